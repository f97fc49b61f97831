"""The command line: ``fedlpp run [--config FILE] [--out DIR | --resume DIR] [section.key=value ...]``."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlpp.cli import deploy as deploy_cli
from fedlpp.config import ConfigError, ExperimentConfig, load_config
from fedlpp.rundir import RunDirError, resumed_config

ENGINES = ("local", "flower")


def _client_or_last(text: str) -> int | str:
    if text == "last":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a client number or 'last', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlpp", description="Federated LoRA fine-tuning that protects data and model.")
    parser.add_argument("--version", action="version", version=f"fedlpp {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a federated fine-tuning experiment")
    run.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config key, e.g. fl.rounds=3")
    run.add_argument("--config", type=Path, help="TOML experiment file (see configs/)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="run directory to create (default: runs/<algorithm>-<model>-<time>)")
    where.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR (also: extend it with fl.rounds=N)")
    run.add_argument("--quiet", action="store_true", help="no progress (bars on a terminal, timed lines in a log)")
    run.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: every client in this process; flower: Flower's simulation runtime (Ray), one virtual SuperNode per client",
    )
    sweep = sub.add_parser("sweep", help="run every combination and seed of a sweep file; write a mean ± std table")
    sweep.add_argument("config", type=Path, help="sweep file: a run config plus a [sweep] table (see configs/sst2_dp_sweep.toml)")
    sweep.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run, e.g. data.path=...")
    sweep.add_argument("--out", type=Path, help="folder of the sweep's runs and tables (default: runs/sweep-<name>)")
    sweep.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the points whose name ('label / label seed N') contains TEXT (repeatable); finished ones are still tabulated",
    )
    attack = sub.add_parser(
        "attack", help="what a client can hold (keep, fine-tune, alone, collude) scored beside theta and Q(theta)"
    )
    attack.add_argument("run_dir", type=Path, help="a finished run directory")
    attack.add_argument(
        "--client",
        type=_client_or_last,
        default="last",
        help="the attacking client (default 'last': the first client of the last round)",
    )
    attack.add_argument(
        "--steps", type=int, nargs="+", help="fine-tuning steps on Q(theta) (default: one and ten rounds' budget)"
    )
    attack.add_argument(
        "--collude",
        type=int,
        default=2,
        help="clients averaging what they keep: the attacker and those that trained most recently (1: none)",
    )
    attack.add_argument(
        "--cache", type=Path, help="a folder keeping 'alone' scores, shared by runs that differ only in algorithm/quant/privacy"
    )
    attack.add_argument("--quiet", action="store_true", help="no progress")
    evaluate = sub.add_parser("eval", help="score a run's saved adapter theta and the proxy built from it; write predictions")
    evaluate.add_argument("run_dir", type=Path, help="a run directory with a checkpoint")
    evaluate.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="other evaluation data or decoding: data.path, data.hf_id, data.eval_path, data.num_eval "
        "(0: the whole split), eval.batch_size, eval.max_new_tokens, eval.num_beams, "
        "eval.length_penalty, eval.no_repeat_ngram_size, train.device",
    )
    evaluate.add_argument(
        "--split",
        choices=("dev", "test"),
        default="dev",
        help="dev: the split the run evaluated on; test: the task's test split (e2e testset_w_refs.csv, dart, "
        "dialogsum, gsm8k test files or hub splits)",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress")
    score = sub.add_parser("score", help="score any system's outputs with a task's metric set (the papers'); prints JSON")
    score.add_argument("--task", required=True, help="e2e, dart, dialogsum, gsm8k, sst2, rte (else BLEU and ROUGE-L)")
    score.add_argument(
        "references",
        type=Path,
        help="text (references of an input on consecutive lines, blank line between), CSV with mr,ref columns, or JSONL",
    )
    score.add_argument("predictions", type=Path, help="one output per line (or JSONL with an 'output' each)")
    report = sub.add_parser("report", help="a Markdown table and PNG plots comparing runs (metrics, bytes, epsilon vs round)")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument(
        "--out",
        type=Path,
        help="folder for report.md and the plots (default: the run directory when one, else runs/report-<time>)",
    )
    deploy_cli.add_commands(sub)
    sub.add_parser("list", help="the models, tasks, algorithms and shipped configs, one line each")
    config = sub.add_parser("config", help="the resolved configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print every key of the resolved configuration with its value and why (valid TOML)")
    show.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config key, e.g. fl.rounds=3")
    show.add_argument("--config", type=Path, help="TOML experiment file (see configs/)")
    return parser


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("fedlpp")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree not installed
        return "unknown (not installed)"


def resolve_resume(directory: Path, config: Path | None, overrides: list[str]) -> ExperimentConfig:
    if config is not None:
        raise ConfigError("--resume takes its configuration from the run directory; drop --config")
    return resumed_config(directory, overrides)


def default_out(cfg: ExperimentConfig) -> Path:
    """runs/<algorithm>-<model>-<time>, where a local model folder is named by its own name, not its path."""
    from fedlpp import registry
    from fedlpp.models.source import local_path

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.model.name
    folder = local_path(name)
    local = name not in registry.MODELS and folder.is_dir()
    model = Path(os.path.abspath(folder)).name if local else name.replace("/", "_")
    return Path("runs") / f"{cfg.algorithm.name}-{model}-{stamp}"


def check_before_start(cfg: ExperimentConfig) -> None:
    """What can be checked before anything is printed or loaded: the model is a short name, a checkpoint folder here or
    a hub id; the data files named exist; the device is one torch sees (a run would otherwise find out only after
    loading the model). A bad name or device is a configuration error (exit 2), a missing file or folder an error
    (exit 1)."""
    from fedlpp import registry
    from fedlpp.models.machine import resolve_device
    from fedlpp.models.source import check_model_name

    check_model_name(cfg.model.name)
    local = registry.TASKS.get(cfg.data.task).traits.get("local_files", False)  # a plugin's task may read data.path otherwise
    for key, value in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if local and value and not Path(value).expanduser().exists():  # the loaders expand ~ too
            raise FileNotFoundError(f"{key}: no such file or folder: {value}")
    resolve_device(cfg.train.device)


def quiet_libraries() -> None:
    """Keep the terminal for our own progress and results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score announces its tokenizer
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def command_run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        cfg, out, resume = resolve_resume(args.resume, args.config, args.overrides), args.resume, True
    else:
        cfg = load_config(args.config, args.overrides)
        out, resume = args.out or default_out(cfg), False
    check_before_start(cfg)
    print(f"run directory: {out}", flush=True)
    quiet_libraries()
    from fedlpp.evaluation.report import format_summary

    summary = run_engine(args.engine)(cfg, out, resume=resume, progress=not args.quiet)
    print(format_summary(summary))
    from fedlpp.evaluation.report import run_directory_line, write_report

    print("\n" + run_directory_line(out, write_report([out], out)))
    print(
        f"the proxy is what a client receives, not what it can hold: `fedlpp attack {out}` scores its last local "
        "adapter, Q(theta) fine-tuned on its data, the same training alone and clients colluding"
    )
    return 0


def run_engine(name: str) -> Callable[..., dict[str, Any]]:
    """The engine's ``run(cfg, out, resume=, progress=) -> summary`` (imported only when chosen)."""
    if name == "flower":
        from fedlpp.engine.flower.simulation import run_simulated

        return run_simulated
    from fedlpp.engine.local import run_experiment

    return run_experiment


def command_attack(args: argparse.Namespace) -> int:
    quiet_libraries()
    from fedlpp.experiments.attack import format_attack, run_attack

    report = run_attack(args.run_dir, args.client, args.steps, args.collude, args.cache, progress=not args.quiet)
    print(format_attack(report))
    written = args.run_dir / f"attack-client-{report['client']}.json"
    print(f"\nwritten: {written}")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    quiet_libraries()
    from fedlpp.experiments.run_eval import EVAL_JSON, evaluate_run, format_eval

    report = evaluate_run(args.run_dir, args.overrides, progress=not args.quiet, split=args.split)
    print(format_eval(report))
    print(f"\nwritten: {args.run_dir / EVAL_JSON}, " + ", ".join(str(args.run_dir / p) for p in report["predictions"]))
    return 0


def command_score(args: argparse.Namespace) -> int:
    from fedlpp.evaluation.scoring import dumps, score_files

    print(dumps(score_files(args.task, args.references, args.predictions)))
    return 0


def command_report(args: argparse.Namespace) -> int:
    from fedlpp.evaluation.report import write_report

    out = args.out or (
        args.run_dirs[0]
        if len(args.run_dirs) == 1
        else Path("runs") / f"report-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    written = write_report(args.run_dirs, out)
    print((out / written[0].name).read_text())
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    from fedlpp.experiments.sweep import SWEEP_MD, check_only, load_sweep, run_sweep

    sweep = load_sweep(args.config, args.overrides)  # every point's config is validated before the first run
    for text in check_only(sweep, args.only):
        print(f"fedlpp sweep: --only {text!r} matches none of this sweep's points", file=sys.stderr)
    for point in sweep.points:  # a missing model folder or data file, or a device this machine lacks: before any run
        try:
            check_before_start(point.config)
        except (ConfigError, FileNotFoundError) as e:
            raise type(e)(f"sweep point {point.name}: {e}") from None
    out = args.out or Path("runs") / f"sweep-{args.config.stem}"
    print(f"{len(sweep.points)} runs into {out}")
    quiet_libraries()
    from fedlpp.engine.local import run_experiment
    from fedlpp.experiments.attack import run_attack

    run_sweep(
        sweep,
        out,
        lambda cfg, directory, resume: run_experiment(cfg, directory, resume=resume, progress=False),
        echo=lambda line: print(line, flush=True),
        attack=lambda directory, a: run_attack(directory, a.client, a.steps, a.collude, out / "attack-cache"),
        only=args.only,
    )
    print((out / SWEEP_MD).read_text())
    return 0


def command_list(args: argparse.Namespace) -> int:
    from fedlpp import registry
    from fedlpp.cli import catalogue

    def block(title: str, entries: dict[str, str]) -> None:
        width = max(map(len, entries), default=0)
        print(f"{title}:")
        for name, line in entries.items():
            print(f"  {name:<{width}}  {line}")

    block("models (model.name)", catalogue.summaries(registry.MODELS))
    print(f"  ({registry.MODEL_NOTE})")
    for kind in (registry.TASKS, registry.ALGORITHMS, registry.SERVER_OPTIMIZERS, registry.PARTITIONERS):
        block(f"{kind.kind}s ({kind.key})", catalogue.summaries(kind))
    shipped = catalogue.shipped_configs()
    if not shipped:
        print("shipped configs: none found here (they are in the repository's configs/ folder)")
        return 0
    block(
        "run configs (fedlpp run --config FILE)", {str(p): line for p, line in shipped.items() if not catalogue.is_sweep_file(p)}
    )
    block("sweep files (fedlpp sweep FILE)", {str(p): line for p, line in shipped.items() if catalogue.is_sweep_file(p)})
    return 0


def command_config(args: argparse.Namespace) -> int:
    from fedlpp.cli import catalogue
    from fedlpp.config import SECTIONS, ExperimentConfig, to_tree

    cfg = load_config(args.config, args.overrides)
    reasons = {"": catalogue.field_reasons(ExperimentConfig), **{n: catalogue.field_reasons(c) for n, c in SECTIONS.items()}}
    sources = catalogue.value_sources(cfg, args.config, args.overrides)
    print(catalogue.annotated_toml(to_tree(cfg), catalogue.with_sources(reasons, sources)), end="")
    return 0


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)?=")


DOTTED_OPTION = re.compile(r"^--([A-Za-z_]\w*\.\w+)(=.*)?$")


def as_overrides(argv: list[str]) -> list[str]:
    """``--data.path X`` and ``--data.path=X`` written as ``data.path=X`` (the two spellings users reach for)."""
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        match = DOTTED_OPTION.match(token)
        if match is None:
            out.append(token)
        elif match.group(2):
            out.append(match.group(1) + match.group(2))
        else:
            out.append(f"{match.group(1)}={next(tokens, '')}")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with ``section.key=value`` overrides allowed anywhere (also after options such as --split)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(as_overrides(sys.argv[1:] if argv is None else list(argv)))
    if extra:
        if not hasattr(args, "overrides") or not all(OVERRIDE.match(token) for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    try:
        commands = {
            "run": command_run,
            "sweep": command_sweep,
            "attack": command_attack,
            "partition": deploy_cli.command_partition,
            "deploy": deploy_cli.command_deploy,
            "list": command_list,
            "config": command_config,
            "eval": command_eval,
            "score": command_score,
            "report": command_report,
        }
        return commands[args.command](args)
    except ConfigError as e:
        print(f"fedlpp: configuration error: {e}", file=sys.stderr)
        return 2
    except RunDirError as e:
        print(f"fedlpp: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`fedlpp list | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ImportError, ValueError, RuntimeError) as e:  # OSError: missing files, offline hub
        print(f"fedlpp: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
