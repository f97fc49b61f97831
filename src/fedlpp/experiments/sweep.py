"""Sweeps: one base configuration, a few named axes of overrides, several seeds — one table.

A sweep file is a run config (any ``[section]`` of a TOML experiment file) plus::

    [sweep]
    seeds = [0, 1, 2]
    [sweep.axes.algorithm]          # axes are crossed, in file order
    "LoRA" = ["algorithm.name=fedavg_lora"]
    "FFA-LoRA" = ["algorithm.name=ffa_lora", "train.lr=0.02"]
    [sweep.attack]                  # optional: `fedlpp attack` on every run (DESIGN 6)
    client = 0
    collude = 4
    steps = [5, 50]                 # optional: fine-tuning steps (default one and ten rounds' budget)

Every combination and seed is an ordinary run directory under ``--out``; a finished one
(summary.json present) is skipped and an interrupted one resumed, so a killed sweep
continues where it stopped. ``sweep.json`` holds every run's figures and ``sweep.md`` the
mean ± std over seeds of each combination. With ``[sweep.attack]`` each run is also attacked
(``attack-client-K.json`` in its directory, kept when present; ``alone`` is scored once per
client data and shared through ``attack-cache/``) and ``sweep.md`` gets the attack table.
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

from fedlpp import rundir
from fedlpp.config import ConfigError, ExperimentConfig, apply_overrides, build_config, changed_keys, load_config, read_toml

SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"


@dataclass(frozen=True)
class SweepPoint:
    labels: tuple[str, ...]  # one label per axis
    seed: int
    config: ExperimentConfig

    @property
    def name(self) -> str:
        return f"{' / '.join(self.labels) or 'base'} seed {self.seed}"

    @property
    def directory(self) -> str:
        slug = "__".join(re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_") for label in self.labels)
        return f"{slug or 'base'}/seed{self.seed}"


@dataclass(frozen=True)
class AttackSettings:
    """``[sweep.attack]``: which client attacks every run, how many collude, how long it fine-tunes."""

    client: int | str = "last"  # a client number, or "last": the first client of the last round
    collude: int = 2
    steps: tuple[int, ...] = ()  # () = one and ten rounds' budget


@dataclass(frozen=True)
class Sweep:
    axes: tuple[str, ...]
    points: tuple[SweepPoint, ...]
    attack: AttackSettings | None = None


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
    unknown = sorted(set(spec) - {"seeds", "axes", "attack"})
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}: unknown key; valid keys in [sweep] are attack, axes, seeds")
    attack = _attack_settings(spec["attack"]) if "attack" in spec else None
    _check_axes(axes)
    base = apply_overrides(tree, list(overrides))
    points = []
    combos = list(itertools.product(*[list(values.items()) for values in axes.values()]))
    for seed in seeds:  # seed by seed: a stopped sweep has every combination of its first seeds
        for combo in combos:
            labels = tuple(label for label, _ in combo)
            combo_overrides = [o for _, extra in combo for o in extra]
            where = f"sweep point {' / '.join(labels) or 'base'}, seed {seed}"
            try:
                config = build_config(apply_overrides(base, [*combo_overrides, f"seed={seed}", *overrides]))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            points.append(SweepPoint(labels, seed, config))
    _check_distinct(points)
    if attack is not None and isinstance(attack.client, int) and not all(attack.client < p.config.fl.num_clients for p in points):
        raise ConfigError(f"sweep.attack.client: {attack.client} is not a client of every run (fl.num_clients)")
    return Sweep(tuple(axes), tuple(points), attack)


def _attack_settings(spec: Any) -> AttackSettings:
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep.attack: expected a table (client, collude, steps), got {spec!r}")
    unknown = sorted(set(spec) - {"client", "collude", "steps"})
    if unknown:
        raise ConfigError(f"sweep.attack.{unknown[0]}: unknown key; valid keys are client, collude, steps")
    for key, least in (("client", 0), ("collude", 1)):
        value = spec.get(key, getattr(AttackSettings, key))
        if value != "last" and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise ConfigError(
                f"sweep.attack.{key}: expected an integer >= {least}"
                + (" or 'last'" if key == "client" else "")
                + f", got {value!r}"
            )
    steps = spec.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in steps):
        raise ConfigError(f"sweep.attack.steps: expected a list of integers >= 1, got {steps!r}")
    return AttackSettings(spec.get("client", "last"), spec.get("collude", 2), tuple(steps))


def _check_distinct(points: Sequence[SweepPoint]) -> None:
    seen: dict[str, tuple[str, ...]] = {}
    for p in points:
        if p.directory in seen and seen[p.directory] != p.labels:
            raise ConfigError(
                f"sweep.axes: labels {' / '.join(p.labels)!r} and {' / '.join(seen[p.directory])!r} "
                f"map to the same run directory {p.directory!r}; use labels that differ in letters or digits"
            )
        seen[p.directory] = p.labels


def check_same_config(point: SweepPoint, directory: Path) -> None:
    """A run directory left by an earlier sweep must hold this point's config, or it is not this point's run."""
    if not (directory / rundir.CONFIG).exists():
        return
    changed = changed_keys(load_config(directory / rundir.CONFIG), point.config)
    if changed:
        raise ConfigError(
            f"{directory} holds a run of this sweep point with a different {changed[0]}: the sweep file "
            "changed since; remove that directory or choose another --out"
        )


def _check_axes(axes: Any) -> None:
    if not isinstance(axes, dict):
        raise ConfigError('sweep.axes: expected tables of label = ["section.key=value", ...]')
    for axis, values in axes.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"sweep.axes.{axis}: expected a table of label = [overrides], got {values!r}")
        for label, extra in values.items():
            if not re.search(r"[A-Za-z0-9]", label):
                raise ConfigError(
                    f"sweep.axes.{axis}: label {label!r} is not a name (each names a run directory); use letters or digits"
                )
            if not isinstance(extra, list) or not all(isinstance(o, str) for o in extra):
                raise ConfigError(f'sweep.axes.{axis}.{label}: expected a list of "section.key=value" strings')


Attack = Callable[[Path, AttackSettings], dict[str, Any]]


def run_sweep(
    sweep: Sweep,
    out: Path,
    run: Callable[[ExperimentConfig, Path, bool], dict[str, Any]],
    echo: Callable[[str], None] = print,
    attack: Attack | None = None,
    only: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run every point not finished yet (``run(config, directory, resume)``), attack it if asked; write the tables.

    ``only``: run (and attack) just the points whose name ("label / label seed N") contains one of
    these texts; every finished point is still tabulated, with the attack report it holds, so that
    two sweeps on disjoint ``only`` sets can share one output folder.
    """
    check_only(sweep, only)
    for point in sweep.points:  # before anything runs: a changed sweep file must not mix with old runs
        check_same_config(point, out / point.directory)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, point in enumerate(sweep.points, 1):
        directory = out / point.directory
        summary_path = directory / rundir.SUMMARY
        name = f"[{i}/{len(sweep.points)}] {point.name}"
        chosen = not only or any(text in point.name for text in only)
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            echo(f"{name}: done before, kept")
        elif not chosen:
            continue
        else:
            start = time.perf_counter()
            summary = run(point.config, directory, (directory / rundir.CONFIG).exists())
            echo(f"{name}: {_brief(summary)} ({time.perf_counter() - start:.0f} s)")
        record = _record(point, sweep.axes, summary)
        if sweep.attack is not None and attack is not None:
            report = _attacked(directory, sweep.attack, attack if chosen else None, name, echo)
            if report is not None:
                record["attack"] = report
        records.append(record)
        _write(out, sweep, records)
    return records


def check_only(sweep: Sweep, only: Sequence[str]) -> list[str]:
    """The ``--only`` texts that pick no point of this sweep (a script may pass one set to two sweeps that share a
    folder); refused when together they pick none, which would run nothing (a typo)."""
    unmatched = [text for text in only if not any(text in point.name for point in sweep.points)]
    if only and len(unmatched) == len(only):
        names = ", ".join(repr(point.name) for point in sweep.points)
        texts = ", ".join(repr(text) for text in only)
        raise ConfigError(f"--only {texts} {'matches' if len(only) == 1 else 'match'} none of the sweep's points: {names}")
    return unmatched


def _attacked(
    directory: Path, settings: AttackSettings, attack: Attack | None, name: str, echo: Callable[[str], None]
) -> dict[str, Any] | None:
    """The run's attack report: the one it holds, or a new one (none when ``attack`` is None)."""
    from fedlpp.experiments.attack import resolve_attacker

    path = directory / f"attack-client-{resolve_attacker(rundir.read_metrics(directory), settings.client)}.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("requested") == {"collude": settings.collude, "steps": list(settings.steps)}:
            return kept
    if attack is None:
        return None
    start = time.perf_counter()
    report = attack(directory, settings)
    taken = report["value_taken"]
    metric = _headline(report["scores"]["theta"])
    shares = ", ".join(f"{k} {v[metric]:.2f}" for k, v in taken.items() if v[metric] is not None)
    echo(
        f"{name}: attacked ({time.perf_counter() - start:.0f} s); "
        + (f"share of the value taken ({metric}): {shares}" if shares else f"theta is no better than alone in {metric}")
    )
    return report


def _headline(metrics: Mapping[str, float]) -> str:
    """The task metric a table shows (BLEU, accuracy), not the loss."""
    return next((m for m in metrics if m != "loss"), "loss")


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
    rundir.write_json(out / SWEEP_JSON, {"axes": list(sweep.axes), "runs": records})
    text = table(sweep.axes, records)
    attacked = [r for r in records if "attack" in r]
    if attacked:
        text += "\n\n" + attack_table(sweep.axes, attacked)
    rundir.write_text(out / SWEEP_MD, text + "\n")


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _by_combination(axes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, ...], list[Mapping[str, Any]]]:
    """The records of each combination of labels, in order of first appearance (one per seed)."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[a] for a in axes), []).append(r)
    return groups


def table(axes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per combination, mean ± std (sample std) over seeds of every global metric and of the
    proxy's (Q(theta): what a client receives) headline metric."""
    groups = _by_combination(axes, records)
    metrics = list(records[0]["global"]) if records else []
    headline = _headline(records[0]["global"]) if records else "loss"
    header = [*axes, *metrics, f"proxy {headline}", "epsilon", "sigma", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for labels, rows in groups.items():
        cells = [
            *labels,
            *(_mean_std([r["global"][m] for r in rows]) for m in metrics),
            _mean_std([r["proxy"][headline] for r in rows]),
        ]
        eps = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        sigma = [r["noise_multiplier"] for r in rows if r["noise_multiplier"] is not None]
        cells += [_mean_std(eps) if eps else "∞ (non-private)", f"{statistics.mean(sigma):.3f}" if sigma else "–", str(len(rows))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attack_table(axes: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per combination, the headline metric of theta, Q(theta) and what a client holds, and the share taken."""
    groups = _by_combination(axes, records)
    metric = _headline(records[0]["attack"]["scores"]["theta"])
    adapters = list(dict.fromkeys(a for r in records for a in r["attack"]["scores"]))  # e.g. finetune-N differs with E
    takers = [a for a in adapters if a not in ("theta", "alone")]
    header = [*axes, *adapters, *(f"taken: {a}" for a in takers), "seeds"]
    lines = [
        f"{metric} of what a client can hold, and the share of the federation's value (theta - alone) it takes",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for labels, rows in groups.items():
        cells = [*labels]
        for a in adapters:
            scores = [r["attack"]["scores"][a][metric] for r in rows if a in r["attack"]["scores"]]
            cells.append(_mean_std(scores) if scores else "–")
        for a in takers:
            shares = [r["attack"]["value_taken"].get(a, {}).get(metric) for r in rows]
            cells.append("–" if None in shares else _mean_std(shares))
        lines.append("| " + " | ".join([*cells, str(len(rows))]) + " |")
    return "\n".join(lines)
