"""What ``model.name`` may name, checked from the name and the files alone (no torch, nothing loaded).

A short name of the registry, a local checkpoint folder (config.json, weights, tokenizer) or a
Hugging Face id (owner/name). ``fedlpp run`` checks it before it prints anything; every command
that loads a model (eval, attack, a resumed run) checks it again, since a run's config keeps a
relative path as given and such a command may start elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fedlpp import registry
from fedlpp.config import ConfigError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
PATH_PREFIXES = (".", "/", "~")  # how a name that can only be a local path starts


def check_model_name(name: str) -> None:
    """Refuse, naming ``model.name``, what can be no model: a path that is not there (FileNotFoundError), a file, a
    folder without config.json, a LoRA adapter's folder, or a name that is no short name and no hub id
    (ConfigError)."""
    if name in registry.MODELS:
        return
    path = local_path(name)
    if path.exists():
        check_model_folder(path)
        return
    if name.startswith(PATH_PREFIXES):
        where = (
            ""
            if path.is_absolute()
            else f" (a relative path is read from the directory fedlpp runs in, here {os.getcwd()}; a run's config "
            "keeps it as given, so run eval, attack and --resume from the directory the run started in)"
        )
        raise FileNotFoundError(f"model.name: no such folder: {name}{where}")
    if not HUB_ID.fullmatch(name):
        raise ConfigError(
            f"model.name: {name!r} is not a short name ({', '.join(registry.MODELS.names())}), "
            "a folder here, nor a Hugging Face model id (owner/name)"
        )


def local_path(name: str) -> Path:
    """``model.name`` as a local path, ``~`` expanded (TOML and a shell's key=value leave it as typed)."""
    return Path(name).expanduser()


def check_model_folder(path: Path) -> None:
    """A local ``model.name`` must be a checkpoint folder: config.json beside the weights and tokenizer."""
    if not path.is_dir():
        raise ConfigError(f"model.name: {path} is a file; name the model's folder (config.json, weights, tokenizer)")
    refuse_adapter_folder(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name: {path} has no config.json, so it is no model checkpoint (a checkpoint folder holds "
            "config.json, the weights and the tokenizer, as save_pretrained writes them)"
        )


def refuse_adapter_folder(folder: Path) -> None:
    """A folder that holds a LoRA adapter but no model (a run's adapter/, peft's save_pretrained) names its base model;
    fedlpp loads the base by model.name and trains its own adapter on it."""
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    raise ConfigError(
        f"model.name: {folder} is a LoRA adapter (adapter_config.json, no config.json), not a model: name its base model "
        f"({base or 'base_model_name_or_path in adapter_config.json'}) in model.name; to evaluate a run's adapter, "
        "use fedlpp eval RUN_DIR"
    )
