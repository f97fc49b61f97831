"""Round time and bytes of aggregation with and without secure aggregation, side by side.

Usage:
    .venv/bin/python bench/secagg.py --quick     # 10 clients x 300k values only (seconds)
    .venv/bin/python bench/secagg.py             # 10/20/50 clients x 300k/1M, complete + sparse graph
    ... --prg chacha20 --reps 5 --out bench/results/secagg.json (the default)

Both sides run fedlpp's own code for one FedAvg+LoRA round's aggregation, on a LoRA-shaped
adapter (rank-8 A and B matrices; 300k values = 25 modules of width 750, 1M = 50 of width
1250) and one random delta per client:

- plain: every client serializes its update (``round.make_update``), the server decodes,
  validates and averages them and applies the mean (``round.aggregate``).
- secagg: every client turns its delta into the protocol's input (weighting, range
  check), the full SecAgg protocol runs (key setup, Shamir shares, encrypted share
  routing, mask expansion, masking, consistency check, unmasking; no dropouts), and the
  server applies the mean (``engine.secure.secure_aggregate``).
- bare sum (reference only): the server adds n float32 vectors into a float64 total, the
  least any aggregation can do.
- distributed DP (10 clients x 300k values, after the table): SecAgg in Z_2^16 with each
  client's update rotated, rounded and noised with its discrete Gaussian share
  (``RotatedInput``), the server's ``RotatedMean``; its round time against plain's and against
  central client-level DP's (each client clips its delta, the server noises the sum from the OS
  CSPRNG: ``round.aggregate_private``), the same job with a trusted server, all interleaved.

Each party's work is timed (``secagg.Parties``). "round" is the round's wall-clock when every
client is its own machine: the server's work plus, for each step, the slowest client. That
is the time the target is about. "cpu" is the sum of every party's work: what one process
spends simulating the whole round (the local engine). For secagg, "setup" is the part of
the round that does not depend on the clients' data (sessions, key advertisement, shares,
mask expansion; a runtime can do it before or during local training) and "online" the part
after training. Bytes are per client per round, headers included.

Memory: with glibc's default settings every large temporary array is fresh pages from the
OS, and how many page faults a step takes depends on what ran before it, which made the
plain round vary from 9 to 16 ms between identical configurations. The benchmark therefore
asks glibc (``mallopt``) to keep freed memory (mmap threshold 32 MiB, no trimming) for both
sides alike; ``--default-allocator`` measures without that, and the JSON records which. Every
party is single-threaded: torch and numpy's BLAS (a norm is a BLAS call, which on a busy
2-core machine varied from 0.02 to 8 ms with two threads). Each run checks that the
secure mean equals the plain one to the fixed-point resolution. Times are medians over
``--reps`` repetitions, plain and secagg interleaved so both see the same machine load.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS: every party is single-threaded
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.rotation import Rotation
from fedlpp.algorithms.secure import RotatedInput, RotatedMean, SecureEncoding, SecureInput, SecureMean
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.config import SecAggConfig
from fedlpp.engine.secure import SecureAggregator, make_aggregator, secure_aggregate
from fedlpp.engine.setup import secagg_params
from fedlpp.models.lora import Adapter
from fedlpp.privacy.client_dp import NoisedSum, clip_delta
from fedlpp.privacy.randomness import SystemRandomness
from fedlpp.provenance import code_version
from fedlpp.secagg import graph_degree
from fedlpp.secagg.params import PRGS

DEFAULT_OUT = Path(__file__).parent / "results" / "secagg.json"
CLIENTS = (10, 20, 50)
SHAPES = {300_000: (25, 750), 1_000_000: (50, 1250)}  # values -> (LoRA modules, width); rank 8
RANK = 8
GRAPHS = ("complete", "sparse")
TARGET = 2.0  # secagg / plain round time at 10 clients x 300k values (issue 3)
WARM_UP = 2  # untimed rounds of each kind before a configuration's timed ones
SETUP_STEPS = 4  # secure_aggregate's client steps: input, sessions, advertise, share_keys | masked input, ...
SPEC = AlgorithmSpec("fedavg_lora", None)
T = TypeVar("T")


class Clock:
    """A ``secagg.Parties`` that times each party: per step, the server's work before it and the slowest client."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.timeline: list[tuple[float, float]] = []  # (server seconds before the step, slowest client)
        self._server = 0.0
        self._slowest = 0.0

    def client(self, client: int, work: Callable[[], T]) -> T:
        spent, out = _timed(work)
        self.cpu_s += spent
        self._slowest = max(self._slowest, spent)
        return out

    def end_step(self) -> None:
        self.timeline.append((self._server, self._slowest))
        self._server = self._slowest = 0.0

    def server(self, work: Callable[[], T]) -> T:
        spent, out = _timed(work)
        self.cpu_s += spent
        self._server += spent
        return out

    def round_s(self) -> float:
        """Wall-clock with parallel clients: all server work plus the slowest client of each step."""
        return sum(server + client for server, client in self.timeline) + self._server


def _timed(work: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


@dataclass(frozen=True)
class Row:
    clients: int
    values: int
    graph: str
    degree: int
    prg: str
    bare_sum_s: float
    plain_round_s: float
    plain_cpu_s: float
    secagg_round_s: float
    secagg_setup_s: float
    secagg_online_s: float
    secagg_cpu_s: float
    ratio_round: float
    ratio_online: float
    ratio_cpu: float
    plain_up_bytes: int
    secagg_up_bytes: int
    secagg_down_bytes: int
    max_abs_error: float


def lora_adapter(values: int, generator: torch.Generator) -> Adapter:
    """A LoRA-shaped adapter with exactly ``values`` trainable values."""
    modules, width = SHAPES[values]
    adapter = {}
    for i in range(modules):
        adapter[f"layer{i}.lora_A"] = torch.randn(RANK, width, generator=generator) * 0.01
        adapter[f"layer{i}.lora_B"] = torch.zeros(width, RANK)
    return adapter


def client_deltas(adapter: Adapter, n: int, generator: torch.Generator) -> dict[int, tuple[Adapter, int]]:
    """One delta per client (|x| well inside the range) and an example count."""
    return {c: ({k: torch.randn(t.shape, generator=generator) * 1e-3 for k, t in adapter.items()}, 100 + c) for c in range(n)}


def plain_round(adapter: Adapter, deltas: dict[int, tuple[Adapter, int]], round_: int) -> tuple[Clock, Adapter, int]:
    """fedlpp's aggregation without SecAgg; returns the clock, the new adapter and one upload's size."""
    clock = Clock()
    payloads = [(c, clock.client(c, lambda d=d, n=n: rnd.make_update(d, n, round_))) for c, (d, n) in deltas.items()]
    clock.end_step()
    result = clock.server(lambda: rnd.aggregate(SPEC, adapter, payloads, round_))
    return clock, result.adapter, max(len(p) for _, p in payloads)


def secure_round(
    agg: SecureAggregator, adapter: Adapter, deltas: dict[int, tuple[Adapter, int]], round_: int
) -> tuple[Clock, Adapter, int, int]:
    """fedlpp's aggregation with SecAgg; returns the clock, the new adapter and bytes up/down per client."""
    clock = Clock()
    encode = SecureInput(agg.encoding)
    inputs = {c: partial(encode, d, n, round_, c) for c, (d, n) in deltas.items()}
    outcome = secure_aggregate(agg, SPEC, adapter, inputs, round_, SecureMean(agg.encoding), parties=clock)
    assert outcome.adapter is not None, outcome.notes
    n = len(deltas)
    return clock, outcome.adapter, outcome.bytes_up // n, outcome.bytes_down // n


def bare_sum(deltas: dict[int, tuple[Adapter, int]]) -> float:
    """Seconds for the server to add n float32 vectors into a float64 total."""
    vectors = [torch.cat([t.reshape(-1) for t in d.values()]).numpy() for d, _ in deltas.values()]
    start = time.perf_counter()
    total = np.zeros(vectors[0].size, dtype=np.float64)
    for v in vectors:
        np.add(total, v, out=total)
    return time.perf_counter() - start


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def setup_s(clock: Clock) -> float:
    """The data-independent part: sessions, advertisement, share keys (with mask expansion), share routing."""
    steps = clock.timeline
    assert len(steps) == 7, f"unexpected secure_aggregate step count {len(steps)}"
    return sum(server + client for server, client in steps[1:SETUP_STEPS]) + steps[SETUP_STEPS][0]


def measure(n: int, values: int, graph: str, prg: str, reps: int) -> Row:
    """Median plain and secagg times (and bytes) for one configuration."""
    generator = torch.Generator().manual_seed(n * 7919 + values)  # benchmark data only
    adapter = lora_adapter(values, generator)
    deltas = client_deltas(adapter, n, generator)
    params = secagg_params(SecAggConfig(enabled=True, graph=graph, prg=prg), n)
    agg = make_aggregator(SecureEncoding(params, weight_bound=100 + n), n)
    samples: dict[str, list[float]] = {k: [] for k in ("bare", "plain", "plain_cpu", "round", "setup", "cpu")}
    error, plain_up, up, down = 0.0, 0, 0, 0
    for warm_up in range(WARM_UP):  # first calls pay for imports, caches and allocator growth
        plain_round(adapter, deltas, 1000 + warm_up)
        secure_round(agg, adapter, deltas, 1000 + warm_up)
    for rep in range(reps):  # interleaved
        gc.collect()
        with gc_paused():  # as timeit does: a collection inside one timed call is noise
            plain, plain_adapter, plain_up = plain_round(adapter, deltas, rep + 1)
            secure, secure_adapter, up, down = secure_round(agg, adapter, deltas, rep + 1)
        samples["bare"].append(bare_sum(deltas))
        for key, value in (
            ("plain", plain.round_s()),
            ("plain_cpu", plain.cpu_s),
            ("round", secure.round_s()),
            ("setup", setup_s(secure)),
            ("cpu", secure.cpu_s),
        ):
            samples[key].append(value)
        error = max(error, max(float((plain_adapter[k] - secure_adapter[k]).abs().max()) for k in adapter))
    resolution = n / agg.encoding.params.scale  # the mean of n fixed-point roundings, scaled by n_max / sum n_k <= 1
    assert error <= resolution, f"secure mean off by {error} (resolution {resolution})"
    m = {k: statistics.median(v) for k, v in samples.items()}
    online = m["round"] - m["setup"]
    return Row(
        n,
        values,
        graph,
        graph_degree(agg.encoding.params, n),
        prg,
        m["bare"],
        m["plain"],
        m["plain_cpu"],
        m["round"],
        m["setup"],
        online,
        m["cpu"],
        m["round"] / m["plain"],
        online / m["plain"],
        m["cpu"] / m["plain_cpu"],
        plain_up,
        up,
        down,
        error,
    )


def distributed_round(agg: SecureAggregator, adapter: Adapter, deltas: dict[int, tuple[Adapter, int]], round_: int) -> Clock:
    """fedlpp's aggregation under distributed DP: SecAgg in a small field, each client's rotated, rounded input with
    its discrete Gaussian share (``RotatedInput``), the server's ``RotatedMean``."""
    clock = Clock()
    encode = RotatedInput(agg.encoding, seed=0, secure=True)
    inputs = {c: partial(encode, d, 1, round_, c) for c, (d, _) in deltas.items()}
    outcome = secure_aggregate(agg, SPEC, adapter, inputs, round_, RotatedMean(agg.encoding), parties=clock)
    assert outcome.adapter is not None, outcome.notes
    return clock


def central_dp_round(
    adapter: Adapter, deltas: dict[int, tuple[Adapter, int]], round_: int, noised: NoisedSum
) -> tuple[Clock, Adapter]:
    """Central client-level DP without SecAgg: each client clips and sends its delta, the server noises the sum."""
    clock = Clock()
    payloads = [
        (c, clock.client(c, lambda d=d, n=n: rnd.make_update(clip_delta(d, noised.clip_norm), n, round_)))
        for c, (d, n) in deltas.items()
    ]
    clock.end_step()
    result = clock.server(lambda: rnd.aggregate_private(SPEC, adapter, payloads, round_, noised))
    return clock, result.adapter


def measure_distributed(n: int, values: int, prg: str, reps: int, bits: int, noise_multiplier: float) -> dict[str, object]:
    """Median round time of plain aggregation, of central client-level DP and of distributed DP in Z_2^bits,
    interleaved, and the ratios."""
    generator = torch.Generator().manual_seed(n * 7919 + values)  # benchmark data only
    adapter = lora_adapter(values, generator)
    deltas = client_deltas(adapter, n, generator)
    cfg = SecAggConfig(enabled=True, prg=prg, modulus_bits=bits)
    rotation = Rotation(bits, n, 1.0, seed=0, noise_multiplier=noise_multiplier)  # privacy.clip_norm = 1
    agg = make_aggregator(SecureEncoding(secagg_params(cfg, n), 1, rotation), n)
    noised = NoisedSum(1.0, noise_multiplier, n, SystemRandomness())  # the trusted server's noise, from the OS
    samples: dict[str, list[float]] = {"plain": [], "central": [], "distributed": []}
    for rep in range(WARM_UP + reps):
        gc.collect()
        with gc_paused():
            clocks = {
                "plain": plain_round(adapter, deltas, rep + 1)[0],
                "central": central_dp_round(adapter, deltas, rep + 1, noised)[0],
                "distributed": distributed_round(agg, adapter, deltas, rep + 1),
            }
        if rep >= WARM_UP:
            for key, clock in clocks.items():
                samples[key].append(clock.round_s())
    m = {k: statistics.median(v) for k, v in samples.items()}
    ratio = m["distributed"] / m["plain"]
    return {
        "config": f"{n} clients x {values:,} values, Z_2^{bits}, noise multiplier {noise_multiplier:g}, complete graph",
        "target": f"distributed DP round time <= {TARGET}x plain (clients in parallel, as deployed)",
        "plain_round_s": m["plain"],
        "central_dp_round_s": m["central"],
        "distributed_round_s": m["distributed"],
        "ratio_round": round(ratio, 2),
        "ratio_to_central_dp": round(m["distributed"] / m["central"], 2),
        "holds": ratio <= TARGET,
    }


HEADER = (
    f"{'n':>3} {'values':>9} {'graph':>8} {'k':>3} | {'bare sum':>8} | {'plain':>7} {'secagg':>7} {'ratio':>6} | "
    f"{'setup':>7} {'online':>7} {'ratio':>6} | {'plain cpu':>9} {'secagg cpu':>10} {'ratio':>6} | "
    f"{'up B/client (plain)':>23} {'down B':>9}"
)


def format_row(r: Row) -> str:
    """One configuration: seconds (round = parallel clients), ratios to plain, bytes per client."""
    config = f"{r.clients:>3} {r.values:>9,} {r.graph:>8} {r.degree:>3}"
    round_ = f"{r.plain_round_s:>7.4f} {r.secagg_round_s:>7.4f} {r.ratio_round:>5.2f}x"
    phases = f"{r.secagg_setup_s:>7.4f} {r.secagg_online_s:>7.4f} {r.ratio_online:>5.2f}x"
    cpu = f"{r.plain_cpu_s:>9.4f} {r.secagg_cpu_s:>10.4f} {r.ratio_cpu:>5.2f}x"
    size = f"{r.secagg_up_bytes:>11,} ({r.plain_up_bytes:>9,}) {r.secagg_down_bytes:>9,}"
    return f"{config} | {r.bare_sum_s:>8.4f} | {round_} | {phases} | {cpu} | {size}"


def verdict(rows: list[Row]) -> dict[str, object]:
    """Whether the secagg round takes <= 2x the plain round at 10 clients x 300k values (complete graph)."""
    row = next(r for r in rows if (r.clients, r.values, r.graph) == (10, 300_000, "complete"))
    return {
        "config": "10 clients x 300,000 values, complete graph",
        "target": f"secagg round time <= {TARGET}x plain (clients in parallel, as deployed)",
        "ratio_round": round(row.ratio_round, 2),
        "holds": row.ratio_round <= TARGET,
        "ratio_online": round(row.ratio_online, 2),
        "ratio_cpu": round(row.ratio_cpu, 2),
        "ratio_round_to_bare_sum": round(row.secagg_round_s / row.bare_sum_s, 1),
        "plain_round_s": row.plain_round_s,
        "secagg_round_s": row.secagg_round_s,
    }


def keep_freed_memory() -> str:
    """Ask glibc to reuse freed memory instead of returning it (less page-fault noise); which allocator ran."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    return "glibc: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "default (mallopt refused)"


def main() -> None:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 10 clients x 300k values")
    parser.add_argument("--prg", default="aes256-ctr", choices=PRGS)
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 7 quick, else 5 / 3 / 1 as sizes grow)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--default-allocator", action="store_true", help="keep glibc's default malloc settings")
    args = parser.parse_args()
    allocator = "default" if args.default_allocator else keep_freed_memory()
    configs = [(10, 300_000)] if args.quick else [(n, d) for n in CLIENTS for d in SHAPES]
    torch.set_num_threads(1)  # every party is one single-threaded process, as in the local engine on one core
    rows: list[Row] = []
    print(f"PRG {args.prg}; allocator {allocator}; seconds per round (medians); 'round' = server + slowest client per step")
    print(HEADER)
    for n, values in configs:
        for graph in GRAPHS:
            reps = args.reps or (7 if args.quick else 5 if n * values <= 6 * 10**6 else 3 if n * values <= 2 * 10**7 else 1)
            rows.append(measure(n, values, graph, args.prg, reps))
            print(format_row(rows[-1]), flush=True)
    distributed = measure_distributed(10, 300_000, args.prg, args.reps or 5, bits=16, noise_multiplier=1.0)
    print(f"distributed DP: {json.dumps(distributed)}")
    result = {
        "machine": platform.processor() or platform.machine(),
        "code": code_version(),
        "prg": args.prg,
        "torch_threads": 1,
        "blas_threads": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "allocator": allocator,
        "verdict": verdict(rows),
        "distributed": distributed,
        "rows": [asdict(r) for r in rows],
    }
    print(json.dumps(result["verdict"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
