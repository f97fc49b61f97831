"""The machine a party's model runs on: device choice, precision, nf4, checkpointing, memory (issue 23).

Everything here runs on the CPU with the tiny backbones; tests/gpu has the CUDA checks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fedlpp.algorithms import client
from fedlpp.algorithms.client import LocalTraining, PlainSteps, ScaledOptimizer, shuffled_batches, train_client
from fedlpp.config import ConfigError, load_config
from fedlpp.data import collate, encode_for_generation
from fedlpp.data.weather import make_weather
from fedlpp.engine.setup import build_model
from fedlpp.evaluation.evaluate import mean_loss
from fedlpp.models import backbone, objective
from fedlpp.models.backbone import load_backbone
from fedlpp.models.lora import adapter_parameters, attach_lora, get_adapter, inputs_as_computed, set_adapter
from fedlpp.models.machine import (
    CPU,
    Machine,
    import_bitsandbytes,
    recomputing,
    resolve_device,
    rss_high_water_mark,
    silent_kernel_fetch,
)
from fedlpp.privacy.dp_sgd import DpSgd, DpSgdSteps
from fedlpp.privacy.randomness import SeededRandomness

OPTS = LocalTraining(lr=1e-2, weight_decay=0.0, max_grad_norm=0.0)
NO_CUDA = not torch.cuda.is_available()


def lora_model(machine: Machine = CPU, dropout: float = 0.0):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # peft draws A from the global generator: the same start every time
        return attach_lora(
            load_backbone("tiny-llama", "generation", machine=machine), "generation", r=4, alpha=8, dropout=dropout
        )


@pytest.fixture(scope="module")
def features():
    model = load_backbone("tiny-llama", "generation")
    return encode_for_generation(model.tokenizer, make_weather(24, 4, 0).train, 48)


def steps(model, features, machine: Machine = CPU, rule=None, n: int = 2):
    start = get_adapter(model)
    batches = shuffled_batches(features, n, 8, 0, seed=1)
    return train_client(model, "generation", start, list(start), batches, OPTS, 0, rule, machine)


# --- configuration and device choice ---------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.device", "gpu", "valid devices are auto, cpu, cuda, cuda:N"),
        ("train.device", "cuda:x", "valid devices"),
        ("train.precision", "int8", "valid choices are 'fp32', 'bf16', 'fp16'"),
        ("model.quantize", "int4", "valid choices are 'none', 'nf4'"),
    ],
)
def test_bad_machine_keys_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"{key}.*{message}"):
        load_config(None, [f"{key}={value}"])


def test_fp16_with_dp_sgd_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="train.precision: fp16 needs loss scaling"):
        load_config(None, ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1", "train.precision=fp16"])


def test_defaults_run_everywhere():
    train, model = load_config(None, []).train, load_config(None, []).model
    assert (train.device, train.precision, train.gradient_checkpointing, model.quantize) == ("auto", "fp32", False, "none")
    if NO_CUDA and resolve_device("auto") != "mps":
        assert resolve_device("auto") == "cpu"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_asking_for_cuda_without_it_is_refused_naming_the_key(device):
    with pytest.raises(ConfigError, match=f"train.device: '{device}' was asked for but torch sees no CUDA GPU"):
        resolve_device(device)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_a_run_on_a_missing_gpu_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    from fedlpp.engine import local, setup

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(setup, "load_backbone", no_model)
    cfg = load_config(None, ["model.name=tiny-llama", "train.device=cuda", "fl.rounds=1"])
    with pytest.raises(ConfigError, match="train.device"):
        local.run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("capability", "precision", "warned"), [((7, 5), "bf16", True), ((8, 0), "bf16", False), ((7, 0), "fp16", False)]
)
def test_bf16_on_a_gpu_without_native_bf16_is_warned_about_naming_the_card(monkeypatch, caplog, capability, precision, warned):
    """A T4 or V100 runs bf16 emulated, many times slower: the user hears it, with the card and what to use instead."""
    from fedlpp.engine import setup

    class Loaded(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(setup, "machine_of", lambda cfg: Machine("cuda:0", precision))
    monkeypatch.setattr(Machine, "reset_peak_memory", lambda self: None)  # no CUDA here to start
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(setup, "load_backbone", no_model)
    with caplog.at_level("WARNING", logger="fedlpp"), pytest.raises(Loaded):
        setup.build_model(load_config(None, ["model.name=tiny-llama"]), "generation", 0)
    said = [r.getMessage() for r in caplog.records if "native bf16" in r.getMessage()]
    if warned:
        assert len(said) == 1 and said[0].startswith("train.precision=bf16 on Tesla T4 (compute capability 7.5): ")
        assert "train.precision=fp16 is its native half precision" in said[0]
    else:
        assert said == []


# --- precision: the base in its dtype, the adapter float32 --------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_base_keeps_the_adapter_float32(precision, features):
    machine = Machine("cpu", precision)
    model = lora_model(machine)
    base_linear = model.get_base_model().model.layers[0].mlp.up_proj
    assert base_linear.weight.dtype == machine.dtype
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
    result = steps(model, features, machine)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in result.delta.values())
    assert all(torch.isfinite(t).all() for t in result.delta.values())
    assert any(t.abs().max() > 0 for t in result.delta.values()), "the steps moved nothing"
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_bf16_steps_follow_fp32_closely(features):
    """SGD (a step proportional to the gradient; AdamW's sign-like first steps would magnify rounding)."""
    sgd = LocalTraining(lr=1.0, weight_decay=0.0, max_grad_norm=0.0, optimizer="sgd")

    def delta(machine):
        model = lora_model(machine)
        start = get_adapter(model)
        result = train_client(
            model, "generation", start, list(start), shuffled_batches(features, 2, 8, 0, seed=1), sgd, 0, machine=machine
        )
        return torch.cat([t.flatten() for t in result.delta.values()])

    full, half = delta(CPU), delta(Machine("cpu", "bf16"))
    assert float(full.norm()) > 0
    assert float((half - full).norm() / full.norm()) < 0.05


def test_fp16_steps_unscale_before_clipping(features):
    """Loss scaling (x65536) must be undone before the clip: one SGD step of lr 1 then moves exactly max_grad_norm."""
    machine = Machine("cpu", "fp16")
    model = lora_model(machine)
    params = list(adapter_parameters(model).values())
    rule = PlainSteps(1e-3, machine)
    with rule.attach(model, params, torch.optim.SGD([torch.zeros(1)], lr=0.1)) as optimizer:
        assert isinstance(optimizer, ScaledOptimizer) and rule.scaler is not None
    start = get_adapter(model)
    sgd = LocalTraining(lr=1.0, weight_decay=0.0, max_grad_norm=1e-3, optimizer="sgd")
    result = train_client(
        model,
        "generation",
        start,
        list(start),
        shuffled_batches(features, 1, 8, 0, seed=1),
        sgd,
        0,
        PlainSteps(1e-3, machine),
        machine,
    )
    moved = float(torch.cat([t.flatten() for t in result.delta.values()]).norm())
    assert 0.9e-3 < moved <= 1.0001e-3


def test_dp_sgd_refuses_fp16_itself():
    with pytest.raises(ValueError, match="fp16"):
        DpSgdSteps(DpSgd(1.0, 1.0, 8), SeededRandomness(0), Machine("cpu", "fp16"))


# --- nf4: a 4-bit base that trains, evaluates and keeps training correctly ------------------------


def nf4_model():
    return lora_model(Machine("cpu", "bf16", "nf4"))


def test_nf4_base_is_4bit_with_embeddings_in_the_compute_dtype():
    bnb = import_bitsandbytes()
    model = nf4_model()
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16  # not upcast to fp32 (prepare_model_for_kbit_training would)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())


@pytest.mark.skipif(
    not import_bitsandbytes().functional.has_avx512bf16(),
    reason="this CPU has no AVX512-BF16: bitsandbytes never repacks here, so there is nothing to catch",
)
def test_training_after_an_evaluation_is_unaffected_on_a_4bit_base(features):
    """DESIGN 5.1: a no_grad forward must not repack the 4-bit weights under the model that keeps training."""
    model = nf4_model()
    start = get_adapter(model)
    before = steps(model, features, Machine("cpu", "bf16", "nf4"))
    set_adapter(model, start)
    evaluation = encode_for_generation(load_backbone("tiny-llama", "generation").tokenizer, make_weather(4, 4, 1).eval, 48)
    from fedlpp.evaluation.evaluate import EvalSet

    mean_loss(model, EvalSet("generation", tuple(evaluation)), 0, 4, machine=Machine("cpu", "bf16", "nf4"))
    model.eval()
    with torch.no_grad():  # the exact pattern that repacks: eval mode, no gradients, a CPU input
        model(input_ids=torch.tensor([evaluation[0]["input_ids"]]))
    after = steps(model, features, Machine("cpu", "bf16", "nf4"))
    for name in before.delta:
        assert torch.equal(before.delta[name], after.delta[name]), name


def test_bitsandbytes_is_imported_only_for_a_4bit_backbone_and_never_fetches_a_kernel():
    """A fresh process where `kernels` records every fetch. A LoRA on a full-precision backbone leaves bitsandbytes
    unimported (peft would import it, and torch's compiler with it); a 4-bit one imports it without a fetch, and
    peft wraps its 4-bit layers."""
    script = (
        "import sys\n"
        "import kernels\n"
        "calls = []\n"
        "def get_kernel(*args, **kwargs):\n"
        "    calls.append(args)\n"
        "    raise RuntimeError('no network')\n"
        "kernels.get_kernel = get_kernel\n"
        "import fedlpp.engine.setup, fedlpp.engine.flower.client_app\n"
        "from fedlpp.models.backbone import load_backbone\n"
        "from fedlpp.models.lora import attach_lora\n"
        "from fedlpp.models.machine import Machine\n"
        "attach_lora(load_backbone('tiny-llama', 'generation'), 'generation', r=4, alpha=8, dropout=0.0)\n"
        "print('imported after fp32', 'bitsandbytes' in sys.modules)\n"
        "nf4 = load_backbone('tiny-llama', 'generation', machine=Machine('cpu', 'bf16', 'nf4'))\n"
        "model = attach_lora(nf4, 'generation', r=4, alpha=8, dropout=0.0)\n"
        "q = model.get_base_model().model.layers[0].self_attn.q_proj\n"
        "print('lora layer', type(q).__module__, type(q.base_layer).__name__)\n"
        "print('fetches', len(calls))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported after fp32 False" in out.stdout
    assert "lora layer peft.tuners.lora.bnb Linear4bit" in out.stdout
    assert "fetches 0" in out.stdout
    with silent_kernel_fetch(), pytest.raises(ImportError):
        importlib.import_module("kernels")


def test_a_4bit_classifier_keeps_its_head_in_full_precision():
    bnb = import_bitsandbytes()
    backbone = load_backbone("tiny-bert", "classification", 2, "cls", Machine("cpu", "bf16", "nf4"))
    model = attach_lora(backbone, "classification", r=4, alpha=8, dropout=0.0)
    base = model.get_base_model()
    assert isinstance(base.bert.encoder.layer[0].intermediate.dense, bnb.nn.Linear4bit)
    assert not isinstance(base.classifier.original_module, bnb.nn.Linear4bit)  # the trained head is a copy of it
    head = [n for n in adapter_parameters(model) if "classifier" in n]
    assert head and all(adapter_parameters(model)[n].dtype == torch.float32 for n in head)


# --- gradient checkpointing, also under DP-SGD ----------------------------------------------------


def recomputes(model) -> list[bool]:
    """Records, for every forward of the first q_proj, whether it was checkpointing's recompute."""
    seen: list[bool] = []
    model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: seen.append(recomputing()))
    return seen


def test_checkpointing_takes_the_same_step(features):
    plain = steps(lora_model(), features)
    machine = Machine("cpu", gradient_checkpointing=True)
    model = lora_model(machine)
    seen = recomputes(model)
    checkpointed = steps(model, features, machine)
    assert seen.count(True) == seen.count(False) == 2, "each step's forward is recomputed once in backward"
    for name in plain.delta:
        torch.testing.assert_close(checkpointed.delta[name], plain.delta[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("base", [CPU, Machine("cpu", "bf16", "nf4")], ids=["fp32", "nf4"])
def test_dp_sgd_with_checkpointing_takes_the_same_step(base, features):
    """Per-example clipping sees each example's gradient once: the recompute inside backward is not recorded."""

    def dp_step(machine, count=False):
        rule = DpSgdSteps(DpSgd(0.0, 1e-3, 8), SeededRandomness(0), machine)  # clip small: every example is clipped
        model = lora_model(machine)
        seen = recomputes(model)
        result = steps(model, features, machine, rule)
        assert (True in seen) == count, "checkpointing recomputes exactly when it is on"
        return result

    plain = dp_step(base)
    checkpointed = dp_step(Machine(base.device, base.precision, base.quantize, True), count=True)
    for name in plain.delta:
        torch.testing.assert_close(checkpointed.delta[name], plain.delta[name], rtol=1e-3, atol=1e-6)
    assert any(t.abs().max() > 0 for t in plain.delta.values())


@pytest.mark.parametrize("machine", [Machine("cpu", "bf16"), Machine("cpu", "bf16", "nf4")], ids=["bf16", "nf4"])
def test_dp_sgd_learns_on_a_half_precision_or_4bit_base(machine, features):
    rule = DpSgdSteps(DpSgd(0.5, 1.0, 8), SeededRandomness(0), machine)
    result = steps(lora_model(machine), features, machine, rule)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in result.delta.values())
    assert any(t.abs().max() > 0 for t in result.delta.values())


# --- what a half-precision step keeps for backward ------------------------------------------------


def kept_for_backward(model, batch, machine: Machine) -> list[torch.Tensor]:
    """Every tensor autograd keeps from one training forward (a checkpointed block's own are not kept)."""
    kept: list[torch.Tensor] = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    with inputs_as_computed(model, machine), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), machine.autocast():
        objective.example_losses(model, batch, "generation").sum()
    return kept


def test_a_bf16_step_keeps_no_float32_copy_of_the_hidden_states(features):
    """A norm upcasts its input to normalise it; checkpointed, it keeps the bf16 input and not that copy."""
    machine = Machine("cpu", "bf16")
    model = lora_model(machine)
    batch = collate(features[:4], 0)
    grid = batch["input_ids"].numel() * model.get_base_model().config.hidden_size  # one value per token and feature
    kept = kept_for_backward(model, batch, machine)
    assert kept, "the forward kept nothing: it was not a training forward"
    wide = [t for t in kept if t.dtype == torch.float32 and t.numel() >= grid]
    assert wide == [], f"float32 copies of the hidden states kept for backward: {[tuple(t.shape) for t in wide]}"


def test_a_bf16_lora_layer_keeps_its_input_not_a_copy(features):
    """q_proj and v_proj read one normalised input; their LoRA A products keep that one tensor for backward."""
    machine = Machine("cpu", "bf16")
    model = lora_model(machine)
    layers = model.get_base_model().config.num_hidden_layers
    batch = collate(features[:4], 0)
    rows = (batch["input_ids"].numel(), model.get_base_model().config.hidden_size)  # a linear's input, token by token
    kept = kept_for_backward(model, batch, machine)
    inputs = {t.untyped_storage().data_ptr() for t in kept if t.dtype == torch.bfloat16 and tuple(t.shape) == rows}
    assert len(inputs) == layers, f"{len(inputs)} kept copies of the LoRA layers' inputs for {layers} layers"


@pytest.mark.parametrize(
    "machine", [Machine("cpu", "bf16"), Machine("cpu", "bf16", gradient_checkpointing=True)], ids=["bf16", "bf16+ckpt"]
)
def test_what_a_bf16_step_keeps_does_not_change_the_step(machine, features, monkeypatch):
    """Recomputed norms and uncast LoRA inputs compute the same values: the step is bit for bit the same."""
    saving = steps(lora_model(machine), features, machine)
    monkeypatch.setattr(backbone, "recompute_norms", lambda model: None)
    monkeypatch.setattr(client, "inputs_as_computed", lambda model, machine: contextlib.nullcontext())
    plain = steps(lora_model(machine), features, machine)
    for name in plain.delta:
        assert torch.equal(saving.delta[name], plain.delta[name]), name
    assert saving.losses == plain.losses


def test_lora_dropout_keeps_peft_s_float32_input(features):
    """Dropout on a bf16 input would scale by a rounded 1 / (1 - p): with dropout peft casts to float32 first."""
    machine = Machine("cpu", "bf16")
    model = lora_model(machine, dropout=0.1)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with inputs_as_computed(model, machine):
        assert layer.cast_input_dtype_enabled
    with inputs_as_computed(lora_model(machine), machine):
        pass  # without dropout the cast is off inside (the tests above) and back on after
    assert layer.cast_input_dtype_enabled


def test_a_local_checkpoint_loads_without_hub_kernels(tmp_path, monkeypatch):
    """transformers 5 would swap layers for Hub kernels (fetched on CUDA) and swap them again at train()/eval()."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # "NO" there would switch them off without fedlpp
    model, tokenizer = backbone._tiny_llama("generation", 0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), "generation", machine=Machine("cpu", "bf16")).model
    assert not loaded.use_kernels
    loaded.train()
    norm = loaded.model.layers[0].post_attention_layernorm
    assert isinstance(norm.forward, functools.partial), "train() put the norm's own forward back: no recompute"


def test_a_folder_of_pytorch_weights_loads_through_transformers_in_the_machine_s_dtype(tmp_path):
    """No safetensors file: transformers reads pytorch_model.bin itself, with the config fedlpp read first."""
    model, tokenizer = backbone._tiny_llama("generation", 0)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = load_backbone(str(tmp_path), "generation", machine=Machine("cpu", "bf16")).model
    assert not loaded.use_kernels
    loaded_weights = loaded.state_dict()
    for name, weight in model.state_dict().items():
        assert loaded_weights[name].dtype == torch.bfloat16, name
        assert torch.equal(loaded_weights[name], weight.to(torch.bfloat16)), name


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_checkpoint_saved_quantized_is_refused_before_its_weights_load(tmp_path, monkeypatch, quantize):
    """Its own 4-bit layers would load whatever model.quantize says, past fedlpp's CPU repack guard."""
    model, tokenizer = backbone._tiny_llama("generation", 0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(backbone, "_read_tensor_by_tensor", None)  # reading a weight would fail differently
    with pytest.raises(ConfigError, match=r"model.name: .* is saved already quantized \(bitsandbytes\).*model.quantize=nf4"):
        load_backbone(str(tmp_path), "generation", machine=Machine("cpu", "bf16", quantize))


@pytest.mark.parametrize("base", ["meta-llama/Llama-3.2-1B", None])
def test_an_adapter_folder_as_the_model_is_refused_naming_its_base(tmp_path, base):
    """A run's adapter/ (peft's format) given as model.name: the error says which base model to name instead."""
    settings = {"peft_type": "LORA", "r": 8} | ({"base_model_name_or_path": base} if base else {})
    (tmp_path / "adapter_config.json").write_text(json.dumps(settings))
    expected = re.escape(base) if base else "base_model_name_or_path in adapter_config.json"
    with pytest.raises(ConfigError, match=rf"model.name: .* is a LoRA adapter .*name its base model \({expected}\)"):
        load_backbone(str(tmp_path), "generation")


# --- the loss at a large vocabulary ---------------------------------------------------------------


def test_chunked_cross_entropy_equals_the_plain_one_with_its_gradient(monkeypatch):
    monkeypatch.setattr(objective, "CE_CHUNK", 50)  # 5 rows of a 10-way vocabulary per chunk
    logits = torch.randn(23, 10, requires_grad=True)
    targets = torch.randint(0, 10, (23,))
    targets[3] = objective.IGNORE
    chunked = objective.token_cross_entropy(logits, targets)
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), logits)
    plain = F.cross_entropy(logits, targets, ignore_index=objective.IGNORE, reduction="none")
    (g_plain,) = torch.autograd.grad(plain.square().sum(), logits)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(g_chunked, g_plain)
    assert float(chunked[3]) == 0.0


def _model_head_losses(model, batch):
    """The losses from the model's own logits (its forward computes the head over the kept positions)."""
    logits, labels = objective.forward_logits(model, batch, "generation")
    return objective.losses_from_logits(logits, labels, "generation")


@pytest.mark.parametrize(
    "machine, tolerance",
    [
        (CPU, 1e-5),
        (Machine("cpu", gradient_checkpointing=True), 1e-5),
        (Machine("cpu", "bf16"), 2e-2),  # the gradient is rounded to bf16 before, not after, its scaling
        (Machine("cpu", "fp16"), 2e-2),
    ],
    ids=["fp32", "checkpointing", "bf16", "fp16"],
)
def test_the_fused_head_gives_the_losses_and_gradients_of_the_model_s_own_logits(machine, tolerance, features, monkeypatch):
    model = lora_model(machine)
    assert objective.fused_head(model) is not None, "tiny-llama is a LlamaForCausalLM: its head runs fused"
    monkeypatch.setattr(objective, "CE_CHUNK", 5 * model.get_base_model().get_output_embeddings().out_features)
    params = list(adapter_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    model.train()
    batch, weights = collate(features[:8], 0), torch.arange(1.0, 9.0)  # unequal weights: each example's gradient counts
    batch["labels"][3] = objective.IGNORE  # an example with nothing scored: loss 0, no gradient
    with machine.autocast():
        fused = objective.example_losses(model, batch, "generation")
    g_fused = torch.autograd.grad((fused * weights).sum(), params)
    with machine.autocast():
        own = _model_head_losses(model, batch)
    g_own = torch.autograd.grad((own * weights).sum(), params)
    torch.testing.assert_close(fused, own, rtol=tolerance, atol=tolerance)
    assert float(fused[3]) == 0.0
    assert any(g.abs().max() > 0 for g in g_own)
    for a, b in zip(g_fused, g_own, strict=True):  # within ``tolerance`` of each gradient's norm
        assert float((a - b).norm()) <= tolerance * float(b.norm()), (float((a - b).norm()), float(b.norm()))


def test_the_fused_head_projects_only_scored_positions_a_chunk_at_a_time(features, monkeypatch):
    """Neither the [N, V] logits nor their gradient is ever whole, prompt rows are never projected, nothing is redone."""
    model = lora_model()
    head = model.get_base_model().get_output_embeddings()
    monkeypatch.setattr(objective, "CE_CHUNK", 5 * head.out_features)
    rows: list[int] = []
    linear = F.linear

    def spy(x, weight, bias=None):
        if weight is head.weight:
            rows.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)
    model.train()
    batch = collate(features[:8], 0)
    losses = objective.example_losses(model, batch, "generation")
    scored = int((batch["labels"][:, 1:] != objective.IGNORE).sum())  # position t is scored when label t+1 is
    assert max(rows) == 5 and sum(rows) == scored < batch["labels"].numel() / 2
    losses.sum().backward()
    assert sum(rows) == scored  # backward only scales the gradients the forward pass took


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3", "gemma2", "gemma3_text"])
def test_the_other_fused_families_give_their_own_losses_and_gradients(family):
    import transformers

    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        sliding_window=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        final_logit_softcapping=0.5,  # Gemma 2 and 3 (with the head scaled below, tanh saturates: the cap shapes the loss)
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)  # logits well beyond the cap, where tanh bends
    model.get_output_embeddings().weight.requires_grad_(False)  # frozen, as every fedlpp backbone's
    head = objective.fused_head(model)
    assert head is not None and head.softcap == (0.5 if family.startswith(("gemma2", "gemma3")) else None)
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 64, (3, 12), generator=generator)
    labels[:, :5] = objective.IGNORE  # a prompt
    labels[2, 9:] = objective.IGNORE  # padding
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": (labels != objective.IGNORE).long(), "labels": labels}
    batch["attention_mask"][:, :5] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    fused = objective.example_losses(model, batch, "generation")
    g_fused = torch.autograd.grad(fused.sum(), params)
    own = _model_head_losses(model, batch)
    g_own = torch.autograd.grad(own.sum(), params)
    torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-5)  # large logits: float32 rounding
    for a, b in zip(g_fused, g_own, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_trained_or_subclassed_head_keeps_the_model_s_own_forward():
    from transformers import LlamaForCausalLM

    model = lora_model()
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(True)  # a head being trained needs its own gradient, which the fused loss does not give
    assert objective.fused_head(model) is None
    head.weight.requires_grad_(False)

    class Scaled(LlamaForCausalLM):  # a subclass may change what follows the head
        pass

    base = model.get_base_model()
    base.__class__ = Scaled
    assert objective.fused_head(model) is None


def test_a_model_outside_the_plain_head_families_keeps_its_own_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).eval()
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[objective.IGNORE, 2, 3, 4]]),
    }
    assert objective.fused_head(model) is None  # its head could be followed by steps of its own: not taken apart
    torch.testing.assert_close(objective.example_losses(model, batch, "generation"), _model_head_losses(model, batch))


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.skipif(rss_high_water_mark() is None, reason="no /proc: only the process's lifetime peak is known")
def test_peak_memory_is_the_peak_since_the_reset():
    machine = CPU
    machine.reset_peak_memory()
    block = torch.ones(2**26)  # 256 MiB touched
    during = machine.peak_memory()
    del block
    machine.reset_peak_memory()
    after = machine.peak_memory()
    assert during["kind"] == after["kind"] == "process_peak_rss"
    assert during["bytes"] - after["bytes"] >= 200 * 2**20


@pytest.mark.parametrize(
    ("device", "precision", "warned"),
    [("cpu", "fp16", True), ("cpu", "bf16", False), ("cpu", "fp32", False), ("cuda:0", "fp16", False)],
)
def test_fp16_on_the_cpu_is_warned_about(caplog, device, precision, warned):
    """fp16 on a CPU without fp16 matrix units: a SmolLM2-135M step took 31x fp32's time here, bf16's 0.66x."""
    from fedlpp.engine.setup import warn_of_slow_precision

    with caplog.at_level("WARNING", logger="fedlpp"):
        warn_of_slow_precision(Machine(device, precision))
    said = [r.getMessage() for r in caplog.records if "fp16 matmuls" in r.getMessage()]
    if warned:
        assert len(said) == 1 and said[0].startswith("train.precision=fp16 on the CPU: ")
        assert "train.precision=bf16 is fast on CPUs with bf16 instructions" in said[0]
    else:
        assert said == []


@pytest.mark.skipif(rss_high_water_mark() is None, reason="no /proc: only the process's lifetime peak is known")
def test_the_model_load_peak_is_the_loads_own_not_an_earlier_peak_of_the_process():
    """summary.json's model_load_peak_memory_bytes: what loading took, also in a process that peaked before (a sweep)."""
    block = torch.ones(2**27)  # 512 MiB touched, then returned (a block this large is a mapping of its own)
    del block
    earlier_peak = rss_high_water_mark()
    side = build_model(load_config(None, ["model.name=tiny-llama", "train.device=cpu"]), "generation", 0)
    assert side.load_peak_memory < earlier_peak - 256 * 2**20


@pytest.mark.parametrize("machine", [Machine("cpu", "bf16"), Machine("cpu", "bf16", "nf4")], ids=["bf16", "nf4"])
def test_dp_sgd_clips_each_example_to_c_on_a_bf16_base(machine, features):
    """The accountant assumes every clipped per-example gradient has norm <= C: its norm is taken in float32."""
    model = lora_model(machine)
    params = list(adapter_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    clip = 1e-3  # far below every example's gradient norm: each one is clipped
    rule = DpSgdSteps(DpSgd(0.0, clip, 1), SeededRandomness(0), machine)
    model.train()
    for i in range(3):
        with rule.attach(model, params, torch.optim.SGD(params, lr=1.0)) as optimizer:
            rule.backward(
                model, "generation", collate(features[i : i + 1], 0), params
            )  # one example: the sum is its clipped gradient
            optimizer.clip_and_accumulate()
            norm = torch.sqrt(sum((p.summed_grad.double() ** 2).sum() for p in params))
            assert clip * 0.99 < float(norm) <= clip * (1 + 1e-6)
            optimizer.zero_grad(True)


def test_the_lm_head_projects_a_contiguous_slice(features):
    """logits_to_keep hands the head a strided slice; a strided matmul input copies the [V, H] weight per sequence."""
    model = lora_model()
    seen: list[bool] = []
    model.get_base_model().get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    batch = collate(features[:4], 0)
    assert (batch["labels"][:, :4] == objective.IGNORE).all(), "the prompt carries no loss: only a slice is projected"
    objective.forward_logits(model, batch, "generation")  # the model's own forward, as for families not fused
    assert seen == [True]
