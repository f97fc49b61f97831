"""``fedlpp eval RUN_DIR``: score a finished run's saved adapter θ and the proxy built from it, and keep what they wrote.

Reads the checkpoint (θ after the last round), builds the proxy a client would start from
(Q(θ) for FedLPP), and scores both on the run's evaluation split — or on another one given
by overrides of the data and decoding keys (``data.path=...``, ``data.num_eval=0`` for the
whole split, ``eval.max_new_tokens=...``), or on the task's test split (``--split test``). Writes ``predictions/global.txt`` and
``predictions/proxy.txt`` (one output per evaluation input, in order; ``.jsonl`` with the inputs
when outputs span lines) and ``eval.json`` into the run directory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.config import ConfigError, changed_keys, flat_tree, to_tree
from fedlpp.engine.setup import algorithm_spec, build_evalset, build_model, load_task_data
from fedlpp.evaluation.evaluate import Decoding, Scored, evaluation_unit, evaluation_work, score_adapter
from fedlpp.evaluation.scoring import official_metrics
from fedlpp.progress import open_bar

EVAL_JSON = "eval.json"
PREDICTIONS = "predictions"
# What an evaluation may change: where the evaluation data comes from, how much of it, how to decode.
EVAL_KEYS = (
    "data.path",
    "data.hf_id",
    "data.eval_path",
    "data.num_eval",
    "eval.batch_size",
    "eval.max_new_tokens",
    "eval.num_beams",
    "eval.length_penalty",
    "eval.no_repeat_ngram_size",
    "train.device",
)


def evaluate_run(out: Path, overrides: Sequence[str], progress: bool = True, split: str = "dev") -> dict[str, Any]:
    """Score θ and its proxy on ``split`` (dev: what the run evaluated on; test: the task's test split);
    write the predictions and ``eval.json``; return the report."""
    with rundir.exclusive(out):  # no run moves the checkpoint meanwhile
        run_cfg = rundir.load_run_config(out, [])
        cfg = rundir.load_run_config(out, list(overrides))
        bad = [k for k in changed_keys(run_cfg, cfg) if k not in EVAL_KEYS]
        if bad:
            raise ConfigError(f"{bad[0]}: an evaluation cannot change it (it may change {', '.join(EVAL_KEYS)})")
        checkpoint = rundir.load_checkpoint(out)
        if checkpoint is None:
            raise rundir.RunDirError(f"{out}: no round finished, there is no adapter to evaluate")
        theta, round_ = checkpoint
        task = load_task_data(cfg, split)
        if any(k.startswith("data.") for k in changed_keys(run_cfg, cfg)):
            check_unseen(task, load_task_data(run_cfg))
        side = build_model(cfg, task.kind, task.num_labels)
        evalset = build_evalset(task, side.backbone, cfg.model.max_length)
        decoding = Decoding.of(cfg.eval)
        adapters = {"global": theta, "proxy": rnd.proxy_point(algorithm_spec(cfg), theta)}
        scored: dict[str, Scored] = {}
        for name, adapter in adapters.items():
            with open_bar(evaluation_work(evalset), f"{name} ({evaluation_unit(evalset)})", enabled=progress, nested=True) as bar:
                scored[name] = score_adapter(
                    side.model, adapter, evalset, side.backbone.tokenizer, decoding, bar.update, side.machine
                )
        written = write_predictions(out, task, scored)
        report = {
            "round": round_,
            "task": task.name,
            "split": split,
            "examples": len(task.eval),
            "changed": {k: flat_tree(to_tree(cfg))[k] for k in changed_keys(run_cfg, cfg)},
            "global": scored["global"].metrics,
            "proxy": scored["proxy"].metrics,
            "official": official(task, scored),
            "predictions": [str(p.relative_to(out)) for p in written],
        }
        rundir.write_json(out / EVAL_JSON, report)
        return report


def check_unseen(task: Any, trained_on: Any) -> None:
    """Refuse an evaluation set that shares inputs with what the run trained on (a dev split held out of a
    train file depends on data.num_eval: asking for more takes training examples)."""
    seen = {(e.prompt, e.pair) for e in trained_on.train}
    shared = sum((e.prompt, e.pair) in seen for e in task.eval)
    if shared:
        raise ValueError(
            f"{shared} of the {len(task.eval)} evaluation inputs were in the run's training data "
            f"(task {task.name!r} holds its dev split out of its training file, so a different "
            "data.num_eval takes other examples); evaluate on a split the run did not train on"
        )


def official(task: Any, scored: dict[str, Scored]) -> dict[str, Any]:
    """The task's paper metric set (``fedlpp score``'s) of each adapter's outputs; generation tasks only."""
    if task.kind != "generation":
        return {}
    references = [list(e.references or (e.target,)) for e in task.eval]
    results = {name: official_metrics(task.name, result.outputs, references) for name, result in scored.items()}
    return {**{name: r["metrics"] for name, r in results.items()}, "unavailable": results["global"]["unavailable"]}


def write_predictions(out: Path, task: Any, scored: dict[str, Scored]) -> list[Path]:
    """One file per adapter: a line per output (class names for classification), or JSON lines when outputs span lines."""
    folder = out / PREDICTIONS
    folder.mkdir(exist_ok=True)
    written = []
    for name, result in scored.items():
        outputs = [task.label_names[int(o)] for o in result.outputs] if task.label_names else result.outputs
        if task.multiline:
            path = folder / f"{name}.jsonl"
            text = "".join(json.dumps({"input": e.prompt, "output": o}) + "\n" for e, o in zip(task.eval, outputs, strict=True))
        else:
            path = folder / f"{name}.txt"
            text = "".join(o.replace("\n", " ") + "\n" for o in outputs)
        rundir.write_text(path, text)
        written.append(path)
    return written


def format_eval(report: dict[str, Any]) -> str:
    metrics = list(report["global"])
    lines = [
        f"{report['task']}: theta after round {report['round']} and its proxy on {report['examples']} "
        f"{report.get('split', 'dev')} examples",
        "",
        f"{'metric':<16}{'global':>12}{'proxy':>12}{'gap':>10}",
    ]
    for m in metrics:
        g, p = report["global"][m], report["proxy"][m]
        lines.append(f"{m:<16}{g:>12.3f}{p:>12.3f}{g - p:>+10.3f}")
    official = report.get("official", {})
    if official.get("global"):
        lines += ["", f"the task's paper metrics ({report['task']}):"]
        for m, g in official["global"].items():
            p = official["proxy"][m]
            lines.append(f"{m:<16}{g:>12.3f}{p:>12.3f}{g - p:>+10.3f}")
    for m, why in official.get("unavailable", {}).items():
        lines.append(f"{m:<16}unavailable: {why}")
    return "\n".join(lines)
