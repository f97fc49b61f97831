"""Secure aggregation in the local engine: the server learns only the sum of the round.

Each sampled client turns its delta into one vector, (n_k / n_max) * delta_k with its
example count n_k appended as an exact integer coordinate, and runs the SecAgg protocol
(``fedlpp.secagg``) with the others. The server side receives the protocol's sum, from
which it derives the example-weighted mean delta — never an individual update. n_max is
a public bound (the largest client's size) that keeps weighted values inside the range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.layout import Layout, flatten, unflatten
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.config import SecAggConfig
from fedlpp.models.lora import Adapter
from fedlpp.privacy.randomness import SystemRandomness
from fedlpp.secagg import (
    AggregateResult,
    InProcess,
    Parties,
    SecAggAbort,
    SecAggError,
    SecAggParams,
    Traffic,
    append_weight,
    generate_signing_key,
    in_range,
    run_local_round,
    split_weight,
    weight_coordinate,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureAggregator:
    params: SecAggParams
    identities: dict[int, Ed25519PrivateKey]  # long-term signing key of every client (OS CSPRNG)
    weight_bound: int  # n_max: public bound on any client's example count


@dataclass(frozen=True)
class SecureOutcome:
    adapter: Adapter | None  # None: keep the global adapter
    survivors: tuple[int, ...]
    bytes_up: int
    bytes_down: int
    notes: dict[str, Any]  # what a metrics row should say about the round (drops, abort)


def make_aggregator(cfg: SecAggConfig, num_clients: int, clients_per_round: int, weight_bound: int) -> SecureAggregator:
    params = SecAggParams(
        scale=2.0**cfg.scale_bits,
        clip_range=cfg.clip_range,
        max_clients=clients_per_round,  # the config requires >= 3 (secagg's MIN_CLIENTS)
        threshold_fraction=cfg.threshold,
        graph=cfg.graph,
        prg=cfg.prg,
    )
    return SecureAggregator(params, {c: generate_signing_key() for c in range(num_clients)}, weight_bound)


def client_vector(agg: SecureAggregator, delta: Mapping[str, torch.Tensor], layout: Layout, num_examples: int) -> np.ndarray | None:
    """What a client feeds the protocol, or None when it must drop out (out of range)."""
    flat = flatten(delta, layout).numpy()
    vector = np.empty(flat.size + 1, dtype=np.float64)  # the weighted delta, then the weight coordinate
    np.multiply(flat, num_examples / agg.weight_bound, out=vector[:-1], dtype=np.float64)
    if not in_range(vector[:-1], agg.params):
        return None
    vector[-1] = weight_coordinate(num_examples, agg.params)
    return vector


def noised_client_vector(agg: SecureAggregator, delta: Mapping[str, torch.Tensor], layout: Layout, dp: NoiseShares) -> np.ndarray | None:
    """Client-level DP: the clipped delta plus this client's share of the noise (OS CSPRNG), weight 1."""
    flat = flatten(delta, layout).to(torch.float64).numpy()
    share = SystemRandomness().normal(flat.shape, dp.share_std).numpy().astype(np.float64) if flat.size else flat
    noised = flat + share
    return append_weight(noised, 1, agg.params) if in_range(noised, agg.params) else None


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


def secure_aggregate(
    agg: SecureAggregator,
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    deltas: Mapping[int, tuple[Adapter, int]],
    round_: int,
    dp: NoiseShares | None = None,
    parties: Parties | None = None,
) -> SecureOutcome:
    """Run the protocol over the clients' (delta, n_k) and apply the server step to the sum.

    Without ``dp`` the mean is weighted by example counts; with it (client-level DP) every
    client weighs 1 and the noised sum is divided by the public expected count. ``parties``
    runs each client's and the server's share of the work (the benchmark times them).
    """
    run = parties or InProcess()
    layout = rnd.trained_layout({n: tuple(t.shape) for n, t in adapter.items()}, spec.freeze_a)
    vectors = {c: run.client(c, partial(_client_input, agg, layout, delta, n, dp)) for c, (delta, n) in sorted(deltas.items())}
    run.end_step()
    inputs, notes = {c: v for c, v in vectors.items() if v is not None}, {}
    for client in sorted(set(vectors) - set(inputs)):
        notes.setdefault("out_of_range", []).append(client)
        log.warning("round %d: client %d's update is not finite or exceeds secagg.clip_range=%g; it drops out of the round",
                    round_, client, agg.params.clip_range)
    traffic = Traffic()
    try:
        if not inputs:
            raise SecAggAbort("masked input", "no client is in range", 0, 1)
        result = run_local_round(agg.params, {c: agg.identities[c] for c in inputs}, inputs, round_, traffic=traffic,
                                 parties=run)
    except (SecAggAbort, SecAggError) as e:
        log.warning("round %d: secure aggregation aborted (%s); the global adapter is unchanged", round_, e)
        notes["secagg_abort"] = str(e)
        return SecureOutcome(None, (), sum(traffic.up.values()), sum(traffic.down.values()), notes)
    new = run.server(partial(_server_step, agg, spec, adapter, layout, result, round_, dp, notes))
    return SecureOutcome(new, result.survivors, sum(traffic.up.values()), sum(traffic.down.values()), notes)


def _client_input(
    agg: SecureAggregator, layout: Layout, delta: Mapping[str, torch.Tensor], n: int, dp: NoiseShares | None
) -> np.ndarray | None:
    return client_vector(agg, delta, layout, n) if dp is None else noised_client_vector(agg, delta, layout, dp)


def _server_step(
    agg: SecureAggregator,
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    layout: Layout,
    result: AggregateResult,
    round_: int,
    dp: NoiseShares | None,
    notes: dict[str, Any],
) -> Adapter | None:
    """The next adapter from the protocol's sum: the weighted (or DP-noised) mean delta, applied."""
    weighted_sum, total_weight = split_weight(result.values, agg.params)
    if dp is None:
        total, factor = weighted_sum, agg.weight_bound / total_weight
    else:
        total, factor = _topped_up(weighted_sum, dp, len(result.survivors), notes), 1.0 / dp.denominator
    mean = np.multiply(total, factor, out=np.empty(total.size, dtype=np.float32), casting="same_kind")  # float64 math
    return rnd.apply_mean_delta(spec, adapter, unflatten(torch.from_numpy(mean), layout), len(result.survivors), round_)


def _topped_up(noised_sum: np.ndarray, dp: NoiseShares, survivors: int, notes: dict[str, Any]) -> np.ndarray:
    std = dp.top_up_std(survivors)
    if std == 0:
        return noised_sum
    notes["dp_noise_topped_up"] = {"survivors": survivors, "expected": dp.denominator}
    log.warning("secure aggregation: %d of %g expected clients survived; the server adds the missing noise", survivors, dp.denominator)
    return noised_sum + SystemRandomness().normal(noised_sum.shape, std).numpy().astype(np.float64)
