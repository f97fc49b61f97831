"""Sweeps: one base configuration, a few named axes of overrides, several seeds — one table.

A sweep file is a run config (any ``[section]`` of a TOML experiment file) plus::

    [sweep]
    seeds = [0, 1, 2]
    [sweep.axes.algorithm]          # axes are crossed, in file order
    "LoRA" = ["algorithm.name=fedavg_lora"]
    "FFA-LoRA" = ["algorithm.name=ffa_lora", "train.lr=0.02"]

Every combination and seed is an ordinary run directory under ``--out``; a finished one
(summary.json present) is skipped and an interrupted one resumed, so a killed sweep
continues where it stopped. ``sweep.json`` holds every run's figures and ``sweep.md`` the
mean ± std over seeds of each combination.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlpp.config import ConfigError, ExperimentConfig, apply_overrides, build_config, changed_keys, load_config, read_toml
from fedlpp.engine import rundir

SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"


@dataclass(frozen=True)
class SweepPoint:
    labels: tuple[str, ...]  # one label per axis
    seed: int
    config: ExperimentConfig

    @property
    def directory(self) -> str:
        slug = "__".join(re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_") for label in self.labels)
        return f"{slug or 'base'}/seed{self.seed}"


@dataclass(frozen=True)
class Sweep:
    axes: tuple[str, ...]
    points: tuple[SweepPoint, ...]


def load_sweep(path: Path, overrides: Sequence[str]) -> Sweep:
    """Every (combination, seed) of the sweep file, each config validated before anything runs."""
    tree = read_toml(path)
    spec = tree.pop("sweep", None)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file needs a [sweep] table (seeds and axes); for one run use `fedlpp run`")
    seeds = spec.get("seeds", [tree.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"sweep.seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    axes = spec.get("axes", {})
    unknown = sorted(set(spec) - {"seeds", "axes"})
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}: unknown key; valid keys in [sweep] are axes, seeds")
    _check_axes(axes)
    base = apply_overrides(tree, list(overrides))
    points = []
    for combo in itertools.product(*[list(values.items()) for values in axes.values()]):
        labels = tuple(label for label, _ in combo)
        combo_overrides = [o for _, extra in combo for o in extra]
        for seed in seeds:
            where = f"sweep point {' / '.join(labels) or 'base'}, seed {seed}"
            try:
                config = build_config(apply_overrides(base, [*combo_overrides, f"seed={seed}", *overrides]))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            points.append(SweepPoint(labels, seed, config))
    _check_distinct(points)
    return Sweep(tuple(axes), tuple(points))


def _check_distinct(points: Sequence[SweepPoint]) -> None:
    seen: dict[str, tuple[str, ...]] = {}
    for p in points:
        if p.directory in seen and seen[p.directory] != p.labels:
            raise ConfigError(f"sweep.axes: labels {' / '.join(p.labels)!r} and {' / '.join(seen[p.directory])!r} "
                              f"map to the same run directory {p.directory!r}; use labels that differ in letters or digits")
        seen[p.directory] = p.labels


def check_same_config(point: SweepPoint, directory: Path) -> None:
    """A run directory left by an earlier sweep must hold this point's config, or it is not this point's run."""
    if not (directory / rundir.CONFIG).exists():
        return
    changed = changed_keys(load_config(directory / rundir.CONFIG), point.config)
    if changed:
        raise ConfigError(f"{directory} holds a run of this sweep point with a different {changed[0]}: the sweep file "
                          "changed since; remove that directory or choose another --out")


def _check_axes(axes: Any) -> None:
    if not isinstance(axes, dict):
        raise ConfigError("sweep.axes: expected tables of label = [\"section.key=value\", ...]")
    for axis, values in axes.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"sweep.axes.{axis}: expected a table of label = [overrides], got {values!r}")
        for label, extra in values.items():
            if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
                raise ConfigError(f"sweep.axes.{axis}.{label}: expected a list of \"section.key=value\" strings")


def run_sweep(sweep: Sweep, out: Path, run: Callable[[ExperimentConfig, Path, bool], dict[str, Any]],
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every point not finished yet (``run(config, directory, resume)``); write the tables."""
    for point in sweep.points:  # before anything runs: a changed sweep file must not mix with old runs
        check_same_config(point, out / point.directory)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, point in enumerate(sweep.points, 1):
        directory = out / point.directory
        summary_path = directory / rundir.SUMMARY
        name = f"[{i}/{len(sweep.points)}] {' / '.join(point.labels) or 'base'} seed {point.seed}"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            echo(f"{name}: done before, kept")
        else:
            start = time.perf_counter()
            summary = run(point.config, directory, (directory / rundir.CONFIG).exists())
            echo(f"{name}: {_brief(summary)} ({time.perf_counter() - start:.0f} s)")
        records.append(_record(point, sweep.axes, summary))
        _write(out, sweep, records)
    return records


def _brief(summary: Mapping[str, Any]) -> str:
    parts = [f"{k} {v:.3f}" for k, v in summary["global"].items()]
    if "privacy" in summary:
        parts.append(f"epsilon {summary['privacy']['epsilon']:.3g}")
    return ", ".join(parts)


def _record(point: SweepPoint, axes: Sequence[str], summary: Mapping[str, Any]) -> dict[str, Any]:
    privacy = summary.get("privacy")
    return {
        **dict(zip(axes, point.labels, strict=True)),
        "seed": point.seed,
        "directory": point.directory,
        "rounds": summary["rounds"],
        "global": summary["global"],
        "proxy": summary["proxy"],
        "epsilon": privacy["epsilon"] if privacy else None,
        "noise_multiplier": privacy["noise_multiplier"] if privacy else None,
        "stopped": summary.get("stopped"),
        "wall_s": summary["wall_s"],
    }


def _write(out: Path, sweep: Sweep, records: list[dict[str, Any]]) -> None:
    (out / SWEEP_JSON).write_text(json.dumps({"axes": list(sweep.axes), "runs": records}, indent=2) + "\n")
    (out / SWEEP_MD).write_text(table(sweep.axes, records) + "\n")


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(axes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per combination, mean ± std (sample std) of every global metric over seeds."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[a] for a in axes), []).append(r)
    metrics = list(records[0]["global"]) if records else []
    header = [*axes, *metrics, "epsilon", "sigma", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for labels, rows in groups.items():
        cells = [*labels, *(_mean_std([r["global"][m] for r in rows]) for m in metrics)]
        eps = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        sigma = [r["noise_multiplier"] for r in rows if r["noise_multiplier"] is not None]
        cells += [_mean_std(eps) if eps else "∞ (non-private)", f"{statistics.mean(sigma):.3f}" if sigma else "–", str(len(rows))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
