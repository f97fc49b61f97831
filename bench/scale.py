"""Memory and speed of a client's LoRA steps at scale: backbones of real shapes x precision x checkpointing.

Usage:
    .venv/bin/python bench/scale.py --quick     # SmolLM2-135M (the shipped weights), 6 cells + a plain loop: <= 5 min on 2 cores
    .venv/bin/python bench/scale.py             # + SmolLM2-360M and Llama-3.2-1B shapes: bench/results/scale.json
    .venv/bin/python bench/scale.py --shapes llama-3.2-1b --repeats 3   # each cell 3 times: median peak and every run
    .venv/bin/python bench/scale.py --shapes llama-2-7b --device cuda   # on a GPU (needs the memory for the 7B file)

Each cell is one fresh process that does what a fedlpp client does on that backbone: load it
through fedlpp (``models.backbone.load_backbone`` with a ``Machine``: device, precision, nf4,
gradient checkpointing), attach LoRA r=8 on q_proj/v_proj, and take --steps AdamW steps with
fedlpp's one trainer (``algorithms.client.train_client``) on batches of 4 x 128 random tokens
(the loss on every token). It reports the peak memory — on the CPU the whole process's peak RSS,
loading included; on CUDA ``torch.cuda.max_memory_allocated`` — seconds per step (median of
the steps after the first), tokens per second, and the last loss (it must be finite).

Backbones: SmolLM2-135M is the shipped model; the others are random-weight models with the exact
configurations of SmolLM2-360M, Llama-3.2-1B (128k vocabulary, tied embeddings) and Llama-2-7B,
written once as a single bf16 safetensors file, as Llama-3.2-1B ships (under $FEDLPP_CACHE/scale,
by a separate process). Cells are compared with the fp32 cell of the same shape, measured side by
side in the same run. A plain transformers + peft loop (``--plain``, on by default: fp32 and
bf16 on the first shape) is timed beside fedlpp's trainer, same batch and optimizer.

Results are appended to the JSON file as cells finish; a rerun skips the cells it holds (--fresh
starts over), so a long run can be resumed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
BATCH, LENGTH, RANK = 4, 128, 8
TARGETS = ("q_proj", "v_proj")
GOALS = {("llama-3.2-1b", "nf4", True): 0.30, ("llama-3.2-1b", "bf16", False): 0.55}  # peak / fp32 peak (issue 23)

# Exact shapes of the public configurations (config.json of each model on the Hugging Face Hub).
SHAPES: dict[str, dict[str, Any] | None] = {
    "smollm2-135m": None,  # the shipped weights
    "smollm2-360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
}
BACKBONES = (("fp32", "none"), ("bf16", "none"), ("bf16", "nf4"))  # (train.precision, model.quantize)
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "nf4": 0.55}  # nf4: a 4-bit linear weight and its scales


# --- a backbone of a real shape, written once --------------------------------------------------


def checkpoint_dir(shape: str) -> Path:
    from fedlpp.models.shipped import cache_dir

    return cache_dir() / "scale" / shape


def model_name(shape: str) -> str:
    """What fedlpp's model.name is for the shape: the short name, or the random checkpoint's folder."""
    return shape if SHAPES[shape] is None else str(checkpoint_dir(shape))


def build_checkpoint(shape: str, device: str = "cpu") -> None:
    """A random-weight model of ``shape`` as one bf16 safetensors file, with SmolLM2's tokenizer; its random values
    drawn on ``device`` (on a GPU in a second, where a 7B model takes a minute on the CPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlpp.models.machine import resolve_device
    from fedlpp.models.shipped import smollm2_tokenizer_dir

    target = checkpoint_dir(shape)
    device = resolve_device(device)  # auto: where the cells will run
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="1000GB")  # one file, as Llama-3.2-1B ships
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def ensure_checkpoint(shape: str, device: str) -> None:
    if SHAPES[shape] is None or checkpoint_dir(shape).exists():
        return
    print(f"writing a random {shape} checkpoint (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, __file__, "--build", shape, "--device", device], check=True)


# --- one cell, in its own process ---------------------------------------------------------------


def random_batches(vocab: int, steps: int, pad_id: int) -> Iterator[dict[str, Any]]:
    import torch

    from fedlpp.data import collate

    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, vocab, (BATCH, LENGTH), generator=gen).tolist()
        yield collate([{"input_ids": r, "labels": r} for r in rows], pad_id)


def timed(batches: Iterator[Any], stamps: list[float], device: str) -> Iterator[Any]:
    """The batches, noting the time each is asked for: the gaps are the steps (on CUDA once the GPU has finished
    the step before: kernels run after the Python that launched them)."""
    import torch

    def now() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for batch in batches:
        stamps.append(now())
        yield batch
    stamps.append(now())


def run_cell(shape: str, precision: str, quantize: str, checkpointing: bool, steps: int, device: str) -> dict[str, Any]:
    """fedlpp's client steps on the backbone: peak memory, seconds per step, tokens/s, losses."""
    t0 = time.perf_counter()
    from fedlpp.algorithms.client import LocalTraining, train_client
    from fedlpp.models.backbone import load_backbone
    from fedlpp.models.lora import adapter_parameters, attach_lora, get_adapter
    from fedlpp.models.machine import Machine, peak_rss_bytes, resolve_device

    machine = Machine(resolve_device(device), precision, quantize, checkpointing)
    machine.reset_peak_memory()
    backbone = load_backbone(model_name(shape), "generation", machine=machine)
    model = attach_lora(backbone, "generation", RANK, 2.0 * RANK, 0.0, TARGETS)
    loaded = time.perf_counter() - t0
    rss_loaded = peak_rss_bytes()
    start = get_adapter(model)
    stamps: list[float] = []
    batches = timed(
        random_batches(min(backbone.model.config.vocab_size, len(backbone.tokenizer)), steps, backbone.tokenizer.pad_token_id),
        stamps,
        machine.device,
    )
    result = train_client(
        model,
        "generation",
        start,
        list(adapter_parameters(model)),
        batches,
        LocalTraining(lr=1e-4, weight_decay=0.0, max_grad_norm=0.0),
        seed=0,
        machine=machine,
    )
    return _report(machine.peak_memory(), stamps, result.losses, loaded, rss_loaded, peak_rss_bytes())


def run_plain(shape: str, precision: str, steps: int, device: str) -> dict[str, Any]:
    """The same steps as a bare transformers + peft loop (no fedlpp): the reference for tokens/s."""
    t0 = time.perf_counter()
    import torch

    from fedlpp.models.machine import Machine, import_bitsandbytes, peak_rss_bytes, resolve_device

    import_bitsandbytes()  # before peft imports it: no kernel fetch from the Hub
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedlpp.models.shipped import smollm2_dir

    machine = Machine(resolve_device(device), precision)
    machine.reset_peak_memory()
    path = str(smollm2_dir()) if SHAPES[shape] is None else model_name(shape)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=machine.dtype, use_kernels=False).to(machine.torch_device)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(TARGETS)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    loaded, rss_loaded = time.perf_counter() - t0, peak_rss_bytes()
    stamps: list[float] = []
    losses = []
    model.train()
    for batch in timed(random_batches(base.config.vocab_size, steps, 0), stamps, machine.device):
        batch = {k: v.to(machine.torch_device) for k, v in batch.items()}
        with machine.autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return _report(machine.peak_memory(), stamps, losses, loaded, rss_loaded, peak_rss_bytes())


def _report(
    peak: dict[str, Any],
    stamps: list[float],
    losses: list[float] | tuple[float, ...],
    loaded: float,
    rss_loaded: int,
    rss_peak: int,
) -> dict[str, Any]:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    per_step = statistics.median(gaps[1:]) if len(gaps) > 1 else gaps[0]
    return {
        "peak_bytes": peak["bytes"],
        "peak_kind": peak["kind"],
        "device": peak["device"],
        "peak_rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": rss_peak,
        "load_s": round(loaded, 2),
        "s_per_step": round(per_step, 3),
        "step_s": [round(g, 3) for g in gaps],
        "tokens_per_s": round(BATCH * LENGTH / per_step, 1),
        "losses": [round(float(v), 4) for v in losses],
        "loss_finite": all(v == v and abs(v) != float("inf") for v in losses),
    }


# --- the whole table ----------------------------------------------------------------------------


def cell_key(cell: dict[str, Any]) -> str:
    if cell["kind"] == "plain":
        return f"plain/{cell['shape']}/{cell['precision']}/{cell['device']}"
    return f"{cell['shape']}/{cell['precision']}/{cell['quantize']}/ckpt={cell['checkpointing']}/{cell['device']}"


def cells_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every shape's cells, the plain loop's right after the first shape's (a run cut short still has them)."""
    cells = []
    for shape in args.shapes:
        for precision, quantize in BACKBONES:
            for checkpointing in (False, True):
                cells.append(
                    {
                        "kind": "fedlpp",
                        "shape": shape,
                        "precision": precision,
                        "quantize": quantize,
                        "checkpointing": checkpointing,
                        "steps": args.steps,
                        "device": args.device,
                    }
                )
        if args.plain and shape == args.shapes[0]:
            for precision in ("fp32", "bf16"):
                cells.append(
                    {"kind": "plain", "shape": shape, "precision": precision, "steps": args.steps, "device": args.device}
                )
    return cells


def parameter_counts(shape: str) -> tuple[int, int] | None:
    """A random-checkpoint shape's weights, counted on the meta device (no memory): (embeddings and LM head, the
    rest). None for the shipped model."""
    if SHAPES[shape] is None:
        return None
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    kept_whole = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    kept_whole |= {id(p) for p in model.lm_head.parameters()}
    every = {id(p): p.numel() for p in model.parameters()}  # a tied head is counted once
    whole = sum(n for i, n in every.items() if i in kept_whole)
    return whole, sum(every.values()) - whole


def too_big_for_this_machine(cell: dict[str, Any]) -> str | None:
    """Why a CPU cell is not run: its weights alone, or the bf16 checkpoint still to be written for it, would take
    90% of the memory available now (the kernel would kill it, or the machine's other work, part way). None when
    it fits, and on a GPU (an out-of-memory error there is caught and reported)."""
    if cell["device"] != "cpu":
        return None
    counts = parameter_counts(cell["shape"])
    if counts is None:
        return None
    import psutil

    whole, rest = counts
    if cell.get("quantize") == "nf4":  # embeddings and the LM head stay in the compute dtype
        need = whole * BYTES_PER_WEIGHT[cell["precision"]] + rest * BYTES_PER_WEIGHT["nf4"]
    else:
        need = (whole + rest) * BYTES_PER_WEIGHT[cell["precision"]]
    what = "its weights alone take"
    if not checkpoint_dir(cell["shape"]).exists() and (whole + rest) * BYTES_PER_WEIGHT["bf16"] > need:
        need, what = (whole + rest) * BYTES_PER_WEIGHT["bf16"], "writing its bf16 checkpoint takes"
    available = psutil.virtual_memory().available
    if need < 0.9 * available:
        return None
    return f"not run: {what} {need / 2**30:.1f} GiB; {available / 2**30:.1f} GiB of memory is available"


def measure(cell: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Run one cell ``repeats`` times, each in a fresh process (its peak RSS is its own): the medians, and every run's
    peak and step time (a CPU process's peak varies by a few hundred MB between identical runs)."""
    reason = too_big_for_this_machine(cell)
    if reason is not None:
        return {**cell, "skipped": reason}
    ensure_checkpoint(cell["shape"], cell["device"])
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            return {**cell, "error": " | ".join(tail) or f"exit {proc.returncode}"}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    median = {
        k: statistics.median(r[k] for r in runs) for k in ("peak_bytes", "peak_rss_after_load_bytes", "s_per_step", "load_s")
    }
    return {
        **cell,
        **runs[0],
        **median,
        "tokens_per_s": round(BATCH * LENGTH / median["s_per_step"], 1),
        "peak_bytes_runs": [r["peak_bytes"] for r in runs],
        "s_per_step_runs": [r["s_per_step"] for r in runs],
    }


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each cell's peak and step time against the fp32 cell (no checkpointing) of its shape and device, measured in
    the same run of this script (a cell kept from an earlier run is compared only with cells of that run)."""
    base = {
        (r["shape"], r["device"], r.get("run")): r
        for r in rows
        if r["kind"] == "fedlpp" and r["precision"] == "fp32" and not r["checkpointing"] and _measured(r)
    }
    plain = {(r["shape"], r["precision"], r["device"], r.get("run")): r for r in rows if r["kind"] == "plain" and _measured(r)}
    for r in rows:
        ref = base.get((r["shape"], r["device"], r.get("run")))
        if not _measured(r) or ref is None:
            continue
        r["peak_vs_fp32"] = round(r["peak_bytes"] / ref["peak_bytes"], 3)
        twin = plain.get((r["shape"], r["precision"], r["device"], r.get("run")))
        if r["kind"] == "fedlpp" and r["quantize"] == "none" and not r["checkpointing"] and twin is not None:
            r["time_vs_plain_loop"] = round(r["s_per_step"] / twin["s_per_step"], 3)
        goal = GOALS.get(
            (r["shape"], r.get("quantize") if r.get("quantize") == "nf4" else r["precision"], r.get("checkpointing"))
        )
        if goal is not None and r["kind"] == "fedlpp":
            r["goal_peak_vs_fp32"], r["goal_met"] = goal, r["peak_vs_fp32"] <= goal


def _measured(row: dict[str, Any]) -> bool:
    return "error" not in row and "skipped" not in row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| shape | backbone | checkpointing | peak | vs fp32 | s/step | tokens/s | load s | last loss | vs plain loop |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_row_cells(r)) + " |")
    return "\n".join(lines)


def _row_cells(r: dict[str, Any]) -> list[str]:
    if r["kind"] == "plain":
        backbone, checkpointing = f"{r['precision']}, plain peft loop", "off"
    else:
        backbone = r["precision"] if r["quantize"] == "none" else f"{r['quantize']} ({r['precision']} compute)"
        checkpointing = "on" if r["checkpointing"] else "off"
    if not _measured(r):
        why = f"error: {r['error'][:80]}" if "error" in r else r["skipped"]
        return [r["shape"], backbone, checkpointing, why, "", "", "", "", "", ""]
    vs_fp32 = f"{r['peak_vs_fp32']:.3f}x" if "peak_vs_fp32" in r else "-"
    runs = r.get("peak_bytes_runs", [])
    spread = f" ({min(runs) / 2**30:.2f}-{max(runs) / 2**30:.2f})" if len(runs) > 1 else ""
    if "goal_met" in r:
        vs_fp32 += f" (goal <= {r['goal_peak_vs_fp32']:.2f}x: {'met' if r['goal_met'] else 'missed'})"
    vs_plain = f"{r['time_vs_plain_loop']:.2f}x" if "time_vs_plain_loop" in r else ""
    return [
        r["shape"],
        backbone,
        checkpointing,
        f"{r['peak_bytes'] / 2**30:.2f} GiB{spread}",
        vs_fp32,
        f"{r['s_per_step']:.2f}",
        f"{r['tokens_per_s']:.0f}",
        f"{r['load_s']:.0f}",
        f"{r['losses'][-1]:.3f}",
        vs_plain,
    ]


def main() -> None:
    from fedlpp.provenance import code_version

    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M only (<= 5 min on 2 cores)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: smollm2-135m smollm2-360m llama-3.2-1b")
    parser.add_argument("--steps", type=int, default=3, help="client steps per cell (the first is not timed)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (train.device)")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain transformers + peft loop")
    parser.add_argument("--out", type=Path, help="default: bench/results/scale.json (--quick: scale-quick.json)")
    parser.add_argument("--fresh", action="store_true", help="measure every cell again")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per cell: medians and every run are reported")
    parser.add_argument(
        "--cell",
        metavar="JSON",
        help="measure one cell in this process and print its row: kind (fedlpp | plain), shape, precision, quantize, "
        "checkpointing, steps, device (the bench runs each cell so, in a fresh process)",
    )
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_checkpoint(args.build, args.device)
        return
    if args.cell:
        cell = json.loads(args.cell)
        ensure_checkpoint(cell["shape"], cell["device"])  # built in a process of its own: not in this cell's peak
        if cell["kind"] == "plain":
            out = run_plain(cell["shape"], cell["precision"], cell["steps"], cell["device"])
        else:
            out = run_cell(
                cell["shape"], cell["precision"], cell["quantize"], cell["checkpointing"], cell["steps"], cell["device"]
            )
        print(json.dumps({**cell, **out}))
        return
    args.shapes = args.shapes or (["smollm2-135m"] if args.quick else ["smollm2-135m", "smollm2-360m", "llama-3.2-1b"])
    out = args.out or RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    done = {} if args.fresh or not out.exists() else {cell_key(r): r for r in json.loads(out.read_text())["cells"]}
    rows = []
    run = time.strftime("%Y-%m-%dT%H:%M:%S")  # ratios compare cells of one run only
    cells = cells_for(args)
    for i, cell in enumerate(cells, 1):
        key = cell_key(cell)
        if key in done and _measured(done[key]):
            rows.append(done[key])
            continue
        print(f"[{i}/{len(cells)}] {key} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        rows.append({**measure(cell, args.repeats), "run": run})
        print(
            f"    {time.perf_counter() - t:.0f} s: "
            + (
                rows[-1].get("error")
                or rows[-1].get("skipped")
                or f"peak {rows[-1]['peak_bytes'] / 2**30:.2f} GiB, {rows[-1]['s_per_step']:.2f} s/step"
            ),
            file=sys.stderr,
            flush=True,
        )
        ratios(rows)
        save(out, rows)
    ratios(rows)
    save(out, rows)
    print(table(rows))
    print(f"\nwrote {out}")
    failed = [cell_key(r) for r in rows if "error" in r]
    if failed:  # the table shows them; a script (bench/gpu_check.sh) must not read a run without figures as a pass
        sys.exit(f"{len(failed)} of {len(rows)} cells failed: {', '.join(failed)}")


def save(out: Path, rows: list[dict[str, Any]]) -> None:
    import platform

    import torch

    from fedlpp.provenance import code_version

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "code": code_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "batch": BATCH,
        "length": LENGTH,
        "lora_r": RANK,
        "targets": list(TARGETS),
    }
    partial = out.with_name(out.name + ".partial")  # a run cut while writing keeps the last whole file
    partial.write_text(json.dumps({"meta": meta, "cells": rows}, indent=1))
    partial.replace(out)


if __name__ == "__main__":
    main()
