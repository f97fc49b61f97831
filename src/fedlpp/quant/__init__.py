"""Quantization of the broadcast adapter: NF-w codebooks, group quantizer, bit packing."""

from fedlpp.quant.codebooks import SUPPORTED_BITS, nf_codebook
from fedlpp.quant.packing import pack_codes, packed_nbytes, storage_bits, unpack_codes
from fedlpp.quant.quantizer import (
    GRANULARITIES,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    max_abs_error_bound,
    num_scales,
    quantize,
)

__all__ = [
    "GRANULARITIES",
    "SUPPORTED_BITS",
    "QuantSpec",
    "QuantizedTensor",
    "dequantize",
    "fake_quantize",
    "max_abs_error_bound",
    "nf_codebook",
    "num_scales",
    "pack_codes",
    "packed_nbytes",
    "quantize",
    "storage_bits",
    "unpack_codes",
]
