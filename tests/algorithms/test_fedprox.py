"""FedProx's proximal term: its gradient is mu (w - w_start), it keeps local steps near the start, mu = 0 is FedAvg."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlpp.algorithms.client import LocalTraining, train_client
from fedlpp.algorithms.fedprox import ProximalTerm
from fedlpp.config import ConfigError, load_config


def test_the_gradient_of_the_term_is_mu_times_the_distance_from_the_start():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    term = ProximalTerm(0.5)
    term.anchor([w])
    with torch.no_grad():
        w.add_(torch.tensor([0.2, -0.4]))
    value = term([w])
    value.backward()
    assert value.item() == pytest.approx(0.5 * 0.5 * (0.2**2 + 0.4**2))
    assert torch.allclose(w.grad, 0.5 * torch.tensor([0.2, -0.4]))


def test_a_larger_mu_keeps_the_local_steps_closer_to_the_broadcast(tiny_llama_setup):
    model, start, trained, batches = tiny_llama_setup

    def delta_norm(mu: float) -> float:
        opts = LocalTraining(lr=0.05, weight_decay=0.0, max_grad_norm=0.0, proximal_mu=mu)
        result = train_client(model, "generation", start, trained, batches(), opts, seed=1)
        return float(torch.sqrt(sum((t**2).sum() for t in result.delta.values())))

    fedavg, twice = delta_norm(0.0), delta_norm(0.0)
    assert fedavg == twice  # mu = 0 adds nothing: the steps are plain FedAvg's, exactly
    assert delta_norm(10.0) < 0.9 * fedavg


def test_the_config_refuses_a_negative_mu_and_dp_sgd():
    assert load_config(None, ["train.proximal_mu=0.01"]).train.proximal_mu == 0.01
    with pytest.raises(ConfigError, match="train.proximal_mu: must be >= 0"):
        load_config(None, ["train.proximal_mu=-1"])
    with pytest.raises(ConfigError, match="train.proximal_mu: FedProx's term is not supported with privacy.mode=dp_sgd"):
        load_config(None, ["train.proximal_mu=0.01", "privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0"])


@pytest.fixture(scope="module")
def tiny_llama_setup():
    from fedlpp.algorithms.client import shuffled_batches
    from fedlpp.data import encode_for_generation, load_task
    from fedlpp.models.backbone import load_backbone
    from fedlpp.models.lora import adapter_shapes, attach_lora, initial_adapter

    backbone = load_backbone("tiny-llama", "generation", 0, "auto")
    model = attach_lora(backbone, "generation", 4, 8.0, 0.0, ())
    shapes = adapter_shapes(model)
    start = initial_adapter(shapes, 3)
    start = {n: (t + 0.01 if ".lora_B." in n else t) for n, t in start.items()}
    features = encode_for_generation(backbone.tokenizer, load_task("weather", num_train=32, num_eval=2).train, 48)
    pad = int(backbone.tokenizer.pad_token_id)
    return model, start, sorted(shapes), lambda: shuffled_batches(features, 6, 4, pad, seed=0)
