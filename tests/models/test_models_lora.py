"""LoRA attach / get / set on the tiny backbones, and A drawn from a seed."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from fedlpp.models.backbone import load_backbone
from fedlpp.models.lora import (
    adapter_shapes,
    attach_lora,
    get_adapter,
    initial_adapter,
    lora_a_from_seed,
    set_adapter,
    set_trainable,
)
from fedlpp.models.pooling import MaskedMeanPooler, declared_pooling, use_mean_pooling


@pytest.fixture(scope="module")
def llama():
    return attach_lora(load_backbone("tiny-llama", "generation"), "generation", r=4, alpha=8, dropout=0.0)


def test_default_targets_and_canonical_names(llama):
    shapes = adapter_shapes(llama)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in shapes
    assert shapes["model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 64)
    assert {n.split(".")[-3] for n in shapes} == {"q_proj", "v_proj"}
    assert all(p.requires_grad is False for n, p in llama.named_parameters() if "lora_" not in n)


def test_targets_chosen_by_the_user_are_wrapped():
    model = attach_lora(
        load_backbone("tiny-llama", "generation"), "generation", r=2, alpha=4, dropout=0.0, targets=("k_proj", "self_attn.o_proj")
    )
    assert {n.split(".")[-3] for n in adapter_shapes(model)} == {"k_proj", "o_proj"}


def test_a_target_that_names_no_layer_is_a_clear_error():
    backbone = load_backbone("tiny-llama", "generation")
    with pytest.raises(ValueError, match=r"query names no layer of this model; its matrix layers are .*q_proj"):
        attach_lora(backbone, "generation", r=2, alpha=4, dropout=0.0, targets=("query", "v_proj"))


def test_set_then_get_round_trips_and_rejects_mismatches(llama):
    adapter = initial_adapter(adapter_shapes(llama), seed=3)
    adapter = {n: t + 0.01 for n, t in adapter.items()}
    set_adapter(llama, adapter)
    back = get_adapter(llama)
    assert all(torch.equal(back[n], adapter[n]) for n in adapter)
    with pytest.raises(KeyError, match="missing"):
        set_adapter(llama, dict(list(adapter.items())[1:]))


def test_a_from_a_seed_is_deterministic_and_peft_shaped():
    shapes = {"x.lora_A.weight": (8, 576), "x.lora_B.weight": (576, 8)}
    a1, a2 = lora_a_from_seed(shapes, 5), lora_a_from_seed(shapes, 5)
    assert list(a1) == ["x.lora_A.weight"]
    assert torch.equal(a1["x.lora_A.weight"], a2["x.lora_A.weight"])
    assert not torch.equal(a1["x.lora_A.weight"], lora_a_from_seed(shapes, 6)["x.lora_A.weight"])
    bound = 1 / math.sqrt(576)  # kaiming_uniform(a=sqrt(5)) as peft initialises A
    assert a1["x.lora_A.weight"].abs().max() <= bound
    assert a1["x.lora_A.weight"].abs().max() > 0.9 * bound
    init = initial_adapter(shapes, 5)
    assert torch.equal(init["x.lora_A.weight"], a1["x.lora_A.weight"])
    assert torch.count_nonzero(init["x.lora_B.weight"]) == 0, "B starts at zero: the first proxy is the backbone"


def test_set_trainable_freezes_a_for_ffa(llama):
    shapes = adapter_shapes(llama)
    set_trainable(llama, [n for n in shapes if ".lora_B." in n])
    flags = {n: p.requires_grad for n, p in llama.named_parameters() if "lora_" in n}
    assert not any(v for n, v in flags.items() if "lora_A" in n)
    assert all(v for n, v in flags.items() if "lora_B" in n)


def test_tiny_bert_classifier_head_is_part_of_the_adapter():
    model = attach_lora(load_backbone("tiny-bert", "classification", 3), "classification", r=4, alpha=8, dropout=0.0)
    shapes = adapter_shapes(model)
    assert shapes["classifier.modules_to_save.weight"] == (3, 64)


def test_mean_pooling_averages_only_the_real_tokens():
    backbone = load_backbone("tiny-bert", "classification", 2, pooling="mean")
    tok, model = backbone.tokenizer, backbone.model
    short = tok(["good"], return_tensors="pt")
    padded = tok(["good", "a much longer sentence than the first one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        alone = model(**short).logits[0]
        in_batch = model(**padded).logits[0]
        hidden = model.bert(**short).last_hidden_state
        by_hand = model.classifier(hidden.mean(1))[0]
    assert torch.allclose(alone, in_batch, atol=1e-5)  # the padding of the longer sentence is not averaged in
    assert torch.allclose(alone, by_hand, atol=1e-5)
    cls = load_backbone("tiny-bert", "classification", 2, pooling="cls").model
    assert not isinstance(cls.bert.pooler, MaskedMeanPooler)


def test_auto_pooling_is_what_the_checkpoint_declares(tmp_path):
    assert declared_pooling(tmp_path) == "cls"  # no sentence-transformers file
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert declared_pooling(tmp_path) == "mean"
    minilm = load_backbone("minilm-l6", "classification", 2)  # shipped sentence-transformers model: mean
    assert isinstance(minilm.model.bert.pooler, MaskedMeanPooler)


def test_mean_pooling_needs_an_encoder_with_a_pooler():
    with pytest.raises(ValueError, match="needs a BERT-style encoder"):
        use_mean_pooling(load_backbone("tiny-llama", "generation").model)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model.name: 'no-such-model' is not a short name"):
        load_backbone("no-such-model", "generation")
    with pytest.raises(ValueError, match="for generation tasks"):
        load_backbone("tiny-llama", "classification", 2)


def _live_modules() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, nn.Module))


@pytest.mark.integration
def test_memory_does_not_grow_with_the_number_of_clients(tmp_path):
    """One backbone for all clients: a round with N=40 creates no more modules than with N=4."""
    from fedlpp.config import load_config
    from fedlpp.engine.local import local_transport
    from fedlpp.engine.server import run_round, start_round_steps
    from fedlpp.engine.setup import build_run, round_clients

    counts = []
    baseline = _live_modules()
    for n in (4, 40):
        cfg = load_config(
            None,
            [
                "model.name=tiny-llama",
                "data.num_train=400",
                "data.num_eval=2",
                f"fl.num_clients={n}",
                "fl.clients_per_round=2",
                "fl.local_steps=1",
                "train.batch_size=2",
                "eval.every=99",
                "fl.rounds=2",
            ],
        )
        run = build_run(cfg)
        transport, steps = local_transport(run), start_round_steps(run.server, tmp_path, resume=False)
        adapter = run.server.initial_adapter()
        for round_ in (1, 2):
            adapter = run_round(run.server, steps, transport, adapter, round_, round_clients(cfg, round_), None).adapter
        counts.append(_live_modules() - baseline)  # building and running included
        del run, transport, steps
    assert counts[0] == counts[1] > 0, counts
