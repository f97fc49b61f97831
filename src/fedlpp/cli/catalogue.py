"""What fedlpp offers, one line each, for ``fedlpp list`` and ``fedlpp config show``.

The names and their summaries are the registries' (``fedlpp/registry.py``); the shipped
configs are the repository's. Kept free of torch so that the command line answers at once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from pathlib import Path

from fedlpp.registry import Registry


def summaries(names: Registry) -> dict[str, str]:
    """Each registered name of a kind with its one-line summary (built in, or from an installed plugin)."""
    return {entry.name: entry.summary for entry in names.entries()}


def shipped_configs() -> dict[Path, str]:
    """Each configs/*.toml of the repository (the working folder's, else the one beside the package): its first line."""
    for folder in (Path("configs"), Path(__file__).resolve().parents[3] / "configs"):
        if folder.is_dir():
            return {path: _first_comment(path) for path in sorted(folder.glob("*.toml"))}
    return {}


def is_sweep_file(path: Path) -> bool:
    """A sweep file (for ``fedlpp sweep``) has a [sweep] table; a run config (for ``--config``) has none."""
    import tomllib

    try:
        return "sweep" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def field_reasons(cls: type) -> dict[str, str]:
    """A config dataclass's fields and the comment written beside each in its source (``x: int = 1  # why``)."""
    source = inspect.getsource(cls)
    comments = {
        tok.start[0]: tok.string.lstrip("# ").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    lines = {
        node.target.id: node.lineno for node in body.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    return {f.name: comments.get(lines.get(f.name, -1), "") for f in dataclasses.fields(cls)}


def value_sources(cfg: object, path: str | Path | None, overrides: list[str]) -> dict[str, str]:
    """Where each dotted key's value came from: "override" (the command line), "file" (the config file),
    "dp_sgd default" (privacy.mode = "dp_sgd"'s own defaults) or "default"."""
    from fedlpp.config import DP_SGD_DEFAULTS, flat_tree, read_toml, to_tree

    given = flat_tree(read_toml(path)) if path else {}
    overridden = {text.partition("=")[0].strip() for text in overrides}
    mode_defaults = {f"{s}.{k}" for s, keys in DP_SGD_DEFAULTS.items() for k in keys}
    dp_sgd = getattr(getattr(cfg, "privacy", None), "mode", "") == "dp_sgd"
    sources = {}
    for key in flat_tree(to_tree(cfg)):  # type: ignore[arg-type]
        if key in overridden:
            sources[key] = "override"
        elif key in given:
            sources[key] = "file"
        elif dp_sgd and key in mode_defaults:
            sources[key] = "dp_sgd default"
        else:
            sources[key] = "default"
    return sources


def with_sources(reasons: dict[str, dict[str, str]], sources: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each key's reason, the names its registry holds (for the keys that name a component), and where its value
    came from, e.g. ``the task: weather is built in, jsonl is your own file (weather | e2e | ...)  [file]``."""
    from fedlpp import registry

    choices = {
        kind.key: " | ".join(kind.names()) + (", or any Hugging Face model id or local folder" if kind is registry.MODELS else "")
        for kind in (registry.ALGORITHMS, registry.TASKS, registry.MODELS, registry.PARTITIONERS, registry.SERVER_OPTIMIZERS)
    }
    out: dict[str, dict[str, str]] = {}
    for key, source in sources.items():
        section, _, name = key.rpartition(".")
        why = reasons.get(section, {}).get(name, "")
        if key in choices:
            why = f"{why} ({choices[key]})"
        out.setdefault(section, {})[name] = f"{why}  [{source}]" if why else f"[{source}]"
    return out


def annotated_toml(tree: dict[str, object], reasons: dict[str, dict[str, str]]) -> str:
    """A resolved configuration as TOML, every key with its value and its reason as a comment.

    ``tree`` is ``config.to_tree(cfg)``; ``reasons`` maps a section ("" for top-level keys) to
    ``field_reasons`` of it. The text reads back into the same configuration.
    """
    import tomli_w

    def value(v: object) -> str:  # on one line: tomli_w spreads a list over several
        if isinstance(v, list):
            return "[" + ", ".join(value(e) for e in v) + "]"
        return tomli_w.dumps({"k": v}).strip().removeprefix("k = ")

    def lines(values: dict[str, object], why: dict[str, str]) -> list[str]:
        pairs = [(f"{k} = {value(v)}", why.get(k, "")) for k, v in values.items()]
        width = max((len(p) for p, _ in pairs), default=0)
        return [f"{p:<{width}}  # {w}" if w else p for p, w in pairs]

    top = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    out = lines(top, reasons.get("", {}))
    for name, values in tree.items():
        if isinstance(values, dict):
            out += ["", f"[{name}]", *lines(values, reasons.get(name, {}))]
    return "\n".join(out) + "\n"
