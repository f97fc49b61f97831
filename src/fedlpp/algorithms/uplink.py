"""A compressed update (``uplink.bits`` < 32): the delta as stochastically rounded b-bit codes and float16 block scales.

The message carries ``codes`` (the packed codes of the whole update vector, in wire order)
and ``scales`` (one float16 per block) and names its bits and block size in its metadata;
the server accepts only the encoding its own config names. The quantizer is
``fedlpp.quant.stochastic`` (unbiased: the mean of decoded updates is the mean of the
updates plus zero-mean rounding noise).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlpp.algorithms.layout import Layout, numel
from fedlpp.privacy.randomness import Randomness
from fedlpp.quant.stochastic import UplinkSpec, dequantize_stochastic, stochastic_quantize

CODES, SCALES = "codes", "scales"


def compressed_payload(values: torch.Tensor, spec: UplinkSpec, rng: Randomness) -> dict[str, torch.Tensor]:
    """{"codes": uint8 [packed bytes], "scales": float16 [blocks]} for a flat update vector."""
    codes, scales = stochastic_quantize(values, spec, rng.uniform(values.numel()))
    return {
        CODES: torch.frombuffer(bytearray(codes), dtype=torch.uint8) if codes else torch.zeros(0, dtype=torch.uint8),
        SCALES: scales,
    }


def decompressed_values(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object], spec: UplinkSpec, layout: Layout
) -> torch.Tensor:
    """The float32 update vector a compressed message stands for.

    Raises:
        ValueError: The message is not in the server's encoding, or its parts do not fit the layout.
    """
    if meta.get("uplink") != spec.as_meta():
        raise ValueError(f"update encoding {meta.get('uplink')!r}, expected uplink {spec.as_meta()} (the run's uplink.*)")
    if set(tensors) != {CODES, SCALES}:
        raise ValueError(f"expected {CODES!r} and {SCALES!r} tensors, got {sorted(tensors)}")
    codes = tensors[CODES]
    if codes.dtype != torch.uint8 or codes.ndim != 1:
        raise ValueError(f"codes must be a flat uint8 vector, got {codes.dtype} of shape {tuple(codes.shape)}")
    return dequantize_stochastic(codes.numpy().tobytes(), tensors[SCALES], spec, sum(numel(s) for _, s in layout))
