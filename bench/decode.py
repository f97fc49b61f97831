"""Tokens per second of fedlpp's evaluation decoding against a plain ``model.generate`` loop, side by side.

Usage:
    .venv/bin/python bench/decode.py                                   # SmolLM2-135M, 48 E2E-style prompts (built-in weather task)
    .venv/bin/python bench/decode.py --data ../shared/data/e2e --prompts 64 --num-beams 1
    ... --out bench/results/decode.json (the default)

fedlpp side: ``fedlpp.evaluation.evaluate.generate`` — prompts in batches of ``--batch-size``
with left padding, the KV cache, each sequence stopped at its own end (EOS or newline).
Plain side: the same model and settings, ``model.generate`` on one prompt at a time (no
padding). Both produce the same number of new tokens per prompt when their outputs agree;
tokens/s counts the tokens each side kept. Repetitions alternate (fedlpp, plain, ...) after
one warm-up of each; the report gives medians, the ratio of throughputs (target >= 1.0), and
for greedy decoding whether the outputs are identical (they are compared, not assumed).
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

from fedlpp.config import load_config
from fedlpp.data.formatting import encode_prompts
from fedlpp.engine.setup import build_model, load_task_data
from fedlpp.evaluation.evaluate import Decoding, generate, stop_token_ids
from fedlpp.provenance import code_version

DEFAULT_OUT = Path(__file__).parent / "results" / "decode.json"
TARGET = 1.0


def plain_generate(model: Any, tokenizer: Any, prompts: list[list[int]], decoding: Decoding) -> list[str]:
    """model.generate one prompt at a time, the same stops and settings; first line kept as fedlpp does."""
    outputs = []
    stops = stop_token_ids(tokenizer)
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                **decoding.generate_kwargs(),
            )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            outputs.append(text.strip().split("\n", 1)[0].strip())
    return outputs


def token_count(tokenizer: Any, outputs: list[str]) -> int:
    return sum(len(tokenizer.encode(o, add_special_tokens=False)) + 1 for o in outputs)  # + its stop token


def main() -> None:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="", help="an E2E folder (default: the built-in weather task)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    task_keys = [f"data.task={'e2e' if args.data else 'weather'}", f"data.num_eval={args.prompts}"]
    cfg = load_config(None, [f"model.name={args.model}", *task_keys, *([f"data.path={args.data}"] if args.data else [])])
    task = load_task_data(cfg)
    side = build_model(cfg, task.kind, task.num_labels)
    model, tok = side.model, side.backbone.tokenizer
    model.eval()
    prompts = encode_prompts(tok, task.eval, cfg.model.max_length)
    decoding = Decoding(args.batch_size, args.max_new_tokens, args.num_beams)
    print(f"torch threads {torch.get_num_threads()}; {len(prompts)} prompts; {args.model}; beams {args.num_beams}", flush=True)
    times: dict[str, list[float]] = {"fedlpp": [], "plain": []}
    outputs: dict[str, list[str]] = {}
    for rep in range(args.reps + 1):
        for side_name, run in (
            ("fedlpp", lambda: generate(model, tok, prompts, decoding)),
            ("plain", lambda: plain_generate(model, tok, prompts, decoding)),
        ):
            t0 = time.perf_counter()
            outputs[side_name] = run()
            elapsed = time.perf_counter() - t0
            if rep > 0:
                times[side_name].append(elapsed)
            print(f"{'warm-up' if rep == 0 else f'rep {rep}'} {side_name:<7} {elapsed:8.2f} s", flush=True)
    tokens = {k: token_count(tok, v) for k, v in outputs.items()}
    rate = {k: tokens[k] / statistics.median(times[k]) for k in times}
    same = sum(a == b for a, b in zip(outputs["fedlpp"], outputs["plain"], strict=True))
    report = {
        "model": args.model,
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "tokens": tokens,
        "tokens_per_s": rate,
        "ratio": rate["fedlpp"] / rate["plain"],
        "target": TARGET,
        "identical_outputs": same,
        "outputs_compared": len(prompts),
    }
    print(
        f"fedlpp {rate['fedlpp']:.1f} tok/s, plain loop {rate['plain']:.1f} tok/s: ratio {report['ratio']:.2f} "
        f"(target >= {TARGET}); identical outputs {same}/{len(prompts)}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "code": code_version()}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
