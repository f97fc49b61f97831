"""FedLPP (DESIGN 2.2): the server broadcasts only a w-bit quantized adapter.

The full-precision adapter never leaves the server: a broadcast carries the packed codes
of every tensor as one uint8 buffer and their float16 scales as one float16 vector, and
nothing else. Offsets follow from the layout (names and shapes both sides know).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlpp.algorithms.layout import Layout, numel
from fedlpp.models.lora import Adapter
from fedlpp.quant import QuantizedTensor, QuantSpec, dequantize, num_scales, packed_nbytes, quantize

CODES, SCALES = "codes", "scales"


def spec_meta(spec: QuantSpec) -> dict[str, object]:
    return {"bits": spec.bits, "granularity": spec.granularity, "block_size": spec.block_size}


def spec_from_meta(meta: Mapping[str, object]) -> QuantSpec:
    return QuantSpec(bits=int(meta["bits"]), granularity=str(meta["granularity"]), block_size=int(meta["block_size"]))  # type: ignore[call-overload]


def quantized_payload(adapter: Mapping[str, torch.Tensor], layout: Layout, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """{"codes": uint8 [total packed bytes], "scales": float16 [total groups]} for ``layout``."""
    codes, scales = bytearray(), []
    for name, _ in layout:
        q = quantize(adapter[name].detach().to(torch.float32), spec)
        codes += q.codes
        scales.append(q.scales)
    return {
        CODES: torch.frombuffer(codes, dtype=torch.uint8) if codes else torch.zeros(0, dtype=torch.uint8),
        SCALES: torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float16),
    }


def dequantized_adapter(tensors: Mapping[str, torch.Tensor], layout: Layout, spec: QuantSpec) -> Adapter:
    """The proxy adapter a client rebuilds from a quantized broadcast."""
    codes, scales = tensors[CODES].numpy().tobytes(), tensors[SCALES]
    need_codes = sum(packed_nbytes(numel(s), spec.bits) for _, s in layout)
    need_scales = sum(num_scales(s, spec) for _, s in layout)
    if len(codes) != need_codes or scales.numel() != need_scales or scales.dtype != torch.float16:
        raise ValueError(
            f"quantized broadcast has {len(codes)} code bytes and {scales.numel()} {scales.dtype} scales; "
            f"the layout needs {need_codes} and {need_scales} float16"
        )
    out: Adapter = {}
    c = g = 0
    for name, shape in layout:
        nc, ng = packed_nbytes(numel(shape), spec.bits), num_scales(shape, spec)
        out[name] = dequantize(QuantizedTensor(shape=shape, spec=spec, codes=codes[c : c + nc], scales=scales[g : g + ng]))
        c, g = c + nc, g + ng
    return out


def proxy_of(adapter: Mapping[str, torch.Tensor], layout: Layout, spec: QuantSpec) -> Adapter:
    """Q_w(theta) for the tensors of ``layout`` (what clients receive), others unchanged."""
    proxy = dict(adapter)
    proxy.update(dequantized_adapter(quantized_payload(adapter, layout, spec), layout, spec))
    return proxy
