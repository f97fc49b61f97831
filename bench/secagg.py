"""Round time and bytes of secure aggregation against plain aggregation, side by side.

Usage:
    .venv/bin/python bench/secagg.py --quick     # 10 clients x 300k values only (seconds)
    .venv/bin/python bench/secagg.py             # 10/20/50 clients x 300k/1M, complete + sparse
    ... --prg aes256-ctr --reps 3 --out bench/results/secagg.json (the default)

Everything runs in one process, one step after another, on one core (no threads), as the
local engine would run it. For each configuration:

- plain: every client serializes its float32 vector (``tobytes``), the server decodes each
  (``np.frombuffer``) and sums into a float64 accumulator -- the work a plain server does.
- secagg: the full protocol (``fedlpp.secagg``): client sessions (key generation), the five
  client steps and the five server steps, with fixed-point encoding, Shamir shares,
  encrypted share routing, masking, the consistency check and unmasking. No dropouts.

"total" is the sum of all client and server work (what one process spends); "critical" is
the server's work plus, for each step, the slowest client (what a round would take if the
clients ran in parallel). Bytes are per client per round: "up" what it sends, "down" what
it receives, protocol headers included (plain counts the raw vector only). The aggregate is
checked against the float sum (|error| <= n / scale) in every run. Times are medians over
``--reps`` repetitions.

On the 2x target: plain aggregation is one memcpy-speed decode-and-add per client (~0.5 ms
per 300k values here), while every SecAgg client must expand one ChaCha20 stream per
neighbour plus its self mask (~0.45 ms each per 300k values at ~2.8 GB/s) and the server
one per survivor; with a complete graph the sequential ratio therefore grows like n and
cannot reach 2x against a bare numpy sum. The verdict reports both ratios as measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.secagg import (
    ClientSession,
    SecAggParams,
    ServerSession,
    generate_signing_key,
    graph_degree,
    registry_of,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "secagg.json"
CLIENTS = (10, 20, 50)
DIMS = (300_000, 1_000_000)
GRAPHS = ("complete", "sparse")
TARGET = 2.0  # secagg / plain round time at 10 clients x 300k (issue 3)
Vectors = dict[int, npt.NDArray[np.float32]]
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    clients: int
    values: int
    graph: str
    degree: int
    prg: str
    plain_s: float
    plain_critical_s: float
    secagg_total_s: float
    secagg_critical_s: float
    ratio_total: float
    ratio_critical: float
    plain_up_bytes: int
    secagg_up_bytes: int
    secagg_down_bytes: int
    max_abs_error: float


class Clock:
    """Seconds per party, the critical path (server + slowest client per step), bytes per client."""

    def __init__(self) -> None:
        self.client_s: dict[int, float] = {}
        self.server_s = 0.0
        self.critical_s = 0.0
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}
        self._slowest = 0.0

    def client(self, c: int, call: Callable[[], T]) -> T:
        """Run one client's work for the current step, timing it."""
        start = time.perf_counter()
        out = call()
        spent = time.perf_counter() - start
        self.client_s[c] = self.client_s.get(c, 0.0) + spent
        self._slowest = max(self._slowest, spent)
        return out

    def end_step(self) -> None:
        """Clients of one step run in parallel in a real deployment: count the slowest."""
        self.critical_s += self._slowest
        self._slowest = 0.0

    def server(self, call: Callable[[], T]) -> T:
        """Run one piece of server work, timing it."""
        start = time.perf_counter()
        out = call()
        spent = time.perf_counter() - start
        self.server_s += spent
        self.critical_s += spent
        return out

    def client_step(self, calls: Mapping[int, Callable[[], bytes]], inbox: Mapping[int, bytes]) -> dict[int, bytes]:
        """One protocol step on every client: timed, and its bytes down (inbox) and up counted."""
        sent = {c: self.client(c, call) for c, call in calls.items()}
        self.end_step()
        for c, message in sent.items():
            self.up[c] = self.up.get(c, 0) + len(message)
            self.down[c] = self.down.get(c, 0) + len(inbox.get(c, b""))
        return sent


def plain_round(inputs: Vectors) -> tuple[Clock, npt.NDArray[np.float64]]:
    """Clients serialize float32, the server decodes each upload and sums: the clock and the sum."""
    clock = Clock()
    sent = clock.client_step({c: x.tobytes for c, x in inputs.items()}, {})
    total = np.zeros(len(next(iter(inputs.values()))), dtype=np.float64)
    for data in sent.values():
        clock.server(partial(np.add, total, np.frombuffer(data, dtype=np.float32), out=total))
    return clock, total


def secagg_round(
    params: SecAggParams, keys: Mapping[int, Ed25519PrivateKey], inputs: Vectors, round_: int
) -> tuple[Clock, npt.NDArray[np.float64]]:
    """One full protocol round, every call timed; returns the clock and the decoded sum."""
    clock = Clock()
    registry = registry_of(keys)
    dim = len(next(iter(inputs.values())))
    server = ServerSession(params, registry, round_, dim)
    # Session creation draws the round's key pairs: client work, timed like a step.
    clients = {c: clock.client(c, partial(ClientSession, c, keys[c], registry, params, round_, dim)) for c in keys}
    clock.end_step()
    sent = clock.client_step({c: s.advertise for c, s in clients.items()}, {})
    inbox = _serve(clock, server.receive_advertisement, server.finish_advertise, sent)
    sent = clock.client_step({c: partial(clients[c].share_keys, m) for c, m in inbox.items()}, inbox)
    inbox = _serve(clock, server.receive_shares, server.finish_share_keys, sent)
    sent = clock.client_step({c: partial(clients[c].masked_input, m, inputs[c]) for c, m in inbox.items()}, inbox)
    inbox = _serve(clock, server.receive_masked_input, server.finish_masked_input, sent)
    sent = clock.client_step({c: partial(clients[c].sign_survivors, m) for c, m in inbox.items()}, inbox)
    inbox = _serve(clock, server.receive_signature, server.finish_consistency, sent)
    sent = clock.client_step({c: partial(clients[c].unmask, m) for c, m in inbox.items()}, inbox)
    for c, m in sent.items():
        clock.server(partial(server.receive_unmask, m, c))
    return clock, clock.server(server.finish_unmask).values


def _serve(
    clock: Clock,
    receive: Callable[[bytes, int], None],
    finish: Callable[[], dict[int, bytes]],
    sent: Mapping[int, bytes],
) -> dict[int, bytes]:
    """The server receives every client's message of a step, then finishes the step."""
    for c, m in sent.items():
        clock.server(partial(receive, m, c))
    return clock.server(finish)


def measure(n: int, dim: int, graph: str, prg: str, reps: int) -> Row:
    """Median plain and secagg round times (and bytes) for one configuration."""
    params = SecAggParams(graph=graph, prg=prg)
    rng = np.random.default_rng(n * 7919 + dim)  # benchmark data only
    inputs = {c: rng.uniform(-0.5, 0.5, dim).astype(np.float32) for c in range(n)}
    keys = {c: generate_signing_key() for c in range(n)}
    plain, plain_critical, total, critical, error = [], [], [], [], 0.0
    clock = Clock()
    for rep in range(reps):  # interleaved, so both see the same machine load
        plain_clock, plain_sum = plain_round(inputs)
        clock, values = secagg_round(params, keys, inputs, rep + 1)
        plain.append(_total(plain_clock))
        plain_critical.append(plain_clock.critical_s)
        total.append(_total(clock))
        critical.append(clock.critical_s)
        error = max(error, float(np.max(np.abs(values - plain_sum))))
    assert error <= n / params.scale, f"aggregate off by {error}"
    p, pk = statistics.median(plain), statistics.median(plain_critical)
    t, k = statistics.median(total), statistics.median(critical)
    return Row(n, dim, graph, graph_degree(params, n), prg, p, pk, t, k, t / p, k / pk, 4 * dim,
               max(clock.up.values()), max(clock.down.values()), error)


def _total(clock: Clock) -> float:
    return sum(clock.client_s.values()) + clock.server_s


HEADER = (f"{'n':>3} {'values':>9} {'graph':>8} {'k':>3} | {'plain s':>8} {'secagg s':>9} {'ratio':>7} | "
          f"{'plain crit':>10} {'secagg crit':>11} {'ratio':>7} | {'up B/client (plain)':>22} {'down B':>9}")


def format_row(r: Row) -> str:
    """One configuration, plain and secagg side by side."""
    config = f"{r.clients:>3} {r.values:>9,} {r.graph:>8} {r.degree:>3}"
    total = f"{r.plain_s:>8.4f} {r.secagg_total_s:>9.3f} {r.ratio_total:>6.1f}x"
    critical = f"{r.plain_critical_s:>10.4f} {r.secagg_critical_s:>11.4f} {r.ratio_critical:>6.1f}x"
    size = f"{r.secagg_up_bytes:>10,} ({r.plain_up_bytes:>9,}) {r.secagg_down_bytes:>9,}"
    return f"{config} | {total} | {critical} | {size}"


def verdict(rows: list[Row]) -> dict[str, object]:
    """Whether secagg <= 2x plain at 10 clients x 300k (complete graph), both ways of counting."""
    row = next(r for r in rows if (r.clients, r.values, r.graph) == (10, 300_000, "complete"))
    return {
        "config": "10 clients x 300,000 values, complete graph",
        "target": f"secagg round time <= {TARGET}x plain",
        "ratio_total": round(row.ratio_total, 2),
        "ratio_critical_path": round(row.ratio_critical, 2),
        "holds": row.ratio_total <= TARGET,
        "why": "plain is one decode+add per client; secagg expands n PRG streams per client (complete graph) "
               "plus n self masks at the server, so the sequential ratio grows with n; see the module docstring",
        "plain_s": row.plain_s,
        "secagg_total_s": row.secagg_total_s,
        "plain_critical_s": row.plain_critical_s,
        "secagg_critical_s": row.secagg_critical_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 10 clients x 300k values")
    parser.add_argument("--prg", default="chacha20", choices=("chacha20", "aes256-ctr"))
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 5 quick, else 3 / 1 for big runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    configs = [(10, 300_000)] if args.quick else [(n, d) for n in CLIENTS for d in DIMS]
    rows: list[Row] = []
    print(f"PRG {args.prg}; one process, sequential, single thread")
    print(HEADER)
    for n, dim in configs:
        for graph in GRAPHS:
            reps = args.reps or (5 if args.quick else (3 if n * dim <= 10 * 10**6 else 1))
            rows.append(measure(n, dim, graph, args.prg, reps))
            print(format_row(rows[-1]), flush=True)
    result = {"machine": platform.processor() or platform.machine(), "prg": args.prg,
              "verdict": verdict(rows), "rows": [asdict(r) for r in rows]}
    print(json.dumps(result["verdict"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
