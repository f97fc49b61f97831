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
finished round. Any other damage is refused by name, never repaired by dropping history:
a bad metrics line before the last, a missing, unreadable or foreign checkpoint, or a
configuration that differs from the one the checkpoint records. One process at a time
writes a run (an flock on DIR/.lock).

The directory is its owner's: a run refuses one in which a file it writes is a symbolic link
(it would write through it, outside the run), appends and locks never follow links, and the
files that hold θ (the checkpoint, adapter/) are readable by the owner only. The checkpoint
carries a SHA-256 digest of its tensors and metadata (checked on resume and by ``fedlpp eval``)
and of the metrics rows up to its round (checked on resume): a flipped bit, a row edited, missing
or copied from another run is refused. A digest detects damage, not a forger who rewrites both
(or removes them: a checkpoint without one, as older versions wrote, is accepted with a warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlpp.config import ConfigError, ExperimentConfig, changed_keys, flat_tree, load_config, read_toml, to_tree, write_toml

if TYPE_CHECKING:  # torch and safetensors load where checkpoints are touched: the command line's --help stays fast
    import torch

log = logging.getLogger(__name__)

CONFIG, METRICS, CHECKPOINT, SUMMARY, ADAPTER, BROADCASTS = (
    "config.toml",
    "metrics.jsonl",
    "checkpoint.safetensors",
    "summary.json",
    "adapter",
    "broadcasts",
)
FINAL_BROADCAST = "final"  # what the round after the last would send: the clients' view of the final adapter
PRIVATE = 0o600  # files that hold θ, the model owner's secret


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. resuming a directory with no run)."""


def _atomic_write(path: Path, write: Any, mode: int | None = None) -> None:
    """Write to a temporary file of its own, then rename it over ``path``: the old file stays whole until the
    new one is, and the new one is on disk (fsync'ed, with its folder) before the rename counts.

    Any failure (a full disk, a read-only or immutable folder, a writer's own error) is one
    RunDirError naming the file; the temporary file is removed. ``mode``: the file's permissions (default: the
    usual ones under the umask); the temporary file is created private, so the content is never readable by others.
    """
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)  # mkstemp made it private; writers may recreate it
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise RunDirError(f"could not write {path}: {e} (the previous version, if any, is unchanged)") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


LOCK = ".lock"  # the run's lock file: flock'ed by the one process writing the run, which writes its pid there


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out`` for this process while the block runs; refuse while another process holds it.

    An exclusive ``flock`` on DIR/.lock: the kernel grants it to one open file at a time and
    drops it when its holder exits or is killed, so a dead holder's lock is recovered without
    guessing. The holder writes its pid into the file for the message others get. (flock is
    reliable on local file systems; on NFS use one run directory per machine.)
    """
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    check_no_links(out)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot open the run's lock {path}: {e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise RunDirError(
                f"{out} is in use by process {holder} (it holds {path}); wait for that run to end or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            if {p.name for p in out.iterdir()} == {LOCK}:  # a new run that wrote nothing leaves nothing behind
                path.unlink()
                if created:
                    out.rmdir()
    finally:
        os.close(fd)  # releases the lock


# Everything a run, eval, attack or report writes in the run directory: none of them may be a symbolic link.
WRITTEN = (
    *(CONFIG, METRICS, CHECKPOINT, SUMMARY, ADAPTER, BROADCASTS, LOCK),
    *("report.md", "metrics.png", "bytes.png", "epsilon.png", "eval.json", "predictions", "sweep.json", "sweep.md"),
)


def check_no_links(out: Path) -> None:
    """Refuse a run directory in which a file or folder fedlpp writes is a symbolic link: writing through it would
    truncate or create a file outside the run (the run directory itself may be a link: that is its owner's choice)."""
    for name in WRITTEN:
        if (out / name).is_symlink():
            raise RunDirError(f"{out / name} is a symbolic link; fedlpp does not write through links (remove it)")
    for folder in (out / BROADCASTS, out / ADAPTER, out / "predictions"):
        if folder.is_dir():
            link = next((p for p in folder.iterdir() if p.is_symlink()), None)
            if link is not None:
                raise RunDirError(f"{link} is a symbolic link; fedlpp does not write through links (remove it)")


def save_private_folder(path: Path, write: Any) -> None:
    """A folder that holds θ (adapter/): written by ``write(folder)`` into a private temporary folder (0700), its files
    made 0600, then renamed into place — never readable by others, never written through a link at ``path``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        make_private(tmp)
        os.chmod(tmp, 0o700)
        if path.is_symlink():
            raise RunDirError(f"{path} is a symbolic link; fedlpp does not write through links (remove it)")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except RunDirError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"could not write {path}: {e}") from e


def make_private(path: Path) -> None:
    """``path`` (a file, or every file in a folder) readable and writable by the owner only: it holds θ."""
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(file, PRIVATE)


def discard_unstarted(out: Path) -> None:
    """Remove what a new run wrote before its first round finished (its config, metrics, broadcasts), so that the
    same --out can be used again; a run with a checkpoint is never touched."""
    if (out / CHECKPOINT).exists():
        return
    for name in (CONFIG, METRICS):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / BROADCASTS, ignore_errors=True)


def check_new(out: Path) -> None:
    """Refuse an --out that already holds a run (nothing is overwritten) or is not a folder."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    left = [name for name in (CONFIG, CHECKPOINT, METRICS, SUMMARY) if (out / name).exists()]
    if left:
        raise RunDirError(f"{out} already holds a run ({left[0]}); use --resume {out} to continue it, or choose another --out")


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
RESUMABLE_KEYS = (
    "fl.rounds",
    "flower.connect_timeout",
    "flower.round_timeout",
    "flower.client_cpus",
    "flower.client_gpus",
    "train.device",
)  # where it runs, not what it computes


def load_run_config(out: Path, overrides: list[str]) -> ExperimentConfig:
    """The configuration a run directory recorded, with ``overrides``."""
    check_no_links(out)
    if not (out / CONFIG).is_file():
        raise RunDirError(f"no run here: {out} has no {CONFIG} (a run directory is the folder `fedlpp run` wrote)")
    return load_config(out / CONFIG, [*_keys_older_runs_used(out / CONFIG), *overrides])


# Keys added after runs were saved without them, where the new default does otherwise: what those
# runs did. model.pooling (default auto, the checkpoint's own) came later, and every classifier before
# it read BERT's CLS pooler, so a resumed or re-scored old run keeps reading it.
OLDER_RUNS_USED = {"model.pooling": "cls", "fl.weighting": "examples"}  # fl.weighting came later too: runs weighed by examples


def _keys_older_runs_used(path: Path) -> list[str]:
    """OLDER_RUNS_USED as overrides, for each key the saved config does not name."""
    saved = flat_tree(read_toml(path))
    return [f"{key}={value}" for key, value in OLDER_RUNS_USED.items() if key not in saved]


def resumed_config(out: Path, overrides: list[str]) -> ExperimentConfig:
    """The run's stored config with ``overrides`` of the keys a resume may change (others are refused)."""
    if not (out / CONFIG).is_file():
        raise RunDirError(f"{out} holds no run to resume (no {CONFIG})")
    new = load_run_config(out, overrides)
    bad = [k for k in changed_keys(load_run_config(out, []), new) if k not in RESUMABLE_KEYS]
    if bad:
        raise ConfigError(f"{bad[0]}: cannot change when resuming (only {', '.join(RESUMABLE_KEYS)} can)")
    return new


def save_config(out: Path, cfg: ExperimentConfig) -> None:
    _atomic_write(out / CONFIG, lambda p: write_toml(cfg, p))


CONFIG_KEY = "config"  # checkpoint metadata: the configuration it was made with (config_record)
SERVER_STATE_PREFIX = "server_state."  # checkpoint tensors that are the server optimizer's, not the adapter's


def save_checkpoint(
    out: Path,
    adapter: Mapping[str, torch.Tensor],
    round_: int,
    extra: Mapping[str, str] | None = None,
    server_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """The adapter after ``round_``, with ``extra`` metadata (the privacy ledger) and the server
    optimizer's state, in one atomic file."""
    tensors = {n: t.contiguous() for n, t in adapter.items()}
    tensors.update({SERVER_STATE_PREFIX + n: t.contiguous() for n, t in (server_state or {}).items()})
    from safetensors.torch import save_file

    metadata = {**(extra or {}), "round": str(round_)}
    metadata[DIGEST_KEY] = checkpoint_digest(tensors, metadata)
    _atomic_write(out / CHECKPOINT, lambda p: save_file(tensors, str(p), metadata=metadata), mode=PRIVATE)


DIGEST_KEY = "digest"  # checkpoint metadata: SHA-256 of its tensors and of the rest of its metadata
METRICS_DIGEST_KEY = "metrics_digest"  # checkpoint metadata: SHA-256 of the metrics rows up to its round


def checkpoint_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the digest itself."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        h.update(f"{key}={metadata[key]}\n".encode())
    return h.hexdigest()


class MetricsDigest:
    """The SHA-256 of metrics.jsonl's rows as the file holds them (one JSON object per line), kept up to date one
    row at a time: a run's checkpoints each record it without hashing the whole history again."""

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self._hash = hashlib.sha256()
        for row in rows:
            self.add(row)

    def add(self, row: Mapping[str, Any]) -> None:
        self._hash.update((json.dumps(row) + "\n").encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def metrics_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 of the rows as metrics.jsonl holds them."""
    return MetricsDigest(rows).hexdigest()


def check_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """The metrics rows up to the checkpoint's round must be the ones the checkpoint was written after."""
    expected = load_checkpoint_metadata(out).get(METRICS_DIGEST_KEY)
    if expected is not None and metrics_digest(rows) != expected:
        raise RunDirError(
            f"{out / METRICS} does not match {out / CHECKPOINT}: rows up to its round were edited, removed or come from "
            "another run; the run's history cannot be trusted, so it is not resumed"
        )


def load_checkpoint_metadata(out: Path) -> dict[str, str]:
    """The checkpoint's metadata ({} when no round has finished)."""
    path = out / CHECKPOINT
    if not path.exists():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - whatever safetensors raises on a damaged file
        raise RunDirError(f"{path} is damaged and cannot be read ({e}); the run cannot be resumed from it") from None


def _checkpoint_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(out / CHECKPOINT))
    except Exception as e:  # noqa: BLE001 - whatever safetensors raises on a damaged file
        raise RunDirError(f"{out / CHECKPOINT} is damaged and cannot be read ({e}); the run cannot be resumed from it") from None
    metadata = load_checkpoint_metadata(out)
    stored = metadata.get(DIGEST_KEY)
    if stored is None:
        log.warning("%s has no digest (written by an older fedlpp): damage to it cannot be detected", out / CHECKPOINT)
    elif checkpoint_digest(tensors, metadata) != stored:
        raise RunDirError(
            f"{out / CHECKPOINT} is damaged: its tensors or metadata no longer match the digest written with them "
            "(a changed bit replays a round silently, so it is not used)"
        )
    return tensors


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], int] | None:
    """(adapter, last finished round), or None when no round has finished yet."""
    if not (out / CHECKPOINT).exists():
        return None
    metadata = load_checkpoint_metadata(out)
    round_ = metadata.get("round", "")
    if not round_.isdigit() or int(round_) < 1:
        raise RunDirError(
            f"{out / CHECKPOINT} has no valid 'round' in its metadata (got {round_!r}): it is not a checkpoint fedlpp wrote"
        )
    adapter = {n: t for n, t in _checkpoint_tensors(out).items() if not n.startswith(SERVER_STATE_PREFIX)}
    return adapter, int(round_)


def _fixed_tree(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config tree without the keys a resume may change."""
    tree = to_tree(cfg)
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        tree[section].pop(name, None)
    return tree


def config_record(cfg: ExperimentConfig) -> str:
    """Every key a resume must not change, as JSON: stored with each checkpoint."""
    return json.dumps(_fixed_tree(cfg), sort_keys=True)


def check_checkpoint_config(out: Path, cfg: ExperimentConfig) -> None:
    """Refuse to resume with a configuration other than the one the checkpoint was made with."""
    stored = load_checkpoint_metadata(out).get(CONFIG_KEY)
    if stored is None:
        return  # a checkpoint from before configurations were recorded
    try:
        then = flat_tree(json.loads(stored))
    except (ValueError, AttributeError):
        raise RunDirError(f"{out / CHECKPOINT}: its recorded configuration is damaged") from None
    now, defaults = flat_tree(_fixed_tree(cfg)), flat_tree(_fixed_tree(ExperimentConfig()))  # a key added since had its default,
    defaults.update(OLDER_RUNS_USED)  # or what older runs did
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k, defaults.get(k)))
    if changed:
        raise RunDirError(
            f"{out}: {changed[0]} differs from the configuration the checkpoint was made with "
            f"({CONFIG} was edited since?); only {', '.join(RESUMABLE_KEYS)} may change on resume"
        )


def load_server_state(out: Path) -> dict[str, torch.Tensor]:
    """The server optimizer's state saved with the checkpoint ({} when there is none)."""
    if not (out / CHECKPOINT).exists():
        return {}
    return {
        n.removeprefix(SERVER_STATE_PREFIX): t for n, t in _checkpoint_tensors(out).items() if n.startswith(SERVER_STATE_PREFIX)
    }


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
    path = out / METRICS
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunDirError(f"could not append to {path}: {e}") from None


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; only a last line cut short by a kill is dropped.

    Any other damage (a bad line before the last, a row that is not an object with an
    integer round, rounds out of order) is a RunDirError naming the file and line: the
    history is never silently shortened.
    """
    path = out / METRICS
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} cannot be read: {e}") from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                log.warning("%s, line %d: a row cut short (the run was killed while writing it) is left out", path, number)
                break
            raise RunDirError(
                f"{path}, line {number}: not valid JSON; the run's history is damaged "
                "(repair or remove the line, or start a new run)"
            ) from None
        _check_row(path, number, row, rows[-1]["round"] if rows else 0)
        rows.append(row)
    return rows


def _check_row(path: Path, number: int, row: Any, previous: int) -> None:
    if not isinstance(row, dict):
        raise RunDirError(f"{path}, line {number}: expected a JSON object (one round's metrics), got {type(row).__name__}")
    r = row.get("round")
    if type(r) is not int or r <= previous:
        raise RunDirError(
            f"{path}, line {number}: round {r!r} does not follow round {previous}; the file mixes runs or is damaged"
        )


def metrics_up_to(out: Path, last_round: int) -> list[dict[str, Any]]:
    """The rows up to the checkpointed round (a kill may leave later or partial rows); nothing is written."""
    return [r for r in read_metrics(out) if r.get("round", 0) <= last_round]


def truncate_metrics(out: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only rows up to the checkpointed round in the file."""
    rows = metrics_up_to(out, last_round)
    _atomic_write(out / METRICS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return rows


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, written atomically (a reader never sees half a file)."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    _atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Bytes (a plot), written atomically."""
    _atomic_write(path, lambda p: p.write_bytes(data))


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    write_json(out / SUMMARY, summary)


def read_summary(out: Path) -> dict[str, Any]:
    """summary.json ({} when the run has not finished)."""
    path = out / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}
