"""Where a party's model runs and in what precision: chosen once from the config, passed down.

Only the backbone, the client's LoRA, its optimizer state, the batches and evaluation live on
``Machine.device``. The server's side — θ, aggregation, the wire format, SecAgg, accounting —
stays on the CPU in float32 whatever the machine (it is small, and it is the model owner's IP):
``models.lora`` reads adapters back as float32 CPU tensors, so the bytes on the wire do not
change with the device. The LoRA weights themselves stay float32 on any base (peft's
``autocast_adapter_dtype``), as do their gradients and the optimizer state.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import resource
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from fedlpp.config import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> str:
    """``train.device`` as a concrete device: auto is CUDA if torch sees one, else MPS, else CPU.

    An explicit device that this machine lacks is refused here, before any model is loaded.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        return "mps" if _mps_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "mps":
        if not _mps_available():
            raise ConfigError("train.device: 'mps' was asked for but torch sees no Apple GPU; use train.device=auto or cpu")
        return "mps"
    index = int(name.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.device: {name!r} was asked for but torch sees no CUDA GPU (this torch is "
            f"{torch.__version__}: a CPU build has no CUDA; docs/scale.md, 'Installing a CUDA torch', says how to "
            "install one); "
            "use train.device=auto or cpu"
        )
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device: {name!r} was asked for but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return f"cuda:{index}"


def emulated_bf16(machine: Machine) -> str | None:
    """The GPU, named, where ``machine`` asks for bf16 compute that the card lacks natively (CUDA compute
    capability below 8.0: T4, V100), so that torch emulates it, slowly; None wherever bf16 is native or
    not asked for. fp16 is such a card's own half precision."""
    if machine.precision != "bf16" or machine.torch_device.type != "cuda" or torch.version.hip:
        return None
    index = machine.torch_device.index or 0
    major, minor = torch.cuda.get_device_capability(index)
    if major >= 8:
        return None
    return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"


def fp16_on_cpu(machine: Machine) -> bool:
    """fp16 asked of the CPU, where torch's fp16 matmuls are many times slower than fp32's on most CPUs (those
    without fp16 matrix units): a SmolLM2-135M step took 31x fp32's here, bf16's 0.66x (docs/scale.md)."""
    return machine.precision == "fp16" and machine.torch_device.type == "cpu"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@dataclass(frozen=True)
class Machine:
    """The device and numerics of the model a party trains and evaluates."""

    device: str = "cpu"  # a resolved device: cpu | cuda:N | mps
    precision: str = "fp32"  # the frozen backbone's dtype and autocast's: fp32 | bf16 | fp16
    quantize: str = "none"  # the frozen backbone's linear layers: none | nf4 (QLoRA, bitsandbytes)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: valid ones are {', '.join(PRECISIONS)}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The frozen backbone's dtype (nf4: of what is not quantized, and of the 4-bit matmuls' compute)."""
        return PRECISIONS[self.precision]

    def autocast(self) -> AbstractContextManager[Any]:
        """Compute under autocast in the backbone's dtype (nothing to do in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling (its gradients underflow); bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.torch_device.type) if self.precision == "fp16" else None

    def reset_peak_memory(self) -> None:
        """Start measuring a new peak (of CUDA's allocations, or of the process's RSS where Linux can reset it)."""
        if self.torch_device.type == "cuda":
            torch.cuda.init()  # CUDA starts lazily; resetting its allocator's stats before that raises "did you call init?"
            torch.cuda.reset_peak_memory_stats(self.torch_device)
        else:
            reset_peak_rss()

    def peak_memory(self) -> dict[str, Any]:
        """The peak since ``reset_peak_memory``: CUDA's allocated bytes, else the process's peak RSS (the
        process's lifetime peak where the kernel cannot reset it: ``kind`` says which)."""
        if self.torch_device.type == "cuda":
            return {
                "device": self.device,
                "kind": "cuda_max_allocated",
                "bytes": int(torch.cuda.max_memory_allocated(self.torch_device)),
            }
        since_reset = rss_high_water_mark()
        if since_reset is not None:
            return {"device": self.device, "kind": "process_peak_rss", "bytes": since_reset}
        return {"device": self.device, "kind": "process_lifetime_peak_rss", "bytes": peak_rss_bytes()}


CPU = Machine()

_recomputing = contextvars.ContextVar("fedlpp_recomputing", default=False)


def recomputing() -> bool:
    """True while gradient checkpointing re-runs a block's forward inside backward."""
    return _recomputing.get()


@contextlib.contextmanager
def _marked_recompute() -> Iterator[None]:
    token = _recomputing.set(True)
    try:
        yield
    finally:
        _recomputing.reset(token)


def checkpoint_contexts() -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
    """torch.utils.checkpoint's ``context_fn``: nothing around the first forward, a mark around the recompute.

    Forward hooks fire again when a checkpointed block is recomputed; DP-SGD's per-example hooks must
    record each block's inputs once per forward (``privacy.dp_sgd``), so they skip the marked recompute.
    """
    return contextlib.nullcontext(), _marked_recompute()


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started, or since the last ``reset_peak_rss`` (Linux
    resets both records together): the whole process, loading included, when nothing reset it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def reset_peak_rss() -> None:
    """Reset the kernel's record of this process's peak RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_high_water_mark() -> int | None:
    """This process's peak RSS since the last ``reset_peak_rss`` (VmHWM), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (a no-op where it already is)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs must go: its input embeddings' device."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def silent_kernel_fetch() -> Iterator[None]:
    """Whatever imports bitsandbytes inside (fedlpp, transformers while loading, peft while wrapping) does so
    without its attempt to fetch a CPU kernel from the Hugging Face Hub (DESIGN 5.1).

    On import it calls ``kernels.get_kernel``, a download; with ``kernels`` unimportable it falls back
    to plain PyTorch and logs a warning, which we silence. Nothing is downloaded at run time.
    """
    missing = object()
    saved = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # makes `from kernels import ...` raise ImportError
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
        if saved is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved  # type: ignore[assignment]


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported once without touching the network (None where it is not installed).

    Call it before a 4-bit model is loaded: transformers' bitsandbytes integration and peft's LoRA import it too.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with silent_kernel_fetch():
        try:
            import bitsandbytes
        except ImportError:
            return None
    return bitsandbytes


def require_bitsandbytes() -> Any:
    """bitsandbytes for a 4-bit backbone, or an error that says how to get it."""
    bnb = import_bitsandbytes()
    if bnb is None:
        raise ConfigError("model.quantize: 'nf4' needs bitsandbytes (pip install bitsandbytes==0.50.2; ./install.sh installs it)")
    return bnb
