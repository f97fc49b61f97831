"""Cost of a DP-SGD local step against a non-private one: same model, same batch, side by side.

Usage:
    .venv/bin/python bench/dp_overhead.py                      # SmolLM2-135M (weather) and MiniLM (SST-2), batch 8,
                                                               # and MiniLM at the DP recipe's batch (256 x 32 tokens)
    .venv/bin/python bench/dp_overhead.py --models minilm-l6 --steps 20 --reps 5
    ... --sst2 ../shared/data/sst2 --out bench/results/dp_overhead.json (the defaults)

Both sides train the run's trained tensors (LoRA A and B; B only with --algorithm ffa_lora)
with AdamW on one fixed batch of --batch examples. The non-private step is what a plain
client does (``PlainSteps``: the mean loss's gradient, a batch over 64 examples in
length-sorted chunks); the same step as one padded pass is timed beside it, to show what
the chunks save. The DP step is what a DP-SGD client does
(``fedlpp.privacy.dp_sgd``): per-example gradients through Opacus hooks, clipping to C,
Gaussian noise, division by the expected batch. Wrapping the model in Opacus happens once
per client per round and is timed separately (``wrap_s``). Blocks of --steps steps
alternate (plain, DP, plain, DP, ...) after a warm-up of each; the report gives median
seconds per step and the ratio DP / plain. Target: <= 1.15x for LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from opacus import GradSampleModule

from fedlpp.algorithms.client import PlainSteps, shuffled_batches
from fedlpp.config import DP_SGD_DEFAULTS, load_config
from fedlpp.engine.setup import LocalRun, build_run
from fedlpp.models.lora import adapter_parameters, set_adapter, set_trainable
from fedlpp.models.objective import example_losses
from fedlpp.privacy.dp_sgd import NoisyOptimizer, per_example_backward
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.provenance import code_version

DEFAULT_OUT = Path(__file__).parent / "results" / "dp_overhead.json"
DEFAULT_SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
TARGET = 1.15
RECIPE_BATCH = DP_SGD_DEFAULTS["train"]["batch_size"]
RECIPE_LENGTH = 32  # configs/sst2_dp_sweep.toml's model.max_length


def context(model: str, algorithm: str, batch: int, sst2: Path, max_length: int = 64) -> LocalRun:
    data = ["data.task=weather"] if model != "minilm-l6" else ["data.task=sst2", f"data.path={sst2}", "data.num_train=2000"]
    return build_run(
        load_config(
            None,
            [
                f"model.name={model}",
                f"algorithm.name={algorithm}",
                f"train.batch_size={batch}",
                f"model.max_length={max_length}",
                "data.num_eval=2",
                *data,
            ],
        )
    )


def timed_block(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(run: LocalRun, batch_size: int, steps: int, reps: int) -> dict[str, Any]:
    ctx, data = run.server, run.clients[0]
    model, kind = ctx.model, ctx.side.kind
    set_adapter(model, ctx.initial_adapter())
    set_trainable(model, ctx.trained(1))
    params = [adapter_parameters(model)[n] for n in ctx.trained(1)]
    batch = next(shuffled_batches(data.features, 1, batch_size, data.pad_id, seed=0))
    plain_opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def plain_step() -> None:  # what a non-private client does (a large batch in length-sorted chunks)
        PlainSteps().backward(model, kind, batch, params)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def whole_step() -> None:  # the same step as one padded pass: what chunking saves
        example_losses(model, batch, kind).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def dp_block() -> tuple[float, float]:
        t0 = time.perf_counter()
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        dp_opt = NoisyOptimizer(
            torch.optim.AdamW(params, lr=1e-4),
            noise=SeededRandomness(0),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batch_size,
            loss_reduction="mean",
        )
        wrap = time.perf_counter() - t0

        def dp_step() -> None:
            per_example_backward(model, kind, batch, params)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        per_step = timed_block(dp_step, steps)
        wrapped.to_standard_module()
        return per_step, wrap

    timed_block(plain_step, 1), timed_block(whole_step, 1), dp_block()  # warm-up
    plain, whole, dp, wraps = [], [], [], []
    for _ in range(reps):
        plain.append(timed_block(plain_step, steps))
        whole.append(timed_block(whole_step, steps))
        per_step, wrap = dp_block()
        dp.append(per_step)
        wraps.append(wrap)
    model.eval()
    p, d, w = statistics.median(plain), statistics.median(dp), statistics.median(whole)
    return {
        "plain_s_per_step": p,
        "dp_s_per_step": d,
        "ratio": d / p,
        "wrap_s": statistics.median(wraps),
        "whole_batch_plain_s_per_step": w,
        "chunking_speedup": w / p,
        "plain_all": plain,
        "whole_all": whole,
        "dp_all": dp,
        "trained_values": sum(q.numel() for q in params),
        "batch_tokens": list(batch["input_ids"].shape),
    }


def main() -> None:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--algorithm", default="fedavg_lora", help="fedavg_lora (A and B trained) or ffa_lora (B only)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=3, help="timed blocks per side")
    parser.add_argument("--sst2", type=Path, default=DEFAULT_SST2, help="SST-2 folder (train.tsv) for MiniLM")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--recipe-steps", type=int, default=2, help="steps per timed block at the DP recipe's batch (0 = skip it)"
    )
    args = parser.parse_args()
    results = {
        "torch_threads": torch.get_num_threads(),
        "algorithm": args.algorithm,
        "batch": args.batch,
        "steps": args.steps,
        "reps": args.reps,
        "target": TARGET,
        "models": {},
    }
    print(
        f"torch threads: {results['torch_threads']}; {args.algorithm}; batch {args.batch}; {args.reps} x {args.steps} steps a side"
    )
    runs = [(name, name, args.batch, 64, args.steps) for name in args.models.split(",")]
    if args.recipe_steps:  # privacy.mode=dp_sgd's default batch on SST-2 (README, "DP that learns")
        runs.append(("minilm-l6 @ DP recipe", "minilm-l6", RECIPE_BATCH, RECIPE_LENGTH, args.recipe_steps))
    for label, name, batch, length, steps in runs:
        r = measure(context(name, args.algorithm, batch, args.sst2, length), batch, steps, args.reps)
        results["models"][label] = r
        verdict = "meets" if r["ratio"] <= TARGET else "MISSES"
        print(
            f"{label:<22} plain {r['plain_s_per_step']:.3f} s/step   DP {r['dp_s_per_step']:.3f} s/step   "
            f"ratio {r['ratio']:.3f}x ({verdict} <= {TARGET}x)   wrap once per client {r['wrap_s'] * 1000:.1f} ms   "
            f"batch x tokens {r['batch_tokens']}   one padded pass {r['whole_batch_plain_s_per_step']:.3f} s/step "
            f"(chunks save {r['chunking_speedup']:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**results, "code": code_version()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
