"""LoRA on a frozen backbone: attach with peft, read and write the adapter as plain tensors.

An *adapter* is a ``dict[str, Tensor]`` of every LoRA tensor (A and B of each wrapped layer)
plus, for classifiers, the new classification head. Names are canonical and short
(``model.layers.0.self_attn.q_proj.lora_A.weight``): they are what travels on the wire.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.helpers import disable_input_dtype_casting
from peft.tuners.lora import model as peft_lora_model
from torch import nn

from fedlpp.models.backbone import Backbone
from fedlpp.models.machine import Machine, silent_kernel_fetch

__all__ = ["Adapter", "PeftModel", "attach_lora", "get_adapter", "set_adapter"]

Adapter = dict[str, torch.Tensor]

_PREFIX = "base_model.model."


def bitsandbytes_imported() -> bool:
    """Whether a layer of this process can be a bitsandbytes one: only once bitsandbytes is imported."""
    return sys.modules.get("bitsandbytes") is not None


def _peft_checks_only_imported_bitsandbytes() -> None:
    """peft looks for bitsandbytes' 4- and 8-bit layer types whenever bitsandbytes is installed, importing it, and
    bitsandbytes then imports torch's compiler (~1 s and, at the Llama-3.2-1B shape, 48-95 MiB of a step's peak
    RSS, one run each) and tries the Hugging Face Hub for a CPU kernel (DESIGN 5.1). No layer can be of those types
    before bitsandbytes is imported, and a 4-bit backbone imports it first, without the Hub
    (``machine.require_bitsandbytes``): so peft's LoRA looks for them exactly when it is imported. A peft that
    checks elsewhere imports bitsandbytes itself, inside ``attach_lora``'s ``silent_kernel_fetch``."""
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        if callable(getattr(peft_lora_model, name, None)):
            setattr(peft_lora_model, name, bitsandbytes_imported)


_peft_checks_only_imported_bitsandbytes()


def canonical_name(param_name: str) -> str:
    """peft parameter name -> wire name (drops the wrapper prefix and the adapter name)."""
    name = param_name.removeprefix(_PREFIX)
    return name.replace(".default.", ".")


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def attach_lora(backbone: Backbone, kind: str, r: int, alpha: float, dropout: float, targets: Iterable[str] = ()) -> PeftModel:
    """Wrap the frozen backbone with a LoRA adapter (and a trainable head for classifiers)."""
    task_type = TaskType.CAUSAL_LM if kind == "generation" else TaskType.SEQ_CLS
    targets = list(targets) or list(backbone.default_targets)
    check_targets(backbone.model, targets)
    config = PeftLoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates an int but scales by it as a float
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    with silent_kernel_fetch():  # should a peft import bitsandbytes itself: never the Hub
        model = get_peft_model(backbone.model, config)
    keep_adapter_float32(model)
    model.eval()
    return model


def inputs_as_computed(model: nn.Module, machine: Machine) -> contextlib.AbstractContextManager[None]:
    """Under a bf16 or fp16 base's autocast, LoRA's A takes its layer's input in the compute dtype, as it is.

    peft casts the input to A's float32 first, and autocast casts that back for the product: the same values,
    but each LoRA layer then keeps its own copy of the input for backward where the input itself would do
    (q_proj and v_proj share one: 32 MiB of copies in a Llama-3.2-1B-shaped bf16 step of 4 x 128 tokens). Only
    without LoRA dropout: peft drops out after its cast, and dropout on the bf16 input would scale by a rounded
    1 / (1 - p). A no-op in fp32. DP-SGD does not use it: its per-example gradients keep peft's float32 inputs.
    """
    active = machine.dtype != torch.float32 and not _lora_dropout(model)
    return disable_input_dtype_casting(model, active=active)


def _lora_dropout(model: nn.Module) -> bool:
    """Whether any LoRA layer drops out its input (peft puts an Identity where lora_dropout is 0)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and any(not isinstance(d, nn.Identity) for d in dropouts.values()):
            return True
    return False


def keep_adapter_float32(model: nn.Module) -> None:
    """Every adapter tensor in float32 whatever the base's dtype: peft does so for LoRA's A and B, and a
    classifier's new head (a copy of the base's) follows; their gradients and optimizer state then are too."""
    for param in adapter_parameters(model).values():
        if param.dtype != torch.float32:
            param.data = param.data.float()


def layer_names(model: nn.Module) -> list[str]:
    """The short names (last path component) of the model's matrix layers (linear, embedding), sorted."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
        }
    )


def check_targets(model: nn.Module, targets: Iterable[str]) -> None:
    """Every LoRA target must name a layer (peft matches a module's name or a dotted suffix of it)."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"lora.target_modules: {', '.join(missing)} names no layer of this model; "
            f"its matrix layers are {', '.join(layer_names(model))}"
        )


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical name -> the live parameter, for every adapter tensor, in a fixed (sorted) order."""
    params = {canonical_name(n): p for n, p in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    if not params:
        raise ValueError("the model has no LoRA parameters: call attach_lora first")
    return dict(sorted(params.items()))


def copy_adapter(adapter: Mapping[str, torch.Tensor]) -> Adapter:
    return {n: t.clone() for n, t in adapter.items()}


def get_adapter(model: nn.Module) -> Adapter:
    """A float32 CPU copy of the live adapter, wherever the model runs: what the server and the wire see."""
    return {n: p.detach().to(device="cpu", dtype=torch.float32, copy=True) for n, p in adapter_parameters(model).items()}


def set_adapter(model: nn.Module, adapter: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into the live adapter (onto the model's device); every adapter tensor must be given, with its shape."""
    params = adapter_parameters(model)
    if set(adapter) != set(params):
        missing, extra = sorted(set(params) - set(adapter)), sorted(set(adapter) - set(params))
        raise KeyError(f"adapter names do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(adapter[name])


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> None:
    """Only the named adapter tensors receive gradients (FFA-LoRA freezes every lora_A)."""
    wanted = set(trainable)
    for name, param in adapter_parameters(model).items():
        param.requires_grad_(name in wanted)


def lora_a_from_seed(shapes: Mapping[str, tuple[int, ...]], seed: int) -> Adapter:
    """Every lora_A drawn from one seed, as peft initialises it: U(-1/sqrt(in), 1/sqrt(in)).

    This is kaiming_uniform(a=sqrt(5)) on an (r, in) matrix. FFA-LoRA sends only this seed so
    that every party holds a bit-identical A (DESIGN 2.3).
    """
    gen = torch.Generator().manual_seed(seed)
    out: Adapter = {}
    for name in sorted(shapes):
        if is_lora_a(name):
            shape = tuple(shapes[name])  # [r, in_features]
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return out


def initial_adapter(shapes: Mapping[str, tuple[int, ...]], seed: int) -> Adapter:
    """The server's round-0 adapter: A from the seed, B = 0, a classifier head ~ N(0, 0.02²)."""
    adapter = lora_a_from_seed(shapes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in sorted(shapes):
        if name in adapter:
            continue
        shape = tuple(shapes[name])
        if is_lora_b(name) or name.endswith("bias"):
            adapter[name] = torch.zeros(shape)
        else:  # classification head weight (BERT's initializer_range)
            adapter[name] = torch.randn(shape, generator=gen) * 0.02
    return dict(sorted(adapter.items()))


def adapter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in adapter_parameters(model).items()}


def save_peft_adapter(model: PeftModel, adapter: Mapping[str, torch.Tensor], out_dir: Path, base: str) -> None:
    """Write the adapter in peft's format: ``PeftModel.from_pretrained(base_model, out_dir)`` loads it."""
    set_adapter(model, adapter)
    model.peft_config["default"].base_model_name_or_path = base
    # save_embedding_layers=False: peft would otherwise look the base model up on the hub.
    model.save_pretrained(str(out_dir), save_embedding_layers=False)
