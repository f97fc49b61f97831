"""Whole runs with the scale options (issue 23): a user's own Llama-family checkpoint by local path, in bf16
with a 4-bit base and gradient checkpointing, through `fedlpp run` and `fedlpp eval`, and its exported adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedlpp import rundir
from fedlpp.cli import main
from fedlpp.config import load_config
from fedlpp.engine.setup import check_privacy, client_partitions, load_task_data, round_clients
from fedlpp.models.lora import PeftModel
from fedlpp.models.shipped import smollm2_tokenizer_dir
from fedlpp.privacy.plan import Ledger

pytestmark = pytest.mark.integration

SCALE = ["model.quantize=nf4", "train.precision=bf16", "train.gradient_checkpointing=true"]
SMALL = [
    "fl.rounds=2",
    "fl.num_clients=3",
    "fl.clients_per_round=2",
    "fl.local_steps=2",
    "data.num_train=30",
    "data.num_eval=4",
    "eval.max_new_tokens=6",
    "seed=0",
]


@pytest.fixture(scope="module")
def user_model(tmp_path_factory) -> Path:
    """A small random Llama with a real tokenizer, saved as a user's own checkpoint folder (one safetensors file)."""
    folder = tmp_path_factory.mktemp("my-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(5)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scaled_run(user_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "nf4"
    assert main(["run", f"model.name={user_model}", *SCALE, *SMALL, "--out", str(out), "--quiet"]) == 0
    return out


def test_a_local_checkpoint_runs_with_a_4bit_base_bf16_and_checkpointing(scaled_run):
    summary = json.loads((scaled_run / rundir.SUMMARY).read_text())
    assert summary["rounds"] == 2
    assert summary["machine"] == {"device": "cpu", "precision": "bf16", "quantize": "nf4", "gradient_checkpointing": True}
    assert summary["client_peak_memory_bytes"] > 0 and "GiB" in summary["client_peak_memory"]
    rows = rundir.read_metrics(scaled_run)
    assert all(r["client_peak_memory_bytes"] > 0 for r in rows)
    assert summary["client_peak_memory_bytes"] == max(r["client_peak_memory_bytes"] for r in rows)
    assert torch.isfinite(torch.tensor(summary["global"]["loss"]))
    theta, _ = rundir.load_checkpoint(scaled_run)
    assert all(t.dtype == torch.float32 for t in theta.values()), "theta stays float32 on a 4-bit base"


def test_the_wire_does_not_change_with_the_backbone(scaled_run, user_model, tmp_path):
    out = tmp_path / "fp32"
    assert main(["run", f"model.name={user_model}", *SMALL, "--out", str(out), "--quiet"]) == 0
    full, scaled = (json.loads((d / rundir.SUMMARY).read_text()) for d in (out, scaled_run))
    assert full["bytes_per_client_per_round"] == scaled["bytes_per_client_per_round"]
    assert full["total_bytes"] == scaled["total_bytes"]


def test_fedlpp_eval_scores_the_run_on_its_4bit_base(scaled_run, capsys):
    assert main(["eval", str(scaled_run), "--quiet"]) == 0
    report = json.loads((scaled_run / "eval.json").read_text())
    summary = json.loads((scaled_run / rundir.SUMMARY).read_text())
    assert report["global"]["loss"] == pytest.approx(summary["global"]["loss"], rel=1e-3)


def test_the_exported_adapter_is_an_ordinary_peft_adapter_that_merges_onto_fp32(scaled_run, user_model):
    base = LlamaForCausalLM.from_pretrained(str(user_model), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    model = PeftModel.from_pretrained(base, str(scaled_run / rundir.ADAPTER))
    theta, _ = rundir.load_checkpoint(scaled_run)
    loaded = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    for name, tensor in theta.items():
        assert torch.equal(loaded[name].detach(), tensor), name
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "mode",
    [
        ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "train.batch_size=4"],
        ["privacy.mode=client_dp", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5"],
    ],
    ids=["dp_sgd", "client_dp"],
)
def test_dp_runs_on_a_4bit_base_and_epsilon_does_not_depend_on_precision(mode, user_model, tmp_path):
    out = tmp_path / "nf4"
    assert main(["run", f"model.name={user_model}", *SMALL, *mode, *SCALE, "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / rundir.SUMMARY).read_text())
    full = load_config(None, [f"model.name={user_model}", *SMALL, *mode])  # the same run in fp32, never loaded
    sizes = [len(p) for p in client_partitions(full, load_task_data(full))]
    plan = check_privacy(full, sizes)
    ledger = Ledger(plan.noise_multiplier)
    for round_ in range(1, full.fl.rounds + 1):
        ledger = ledger.after_round(plan, round_clients(full, round_))
    assert summary["privacy"]["epsilon"] == pytest.approx(ledger.epsilon) and ledger.epsilon > 0
    theta, _ = rundir.load_checkpoint(out)
    assert all(torch.isfinite(t).all() for t in theta.values())
