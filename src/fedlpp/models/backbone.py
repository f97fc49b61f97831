"""Load a frozen backbone and its tokenizer by short name, Hugging Face id or local path."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.auto_factory import _get_model_class

from fedlpp import registry
from fedlpp.config import ConfigError
from fedlpp.models import shipped
from fedlpp.models.machine import CPU, Machine, checkpoint_contexts, require_bitsandbytes, silent_kernel_fetch
from fedlpp.models.pooling import declared_pooling, use_mean_pooling
from fedlpp.models.source import check_model_name, local_path

log = logging.getLogger(__name__)

KINDS = ("generation", "classification")
TINY_SEED = 1234  # tiny backbones are random but fixed, so a saved adapter always meets the same base


@dataclass
class Backbone:
    """A frozen base model, its tokenizer, and where it came from (for the saved adapter)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # short name, hub id or local path
    default_targets: tuple[str, ...]  # LoRA target modules for this family
    machine: Machine = CPU  # where it lives and in what precision


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def _tiny_llama(kind: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _require_kind("tiny-llama", kind, "generation")
    tokenizer = AutoTokenizer.from_pretrained(str(shipped.smollm2_tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.1,  # wide enough that an adapter can move the logits (tests check learning)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _tiny_bert(kind: str, num_labels: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _require_kind("tiny-bert", kind, "classification")
    tokenizer = AutoTokenizer.from_pretrained(str(shipped.minilm_dir()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=num_labels,  # type: ignore[call-arg]  # one of PretrainedConfig's **kwargs
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = BertForSequenceClassification(config)
    return model, tokenizer


def _require_kind(name: str, kind: str, supported: str) -> None:
    if kind != supported:
        raise ValueError(f"model {name!r} is for {supported} tasks, but the task is {kind}")


def _pretrained(path: str, kind: str, num_labels: int, machine: Machine = CPU) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _load_weights(path, kind, num_labels, machine), tokenizer


def _load_weights(path: str, kind: str, num_labels: int, machine: Machine) -> PreTrainedModel:
    """The checkpoint at ``path`` in the machine's dtype (nf4: its linear layers in 4 bits) on its device."""
    auto = AutoModelForCausalLM if kind == "generation" else AutoModelForSequenceClassification
    # The classification head is new; its initial values come from the caller's seed.
    head: dict[str, Any] = {"num_labels": num_labels} if kind == "classification" else {}
    files = _local_safetensors(path)
    config = AutoConfig.from_pretrained(path, **head)
    _refuse_saved_quantized(path, config)
    with _large_allocations_returned(), silent_kernel_fetch():  # whatever imports bitsandbytes: never the Hub
        if not files:
            return auto.from_pretrained(path, config=config, **_load_kwargs(machine))
        with _read_tensor_by_tensor(files) as state_dict:
            model = _get_model_class(config, auto._model_mapping).from_pretrained(
                None, config=config, state_dict=state_dict, **_load_kwargs(machine)
            )
        return _as_if_loaded_from(model, path)


def _refuse_saved_quantized(path: str, config: Any) -> None:
    """A checkpoint saved already quantized (bitsandbytes, GPTQ, AWQ, ...) would load its own quantized layers
    whatever ``model.quantize`` says, outside what fedlpp checks (on the CPU a 4-bit one would meet the repack
    of DESIGN 5.1); refused before any weight is read."""
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return
    method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
    raise ConfigError(
        f"model.name: {path} is saved already quantized ({method or 'quantization_config in its config'}); fedlpp "
        "quantizes a full-precision checkpoint itself: name the unquantized model, with model.quantize=nf4 for 4 bits"
    )


def _as_if_loaded_from(model: PreTrainedModel, path: str) -> PreTrainedModel:
    """What from_pretrained(path) would also have read: the folder's name and its generation settings."""
    model.config._name_or_path = path
    model.name_or_path = path
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _local_safetensors(path: str) -> list[Path]:
    """The safetensors files of a local checkpoint folder (every shard), or [] for anything else."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


@contextlib.contextmanager
def _read_tensor_by_tensor(files: list[Path]) -> Iterator[dict[str, Any]]:
    """Every tensor of ``files`` as a lazy slice that reads its own bytes when asked (pread, not mmap).

    transformers maps a checkpoint file and keeps it mapped while it converts each tensor: every
    page it touched counts in the process's memory until the end (a 2.5 GB file for Llama-3.2-1B,
    on top of the model it builds). Read tensor by tensor, a weight's source bytes are freed once it
    is converted (to fp32, or to 4 bits): loading peaks near the size of the model it makes.
    """
    with contextlib.ExitStack() as stack:
        state: dict[str, Any] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu", backend="pread"))
            state.update({key: handle.get_slice(key) for key in handle.keys()})  # noqa: SIM118 - safe_open is not iterable
        yield state


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LOADING_MMAP_THRESHOLD = 2**20  # while loading: every buffer of 1 MiB or more is its own mapping, unmapped when freed
AFTER_LOADING_MMAP_THRESHOLD = 2**25  # then: glibc's own ceiling for its adaptive threshold (32 MiB on 64-bit)


@contextlib.contextmanager
def _large_allocations_returned() -> Iterator[None]:
    """Loading frees a source buffer after each converted tensor; glibc would keep those on its heap.

    Its adaptive mmap threshold rises to the size of the largest freed buffer, so later tensors of that
    size come from the heap and the freed ones are never returned: a 1B nf4 load peaked at 2.4 GB of
    RSS for a model of 1.4 GB. While loading, every large buffer gets its own mapping (returned to the
    OS when freed); afterwards the threshold is glibc's ceiling, and what was freed is trimmed.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, AFTER_LOADING_MMAP_THRESHOLD)
            libc.malloc_trim(0)


def _glibc() -> Any:
    """glibc, for mallopt and malloc_trim; None elsewhere (macOS, musl): loading then just peaks higher."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


NOT_QUANTIZED = ("lm_head", "classifier", "score")


def _load_kwargs(machine: Machine) -> dict[str, Any]:
    """from_pretrained's arguments for the machine: dtype, and the 4-bit config for nf4 (QLoRA's settings).

    Hub kernels are off: transformers 5 would otherwise fetch layers (RMSNorm, rotary, activations) from the
    Hugging Face Hub for a CUDA model, a download nobody asked for, and swap every such layer's forward again
    at each train()/eval() (which would undo ``recompute_norms``). The model's own PyTorch code runs everywhere.
    """
    common: dict[str, Any] = {"dtype": machine.dtype, "use_kernels": False}
    if machine.quantize == "none":
        on_cpu = machine.torch_device.type == "cpu"  # elsewhere: loaded straight onto the device, no CPU copy
        return common if on_cpu else {**common, "device_map": {"": machine.device}}
    require_bitsandbytes()  # before transformers imports it: no kernel fetch from the Hub (DESIGN 5.1)
    from transformers import BitsAndBytesConfig

    # A classifier's new head is trained (peft copies it): never quantized.
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=machine.dtype,
        llm_int8_skip_modules=list(NOT_QUANTIZED),
    )
    # Embeddings, norms and the LM head stay unquantized in the compute dtype (not upcast to fp32 as
    # peft's prepare_model_for_kbit_training would: +1 GB at a 128k vocabulary).
    return {**common, "quantization_config": nf4, "device_map": {"": machine.device}}


def _placed(model: PreTrainedModel, kind: str, num_labels: int, machine: Machine) -> PreTrainedModel:
    """A model built in memory (the tiny ones) as the machine wants it: nf4 goes through a saved copy."""
    if machine.quantize == "none":
        return model.to(device=machine.torch_device, dtype=machine.dtype)  # type: ignore[call-arg]  # transformers' wrapped .to
    with tempfile.TemporaryDirectory(prefix="fedlpp-tiny-") as tmp:
        model.save_pretrained(tmp)
        return _load_weights(tmp, kind, num_labels, machine)


Builder = Callable[[str, int, Machine], tuple[PreTrainedModel, PreTrainedTokenizerBase]]


def _tiny(build: Callable[[str, int], tuple[PreTrainedModel, PreTrainedTokenizerBase]]) -> Builder:
    def placed(kind: str, num_labels: int, machine: Machine) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model, tokenizer = build(kind, num_labels)
        return _placed(model, kind, num_labels, machine), tokenizer

    return placed


# The builders of the registered short names (``fedlpp.registry.MODELS``).
def shipped_smollm2(kind: str, num_labels: int, machine: Machine) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _pretrained(str(shipped.smollm2_dir()), kind, num_labels, machine)


def shipped_minilm(kind: str, num_labels: int, machine: Machine) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _pretrained(str(shipped.minilm_dir()), kind, num_labels, machine)


tiny_llama: Builder = _tiny(_tiny_llama)
tiny_bert: Builder = _tiny(_tiny_bert)


def _resolved_pooling(name: str, pooling: str) -> str:
    if pooling != "auto":
        return pooling
    if name not in registry.MODELS:
        return declared_pooling(name)
    checkpoint_dir = registry.MODELS.get(name).traits.get("checkpoint_dir")  # a short name whose checkpoint declares one
    return declared_pooling(registry.load_object(checkpoint_dir)()) if checkpoint_dir else "cls"


_TARGETS = {"llama": ("q_proj", "v_proj"), "bert": ("query", "value")}


def default_lora_targets(model: PreTrainedModel) -> tuple[str, ...]:
    family = getattr(model.config, "model_type", "")
    if family in _TARGETS:
        return _TARGETS[family]
    # Other families: the usual attention projection names, whichever the model has.
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for candidates in (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("qkv_proj",)):
        if set(candidates) <= names:
            return candidates
    raise ValueError(f"no default LoRA targets for model type {family!r}: set lora.target_modules")


def load_backbone(name: str, kind: str, num_labels: int = 0, pooling: str = "auto", machine: Machine = CPU) -> Backbone:
    """A frozen backbone in eval mode, by short name, hub id or local path, on ``machine``'s device in its
    precision (and with its linear layers in 4 bits for nf4).

    ``pooling`` (classifiers): "cls" keeps the model's own pooler, "mean" averages the token
    states, "auto" does what the checkpoint declares (``models.pooling``).
    """
    if kind not in KINDS:
        raise ValueError(f"task kind {kind!r}: valid kinds are {', '.join(KINDS)}")
    check_model_name(name)
    if name in registry.MODELS:
        model, tokenizer = registry.MODELS.get(name).load()(kind, num_labels, machine)
    elif (folder := local_path(name)).exists():
        model, tokenizer = _pretrained(str(folder), kind, num_labels, machine)
    else:
        model, tokenizer = _pretrained(name, kind, num_labels, machine)  # a Hugging Face id
    if kind == "classification" and _resolved_pooling(name, pooling) == "mean":
        use_mean_pooling(model)
    model.requires_grad_(False)
    model.eval()
    if kind == "generation":
        contiguous_head_input(model)
    if machine.quantize != "none":
        keep_4bit_layout(model)
    if machine.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA weights inside each block although the block's inputs
        # need none (transformers 5 wants the choice explicit, DESIGN 5.1).
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_contexts}
        )
    if machine.dtype != torch.float32:
        recompute_norms(model)
    _ensure_pad(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Backbone(model, tokenizer, name, default_lora_targets(model), machine)


def recompute_norms(model: PreTrainedModel) -> None:
    """Each RMSNorm of a bf16 or fp16 model keeps only its input for backward and recomputes the rest there.

    A norm upcasts its input to float32 to normalise it, and autograd keeps that float32 copy: twice the
    input's bytes (128 MiB of the 660 MiB a Llama-3.2-1B-shaped bf16 step of 4 x 128 tokens kept). Checkpointed,
    a norm whose input needs a gradient keeps that bf16 input (64 MiB there), and backward recomputes a few
    elementwise passes: the same values. In float32 the kept tensor is the input itself: nothing is done. Gated
    norms (``*RMSNormGated``, two inputs) are left alone.
    """
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = functools.partial(_recomputed, module.forward)


def _recomputed(forward: Callable[..., torch.Tensor], hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not (torch.is_grad_enabled() and hidden_states.requires_grad):
        return forward(hidden_states, *args, **kwargs)
    return checkpoint(forward, hidden_states, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def contiguous_head_input(model: PreTrainedModel) -> None:
    """The LM head gets a contiguous copy of the hidden states it projects.

    With ``logits_to_keep`` (models.objective) the head sees a strided slice of the hidden states, and
    torch's matmul of a strided [B, T, H] input by the [V, H] weight goes through a batched product that
    materialises the weight once per sequence: +1.5 GB in a Llama-3.2-1B-shaped step of batch 4 (128k
    vocabulary). Copying the slice costs B x T x H values.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else args)


def keep_4bit_layout(model: PreTrainedModel) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference (DESIGN 5.1).

    On a CPU with AVX512-BF16, a forward of a Linear4bit in eval mode without gradients rewrites its
    weight in place into an inference-only layout; the same model then trains on wrong weights (and
    merges wrongly). Evaluation between rounds runs on the model that keeps training, so the repack is
    switched off for every 4-bit layer: inference then takes the same kernels as training.
    """
    bnb = require_bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
