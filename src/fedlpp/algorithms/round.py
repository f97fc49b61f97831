"""One round of any algorithm, as plain functions over adapters and bytes.

Server: ``make_broadcast`` -> bytes to every sampled client; ``server_step`` combines the
round's inputs (``WeightedMean``, ``ClientDpMean``, SecAgg's ``SecureMean``) and applies the
server rule. Client: ``read_broadcast`` -> its starting adapter,
train (``client.py``), ``make_update`` -> bytes. No I/O and no runtime imports: the local
engine and the Flower apps both call these.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from fedlpp.algorithms import factors, fedavg_lora, fedlpp, wire
from fedlpp.algorithms.layout import Layout, check_length, fingerprint, flatten, layout_of, unflatten
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.algorithms.uplink import compressed_payload, decompressed_values
from fedlpp.models.lora import Adapter, copy_adapter, lora_a_from_seed
from fedlpp.privacy.client_dp import NoisedSum, clip_delta, within_norm
from fedlpp.privacy.randomness import Randomness
from fedlpp.quant.stochastic import UplinkSpec

log = logging.getLogger(__name__)

U = TypeVar("U")
U_contra = TypeVar("U_contra", contravariant=True)

BROADCAST, UPDATE = "broadcast", "update"
# Largest adapter magnitude accepted: the broadcast's float16 scales cannot carry more, so a
# larger value from one client would stop every later FedLPP round.
MAX_ABS_VALUE = 65504.0
# With the "mean" rule and a single accepted update, theta_{t+1} would be exactly that
# client's own adapter: the client would hold the server's model.
MIN_UPDATES_FOR_MEAN = 2
# The most examples one update may claim where the server does not know the client's size
# (weights are examples / total in float64: a larger count could only overflow or dominate).
MAX_NUM_EXAMPLES = 1 << 40


@dataclass(frozen=True)
class ClientUpdate:
    """A decoded, validated client update."""

    client_id: int
    values: torch.Tensor  # theta_k - start as one float32 vector in wire order
    layout: Layout  # the trained tensors' names and shapes, in wire order
    num_examples: int

    @functools.cached_property
    def delta(self) -> Adapter:
        """The update tensor by tensor (the plain mean works on ``values`` directly)."""
        return unflatten(self.values, self.layout)


@dataclass(frozen=True)
class AggregateResult:
    adapter: Adapter
    accepted: tuple[int, ...]  # client ids whose updates were used
    rejected: dict[int, str]  # client id -> why its update was refused
    notes: dict[str, Any] = field(default_factory=dict)  # what the round's metrics row should say (SecAgg, DP top-up)


def update_layout(spec: AlgorithmSpec, shapes: Mapping[str, Sequence[int]], round_: int) -> Layout:
    """The tensors clients train and send in ``round_``, in wire order."""
    return layout_of(shapes, spec.trained_names(shapes, round_))


def broadcast_layout(spec: AlgorithmSpec, shapes: Mapping[str, Sequence[int]]) -> Layout:
    """The tensors the server sends, in wire order."""
    return layout_of(shapes, spec.broadcast_names(shapes))


def _shapes(adapter: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in adapter.items()}


def make_broadcast(spec: AlgorithmSpec, adapter: Mapping[str, torch.Tensor], a_seed: int, round_: int) -> bytes:
    """What the server sends every sampled client this round.

    FFA variants send the seed of A instead of A. FedLPP variants send codes and scales
    only: the full-precision adapter never appears in the message.
    """
    layout = broadcast_layout(spec, _shapes(adapter))
    meta: dict[str, object] = {"algorithm": spec.name, "round": round_, "layout": fingerprint(layout)}
    if spec.a_from_seed:
        meta["a_seed"] = a_seed
    if spec.quant is None:
        tensors = fedavg_lora.full_precision_payload(adapter, layout)
    else:
        tensors = fedlpp.quantized_payload(adapter, layout, spec.quant)
        meta["quant"] = fedlpp.spec_meta(spec.quant)
    return wire.encode(BROADCAST, tensors, meta)


def read_broadcast(payload: bytes, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Adapter, int]:
    """The client's starting adapter and the round number, rebuilt from a broadcast.

    ``shapes`` are the client's own adapter shapes (it knows its model); frozen A tensors
    are regenerated from the seed.
    """
    tensors, meta = wire.decode(payload, BROADCAST)
    frozen_a = "a_seed" in meta
    layout = layout_of(shapes, factors.broadcast_names(shapes, frozen_a))
    if meta.get("layout") != fingerprint(layout):
        raise wire.WireError("broadcast layout does not match this client's adapter (model or LoRA config differ)")
    if "quant" in meta:
        start = fedlpp.dequantized_adapter(tensors, layout, fedlpp.spec_from_meta(meta["quant"]))  # type: ignore[arg-type]
    else:
        start = unflatten(tensors[fedavg_lora.VALUES], layout)
    if frozen_a:
        start.update(lora_a_from_seed(shapes, int(meta["a_seed"])))  # type: ignore[call-overload]
    return start, int(meta["round"])  # type: ignore[call-overload]


def make_update(
    delta: Mapping[str, torch.Tensor],
    num_examples: int,
    round_: int,
    uplink: UplinkSpec | None = None,
    rng: Randomness | None = None,
) -> bytes:
    """A client's update: its delta as one float32 vector in wire order, or (``uplink``) its b-bit
    stochastic rounding with one float16 scale per block, the rounding drawn from ``rng``."""
    layout = layout_of(_shapes(delta), sorted(delta))
    meta: dict[str, object] = {"num_examples": num_examples, "round": round_, "layout": fingerprint(layout)}
    if uplink is None:
        return wire.encode(UPDATE, fedavg_lora.full_precision_payload(delta, layout), meta)
    if rng is None:
        raise ValueError("a compressed update needs the randomness its rounding draws from")
    meta["uplink"] = uplink.as_meta()
    return wire.encode(UPDATE, compressed_payload(flatten(delta, layout), uplink, rng), meta)


def proxy_point(spec: AlgorithmSpec, adapter: Mapping[str, torch.Tensor]) -> Adapter:
    """The adapter clients actually start from: Q_w(theta) for FedLPP, theta otherwise."""
    if spec.quant is None:
        return dict(adapter)
    return fedlpp.proxy_of(adapter, broadcast_layout(spec, _shapes(adapter)), spec.quant)


def validate_update(
    payload: bytes,
    client_id: int,
    layout: Layout,
    round_: int,
    declared: int | None = None,
    uplink: UplinkSpec | None = None,
) -> ClientUpdate:
    """Decode one update and check layout (names, shapes), encoding, dtype, size, finiteness, round, count.

    ``declared``: the client's number of examples as the server knows it (its partition, or
    what the node said when it joined); an update may not claim more. Where it is unknown the
    count is only bounded by MAX_NUM_EXAMPLES: the server cannot check a client's data.
    ``uplink``: the run's compressed encoding (None: float32 values); no other is accepted.
    """
    tensors, meta = wire.decode(payload, UPDATE)
    if meta.get("layout") != fingerprint(layout):
        raise ValueError("tensor layout (names or shapes) differs from the server's adapter")
    values = _float_values(tensors, meta, layout) if uplink is None else decompressed_values(tensors, meta, uplink, layout)
    _check_magnitude(values)
    r = meta.get("round")
    if type(r) is not int or r != round_:  # exactly an int: true or 1.0 is not a round number
        raise ValueError(f"update is for round {r!r}, expected {round_}")
    n = meta.get("num_examples")
    if type(n) is not int or n <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {_brief(n)}")
    if declared is not None and n > declared:
        raise ValueError(f"num_examples {n} is more than the {declared} examples this client declared")
    if n > MAX_NUM_EXAMPLES:
        raise ValueError(f"num_examples {_brief(n)} is more than {MAX_NUM_EXAMPLES}")
    return ClientUpdate(client_id, values, layout, n)


def _float_values(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object], layout: Layout) -> torch.Tensor:
    """A plain update's one float32 vector, checked against the layout."""
    if "uplink" in meta:
        raise ValueError(f"a compressed update ({meta['uplink']!r}) where the run sends float32 (uplink.bits = 32)")
    values = tensors.get(fedavg_lora.VALUES)
    if values is None or set(tensors) != {fedavg_lora.VALUES}:
        raise ValueError(f"expected one {fedavg_lora.VALUES!r} tensor, got {sorted(tensors)}")
    if values.dtype != torch.float32:
        raise ValueError(f"dtype {values.dtype}, expected torch.float32")
    if values.ndim != 1:
        raise ValueError(f"values must be a flat vector, got shape {tuple(values.shape)}")
    check_length(values, layout)
    return values


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check_magnitude(values: torch.Tensor) -> None:
    """Every value finite and within MAX_ABS_VALUE; one pass over the vector when it is."""
    if not values.numel():
        return
    low, high = (float(x) for x in torch.aminmax(values))  # NaN anywhere makes both NaN
    if low >= -MAX_ABS_VALUE and high <= MAX_ABS_VALUE:
        return
    if not torch.isfinite(values).all():
        raise ValueError("contains NaN or Inf")
    raise ValueError(f"a value exceeds {MAX_ABS_VALUE:g} in magnitude")


@dataclass(frozen=True)
class Combined:
    """What a combiner makes of a round's inputs: the mean delta to apply and who contributed."""

    mean_delta: Adapter | None  # None: nothing to apply (the adapter is kept)
    contributors: tuple[int, ...]
    rejected: dict[int, str]


class Combiner(Protocol[U_contra]):
    """Turns a round's inputs (update bytes, or the SecAgg protocol's sum) into a mean delta."""

    def __call__(
        self, spec: AlgorithmSpec, adapter: Mapping[str, torch.Tensor], inputs: U_contra, round_: int, notes: dict[str, Any]
    ) -> Combined: ...


def server_step(
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    inputs: U,
    round_: int,
    combiner: Combiner[U],
) -> AggregateResult:
    """The next server adapter: combine the round's inputs, then apply the algorithm's server rule.

    ``combiner`` is the composable part (``WeightedMean``, ``ClientDpMean``, or SecAgg's
    ``SecureMean``); the server rule and its guards are the same for all of them.
    """
    notes: dict[str, Any] = {}
    combined = combiner(spec, adapter, inputs, round_, notes)
    new = None
    if combined.mean_delta is not None:
        new = apply_mean_delta(spec, adapter, combined.mean_delta, len(combined.contributors), round_)
    accepted = combined.contributors if new is not None else ()
    return AggregateResult(new if new is not None else copy_adapter(adapter), accepted, combined.rejected, notes)


@dataclass(frozen=True)
class WeightedMean:
    """Plain FedAvg: every valid update, weighted by its example count (at most what its client declared)."""

    declared: Mapping[int, int] | None = None  # client id -> number of examples, where the server knows it
    uniform: bool = False  # every update weighs the same, whatever count it claims (fl.weighting)

    def __call__(
        self,
        spec: AlgorithmSpec,
        adapter: Mapping[str, torch.Tensor],
        inputs: Sequence[tuple[int, bytes]],
        round_: int,
        notes: dict[str, Any],
    ) -> Combined:
        updates, rejected = validate_all(spec, adapter, inputs, round_, self.declared)
        if not updates:
            log.warning("round %d: no valid update; the global adapter is unchanged", round_)
            return Combined(None, (), rejected)
        weights = [1] * len(updates) if self.uniform else [u.num_examples for u in updates]
        mean = fedavg_lora.weighted_mean([u.values for u in updates], weights)
        return Combined(unflatten(mean, updates[0].layout), tuple(u.client_id for u in updates), rejected)


@dataclass(frozen=True)
class ClientDpMean:
    """Client-level DP: deltas clipped to S (a longer one is refused), their sum noised, over a public count.

    Every sampled client's slot counts even when its update is refused or missing: the
    denominator is the expected number of clients, never the number that arrived.
    """

    noised: NoisedSum
    declared: Mapping[int, int] | None = None

    def __call__(
        self,
        spec: AlgorithmSpec,
        adapter: Mapping[str, torch.Tensor],
        inputs: Sequence[tuple[int, bytes]],
        round_: int,
        notes: dict[str, Any],
    ) -> Combined:
        updates, rejected = validate_all(spec, adapter, inputs, round_, self.declared)
        accepted = []
        for u in updates:
            if within_norm(u.delta, self.noised.clip_norm):
                accepted.append(u)
            else:
                rejected[u.client_id] = f"delta norm exceeds privacy.clip_norm={self.noised.clip_norm:g}"
                log.warning("round %d: rejected the update of client %d: %s", round_, u.client_id, rejected[u.client_id])
        shapes = dict(update_layout(spec, _shapes(adapter), round_))
        # Within float32 rounding of S, but never more than S: the accounted sensitivity holds exactly.
        mean_delta = self.noised.mean([clip_delta(u.delta, self.noised.clip_norm) for u in accepted], shapes)
        return Combined(mean_delta, tuple(u.client_id for u in accepted), rejected)


def aggregate(
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    payloads: Sequence[tuple[int, bytes]],
    round_: int,
) -> AggregateResult:
    """The next server adapter from (client id, update bytes) pairs (``server_step`` with ``WeightedMean``).

    Invalid updates are logged with the client and the reason and left out; with no
    valid update the adapter is returned unchanged.
    """
    return server_step(spec, adapter, payloads, round_, WeightedMean())


def validate_all(
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    payloads: Sequence[tuple[int, bytes]],
    round_: int,
    declared: Mapping[int, int] | None = None,
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """The valid updates, and why each other one was refused (logged).

    One update per client per round: a client that sent several has all of them refused
    (which one is genuine cannot be told), so no client counts twice towards the mean.
    """
    layout = update_layout(spec, _shapes(adapter), round_)
    counts = Counter(client_id for client_id, _ in payloads)
    updates, rejected = [], {}
    for client_id, payload in payloads:
        try:
            if counts[client_id] > 1:
                raise ValueError(
                    f"{counts[client_id]} updates from this client in one round; one per client per round is accepted"
                )
            updates.append(validate_update(payload, client_id, layout, round_, (declared or {}).get(client_id), spec.uplink))
        except (ValueError, wire.WireError) as e:
            if client_id not in rejected:
                log.warning("round %d: rejected the update of client %d: %s", round_, client_id, e)
            rejected[client_id] = str(e)
    return updates, rejected


def aggregate_private(
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    payloads: Sequence[tuple[int, bytes]],
    round_: int,
    noised: NoisedSum,
) -> AggregateResult:
    """Client-level DP's server step (``server_step`` with ``ClientDpMean``)."""
    return server_step(spec, adapter, payloads, round_, ClientDpMean(noised))


def within_broadcast_range(adapter: Mapping[str, torch.Tensor]) -> bool:
    """Every value finite and within MAX_ABS_VALUE: what the broadcast's float16 scales can carry."""
    return all(
        bool(torch.isfinite(t).all()) and (not t.numel() or float(t.abs().max()) <= MAX_ABS_VALUE) for t in adapter.values()
    )


def apply_mean_delta(
    spec: AlgorithmSpec, adapter: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor], count: int, round_: int
) -> Adapter | None:
    """The server step from the clients' weighted mean delta, or None to keep the adapter.

    Used by ``aggregate`` and by secure aggregation, where the server only ever learns
    the mean over ``count`` clients, never an individual update.
    """
    if spec.quant is not None and spec.server_rule == "mean" and count < MIN_UPDATES_FOR_MEAN:
        log.warning(
            "round %d: one valid update; the mean rule would hand that client the server's adapter, "
            "so the global adapter is unchanged",
            round_,
        )
        return None
    proxy = proxy_point(spec, adapter) if spec.server_rule == "mean" else dict(adapter)
    new = fedavg_lora.server_step(adapter, proxy, mean_delta, spec.server_rule, spec.server_lr)
    if not within_broadcast_range(new):
        log.warning("round %d: the aggregate is not finite or exceeds %g; the global adapter is unchanged", round_, MAX_ABS_VALUE)
        return None
    return new
