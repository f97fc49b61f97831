"""One round of any algorithm, as plain functions over adapters and bytes.

Server: ``make_broadcast`` -> bytes to every sampled client; ``aggregate`` the clients'
update bytes into the next adapter. Client: ``read_broadcast`` -> its starting adapter,
train (``client.py``), ``make_update`` -> bytes. No I/O and no runtime imports: the local
engine and the Flower apps both call these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlpp.algorithms import fedavg_lora, fedlpp, ffa_lora, wire
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.models.lora import Adapter, lora_a_from_seed

log = logging.getLogger(__name__)

BROADCAST, UPDATE = "broadcast", "update"


@dataclass(frozen=True)
class ClientUpdate:
    """A decoded, validated client update."""

    client_id: int
    delta: Adapter  # theta_k - start, for the trained tensors only
    num_examples: int


@dataclass(frozen=True)
class AggregateResult:
    adapter: Adapter
    accepted: tuple[int, ...]  # client ids whose updates were used
    rejected: dict[int, str]  # client id -> why its update was refused


def make_broadcast(spec: AlgorithmSpec, adapter: Mapping[str, torch.Tensor], a_seed: int, round_: int) -> bytes:
    """What the server sends every sampled client this round.

    FFA variants send the seed of A instead of A. FedLPP variants send codes and scales
    only: the full-precision adapter never appears in the message.
    """
    shapes = {n: tuple(t.shape) for n, t in adapter.items()}
    names = ffa_lora.trained_names(shapes, spec.freeze_a)
    meta: dict[str, object] = {"algorithm": spec.name, "round": round_, "names": names}
    if spec.freeze_a:
        meta["a_seed"] = a_seed
    if spec.quant is None:
        tensors = fedavg_lora.full_precision_payload(adapter, names)
    else:
        tensors, meta["quant"] = fedlpp.quantized_payload(adapter, names, spec.quant)
    return wire.encode(BROADCAST, tensors, meta)


def read_broadcast(payload: bytes, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Adapter, int]:
    """The client's starting adapter and the round number, rebuilt from a broadcast.

    ``shapes`` are the client's own adapter shapes (it knows its model); frozen A tensors
    are regenerated from the seed.
    """
    tensors, meta = wire.decode(payload, BROADCAST)
    if "quant" in meta:
        start = fedlpp.dequantized_adapter(tensors, meta["quant"])  # type: ignore[arg-type]
    else:
        start = {n: t.to(torch.float32) for n, t in tensors.items()}
    if "a_seed" in meta:
        start.update(lora_a_from_seed(shapes, int(meta["a_seed"])))  # type: ignore[call-overload]
    missing = sorted(set(shapes) - set(start))
    if missing:
        raise wire.WireError(f"broadcast lacks adapter tensors {missing[:3]}")
    return start, int(meta["round"])  # type: ignore[call-overload]


def make_update(delta: Mapping[str, torch.Tensor], num_examples: int, round_: int) -> bytes:
    return wire.encode(UPDATE, dict(delta), {"num_examples": num_examples, "round": round_})


def proxy_point(spec: AlgorithmSpec, adapter: Mapping[str, torch.Tensor]) -> Adapter:
    """The adapter clients actually start from: Q_w(theta) for FedLPP, theta otherwise."""
    if spec.quant is None:
        return dict(adapter)
    names = ffa_lora.trained_names({n: tuple(t.shape) for n, t in adapter.items()}, spec.freeze_a)
    return fedlpp.proxy_of(adapter, names, spec.quant)


def validate_update(
    payload: bytes, client_id: int, expected: Mapping[str, tuple[int, ...]], round_: int
) -> ClientUpdate:
    """Decode one update and check names, shapes, dtype, finiteness, round and example count."""
    tensors, meta = wire.decode(payload, UPDATE)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"wrong tensor names (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(expected[name])}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: dtype {t.dtype}, expected torch.float32")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    if meta.get("round") != round_:
        raise ValueError(f"update is for round {meta.get('round')}, expected {round_}")
    n = meta.get("num_examples")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {n!r}")
    return ClientUpdate(client_id, tensors, n)


def aggregate(
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    payloads: Sequence[tuple[int, bytes]],
    round_: int,
) -> AggregateResult:
    """The next server adapter from (client id, update bytes) pairs.

    Invalid updates are logged with the client and the reason and left out; with no
    valid update the adapter is returned unchanged.
    """
    shapes = {n: tuple(t.shape) for n, t in adapter.items()}
    expected = {n: shapes[n] for n in ffa_lora.trained_names(shapes, spec.freeze_a)}
    updates, rejected = [], {}
    for client_id, payload in payloads:
        try:
            updates.append(validate_update(payload, client_id, expected, round_))
        except (ValueError, wire.WireError) as e:
            rejected[client_id] = str(e)
            log.warning("round %d: rejected the update of client %d: %s", round_, client_id, e)
    if not updates:
        log.warning("round %d: no valid update; the global adapter is unchanged", round_)
        return AggregateResult({n: t.clone() for n, t in adapter.items()}, (), rejected)
    mean_delta = fedavg_lora.weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
    proxy = proxy_point(spec, adapter) if spec.server_rule == "mean" else dict(adapter)
    new = fedavg_lora.server_step(adapter, proxy, mean_delta, spec.server_rule, spec.server_lr)
    return AggregateResult(new, tuple(u.client_id for u in updates), rejected)
