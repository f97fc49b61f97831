"""The server's view of one masked update is indistinguishable from uniform noise on Z_(2^32).

Chi-square tests at p > 1e-6 (a correct implementation fails about once in a million runs);
each test also runs the same statistic on the unmasked encoding to show it would catch
structure that leaks through.
"""

import numpy as np
import numpy.typing as npt
from scipy.stats import chi2_contingency, chisquare
from secagg_harness import make_round

from fedlpp.secagg import HEADER_BYTES, SecAggParams, encode

DIM = 100_000
ALPHA = 1e-6


def _masked(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint32]:
    """Client 0's masked vector, exactly as the server receives it."""
    rnd = make_round(3, dim=DIM)
    rnd.inputs[0] = values
    routed = rnd.share(rnd.advertise())
    return np.frombuffer(rnd.clients[0].masked_input(routed[0], values)[HEADER_BYTES:], dtype="<u4")


def _byte_counts(x: npt.NDArray[np.uint32], shift: int) -> npt.NDArray[np.int64]:
    return np.bincount(((x >> shift) & 0xFF).astype(np.int64), minlength=256)


def _top_byte_counts(x: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
    return _byte_counts(x, 24)


def test_masked_zeros_are_uniform_on_top_and_bottom_bytes() -> None:
    y = _masked(np.zeros(DIM))
    assert chisquare(_top_byte_counts(y)).pvalue > ALPHA
    assert chisquare(np.bincount((y & 0xFF).astype(np.int64), minlength=256)).pvalue > ALPHA
    # Control: the unmasked encoding of zeros is one spike.
    assert chisquare(_top_byte_counts(encode(np.zeros(DIM), SecAggParams(), 0))).pvalue < ALPHA


def test_every_bit_of_a_masked_update_is_balanced() -> None:
    y = _masked(np.full(DIM, 0.75))
    bits = (y[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    # Each bit's mean is 0.5 +- 0.5/sqrt(DIM); allow 6 standard deviations.
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 6 * 0.5 / np.sqrt(DIM))


def test_zeros_and_constant_input_are_indistinguishable_after_masking() -> None:
    params = SecAggParams()
    zeros, ones = np.zeros(DIM), np.full(DIM, params.clip_range)  # r * scale = 0x00100000
    a, b = _masked(zeros), _masked(ones)
    for shift in (0, 8, 16, 24):
        table = np.stack([_byte_counts(a, shift), _byte_counts(b, shift)])
        assert chi2_contingency(table).pvalue > ALPHA
    # Control: byte 2 of the unmasked encodings (0x00 vs 0x10) tells them apart at once.
    plain = np.stack([_byte_counts(encode(zeros, params, 0), 16), _byte_counts(encode(ones, params, 0), 16)])
    assert chi2_contingency(plain[:, plain.sum(axis=0) > 0]).pvalue < ALPHA
