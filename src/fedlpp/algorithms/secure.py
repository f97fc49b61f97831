"""Secure aggregation's two ends of a round: what a client feeds the protocol, what the server makes of the sum.

In a field of fewer than 32 bits (``secagg.modulus_bits``) ``RotatedInput`` and ``RotatedMean``
take their place: every client weighs 1 and its update is rotated, scaled and rounded into
the field (``algorithms.rotation``).

A client turns its delta into one vector, (n_k / n_max) * delta_k with its example count
n_k appended as an exact integer coordinate (``SecureInput``), which the SecAgg protocol
masks (``fedlpp.secagg``). The server only ever receives the protocol's sum, from which
``SecureMean`` derives the example-weighted mean delta — never an individual update.
n_max is a public bound (the largest client's size) that keeps weighted values in range.

With client-level DP each client instead adds its share of the noise to its clipped delta
and weighs 1 (``NoiseShares``); the server divides the noised sum by the public expected
count. These are steps composed into a round (``algorithms.steps``), not engine branches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.layout import Layout, flatten, layout_of, unflatten
from fedlpp.algorithms.rotation import Rotation, l2_norm
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.privacy import discrete_gaussian
from fedlpp.privacy.randomness import SystemRandomness, randomness
from fedlpp.secagg import AggregateResult, SecAggParams, append_weight, field_elements, in_range, split_weight, weight_coordinate
from fedlpp.seeding import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoiseShares:
    """Client-level DP under SecAgg: each client adds N(0, (sigma S)^2 / K) before masking.

    The sum of K shares carries the full N(0, (sigma S)^2) and the server never sees a
    less noisy value. When fewer clients survive, the server adds the missing variance
    itself (so the released model keeps the accounted sigma) and the round says so.
    """

    clip_norm: float  # S
    noise_multiplier: float  # sigma
    denominator: float  # K: the expected number of clients (public)

    @property
    def share_std(self) -> float:
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.denominator)

    def top_up_std(self, survivors: int) -> float:
        missing = max(0.0, 1.0 - survivors / self.denominator)
        return self.noise_multiplier * self.clip_norm * math.sqrt(missing)


@dataclass(frozen=True)
class SecureEncoding:
    """What both ends agree on: the protocol's parameters, the public weight bound n_max, and for a field of
    fewer than 32 bits the rotation that fits the updates into it (``algorithms.rotation``)."""

    params: SecAggParams
    weight_bound: int
    rotation: Rotation | None = None


def client_vector(enc: SecureEncoding, delta: Mapping[str, torch.Tensor], layout: Layout, num_examples: int) -> np.ndarray | None:
    """What a client feeds the protocol, or None when it must drop out (out of range)."""
    flat = flatten(delta, layout).numpy()
    vector = np.empty(flat.size + 1, dtype=np.float64)  # the weighted delta, then the weight coordinate
    np.multiply(flat, num_examples / enc.weight_bound, out=vector[:-1], dtype=np.float64)
    if not in_range(vector[:-1], enc.params):
        return None
    vector[-1] = weight_coordinate(num_examples, enc.params)
    return vector


def noised_client_vector(
    enc: SecureEncoding, delta: Mapping[str, torch.Tensor], layout: Layout, dp: NoiseShares
) -> np.ndarray | None:
    """Client-level DP: the clipped delta plus this client's share of the noise (OS CSPRNG), weight 1."""
    flat = flatten(delta, layout).to(torch.float64).numpy()
    share = SystemRandomness().normal(flat.shape, dp.share_std).numpy().astype(np.float64) if flat.size else flat
    noised = flat + share
    return append_weight(noised, 1, enc.params) if in_range(noised, enc.params) else None


@dataclass(frozen=True)
class SecureInput:
    """A client's encoder under SecAgg: its delta as the protocol's input vector (None: it drops out)."""

    encoding: SecureEncoding
    noise: NoiseShares | None = None  # client-level DP's share of the noise

    def __call__(self, delta: Mapping[str, torch.Tensor], num_examples: int, round_: int, client_id: int) -> np.ndarray | None:
        layout = layout_of({n: tuple(t.shape) for n, t in delta.items()}, sorted(delta))
        if self.noise is None:
            return client_vector(self.encoding, delta, layout, num_examples)
        return noised_client_vector(self.encoding, delta, layout, self.noise)


@dataclass(frozen=True)
class RotatedInput:
    """A client's encoder in a b-bit field: its delta bounded in norm, rotated, scaled and rounded at random
    (``Rotation.encode``), then its weight 1, as field elements. The rounding draws come from ``seed`` or, when
    ``secure`` or under distributed DP, the OS."""

    encoding: SecureEncoding
    seed: int
    secure: bool

    def __call__(self, delta: Mapping[str, torch.Tensor], num_examples: int, round_: int, client_id: int) -> np.ndarray | None:
        rotation = _rotation_of(self.encoding)
        layout = layout_of({n: tuple(t.shape) for n, t in delta.items()}, sorted(delta))
        flat = flatten(delta, layout).numpy()  # float32: the rotation runs in float32 or casts it (transform_dtype)
        norm = l2_norm(flat)
        if not math.isfinite(norm):  # it still takes part (a dropout would reveal something about its data): as 0
            log.warning("round %d: this update is not finite; client %d sends a zero update instead", round_, client_id)
            flat, norm = np.zeros_like(flat), 0.0
        if norm > rotation.l2_bound * (1 + 1e-6):  # client-level DP has clipped it to the bound already (float noise aside)
            log.warning("round %d: this update's norm %.4g is scaled down to secagg.l2_bound=%g", round_, norm, rotation.l2_bound)
        # Under distributed DP the rounding draws come from the OS too: seeded, how often conditional rounding retried
        # would be a function of the data that a party knowing the seed could time.
        secure = self.secure or rotation.noise_multiplier > 0
        rng = randomness(secure, derive_seed(self.seed, "secagg_rounding", round_, client_id))
        noise = SystemRandomness() if rotation.noise_multiplier else None  # a DP share: always the OS CSPRNG
        return field_elements(rotation.encode(flat, round_, rng, noise), 1, self.encoding.params)


@dataclass(frozen=True)
class RotatedMean:
    """The server's combiner in a b-bit field: the mean delta from the protocol's sum of rotated integers.

    SecAgg hides each input, so the server checks what it can of the sum: the weights add up to the survivors (each
    weighs 1), and the decoded sum's norm is within what that many updates of norm secagg.l2_bound can reach (a
    larger one means a node sent more). Either failure voids the round. Neither catches what stays inside the
    bounds: one node may use the whole sum's allowance the honest ones leave, colluding nodes may trade weight
    (0 and 2 add up like 1 and 1), and a sum that wrapped (at most 10^-6 a round, by the scale's bound) moves one
    rotated coordinate by 2^b / s, usually far less than the allowance.

    Under distributed DP the sum carries the clients' noise shares: when fewer than K survive, the server adds the
    missing shares' discrete Gaussian itself (OS CSPRNG; the row says ``dp_noise_topped_up``), divides by the
    public K, and allows twice the noise's expected norm in the check (2 z c sqrt(d); a refused round is still
    charged for the sum the server saw)."""

    encoding: SecureEncoding

    def __call__(
        self,
        spec: AlgorithmSpec,
        adapter: Mapping[str, torch.Tensor],
        inputs: AggregateResult,
        round_: int,
        notes: dict[str, Any],
    ) -> rnd.Combined:
        rotation, survivors = _rotation_of(self.encoding), len(inputs.survivors)
        layout = rnd.update_layout(spec, {n: tuple(t.shape) for n, t in adapter.items()}, round_)
        integers, total_weight = split_weight(inputs.values, self.encoding.params)
        if rotation.noise_multiplier:
            integers = _topped_up_integers(integers, rotation, survivors, notes)
        total = rotation.decode(integers, round_)
        norm, bound = float(np.linalg.norm(total)), rotation.sum_bound(total.size, survivors)
        if rotation.noise_multiplier:
            bound += 2.0 * rotation.noise_multiplier * rotation.l2_bound * math.sqrt(total.size)
        reason = None
        if total_weight != survivors:
            reason = f"the survivors' total weight {total_weight} is not their number {survivors}: a client sent a weight it does not have"
        elif not norm <= bound:
            reason = (
                f"the decoded sum's norm {norm:.4g} is more than {survivors} updates within secagg.l2_bound="
                f"{rotation.l2_bound:g} can reach ({bound:.4g}): a node sent more, or the sum wrapped around the field"
            )
        if reason is not None:
            return _refused(round_, reason, notes)
        count = rotation.clients if rotation.noise_multiplier else survivors
        mean = np.multiply(total, 1.0 / count, out=np.empty(total.size, dtype=np.float32), casting="same_kind")
        return rnd.Combined(unflatten(torch.from_numpy(mean), layout), tuple(inputs.survivors), {})


def _topped_up_integers(integers: np.ndarray, rotation: Rotation, survivors: int, notes: dict[str, Any]) -> np.ndarray:
    """The integer sum with the discrete Gaussian shares of the clients that did not survive added by the server."""
    missing = rotation.clients - survivors
    if missing <= 0:
        return integers
    notes["dp_noise_topped_up"] = {"survivors": survivors, "expected": rotation.clients}
    log.warning("secure aggregation: %d of %d clients survived; the server adds the missing noise", survivors, rotation.clients)
    std = rotation.local_std(integers.size) * math.sqrt(missing)
    return integers + discrete_gaussian.sample(integers.size, std, SystemRandomness())


def _refused(round_: int, reason: str, notes: dict[str, Any]) -> rnd.Combined:
    """A sum the server will not use: logged and noted with its reason; the global adapter is unchanged."""
    log.warning("round %d: secure aggregation: %s; the global adapter is unchanged", round_, reason)
    notes["refused"] = reason
    return rnd.Combined(None, (), {})


def _rotation_of(encoding: SecureEncoding) -> Rotation:
    if encoding.rotation is None:
        raise ValueError("a rotated encoding needs secagg.modulus_bits < 32")
    return encoding.rotation


@dataclass(frozen=True)
class SecureMean:
    """The server's combiner under SecAgg: the weighted (or DP-noised) mean delta from the protocol's sum."""

    encoding: SecureEncoding
    noise: NoiseShares | None = None

    def __call__(
        self,
        spec: AlgorithmSpec,
        adapter: Mapping[str, torch.Tensor],
        inputs: AggregateResult,
        round_: int,
        notes: dict[str, Any],
    ) -> rnd.Combined:
        result = inputs  # the protocol's sum over the survivors
        layout = rnd.update_layout(spec, {n: tuple(t.shape) for n, t in adapter.items()}, round_)
        weighted_sum, total_weight = split_weight(result.values, self.encoding.params)
        beyond = _beyond(weighted_sum, self.encoding.params, len(result.survivors))
        if beyond is not None:
            return _refused(round_, beyond, notes)
        if self.noise is None:
            survivors = len(result.survivors)
            if not survivors <= total_weight <= survivors * self.encoding.weight_bound:
                # Each weight is masked, so only the sum can be checked: every honest client weighs 1..weight_bound.
                reason = (
                    f"the survivors' total weight {total_weight} is outside [{survivors}, {survivors} x "
                    f"{self.encoding.weight_bound}]: a client sent a weight it does not have"
                )
                return _refused(round_, reason, notes)
            total, factor = weighted_sum, self.encoding.weight_bound / total_weight
        else:
            total, factor = _topped_up(weighted_sum, self.noise, len(result.survivors), notes), 1.0 / self.noise.denominator
        mean = np.multiply(total, factor, out=np.empty(total.size, dtype=np.float32), casting="same_kind")  # float64 math
        return rnd.Combined(unflatten(torch.from_numpy(mean), layout), tuple(result.survivors), {})


def _beyond(weighted_sum: np.ndarray, params: SecAggParams, survivors: int) -> str | None:
    """Why the sum cannot come from inputs within the range (SecAgg hides each input, so only the sum is checked),
    or None. A node inside its range can still send a bad update: bounding it further is robust aggregation's job."""
    if not weighted_sum.size:
        return None
    peak, bound = float(np.abs(weighted_sum).max()), _sum_bound(params, survivors)
    if peak <= bound:
        return None
    return (
        f"the unmasked sum reaches {peak:.4g}, more than {survivors} survivors within secagg.clip_range="
        f"{params.clip_range:g} can add up to ({bound:.4g}): a node sent values outside its range"
    )


def _sum_bound(params: SecAggParams, survivors: int) -> float:
    """The most one coordinate of the survivors' sum can reach when every input keeps to the declared range
    (each value rounded to the fixed point's step)."""
    return survivors * (params.clip_range + 1.0 / params.scale)


SumCombiner = rnd.Combiner[AggregateResult]  # SecureMean or RotatedMean: what the server makes of the protocol's sum


def _topped_up(noised_sum: np.ndarray, dp: NoiseShares, survivors: int, notes: dict[str, Any]) -> np.ndarray:
    std = dp.top_up_std(survivors)
    if std == 0:
        return noised_sum
    notes["dp_noise_topped_up"] = {"survivors": survivors, "expected": dp.denominator}
    log.warning(
        "secure aggregation: %d of %g expected clients survived; the server adds the missing noise", survivors, dp.denominator
    )
    return noised_sum + SystemRandomness().normal(noised_sum.shape, std).numpy().astype(np.float64)
