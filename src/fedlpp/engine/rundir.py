"""The run directory contract: config, metrics.jsonl, checkpoint, summary, final adapter.

    DIR/config.toml          the resolved configuration
    DIR/metrics.jsonl        one JSON object per round
    DIR/checkpoint.safetensors   the server adapter after the latest finished round
    DIR/summary.json         the final result
    DIR/adapter/             the final global adapter in peft format
    DIR/broadcasts/          every round's broadcast as sent (round-0001.bin, ...; final.bin): what clients received

config.toml, checkpoint.safetensors and summary.json are replaced atomically (temporary
file + rename); metrics.jsonl is appended to, and a line cut short by a kill is dropped on
resume; adapter/ is written by peft once, at the end. A kill therefore never costs a
finished round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedlpp.config import ConfigError, ExperimentConfig, changed_keys, load_config, write_toml

CONFIG, METRICS, CHECKPOINT, SUMMARY, ADAPTER, BROADCASTS = (
    "config.toml",
    "metrics.jsonl",
    "checkpoint.safetensors",
    "summary.json",
    "adapter",
    "broadcasts",
)
FINAL_BROADCAST = "final"  # what the round after the last would send: the clients' view of the final adapter


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. resuming a directory with no run)."""


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def check_new(out: Path) -> None:
    """Refuse an --out that already holds a run (nothing is overwritten) or is not a folder."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    if (out / CONFIG).exists() or (out / CHECKPOINT).exists():
        raise RunDirError(f"{out} already holds a run; use --resume {out} to continue it, or choose another --out")


def prepare_new(out: Path, cfg: ExperimentConfig) -> None:
    """Create a fresh run directory holding the resolved config."""
    check_new(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / CONFIG, lambda p: write_toml(cfg, p))


def check_extends(out: Path, rounds: int) -> None:
    """A resumed run may keep or raise fl.rounds, never drop below the rounds already done."""
    ckpt = load_checkpoint(out)
    if ckpt is not None and ckpt[1] > rounds:
        raise RunDirError(f"{out} has already finished {ckpt[1]} rounds; fl.rounds={rounds} cannot shrink it")


# Keys that may change when a run is resumed: everything else would make the continued
# run differ from one configured that way from the start.
RESUMABLE_KEYS = ("fl.rounds", "flower.connect_timeout", "flower.round_timeout")


def load_run_config(out: Path, overrides: list[str]) -> ExperimentConfig:
    if not (out / CONFIG).is_file():
        raise RunDirError(f"{out} holds no run to resume (no {CONFIG})")
    return load_config(out / CONFIG, overrides)


def resumed_config(out: Path, overrides: list[str]) -> ExperimentConfig:
    """The run's stored config with ``overrides`` of the keys a resume may change (others are refused)."""
    new = load_run_config(out, overrides)
    bad = [k for k in changed_keys(load_run_config(out, []), new) if k not in RESUMABLE_KEYS]
    if bad:
        raise ConfigError(f"{bad[0]}: cannot change when resuming (only {', '.join(RESUMABLE_KEYS)} can)")
    return new


def save_config(out: Path, cfg: ExperimentConfig) -> None:
    _atomic_write(out / CONFIG, lambda p: write_toml(cfg, p))


SERVER_STATE_PREFIX = "server_state."  # checkpoint tensors that are the server optimizer's, not the adapter's


def save_checkpoint(out: Path, adapter: Mapping[str, torch.Tensor], round_: int, extra: Mapping[str, str] | None = None,
                    server_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """The adapter after ``round_``, with ``extra`` metadata (the privacy ledger) and the server
    optimizer's state, in one atomic file."""
    tensors = {n: t.contiguous() for n, t in adapter.items()}
    tensors.update({SERVER_STATE_PREFIX + n: t.contiguous() for n, t in (server_state or {}).items()})
    metadata = {**(extra or {}), "round": str(round_)}
    _atomic_write(out / CHECKPOINT, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_checkpoint_metadata(out: Path) -> dict[str, str]:
    """The checkpoint's metadata ({} when no round has finished)."""
    path = out / CHECKPOINT
    if not path.exists():
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / CHECKPOINT))


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], int] | None:
    """(adapter, last finished round), or None when no round has finished yet."""
    if not (out / CHECKPOINT).exists():
        return None
    adapter = {n: t for n, t in _checkpoint_tensors(out).items() if not n.startswith(SERVER_STATE_PREFIX)}
    return adapter, int(load_checkpoint_metadata(out)["round"])


def load_server_state(out: Path) -> dict[str, torch.Tensor]:
    """The server optimizer's state saved with the checkpoint ({} when there is none)."""
    if not (out / CHECKPOINT).exists():
        return {}
    return {n.removeprefix(SERVER_STATE_PREFIX): t for n, t in _checkpoint_tensors(out).items() if n.startswith(SERVER_STATE_PREFIX)}


def broadcast_path(out: Path, round_: int | str) -> Path:
    name = f"round-{round_:04d}" if isinstance(round_, int) else str(round_)
    return out / BROADCASTS / f"{name}.bin"


def save_broadcast(out: Path, round_: int | str, payload: bytes) -> None:
    """The bytes every client of ``round_`` received (client-side information: ``fedlpp attack`` reads them)."""
    path = broadcast_path(out, round_)
    path.parent.mkdir(exist_ok=True)
    _atomic_write(path, lambda p: p.write_bytes(payload))


def load_broadcast(out: Path, round_: int | str) -> bytes:
    path = broadcast_path(out, round_)
    if not path.is_file():
        raise RunDirError(f"{path} is missing: the run directory was written before broadcasts were kept (rerun it)")
    return path.read_bytes()


def append_metrics(out: Path, row: Mapping[str, Any]) -> None:
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def truncate_metrics(out: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only rows up to the checkpointed round (a kill may leave later or partial rows)."""
    rows = [r for r in read_metrics(out) if r.get("round", 0) <= last_round]
    _atomic_write(out / METRICS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return rows


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, written atomically (a reader never sees half a file)."""
    _atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    write_json(out / SUMMARY, summary)


def read_summary(out: Path) -> dict[str, Any]:
    """summary.json ({} when the run has not finished)."""
    path = out / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}
