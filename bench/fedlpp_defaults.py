"""Measure what FedLPP's defaults should be: quantizer granularity and server update rule.

Usage:
    .venv/bin/python bench/fedlpp_defaults.py --data ../shared/data/e2e [--rounds 8] [--out bench/results/fedlpp_defaults.json]

Part A runs federated fine-tuning on real E2E with SmolLM2-135M (same seed, data, clients
and client steps for every arm): FedAvg+LoRA, and FedLPP w=2 with per-tensor scales under
both server rules ("mean" and "delta") and with 64-value blocks. Each arm reports the
server's global model and the proxy a client can build, side by side.

Part B takes the adapter FedAvg+LoRA trained in part A and scores the proxy each quantizer
setting would give a client (w = 1, 2, 3 x block64 / row / tensor): how much model the
broadcast gives away, independent of how training reacts to it.

Writes JSON (and prints tables). Takes ~40 minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlpp import rundir
from fedlpp.algorithms.fedlpp import proxy_of
from fedlpp.algorithms.layout import layout_of
from fedlpp.cli.main import quiet_libraries
from fedlpp.config import load_config
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run
from fedlpp.evaluation.evaluate import evaluate_adapter
from fedlpp.provenance import code_version
from fedlpp.quant import QuantSpec

ARMS = {
    "fedavg_lora": ["algorithm.name=fedavg_lora"],
    "fedlpp_w2_tensor_mean": ["algorithm.name=fedlpp", "quant.granularity=tensor", "algorithm.server_rule=mean"],
    "fedlpp_w2_tensor_delta": ["algorithm.name=fedlpp", "quant.granularity=tensor", "algorithm.server_rule=delta"],
    "fedlpp_w2_block64_mean": ["algorithm.name=fedlpp", "quant.granularity=block", "algorithm.server_rule=mean"],
}
PROXY_SETTINGS = [(w, g) for w in (1, 2, 3) for g in ("block", "row", "tensor")]


def base_overrides(data: str, rounds: int, num_eval: int, model: str) -> list[str]:
    return [
        f"model.name={model}",
        "data.task=e2e",
        f"data.path={data}",
        f"data.num_eval={num_eval}",
        "fl.num_clients=4",
        "fl.clients_per_round=2",
        "fl.local_steps=10",
        f"fl.rounds={rounds}",
        "train.batch_size=8",
        "train.lr=1e-3",
        "quant.bits=2",
        f"eval.every={rounds}",
        "eval.max_new_tokens=64",
        "seed=0",
    ]


def run_arms(base: list[str], workdir: Path) -> dict[str, dict]:
    results = {}
    for name, extra in ARMS.items():
        t0 = time.perf_counter()
        summary = run_experiment(load_config(None, base + extra), workdir / name, progress=False)
        results[name] = {"global": summary["global"], "proxy": summary["proxy"], "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[A] {name:<26} global {fmt(summary['global'])} | proxy {fmt(summary['proxy'])}", flush=True)
    return results


def proxy_gap(base: list[str], fedavg_dir: Path) -> list[dict]:
    """Score the proxies of FedAvg's trained adapter under each quantizer setting."""
    ctx = build_run(load_config(None, [*base, "algorithm.name=fedavg_lora"]))
    adapter, _ = rundir.load_checkpoint(fedavg_dir)  # type: ignore[misc]
    layout = layout_of(ctx.shapes, sorted(ctx.shapes))
    tok = ctx.backbone.tokenizer
    rows = [{"setting": "full precision", **evaluate_adapter(ctx.model, adapter, ctx.evalset, tok, ctx.decoding)}]
    print(f"[B] {'full precision':<16} {fmt(rows[0])}", flush=True)
    for bits, granularity in PROXY_SETTINGS:
        proxy = proxy_of(adapter, layout, QuantSpec(bits=bits, granularity=granularity, block_size=64))
        metrics = evaluate_adapter(ctx.model, proxy, ctx.evalset, tok, ctx.decoding)
        label = f"w={bits} {granularity}{'64' if granularity == 'block' else ''}"
        rows.append({"setting": label, **metrics})
        print(f"[B] {label:<16} {fmt(metrics)}", flush=True)
    zero = {n: t * 0 if ".lora_B." in n else t for n, t in adapter.items()}
    rows.append({"setting": "backbone only (B = 0)", **evaluate_adapter(ctx.model, zero, ctx.evalset, tok, ctx.decoding)})
    print(f"[B] {'backbone only':<16} {fmt(rows[-1])}", flush=True)
    return rows


def fmt(m: dict) -> str:
    return f"loss {m['loss']:.3f} BLEU {m['bleu']:5.1f} ROUGE-L {m['rouge_l']:5.1f}"


def main() -> int:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with trainset.csv and devset.csv (E2E)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--num-eval", type=int, default=50, help="held-out MRs (all references each)")
    parser.add_argument("--model", default="smollm2-135m", help="tiny-llama for a quick check of the script")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fedlpp_defaults.json"))
    args = parser.parse_args()
    quiet_libraries()
    base = base_overrides(args.data, args.rounds, args.num_eval, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        arms = run_arms(base, Path(tmp))
        proxies = proxy_gap(base, Path(tmp) / "fedavg_lora")
    result = {"setup": base, "arms": arms, "proxy_of_fedavg_adapter": proxies}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "code": code_version()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
