"""Bytes per client per round, down and up, for every algorithm, from real serialized payloads.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/communication.py                  # SmolLM2-135M, r=8
    HF_HUB_OFFLINE=1 .venv/bin/python bench/communication.py --model tiny-llama   # seconds
    ... --out bench/results/communication.json (the default)

Every number is ``len()`` of a message built by ``fedlpp.algorithms.round``: ``make_broadcast``
for the downlink and ``make_update`` (over the tensors a client trains) for the uplink, on the
model's real q_proj/v_proj LoRA adapter with A from its seed and B ~ N(0, 0.01²) (sizes do not
depend on values, but nothing here is computed from a formula). Ratios are against
FedAvg+LoRA in float32 ("down x": whole message; "data x": tensor bytes only, header left out
on both sides; "up x": the uplink, float32 or ``uplink.bits`` b-bit stochastic rounding with a
float16 scale per 64 values, whose rounding draws come from a seeded generator here; and under
SecAgg in Z_2^b (``secagg.modulus_bits``) every byte a client sends in one real protocol round
of 3 clients, divided by 3; distributed DP adds each client's discrete Gaussian share before
masking, which changes no byte count). The theory column is the payload alone, w + 16/group bits per value (w=1
ternary is packed 5 trits per byte, i.e. 1.6 bits: the "packed" column); the difference to the
measured bits/value is the safetensors header (tensor index + message metadata JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fedlpp.algorithms.rotation import Rotation
from fedlpp.algorithms.round import make_broadcast, make_update
from fedlpp.algorithms.secure import RotatedInput, RotatedMean, SecureEncoding, SecureInput, SecureMean
from fedlpp.algorithms.spec import AlgorithmSpec, get_algorithm
from fedlpp.config import QuantConfig, SecAggConfig
from fedlpp.engine.secure import make_aggregator, secure_aggregate
from fedlpp.engine.setup import secagg_params
from fedlpp.models.backbone import load_backbone
from fedlpp.models.lora import Adapter, adapter_shapes, attach_lora, initial_adapter
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.provenance import code_version
from fedlpp.quant import QuantSpec, storage_bits
from fedlpp.quant.stochastic import UplinkSpec

DEFAULT_OUT = Path(__file__).parent / "results" / "communication.json"
SEED = 0
ROUND = 3
NUM_EXAMPLES = 250
BITS = (1, 2, 3, 4, 8)
GRANULARITIES = (("block", 64), ("row", 64), ("tensor", 64))
TARGETS = {"fedlpp": 0.075, "fedlpp_ffa": 0.04}  # downlink / FedAvg+LoRA at w=2, block 64
UPLINK_BITS = (8, 4, 2)  # uplink.bits rows, for FedAvg+LoRA and FedLPP+FFA w=2 block 64
UPLINK_TARGETS = {"fedavg_lora": (4, 0.15)}  # uplink / FedAvg+LoRA float32 at b=4 (issue: plain uplink compression)
SECAGG_BITS = {32: None, 16: 0.55, 12: 0.42}  # secagg.modulus_bits -> the uplink target (x FedAvg+LoRA float32)
DISTRIBUTED = (16, 1.0)  # distributed DP's row: the field's bits and the noise multiplier z (clip norm 1)
SECAGG_CLIENTS = 3  # the fewest SecAgg allows: each client's share of the protocol's messages is then largest


@dataclass(frozen=True)
class Row:
    algorithm: str
    bits: int | None  # None = float32 broadcast
    granularity: str | None
    block_size: int | None
    values_down: int  # adapter values represented in the broadcast
    values_up: float  # mean over two consecutive rounds (RoLoRA alternates A and B)
    down_bytes: int
    up_bytes: float
    down_header_bytes: int  # safetensors header incl. metadata JSON
    down_ratio: float  # to FedAvg+LoRA float32
    down_payload_ratio: float  # tensor data only (header left out on both sides)
    up_ratio: float
    bits_per_value_measured: float  # 8 * down_bytes / values_down
    bits_per_value_theory: float | None  # w + 16/block (block granularity)
    bits_per_value_packed: float | None  # storage bits (1.6 for ternary) + scale bits, no header
    uplink_bits: int = 32  # 32 = float32 updates; else uplink.bits


def realistic_adapter(shapes: Mapping[str, tuple[int, ...]], seed: int) -> Adapter:
    """A from the seed (as every run starts), B small and non-zero as after some training."""
    adapter = initial_adapter(shapes, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    for name, t in adapter.items():
        if ".lora_B." in name:
            adapter[name] = torch.randn(t.shape, generator=gen) * 0.01
    return adapter


def client_delta(adapter: Mapping[str, torch.Tensor], names: list[str], seed: int) -> Adapter:
    """theta_k - start for the trained tensors: small random values, float32."""
    gen = torch.Generator().manual_seed(seed + 3)
    return {n: torch.randn(adapter[n].shape, generator=gen) * 1e-3 for n in names}


def header_bytes(payload: bytes) -> int:
    return 8 + int.from_bytes(payload[:8], "little")


def measure(spec: AlgorithmSpec, adapter: Adapter, a_seed: int) -> tuple[int, int, float, int, float]:
    """(down bytes, down header bytes, up bytes, values down, values up) for one spec.

    The uplink is the mean over two consecutive rounds: RoLoRA sends A in one and B in the other.
    """
    shapes = {n: tuple(t.shape) for n, t in adapter.items()}
    down = make_broadcast(spec, adapter, a_seed, ROUND)
    values_down = sum(adapter[n].numel() for n in spec.broadcast_names(shapes))
    ups, values_up = [], []
    for round_ in (ROUND, ROUND + 1):
        names = spec.trained_names(shapes, round_)
        delta = client_delta(adapter, names, SEED)
        ups.append(len(make_update(delta, NUM_EXAMPLES, round_, spec.uplink, SeededRandomness(SEED))))
        values_up.append(sum(adapter[n].numel() for n in names))
    return len(down), header_bytes(down), sum(ups) / 2, values_down, sum(values_up) / 2


def theory_bits(quant: QuantSpec | None, values: int, tensors: int, rows: int) -> tuple[float | None, float | None]:
    """Nominal w + 16/group and the packed equivalent, per value, without any header."""
    if quant is None:
        return None, None
    groups_per_value = {"block": 1 / quant.block_size, "row": rows / values, "tensor": tensors / values}
    scale_bits = 16 * groups_per_value[quant.granularity]
    return quant.bits + scale_bits, storage_bits(quant.bits) + scale_bits


def row_for(spec: AlgorithmSpec, adapter: Adapter, a_seed: int, reference: tuple[int, int, int]) -> Row:
    """One table row; ``reference`` is FedAvg+LoRA's (down bytes, down header bytes, up bytes)."""
    down, head, up, v_down, v_up = measure(spec, adapter, a_seed)
    shapes = {n: tuple(t.shape) for n, t in adapter.items()}
    names = spec.broadcast_names(shapes)
    rows = sum(shapes[n][0] for n in names)
    theory, packed = theory_bits(spec.quant, v_down, len(names), rows)
    q = spec.quant
    return Row(
        algorithm=spec.name,
        bits=q.bits if q else None,
        granularity=q.granularity if q else None,
        block_size=q.block_size if q and q.granularity == "block" else None,
        values_down=v_down,
        values_up=v_up,
        down_bytes=down,
        up_bytes=up,
        down_header_bytes=head,
        down_ratio=down / reference[0],
        down_payload_ratio=(down - head) / (reference[0] - reference[1]),
        up_ratio=up / reference[2],
        bits_per_value_measured=8 * down / v_down,
        bits_per_value_theory=theory,
        bits_per_value_packed=packed,
        uplink_bits=spec.uplink.bits if spec.uplink else 32,
    )


def all_specs() -> list[AlgorithmSpec]:
    any_quant = QuantSpec(bits=2)
    specs = [get_algorithm(name, any_quant, "mean", 1.0) for name in ("fedavg_lora", "ffa_lora", "rolora")]
    for name in ("fedlpp", "fedlpp_ffa"):
        for granularity, block in GRANULARITIES:
            for bits in BITS:
                specs.append(get_algorithm(name, QuantSpec(bits, granularity, block), "mean", 1.0))
    for name in ("fedavg_lora", "fedlpp_ffa"):
        for bits in UPLINK_BITS:
            specs.append(get_algorithm(name, QuantSpec(bits=2), "mean", 1.0, UplinkSpec(bits)))
    return specs


def format_row(r: Row) -> str:
    quant = "float32" if r.bits is None else f"w={r.bits} {r.granularity}{r.block_size or ''}"
    quant += "" if r.uplink_bits == 32 else f" up{r.uplink_bits}"
    theory = "" if r.bits_per_value_theory is None else f"{r.bits_per_value_theory:7.3f} {r.bits_per_value_packed:7.3f}"
    return (
        f"{r.algorithm:<11} {quant:<16} {r.down_bytes:>10,} {r.down_ratio:>8.4f} {r.up_bytes:>10,.0f} {r.up_ratio:>7.4f}"
        f" {r.down_header_bytes:>7,} {r.down_payload_ratio:>7.4f} {r.bits_per_value_measured:>8.3f} {theory}"
    )


def print_table(rows: list[Row]) -> None:
    print(
        f"{'algorithm':<11} {'broadcast':<16} {'down B':>10} {'down x':>8} {'up B':>10} {'up x':>7}"
        f" {'header':>7} {'data x':>7} {'bits/val':>8} {'theory':>7} {'packed':>7}"
    )
    for r in rows:
        print(format_row(r))


def find(rows: list[Row], algorithm: str, bits: int | None, granularity: str | None, uplink_bits: int = 32) -> Row:
    return next(
        r
        for r in rows
        if r.algorithm == algorithm and r.bits == bits and r.granularity == granularity and r.uplink_bits == uplink_bits
    )


def check_targets(rows: list[Row]) -> dict[str, dict[str, object]]:
    """The downlink targets at w=2 block 64, and what the configured default granularity gives."""
    default = QuantConfig()
    checks: dict[str, dict[str, object]] = {}
    for algorithm, limit in TARGETS.items():
        for label, granularity in (("block64", "block"), (f"config default ({default.granularity})", default.granularity)):
            r = find(rows, algorithm, 2 if label == "block64" else default.bits, granularity)
            key = f"{algorithm} w={r.bits} {label}"
            checks[key] = {"down_ratio": r.down_ratio, "limit": limit, "holds": r.down_ratio <= limit}
            print(f"target {key:<40} down {r.down_ratio:.4f}x <= {limit}x: {'HOLDS' if r.down_ratio <= limit else 'FAILS'}")
    return checks


def uplink_table(rows: list[Row]) -> dict[str, dict[str, object]]:
    """Each uplink configuration's bytes and ratio to FedAvg+LoRA's float32 update, and the b=4 target."""
    table: dict[str, dict[str, object]] = {}
    for r in rows:
        if r.granularity not in (None, "block") or (r.bits not in (None, 2)) or r.algorithm not in ("fedavg_lora", "fedlpp_ffa"):
            continue
        key = f"{r.algorithm} uplink {'float32' if r.uplink_bits == 32 else f'{r.uplink_bits}-bit'}"
        table[key] = {"up_bytes": r.up_bytes, "uplink_ratio": r.up_ratio}
        limit = UPLINK_TARGETS.get(r.algorithm)
        if limit and r.uplink_bits == limit[0]:
            table[key].update({"limit": limit[1], "holds": r.up_ratio <= limit[1]})
            print(f"target {key:<40} up {r.up_ratio:.4f}x <= {limit[1]}x: {'HOLDS' if r.up_ratio <= limit[1] else 'FAILS'}")
    return table


def secagg_uplink(adapter: Adapter, up_reference: int) -> dict[str, dict[str, object]]:
    """FedAvg+LoRA under SecAgg in Z_2^b: every byte a client sends in one real protocol round (advertisement,
    encrypted shares, masked input, signature, revealed shares) over SECAGG_CLIENTS clients, per client."""
    spec = get_algorithm("fedavg_lora", QuantSpec(bits=2), "mean", 1.0)
    shapes = {n: tuple(t.shape) for n, t in adapter.items()}
    table: dict[str, dict[str, object]] = {}
    configurations = [(bits, limit, 0.0) for bits, limit in SECAGG_BITS.items()] + [(DISTRIBUTED[0], None, DISTRIBUTED[1])]
    for bits, limit, z in configurations:
        params = secagg_params(SecAggConfig(modulus_bits=bits), SECAGG_CLIENTS)
        bound = 1.0 if z else SecAggConfig().l2_bound  # under DP the bound is privacy.clip_norm
        rotation = Rotation(bits, SECAGG_CLIENTS, bound, SEED, z) if bits < 32 else None
        encoding = SecureEncoding(params, 1, rotation)
        encode = RotatedInput(encoding, SEED, False) if rotation else SecureInput(encoding)
        combiner = RotatedMean(encoding) if rotation else SecureMean(encoding)
        deltas = {c: client_delta(adapter, spec.trained_names(shapes, ROUND), SEED + c) for c in range(SECAGG_CLIENTS)}
        inputs = {c: functools.partial(encode, deltas[c], 1, ROUND, c) for c in deltas}
        outcome = secure_aggregate(make_aggregator(encoding, SECAGG_CLIENTS), spec, adapter, inputs, ROUND, combiner)
        assert outcome.adapter is not None, outcome.notes
        up = outcome.bytes_up / SECAGG_CLIENTS
        key = f"fedavg_lora {'distributed DP' if z else 'secagg'} {bits}-bit"
        table[key] = {"up_bytes": up, "uplink_ratio": up / up_reference}
        if limit is not None:
            table[key].update({"limit": limit, "holds": up / up_reference <= limit})
        verdict = "" if limit is None else f" <= {limit}x: {'HOLDS' if up / up_reference <= limit else 'FAILS'}"
        print(f"{key:<30} up {up:>12,.0f} B {up / up_reference:.4f}x{verdict}")
    return table


def main() -> None:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="short name, e.g. smollm2-135m or tiny-llama")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    backbone = load_backbone(args.model, "generation")
    model = attach_lora(backbone, "generation", args.r, 16, 0.0)
    shapes = adapter_shapes(model)
    adapter = realistic_adapter(shapes, SEED)
    a_seed = 12345
    total = sum(t.numel() for t in adapter.values())
    print(f"model {args.model}, LoRA r={args.r} on {backbone.default_targets}: {len(shapes)} tensors, {total:,} values")

    specs = all_specs()
    down_ref, head_ref, up_ref, _, _ = measure(specs[0], adapter, a_seed)
    rows = [row_for(s, adapter, a_seed, (down_ref, head_ref, up_ref)) for s in specs]
    print_table(rows)
    checks = check_targets(rows)
    uplink = uplink_table(rows)
    uplink.update(secagg_uplink(adapter, up_ref))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "lora_r": args.r,
        "adapter_values": total,
        "adapter_tensors": len(shapes),
        "reference": {
            "algorithm": "fedavg_lora float32",
            "down_bytes": down_ref,
            "down_header_bytes": head_ref,
            "up_bytes": up_ref,
        },
        "config_default_quant": asdict(QuantConfig()),
        "rows": [asdict(r) for r in rows],
        "targets": checks,
        "uplink": uplink,
    }
    args.out.write_text(json.dumps({**report, "code": code_version()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
