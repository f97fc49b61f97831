"""A compressed uplink (uplink.bits < 32): what travels, what the server accepts, and that every engine sends the same."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.config import ConfigError, load_config
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.quant import QuantSpec
from fedlpp.quant.stochastic import UplinkSpec

A, B = "layer.lora_A.weight", "layer.lora_B.weight"
FOUR = UplinkSpec(4, block_size=64)
SMALL_FIELD = ["secagg.enabled=true", "fl.clients_per_round=3", "secagg.modulus_bits=16"]


def delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(8, 1024, generator=g) * 1e-2, B: torch.randn(1024, 8, generator=g) * 1e-3}


def layout_of(d):
    return rnd.update_layout(get_algorithm("fedavg_lora", QuantSpec(2)), {n: tuple(t.shape) for n, t in d.items()}, 1)


def test_a_compressed_update_decodes_to_within_one_level_of_each_value_at_an_eighth_of_the_bytes():
    d = delta()
    plain = rnd.make_update(d, 10, 1)
    packed = rnd.make_update(d, 10, 1, FOUR, SeededRandomness(0))
    got = rnd.validate_update(packed, 3, layout_of(d), 1, uplink=FOUR).delta
    for name in d:  # a level's gap is 2 x the block's max |x| / 15; B's blocks are 10x smaller than A's
        assert float((got[name] - d[name]).abs().max()) <= 2 * float(d[name].abs().max()) / 15 * 1.002
    assert len(packed) / len(plain) < 0.15


def test_the_server_mean_of_compressed_updates_is_unbiased():
    """50 clients send the same delta, each rounded with its own draws: the mean is closer to it than one update is."""
    d = delta()
    payloads = [(c, rnd.make_update(d, 10, 1, FOUR, SeededRandomness(c))) for c in range(50)]
    spec = dataclasses.replace(get_algorithm("fedavg_lora", QuantSpec(2)), uplink=FOUR)
    zero = {n: torch.zeros_like(t) for n, t in d.items()}
    mean = rnd.aggregate(spec, zero, payloads, 1).adapter
    one = rnd.validate_update(payloads[0][1], 0, layout_of(d), 1, uplink=FOUR).delta
    for name in d:
        assert float((mean[name] - d[name]).norm()) < 0.25 * float((one[name] - d[name]).norm())


@pytest.mark.parametrize(
    ("sent", "expected", "reason"),
    [
        (None, FOUR, "expected uplink {'bits': 4, 'block_size': 64}"),
        (UplinkSpec(8), FOUR, "update encoding {'bits': 8, 'block_size': 64}, expected uplink {'bits': 4"),
        (UplinkSpec(4, block_size=32), FOUR, "expected uplink"),
        (FOUR, None, "a compressed update ({'bits': 4, 'block_size': 64}) where the run sends float32"),
    ],
)
def test_an_update_in_another_encoding_than_the_runs_is_refused(sent, expected, reason):
    d = delta()
    payload = rnd.make_update(d, 10, 1, sent, SeededRandomness(0))
    with pytest.raises(ValueError, match=reason.replace("(", "\\(").replace(")", "\\)").replace("{", "\\{").replace("}", "\\}")):
        rnd.validate_update(payload, 3, layout_of(d), 1, uplink=expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["uplink.bits=3"], "uplink.bits: got 3; valid choices are 32, 8, 4, 2"),
        (["uplink.bits=4", "secagg.enabled=true", "fl.clients_per_round=3"], "set secagg.modulus_bits \\(12 to 32\\)"),
        ([*SMALL_FIELD, "fl.weighting=examples"], "'examples' cannot be carried in a 16-bit field"),
        (["secagg.modulus_bits=8"], "secagg.modulus_bits: must be in \\[12, 32\\]"),
        (["secagg.l2_bound=0"], "secagg.l2_bound: must be > 0"),
        (["secagg.modulus_bits=16"], "applies only with secagg.enabled=true; to compress updates without"),
        (["uplink.bits=4", "privacy.mode=client_dp", "privacy.noise_multiplier=1"], "random rounding can push a clipped update"),
        (["uplink.block_size=0"], "uplink.block_size: must be >= 1"),
    ],
)
def test_combinations_not_built_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_an_update_the_uplink_cannot_round_fails_that_client_alone():
    """NaN (or a value beyond float16) cannot be rounded: the client fails the round with the reason, as a node's
    error reply does, and the local engine goes on with the others (the float32 path sends it and the server refuses)."""
    from fedlpp.algorithms.steps import CompressedUpdateBytes, UploadError
    from fedlpp.engine.local import answer
    from fedlpp.engine.transport import Replies

    d = delta()
    d[A][0, 0] = float("nan")
    encode = CompressedUpdateBytes(FOUR, seed=0, secure=False)
    with pytest.raises(UploadError, match="client 7's update cannot be sent with uplink.bits=4: .*non-finite"):
        encode(d, 10, 1, 7)
    replies = Replies()
    answer(replies, 7, 1, lambda: {"update": encode(d, 10, 1, 7)})
    assert "non-finite" in replies.failed[7] and 7 not in replies.answers
