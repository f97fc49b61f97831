"""``fedlpp score --task T REFERENCES PREDICTIONS``: any system's outputs scored with the task's metric set.

The metric sets are the papers' (DESIGN / README "Data"):

- e2e: BLEU and NIST as the E2E challenge's mteval-v13a does (``evaluation.mteval``), METEOR 1.5,
  ROUGE-L and CIDEr as the COCO caption code does (``evaluation.coco``; Java);
- dart: BLEU (mteval), METEOR 1.5 (COCO, Java), TER (sacrebleu);
- dialogsum: ROUGE-1/2/L F (rouge-score); gsm8k: exact match of the final number;
- sst2, rte: accuracy (predicted and reference labels compared as text);
- anything else that generates (weather, jsonl): BLEU (sacrebleu) and ROUGE-L.

A metric that cannot run here (METEOR without Java) is listed under "unavailable" with the reason.

Files: references as plain text (an input's references on consecutive lines, a blank line between
inputs; without blank lines, one reference per line), as a CSV with ``mr,ref`` columns (consecutive
rows with the same MR are one input's references, as the E2E scorer groups them), a GLUE ``.tsv``
(its ``label`` column), DART's release ``.json``, or JSON Lines (``output`` / ``outputs`` /
``references``, or the task's own fields: ``summary``, ``answer``, ``label``). Class labels are
compared by name (SST-2's 0/1 read as negative/positive, RTE's 0/1 as entailment/not_entailment). Predictions: one output per line, or JSON Lines with ``output`` (outputs that span lines).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlpp.data.files import read_json_lines, read_text
from fedlpp.evaluation import metrics as m

CLASSIFICATION_TASKS = ("sst2", "rte")
REFERENCE_FIELDS = ("outputs", "references", "output", "summary", "summary1", "answer", "label")


def official_metrics(task: str, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """{"metrics": {name: value}, "unavailable": {name: reason}} for ``task``'s metric set."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} predictions but {len(references)} reference sets: they must be one per input")
    scores: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    for name, compute in _metric_set(task):
        try:
            scores.update(compute(hypotheses, references))
        except RuntimeError as e:  # a Java metric without Java
            unavailable.update({metric: str(e) for metric in name.split(",")})
    return {"metrics": scores, "unavailable": unavailable}


Compute = Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, float]]


def _metric_set(task: str) -> list[tuple[str, Compute]]:
    from fedlpp.evaluation.coco import coco_scores
    from fedlpp.evaluation.mteval import bleu_nist

    def only(*names: str, of: Compute) -> Compute:
        return lambda h, r: {k: v for k, v in of(h, r).items() if k in names}

    def one(name: str, fn: Callable[[Sequence[str], Sequence[Sequence[str]]], float]) -> Compute:
        return lambda h, r: {name: fn(h, r)}

    if task == "e2e":
        return [("bleu,nist", bleu_nist), ("meteor,rouge_l,cider", coco_scores)]
    if task == "dart":
        return [("bleu", only("bleu", of=bleu_nist)), ("meteor", only("meteor", of=coco_scores)), ("ter", one("ter", m.ter))]
    if task == "dialogsum":
        return [(n, one(n, m.GENERATION_METRICS[n])) for n in ("rouge_1", "rouge_2", "rouge_l")]
    if task == "gsm8k":
        return [("exact_match", one("exact_match", m.exact_match))]
    if task in CLASSIFICATION_TASKS:
        return [("accuracy", one("accuracy", _label_accuracy_of(task)))]
    return [(n, one(n, m.GENERATION_METRICS[n])) for n in ("bleu", "rouge_l")]


def _label_accuracy_of(task: str) -> Callable[[Sequence[str], Sequence[Sequence[str]]], float]:
    """Accuracy with labels compared by name: a class id (GLUE's SST-2 0/1) is read as the task's class name."""
    from fedlpp.data import rte, sst2

    names: Sequence[str] = {"rte": rte.LABEL_NAMES, "sst2": sst2.LABEL_NAMES}[task]

    def named(label: str) -> str:
        label = label.strip()
        return names[int(label)] if label.isdigit() and int(label) < len(names) else label

    return lambda hyps, refs: m.accuracy([named(h) for h in hyps], [named(r[0]) for r in refs])


def read_references(path: Path) -> list[list[str]]:
    """Each input's references from a text, CSV (mr,ref), GLUE TSV (label), DART release JSON or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [_jsonl_references(row, f"{path}, line {n}") for n, row in read_json_lines(path)]
    if suffix == ".json":
        from fedlpp.data.dart import references_file

        return references_file(path)
    if suffix == ".tsv":
        from fedlpp.data.files import read_table

        return [[row["label"]] for row in read_table(path, ("label",), delimiter="\t", quote_none=True)]
    text = read_text(path)
    if suffix == ".csv":
        return _csv_references(text, path)
    lines = [line.strip() for line in text.splitlines()]
    if "" not in lines[:-1] or all(lines):
        return [[line] for line in lines if line]
    groups: list[list[str]] = [[]]
    for line in lines:
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return [g for g in groups if g]


def _csv_references(text: str, path: Path) -> list[list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not {"mr", "ref"} <= set(reader.fieldnames or []):
        raise ValueError(f"{path}: a references CSV needs columns mr and ref, found {reader.fieldnames}")
    groups: list[list[str]] = []
    last = None
    for row in reader:
        if row["mr"] != last:
            groups.append([])
            last = row["mr"]
        groups[-1].append(row["ref"].strip())
    return groups


def _jsonl_references(row: dict[str, Any], where: str) -> list[str]:
    for field in REFERENCE_FIELDS:
        if field in row:
            value = row[field]
            if field == "summary1":
                value = [row[f] for f in ("summary1", "summary2", "summary3") if isinstance(row.get(f), str)]
            refs = value if isinstance(value, list) else [value]
            if refs and all(isinstance(r, (str, int)) and str(r).strip() for r in refs):
                return [str(r).strip() for r in refs]
            raise ValueError(f"{where}: '{field}' must be a non-empty string or list of strings")
    raise ValueError(f"{where}: no reference field; expected one of {', '.join(REFERENCE_FIELDS)}")


def read_predictions(path: Path) -> list[str]:
    """One output per line, or JSON Lines with an ``output`` each."""
    if path.suffix.lower() == ".jsonl":
        outputs = []
        for n, row in read_json_lines(path):
            if not isinstance(row.get("output"), str):
                raise ValueError(f"{path}, line {n}: expected an 'output' string")
            outputs.append(row["output"])
        return outputs
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.rstrip("\r").strip() for line in lines]


def score_files(task: str, references: Path, predictions: Path) -> dict[str, Any]:
    for p in (references, predictions):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found")
    refs, hyps = read_references(references), read_predictions(predictions)
    if len(refs) != len(hyps):
        raise ValueError(
            f"{predictions} holds {len(hyps)} predictions but {references} has {len(refs)} inputs "
            "(one prediction per input, in the same order)"
        )
    return {"task": task, "inputs": len(refs), "references": sum(len(r) for r in refs), **official_metrics(task, hyps, refs)}


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
