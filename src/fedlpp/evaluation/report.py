"""What runs report: the end-of-run table (``format_summary``), and ``fedlpp report RUN_DIR [RUN_DIR ...]``'s Markdown
table and PNG plots comparing runs, as a paper's figure does.

Plots: every evaluation metric against the round, the global model (solid) and the proxy a
client builds (dashed) in one colour per run; cumulative bytes down and up; epsilon against the
round when a run is private. Runs are named by what differs between their configurations
(``algorithm.name=fedlpp, quant.bits=1``), or by their folder when nothing does.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlpp import rundir
from fedlpp.config import flat_tree, to_tree

REPORT_MD = "report.md"
METRICS_PNG, BYTES_PNG, EPSILON_PNG = "metrics.png", "bytes.png", "epsilon.png"
UNITS = {
    "loss": "held-out loss (nats)",
    "bleu": "BLEU (0-100)",
    "rouge_l": "ROUGE-L F (0-100)",
    "rouge_1": "ROUGE-1 F (0-100)",
    "rouge_2": "ROUGE-2 F (0-100)",
    "accuracy": "accuracy (%)",
    "ter": "TER (lower is better)",
    "exact_match": "exact match (%)",
}
MIB = 1024 * 1024
MARKERS = "os^Dvp*hX"  # one per run, so that runs whose lines coincide stay visible


@dataclass(frozen=True)
class RunRecord:
    directory: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if "global" in r]


def load_runs(directories: Sequence[Path]) -> list[RunRecord]:
    runs = []
    for d in directories:
        cfg = rundir.load_run_config(d, [])
        rows = rundir.read_metrics(d)
        if not rows:
            raise rundir.RunDirError(f"{d}: no round finished, nothing to report")
        runs.append(RunRecord(d, to_tree(cfg), rows, rundir.read_summary(d)))
    return runs


def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """Each run named by the configuration keys whose values differ between the runs (data paths left out)."""
    flats = [flat_tree(r.config) for r in runs]
    keys = [k for k in flats[0] if len({repr(f.get(k)) for f in flats}) > 1 and k not in ("data.path", "data.eval_path")]
    labels = [", ".join(f"{k}={f[k]}" for k in keys) for f in flats]
    if len(runs) == 1 or not all(labels) or len(set(labels)) < len(labels):
        return [str(r.directory) for r in runs]
    return labels


def markdown(runs: Sequence[RunRecord], labels: Sequence[str]) -> str:
    metrics = list(dict.fromkeys(m for r in runs for row in r.evaluated for m in row["global"]))
    header = [
        "run",
        "rounds",
        *(f"global {m}" for m in metrics),
        *(f"proxy {m}" for m in metrics if m != "loss"),
        "KiB down / client / round",
        "KiB up / client / round",
        "epsilon",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run, label in zip(runs, labels, strict=True):
        last = run.evaluated[-1] if run.evaluated else {"global": {}, "proxy": {}}
        per = run.summary.get("bytes_per_client_per_round", {})
        eps = run.rows[-1].get("epsilon")
        cells = [
            label,
            str(run.rows[-1]["round"]),
            *(_num(last["global"].get(m)) for m in metrics),
            *(_num(last["proxy"].get(m)) for m in metrics if m != "loss"),
            _num(per.get("down", 0) / 1024 if per else None),
            _num(per.get("up", 0) / 1024 if per else None),
            "∞ (non-private)" if eps is None else f"{eps:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def run_directory_line(out: Path, written: Sequence[Path]) -> str:
    """The last line of a finished run: where it is and its report files."""
    return f"run directory: {out} (report: {', '.join(p.name for p in written)})"


def report_files(out: Path) -> list[Path]:
    """The report a finished run directory holds (report.md and the plots), as write_report wrote them."""
    return [p for p in (out / REPORT_MD, out / METRICS_PNG, out / BYTES_PNG, out / EPSILON_PNG) if p.is_file()]


def write_report(directories: Sequence[Path], out: Path) -> list[Path]:
    """report.md and the plots into ``out``; returns the files written."""
    runs = load_runs(directories)
    labels = run_labels(runs)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_metrics(runs, labels, out / METRICS_PNG), _plot_bytes(runs, labels, out / BYTES_PNG)]
    if any("epsilon" in row for r in runs for row in r.rows):
        written.append(_plot_epsilon(runs, labels, out / EPSILON_PNG))
    plots = [w for w in written if w is not None]
    text = (
        f"# fedlpp report\n\n{markdown(runs, labels)}\n\nLast evaluated round of each run; global = the server's adapter θ, "
        "proxy = what a client builds from the broadcast.\n\n" + "".join(f"![{p.stem}]({p.name})\n\n" for p in plots)
    )
    rundir.write_text(out / REPORT_MD, text)
    return [out / REPORT_MD, *plots]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_metrics(runs: Sequence[RunRecord], labels: Sequence[str], path: Path) -> Path | None:
    metrics = list(dict.fromkeys(m for r in runs for row in r.evaluated for m in row["global"]))
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            rows = [row for row in run.evaluated if metric in row["global"]]  # runs of other tasks lack some metrics
            rounds = [row["round"] for row in rows]
            color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
            ax.plot(rounds, [row["global"][metric] for row in rows], "-", marker=marker, color=color, label=f"{label} (global)")
            ax.plot(
                rounds,
                [row["proxy"][metric] for row in rows],
                "--",
                marker=marker,
                markerfacecolor="none",
                color=color,
                label=f"{label} (proxy)",
            )
        _rounds_axis(ax)
        ax.set_ylabel(UNITS.get(metric, metric))
        ax.set_title(metric)
    _legend_below(fig, axes[0][0])
    return _save(fig, path, plt)


def _plot_bytes(runs: Sequence[RunRecord], labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2))
    for ax, key, title in ((axes[0], "bytes_down", "server to clients"), (axes[1], "bytes_up", "clients to server")):
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            total, xs, ys = 0, [], []
            for row in run.rows:
                total += row.get(key, 0)
                xs.append(row["round"])
                ys.append(total / MIB)
            ax.plot(xs, ys, "-", marker=MARKERS[i % len(MARKERS)], markersize=9 - 2 * (i % 3), color=f"C{i % 10}", label=label)
        _rounds_axis(ax)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("cumulative MiB, all clients")
        ax.set_title(title)
    _legend_below(fig, axes[0])
    return _save(fig, path, plt)


def _plot_epsilon(runs: Sequence[RunRecord], labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        points = [(row["round"], row["epsilon"]) for row in run.rows if "epsilon" in row]
        if points:
            delta = next(row["delta"] for row in run.rows if "delta" in row)
            ax.plot(
                *zip(*points, strict=True),
                "-",
                marker=MARKERS[i % len(MARKERS)],
                color=f"C{i % 10}",
                label=f"{label} (δ={delta:g})",
            )
    _rounds_axis(ax)
    highest = max((y for line in ax.get_lines() for y in line.get_ydata()), default=0.0)
    ax.set_ylim(0, highest * 1.08 or 1.0)  # room above the last point: its marker is not cut by the frame
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title("privacy budget")
    _legend_below(fig, ax)
    return _save(fig, path, plt)


def _rounds_axis(ax: Any) -> None:
    """Whole rounds on the x axis (each round marked when there are few)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    rounds = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xlabel("round")
    if rounds and len(rounds) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(rounds))
        ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _legend_below(fig: Any, ax: Any) -> None:
    """One legend under the plots, out of the data's way."""
    handles, names = ax.get_legend_handles_labels()
    wide = max((len(n) for n in names), default=0) > 36
    fig.legend(handles, names, loc="lower center", ncol=1 if wide else min(3, max(1, len(names))), fontsize=9, frameon=False)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    legend = fig.legends[0] if fig.legends else None
    rows = math.ceil(len(legend.get_texts()) / legend._ncols) if legend is not None else 0
    width, height = fig.get_size_inches()
    room = 0.24 * rows + 0.2  # inches under the plots for the legend
    fig.set_size_inches(width, height + room)
    fig.tight_layout(rect=(0, room / (height + room), 1, 1))
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)  # a legend wider than the plots is not cut
    plt.close(fig)
    rundir.write_bytes(path, image.getvalue())  # atomically, never through a link planted at the name
    return path


# --- the end-of-run table: global vs proxy, and bytes vs FedAvg+LoRA ---------------------------------


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_summary(summary: Mapping[str, Any]) -> str:
    g, p = summary["global"], summary["proxy"]
    names = list(g)
    lines = [
        f"{summary['algorithm']} on {summary['task']} with {summary['model']}: {summary['rounds']} "
        f"round{'' if summary['rounds'] == 1 else 's'}, "
        f"{summary['wall_s']:.0f} s",
        "",
        f"{'metric (round ' + str(summary['final_round']) + ')':<22}{'global':>12}{'proxy':>12}{'gap':>10}",
    ]
    for name in names:
        lines.append(f"{name:<22}{g[name]:>12.3f}{p[name]:>12.3f}{g[name] - p[name]:>+10.3f}")
    b, ref, ratio = (
        summary["bytes_per_client_per_round"],
        summary["fedavg_lora_bytes_per_client_per_round"],
        summary["ratio_to_fedavg_lora"],
    )
    lines += [
        "",
        f"{'bytes / client / round':<22}{'this run':>14}{'FedAvg+LoRA':>14}{'ratio':>10}",
        f"{'down (server->client)':<22}{_kib(b['down']):>14}{_kib(ref['down']):>14}{ratio['down']:>9.3f}x",
        f"{'up (client->server)':<22}{_kib(b['up']):>14}{_kib(ref['up']):>14}{ratio['up']:>9.3f}x",
    ]
    if "privacy" in summary:
        lines += ["", summary["privacy"]["statement"]]
    if "stopped" in summary:
        lines += ["", f"stopped early: {summary['stopped']}"]
    return "\n".join(lines)
