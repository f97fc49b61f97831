"""End-to-end SecAgg rounds: exact sums, dropout recovery, thresholds, sparse graphs, CSPRNG use."""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Callable

import numpy as np
import pytest
from secagg_harness import make_round

from fedlpp.secagg import (
    HEADER_BYTES,
    Dropouts,
    SecAggAbort,
    SecAggParams,
    SecAggParamsError,
    crypto,
    generate_signing_key,
    run_local_round,
)
from fedlpp.secagg.params import PRGS


def test_no_dropout_sum_is_exact() -> None:
    rnd = make_round(8, dim=500)
    result = rnd.run()
    assert np.array_equal(result.encoded, rnd.expected(range(8)))
    float_sum = sum(rnd.inputs.values())
    # Each input is off by at most 1/(2 scale) after rounding: n/scale is a safe bound.
    assert np.max(np.abs(result.values - float_sum)) <= 8 / rnd.params.scale
    assert result.survivors == tuple(range(8)) and result.dropped == ()


def test_clients_dropping_after_masked_input_are_unmasked_from_shares() -> None:
    rnd = make_round(12, dim=300)  # degree 11, t = 7: four of 11 holders may go
    views = rnd.mask(rnd.share(rnd.advertise()), skip=[2, 6])  # 2 and 6 never send y_u
    result = rnd.unmask(rnd.sign(views, skip=[4]), skip=[5])  # 4, 5 vanish after sending y_u
    survivors = [c for c in range(12) if c not in (2, 6)]
    assert result.dropped == (2, 6)
    assert result.survivors == tuple(survivors)
    assert np.array_equal(result.encoded, rnd.expected(survivors))


def test_clients_dropping_before_masking_are_left_out() -> None:
    rnd = make_round(7, dim=100)
    routed = rnd.share(rnd.advertise(skip=[0]), skip=[3])  # 0 never advertises, 3 never shares
    assert set(routed) == {1, 2, 4, 5, 6}
    result = rnd.unmask(rnd.sign(rnd.mask(routed)))
    assert result.dropped == ()  # nobody masked with 0 or 3, so nothing to repair
    assert np.array_equal(result.encoded, rnd.expected([1, 2, 4, 5, 6]))


@pytest.mark.parametrize(
    "stage, step",
    [("advertise", "AdvertiseKeys"), ("share", "ShareKeys"), ("mask", "MaskedInputCollection"), ("unmask", "Unmasking")],
)
def test_below_threshold_aborts_with_a_clear_message(stage: str, step: str) -> None:
    rnd = make_round(5)  # complete graph: degree 4, t = ceil(0.6 * 4) = 3
    gone = {"advertise": [0, 1, 2], "share": [0, 1, 2], "mask": [0, 1, 2], "unmask": [0, 1, 2]}[stage]
    with pytest.raises(SecAggAbort, match=rf"aborted at {step}: \d .*threshold is 3") as info:
        msgs = rnd.advertise(skip=gone if stage == "advertise" else [])
        msgs = rnd.share(msgs, skip=gone if stage == "share" else [])
        msgs = rnd.mask(msgs, skip=gone if stage == "mask" else [])
        rnd.unmask(rnd.sign(msgs), skip=gone)
    assert info.value.step == step and info.value.count < info.value.threshold


def test_a_round_after_an_abort_starts_clean() -> None:
    keys = {c: generate_signing_key() for c in range(4)}
    inputs = {c: np.full(10, 0.25) for c in keys}
    params = SecAggParams()
    with pytest.raises(SecAggAbort):
        run_local_round(params, keys, inputs, 1, Dropouts(masked_input=frozenset({0, 1})))
    result = run_local_round(params, keys, inputs, 2)
    assert result.values.tolist() == [1.0] * 10


def test_more_clients_than_the_headroom_allows_is_refused() -> None:
    params = SecAggParams(max_clients=3)
    keys = {c: generate_signing_key() for c in range(4)}
    with pytest.raises(SecAggParamsError, match="max_clients"):
        run_local_round(params, keys, {c: np.zeros(4) for c in keys}, 1)


def test_sparse_graph_sums_exactly_with_dropouts_and_sends_k_boxes() -> None:
    params = SecAggParams(graph="sparse", degree=12)  # t = ceil(7.2) = 8 tolerates 4 losses
    rnd = make_round(30, dim=50, params=params)
    key_lists = rnd.advertise()
    graph = rnd.server.graph
    assert graph is not None and all(graph.degree(u) == 12 for u in range(30))
    for c, m in key_lists.items():
        shares = rnd.clients[c].share_keys(m)
        assert rnd.clients[c].graph == graph  # derived by the client from the published seed
        assert int.from_bytes(shares[HEADER_BYTES : HEADER_BYTES + 4], "big") == 12  # boxes: k, not n - 1
        rnd.server.receive_shares(shares, c)
    views = rnd.mask(rnd.server.finish_share_keys(), skip=[3, 11])
    result = rnd.unmask(rnd.sign(views), skip=[7, 20])
    assert result.dropped == (3, 11)
    survivors = [c for c in range(30) if c not in (3, 11)]
    assert np.array_equal(result.encoded, rnd.expected(survivors))


def test_masked_input_is_four_bytes_per_value_plus_a_fixed_header() -> None:
    for dim in (1, 1000, 12345):
        rnd = make_round(3, dim=dim)
        routed = rnd.share(rnd.advertise())
        assert len(rnd.clients[0].masked_input(routed[0], rnd.inputs[0])) == 4 * dim + HEADER_BYTES == 4 * dim + 22


def test_masks_are_expanded_before_the_input_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    # share_keys expands the self mask and one stream per neighbour; after training,
    # masked_input only encodes and adds unless a neighbour vanished before sharing keys.
    expanded: list[int] = []
    real = crypto.Prg.expand
    monkeypatch.setattr(crypto.Prg, "expand", lambda prg, key: expanded.append(1) or real(prg, key))
    rnd = make_round(4, dim=1_000_000)
    routed = rnd.share(rnd.advertise())
    assert len(expanded) == 4 * (1 + 3)
    expanded.clear()
    views = rnd.mask(routed)
    assert expanded == []
    result = rnd.unmask(rnd.sign(views))
    assert np.array_equal(result.encoded, rnd.expected(range(4)))


@pytest.mark.parametrize("prg", PRGS)
def test_every_prg_cipher_sums_exactly_with_dropouts(prg: str) -> None:
    rnd = make_round(6, dim=300, params=SecAggParams(prg=prg))
    views = rnd.mask(rnd.share(rnd.advertise(), skip=[1]), skip=[4])
    result = rnd.unmask(rnd.sign(views))
    assert np.array_equal(result.encoded, rnd.expected([0, 2, 3, 5]))
    assert result.dropped == (4,)


def test_identical_inputs_give_different_masked_vectors() -> None:
    a, b = make_round(3, dim=200, seed=5), make_round(3, dim=200, seed=5)
    ya = a.clients[0].masked_input(a.share(a.advertise())[0], a.inputs[0])
    yb = b.clients[0].masked_input(b.share(b.advertise())[0], b.inputs[0])
    assert ya[HEADER_BYTES:] != yb[HEADER_BYTES:]


def _deterministic_token_bytes() -> Callable[[int], bytes]:
    counter = iter(range(10**9))
    return lambda n=32: hashlib.shake_256(next(counter).to_bytes(8, "big")).digest(n)


def _client_zero_masked_input(monkeypatch: pytest.MonkeyPatch, fake: bool) -> bytes:
    """Client 0's masked input in a fresh 3-client round (identities included) on fixed inputs."""
    if fake:
        monkeypatch.setattr(secrets, "token_bytes", _deterministic_token_bytes())
    rnd = make_round(3, dim=100)
    return rnd.clients[0].masked_input(rnd.share(rnd.advertise())[0], rnd.inputs[0])


def test_all_secrets_come_from_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    # Forbid the non-cryptographic generators for the duration of a round...
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a non-cryptographic generator was used")

    for target, name in [
        (np.random, "default_rng"),
        (np.random, "RandomState"),
        (np.random, "seed"),
        (random, "random"),
        (random, "getrandbits"),
        (random, "seed"),
    ]:
        monkeypatch.setattr(target, name, forbidden)
    calls: list[int] = []
    real = secrets.token_bytes
    monkeypatch.setattr(secrets, "token_bytes", lambda n=32: calls.append(n) or real(n))
    keys = {c: generate_signing_key() for c in range(3)}
    run_local_round(SecAggParams(), keys, {c: [0.5] * 8 for c in keys}, 1)
    # ...and see every key, seed and nonce drawn from secrets.token_bytes: 3 identities,
    # 3 x (c, s, b), the graph seed, and one nonce per share box (3 x 2).
    assert calls == [32] * 3 + [32] * 9 + [32] + [12] * 6
    monkeypatch.undo()
    # Replacing that one source by a deterministic stream makes the masked vectors
    # reproducible, so no other source of randomness reaches the masks.
    first = _client_zero_masked_input(monkeypatch, fake=True)
    monkeypatch.undo()
    second = _client_zero_masked_input(monkeypatch, fake=True)
    monkeypatch.undo()
    assert first == second
    assert _client_zero_masked_input(monkeypatch, fake=False) != first


class _Recorder:
    """A Parties that runs everything and records whose work each piece was."""

    def __init__(self) -> None:
        self.client_calls: dict[int, int] = {}
        self.steps = 0
        self.server_calls = 0

    def client(self, client: int, work: Callable[[], object]) -> object:
        self.client_calls[client] = self.client_calls.get(client, 0) + 1
        return work()

    def end_step(self) -> None:
        self.steps += 1

    def server(self, work: Callable[[], object]) -> object:
        self.server_calls += 1
        return work()


def test_parties_see_each_clients_six_steps_and_the_sum_is_unchanged() -> None:
    params = SecAggParams()
    keys = {c: generate_signing_key() for c in range(4)}
    inputs = {c: np.full(50, 0.1 * c) for c in keys}
    recorder = _Recorder()
    result = run_local_round(params, keys, inputs, 1, parties=recorder)  # type: ignore[arg-type]
    # session start, advertise, share keys, masked input, signature, unmask
    assert recorder.client_calls == dict.fromkeys(keys, 6) and recorder.steps == 6
    # session, then per step: one receive per client and one finish
    assert recorder.server_calls == 1 + 5 * (4 + 1)
    assert np.allclose(result.values, sum(inputs.values()), atol=4 / params.scale)


def test_prg_ciphers_differ_and_each_view_is_read_only_until_the_next_key() -> None:
    key_a, key_b = bytes(range(32)), bytes(range(1, 33))
    aes, chacha = crypto.Prg(1000, "aes256-ctr"), crypto.Prg(1000, "chacha20")
    first = aes.expand(key_a).copy()
    assert not np.array_equal(first, chacha.expand(key_a))
    view = aes.expand(key_b)
    assert not view.flags.writeable and not np.array_equal(view, first)
    assert np.array_equal(aes.expand(key_a), first)  # deterministic per key, same buffer overwritten
    # Roughly uniform over Z_2^32: mean near 2^31, both halves of the range used.
    assert abs(float(first.mean()) / 2**31 - 1) < 0.1 and (first < 2**31).any() and (first >= 2**31).any()
    with pytest.raises(ValueError, match="unknown PRG cipher 'rc4'"):
        crypto.Prg(10, "rc4")
