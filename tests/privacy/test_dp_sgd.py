"""DP-SGD on a client: per-example gradients, clipping, noise-only steps, the adapter really moves."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule

from fedlpp.algorithms.client import LocalTraining, train_client
from fedlpp.algorithms.steps import ClientData, DpSgdTraining
from fedlpp.config import PrivacyConfig
from fedlpp.data import collate, encode_for_classification, encode_for_generation, load_task
from fedlpp.models.backbone import load_backbone
from fedlpp.models.lora import adapter_parameters, attach_lora, get_adapter, is_lora_b, set_adapter, set_trainable
from fedlpp.models.objective import example_losses
from fedlpp.privacy.dp_sgd import DpSgd, DpSgdSteps, NoisyOptimizer, poisson_batches
from fedlpp.privacy.plan import make_plan
from fedlpp.privacy.randomness import SeededRandomness

OPTS = LocalTraining(lr=0.01, weight_decay=0.0, max_grad_norm=0.0)
OPTS_SGD = LocalTraining(lr=50.0, weight_decay=0.0, max_grad_norm=0.0, optimizer="sgd")  # steps proportional to the gradient


def _setup(kind: str, pooling: str = "auto"):
    if kind == "generation":
        task = load_task("weather", num_train=24, num_eval=2, seed=0)
        backbone = load_backbone("tiny-llama", kind)
        features = encode_for_generation(backbone.tokenizer, task.train, 64)
    else:
        backbone = load_backbone("tiny-bert", kind, 2, pooling)
        features = encode_for_classification(backbone.tokenizer, _sentences(), 32)
    with torch.random.fork_rng():  # peft draws A from the global generator: the same start in every run
        torch.manual_seed(0)
        model = attach_lora(backbone, kind, r=4, alpha=8, dropout=0.0)
    for module in model.modules():  # dropout off (BERT has its own): gradients are compared exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = {
        n: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for n, t in get_adapter(model).items()
    }
    return model, features, start, int(backbone.tokenizer.pad_token_id)


def _sentences():
    from fedlpp.data.schema import Example

    texts = ["a fine film", "dull and long", "the best of the year, truly moving", "no", "awful acting, worse script", "fun"]
    return [Example(prompt=t, target="", label=i % 2, group=str(i % 2)) for i, t in enumerate(texts)]


@pytest.mark.parametrize("kind, pooling", [("generation", "auto"), ("classification", "cls"), ("classification", "mean")])
def test_per_example_gradients_equal_one_example_at_a_time(kind, pooling):
    # mean pooling reads the attention mask through a hook: padded positions must not leak into any example
    model, features, start, pad = _setup(kind, pooling)
    set_adapter(model, start)
    names = list(start)
    set_trainable(model, names)
    params = adapter_parameters(model)
    batch = collate(features[:5], pad)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    model.train()
    example_losses(model, batch, kind).mean().backward()
    per_example = {n: params[n].grad_sample.clone() for n in names}
    wrapped.to_standard_module()
    for n in names:
        params[n].grad = None
    for i in range(5):
        example_losses(model, collate(features[i : i + 1], pad), kind).sum().backward()
        for n in names:
            assert torch.allclose(per_example[n][i], params[n].grad, rtol=1e-4, atol=1e-6), (n, i)
            params[n].grad = None
    assert not any(hasattr(p, "grad_sample") for p in params.values())  # unwrapped cleanly


def _wrapped_sgd(model, start, lr: float, sigma: float, clip: float):
    """Every adapter tensor trained, Opacus hooks on, our DP optimizer over plain SGD (expected batch 4)."""
    set_adapter(model, start)
    set_trainable(model, list(start))
    params = [adapter_parameters(model)[n] for n in start]
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    optimizer = NoisyOptimizer(
        torch.optim.SGD(params, lr=lr),
        noise=SeededRandomness(0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=4,
        loss_reduction="mean",
    )
    return params, wrapped, optimizer


def test_each_example_is_clipped_to_c_before_summing():
    model, features, start, pad = _setup("generation")
    params, wrapped, optimizer = _wrapped_sgd(model, start, lr=0.0, sigma=0.0, clip=1e-3)
    model.train()
    example_losses(model, collate(features[:4], pad), "generation").mean().backward()
    optimizer.pre_step()
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    wrapped.to_standard_module()
    assert 0 < total <= 4 * 1e-3 / 4 * (1 + 1e-4)  # four clipped examples over the expected batch of 4


@pytest.mark.parametrize("freeze_a", [False, True])
def test_a_dp_step_really_changes_the_trained_adapter(freeze_a):
    model, features, start, pad = _setup("generation")
    trained = [n for n in start if is_lora_b(n)] if freeze_a else list(start)
    batches = poisson_batches(features, 2, 0.5, pad, SeededRandomness(0))
    # sigma = 0: only the clipped per-example gradients can move the adapter
    result = train_client(
        model, "generation", start, trained, batches, OPTS, 0, DpSgdSteps(DpSgd(0.0, 1.0, 12), SeededRandomness(1))
    )
    assert set(result.delta) == set(trained)
    assert all(float(d.abs().max()) > 0 for d in result.delta.values())
    after = get_adapter(model)
    for n in start:
        if n not in trained:
            assert torch.equal(after[n], start[n])  # FFA-LoRA: A never moves
    # A second client on the same shared model still trains (no stale hooks from the first).
    again = train_client(
        model,
        "generation",
        start,
        trained,
        poisson_batches(features, 1, 0.5, pad, SeededRandomness(2)),
        OPTS,
        0,
        DpSgdSteps(DpSgd(0.5, 1.0, 12), SeededRandomness(3)),
    )
    assert all(float(d.abs().max()) > 0 for d in again.delta.values())


def test_sgd_under_dp_steps_in_proportion_to_the_clipped_gradient():
    # train.optimizer = "sgd": one step moves the adapter by -lr x (the mean clipped gradient), so halving C
    # (every example clipped) halves the step; AdamW's first step would be the same size for either C.
    model, features, start, pad = _setup("generation")
    sgd = OPTS_SGD  # lr 50: deltas well above float32 rounding

    def step(opts: LocalTraining, clip: float) -> torch.Tensor:
        batches = poisson_batches(features, 1, 0.5, pad, SeededRandomness(0))
        delta = train_client(
            model, "generation", start, list(start), batches, opts, 0, DpSgdSteps(DpSgd(0.0, clip, 12), SeededRandomness(1))
        ).delta
        return torch.cat([d.flatten() for d in delta.values()])

    small, large = step(sgd, 1e-4), step(sgd, 2e-4)
    assert float(small.abs().max()) > 0
    assert torch.allclose(large, 2 * small, rtol=1e-3, atol=1e-7)  # float32 rounding of start + delta
    adam_small, adam_large = step(OPTS, 1e-4), step(OPTS, 2e-4)
    assert float(adam_large.norm() / adam_small.norm()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("kind, pooling", [("generation", "auto"), ("classification", "mean")])
@pytest.mark.parametrize("rule", ["dp", "dp with noise", "plain"])
def test_a_large_batch_in_length_chunks_steps_as_one_batch(monkeypatch, rule, kind, pooling):
    # 70 examples run as two chunks (64 + 6); the step must equal the unchunked one, DP or not,
    # and with noise it is drawn once for the batch (the same seeded draw as the unchunked step's).
    # Mean pooling averages over the mask: a chunk cut to its own longest must not change an example's mean.
    model, features, start, pad = _setup(kind, pooling)
    by_length = sorted(features, key=lambda f: len(f["input_ids"]))
    shorter, longest = by_length[:-1], by_length[-1]  # only the second chunk holds the longest: the first is cut shorter
    batch = collate([shorter[i % len(shorter)] for i in range(64)] + [longest] * 6, pad)
    sigma = 0.5 if rule == "dp with noise" else 0.0

    def step() -> torch.Tensor:
        steps = DpSgdSteps(DpSgd(sigma, 1e-3, 70), SeededRandomness(1)) if rule != "plain" else None
        result = train_client(model, kind, start, list(start), [batch], OPTS_SGD, 0, steps)
        return torch.cat([d.flatten() for d in result.delta.values()])

    chunked = step()
    monkeypatch.setattr("fedlpp.privacy.dp_sgd.length_chunks", lambda b: [dict(b)])
    monkeypatch.setattr("fedlpp.algorithms.client.length_chunks", lambda b: [dict(b)])
    whole = step()
    assert float(whole.abs().max()) > 0
    # float32 sums in another order: rtol as before, atol scaled to the step (lr-50 SGD moves a classifier's
    # head by ~8, an LM's LoRA by ~0.005; 1.5e-5 of that is below the old absolute 1e-7 for the LM)
    assert torch.allclose(chunked, whole, rtol=1e-3, atol=1.5e-5 * float(whole.abs().max()))


def test_an_empty_poisson_batch_is_a_noise_only_step():
    model, _features, start, _pad = _setup("generation")
    trained = list(start)
    result = train_client(
        model, "generation", start, trained, iter([None]), OPTS, 0, DpSgdSteps(DpSgd(1.0, 1.0, 8), SeededRandomness(0))
    )
    assert math.isnan(result.losses[0])
    assert all(float(d.abs().max()) > 0 for d in result.delta.values())  # noise moved it


def test_poisson_batches_sample_at_the_rate_and_yield_empty_batches():
    features = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1, 2]}] * 50
    rng = SeededRandomness(0)
    sizes = [0 if b is None else len(b["input_ids"]) for b in poisson_batches(features, 400, 0.1, 0, rng)]
    assert sum(sizes) / len(sizes) == pytest.approx(5.0, rel=0.1)
    tiny = list(poisson_batches(features, 200, 0.001, 0, SeededRandomness(1)))
    assert any(b is None for b in tiny)


def test_noise_on_the_averaged_gradient_has_std_sigma_c_over_the_expected_batch():
    model, _, start, _ = _setup("generation")
    params, wrapped, optimizer = _wrapped_sgd(model, start, lr=1.0, sigma=2.0, clip=0.5)
    before = [p.detach().clone() for p in params]
    for p in params:  # an empty batch: the step is noise only, so the SGD step is exactly -noise / 4
        p.grad_sample = torch.zeros((0, *p.shape))
    optimizer.step()
    wrapped.to_standard_module()
    moved = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params, strict=True)])
    assert moved.numel() > 1000
    assert float(moved.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.08)  # 8%: about 4 standard errors


def test_a_client_smaller_than_the_batch_averages_over_all_its_examples():
    """At q = 1 the expected batch is the client's n, not train.batch_size: the step is the clipped mean."""
    model, features, start, pad = _setup("generation")
    client = DpSgdTraining(
        local_steps=1, batch_size=1000, opts=OPTS_SGD, seed=0, noise_multiplier=0.0, clip_norm=1e-3, secure_noise=False
    )
    result = client.train(model, "generation", start, list(start), ClientData(0, features, pad), 1, None)
    mean = train_client(
        model,
        "generation",
        start,
        list(start),
        [collate(features, pad)],
        OPTS_SGD,
        0,
        DpSgdSteps(DpSgd(0.0, 1e-3, len(features)), SeededRandomness(0)),
    )
    assert len(features) < 1000 and float(mean.delta[next(iter(mean.delta))].abs().max()) > 0
    assert all(torch.allclose(result.delta[n], mean.delta[n], rtol=1e-4, atol=1e-8) for n in mean.delta)


def test_the_plan_warns_when_the_batch_takes_a_whole_client(caplog):
    cfg = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0)
    plan = make_plan(cfg, [30, 5000], batch_size=256, local_steps=2, participation={0: 1, 1: 1}, rounds=1, clients_per_round=2)
    assert plan.rates == {"0": 1.0, "1": 256 / 5000}
    assert "train.batch_size=256 is at least the 30 examples of client 0" in caplog.text
