"""FedLPP (DESIGN 2.2): the server broadcasts only a w-bit quantized adapter.

The full-precision adapter never leaves the server: each broadcast tensor becomes packed
codes (uint8 bytes) plus float16 scales, and the wire carries nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlpp.models.lora import Adapter
from fedlpp.quant import QuantizedTensor, QuantSpec, dequantize, quantize

CODES, SCALES = ".codes", ".scales"


def quantized_payload(
    adapter: Mapping[str, torch.Tensor], names: Sequence[str], spec: QuantSpec
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Wire tensors (codes as uint8, scales as float16) and the shapes needed to decode them."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name in names:
        q = quantize(adapter[name].detach().to(torch.float32), spec)
        tensors[name + CODES] = torch.frombuffer(bytearray(q.codes), dtype=torch.uint8) if q.codes else torch.zeros(0, dtype=torch.uint8)
        tensors[name + SCALES] = q.scales
        shapes[name] = list(q.shape)
    meta = {"bits": spec.bits, "granularity": spec.granularity, "block_size": spec.block_size, "shapes": shapes}
    return tensors, meta


def dequantized_adapter(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> Adapter:
    """The proxy adapter a client rebuilds from a quantized broadcast."""
    spec = QuantSpec(bits=int(meta["bits"]), granularity=str(meta["granularity"]), block_size=int(meta["block_size"]))  # type: ignore[call-overload]
    shapes: Mapping[str, list[int]] = meta["shapes"]  # type: ignore[assignment]
    out: Adapter = {}
    for name, shape in shapes.items():
        q = QuantizedTensor(
            shape=tuple(shape),
            spec=spec,
            codes=tensors[name + CODES].numpy().tobytes(),
            scales=tensors[name + SCALES],
        )
        out[name] = dequantize(q)
    return out


def proxy_of(adapter: Mapping[str, torch.Tensor], names: Sequence[str], spec: QuantSpec) -> Adapter:
    """Q_w(theta) for ``names`` (what clients receive), other tensors unchanged."""
    tensors, meta = quantized_payload(adapter, names, spec)
    proxy = dict(adapter)
    proxy.update(dequantized_adapter(tensors, meta))
    return proxy
