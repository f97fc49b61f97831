"""DART (RDF triples -> text), from the release's JSON files or the hub's ``dart``.

A folder with ``dart-v1.1.1-full-train.json`` and ``-dev.json``; with the dev file alone, a
seeded tenth of its triple sets is held out and the rest trained on. Each triple set is
written ``subject | predicate | object`` and joined with `` ; ``. Training keeps one example
per (triple set, annotation); evaluation one per triple set with all its annotations as
references. The first annotation's ``source`` (webnlg, e2e, WikiSQL_..., ...) is the
partitioner's group. Runs score BLEU and TER; ``fedlpp score`` / ``fedlpp eval`` add METEOR 1.5 (Java).
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlpp.data.files import read_text, require_dir
from fedlpp.data.hub import get_split, load_hub_splits
from fedlpp.data.sampling import hold_out, sized_task
from fedlpp.data.schema import GENERATION, Example, TaskData

NAME = "dart"
PROMPT = "Describe the triples.\nData: {triples}\nText:"
TRAIN_FILE, DEV_FILE, TEST_FILE = "dart-v1.1.1-full-train.json", "dart-v1.1.1-full-dev.json", "dart-v1.1.1-full-test.json"
METRICS = ("bleu", "ter")

Entry = tuple[str, str, tuple[str, ...]]  # (prompt, group, references)


def _entries(path: Path) -> list[Entry]:
    """The file's triple sets, one entry per distinct linearised set (the release repeats some), references merged."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of triple sets")
    return _grouped([_entry(item, f"{path}, triple set {i}") for i, item in enumerate(data, 1)])


def _grouped(entries: list[Entry]) -> list[Entry]:
    merged: dict[str, tuple[str, list[str]]] = {}
    for prompt, group, refs in entries:
        merged.setdefault(prompt, (group, []))[1].extend(refs)
    return [(prompt, group, tuple(refs)) for prompt, (group, refs) in merged.items()]


def references_file(path: Path) -> list[list[str]]:
    """Each distinct triple set's references from a release file (what ``fedlpp score --task dart`` reads)."""
    return [list(refs) for _, _, refs in _entries(path)]


def _entry(item: object, where: str) -> Entry:
    triples = item.get("tripleset") if isinstance(item, dict) else None
    notes = item.get("annotations") if isinstance(item, dict) else None
    if isinstance(notes, dict) and isinstance(notes.get("text"), list):  # the hub's columnar layout: {source: [...], text: [...]}
        sources = notes.get("source") or [""] * len(notes["text"])
        notes = [{"source": src, "text": text} for src, text in zip(sources, notes["text"], strict=False)]
    if (
        not isinstance(triples, list)
        or not triples
        or not all(isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t) for t in triples)
    ):
        raise ValueError(f"{where}: 'tripleset' must be a list of [subject, predicate, object] strings")
    if not isinstance(notes, list) or not notes or not all(isinstance(n, dict) and isinstance(n.get("text"), str) for n in notes):
        raise ValueError(f"{where}: 'annotations' must be a list of objects with a 'text'")
    prompt = PROMPT.format(triples=" ; ".join(" | ".join(x.strip() for x in t) for t in triples))
    return prompt, str(notes[0].get("source", "")), tuple(n["text"].strip() for n in notes)


def _train(entries: list[Entry]) -> list[Example]:
    return [
        Example(prompt=p, target=ref, group=group, attributes=(("source", group),)) for p, group, refs in entries for ref in refs
    ]


def _eval(entries: list[Entry]) -> list[Example]:
    return [
        Example(prompt=p, target=refs[0], group=group, references=refs, attributes=(("source", group),))
        for p, group, refs in entries
    ]


def load_dart_hub(hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    """From the hub's ``dart`` (tripleset, annotations {source, text}): train, and validation or test."""
    splits = load_hub_splits(hf_id)
    names = ("test",) if split == "test" else ("validation", "dev")
    train = _grouped([_entry(r, f"{hf_id} train row {i}") for i, r in enumerate(get_split(splits, ("train",), hf_id), 1)])
    held = _grouped([_entry(r, f"{hf_id} {names[0]} row {i}") for i, r in enumerate(get_split(splits, names, hf_id), 1)])
    return _task(train, held, num_train, num_eval, seed)


def _task(train: list[Entry], held: list[Entry], num_train: int, num_eval: int, seed: int) -> TaskData:
    return sized_task(NAME, GENERATION, _train(train), _eval(held), num_train, num_eval, seed, metrics=METRICS)


def load_dart(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int, split: str = "dev") -> TaskData:
    if hf_id:
        return load_dart_hub(hf_id, num_train, num_eval, seed, split)
    if not path:
        raise ValueError(f"task 'dart' needs path= (a folder holding {DEV_FILE} and ideally {TRAIN_FILE})")
    folder = require_dir(path, NAME, f"{TRAIN_FILE} and/or {DEV_FILE}")
    if not (folder / DEV_FILE).is_file():
        raise FileNotFoundError(f"{folder / DEV_FILE}: file not found; task 'dart' expects it")
    dev = _entries(folder / DEV_FILE)
    if (folder / TRAIN_FILE).is_file():
        train, held = _entries(folder / TRAIN_FILE), dev
    else:
        train, held = hold_out(dev, num_eval if split == "dev" else 0, seed, "dart (dev only)")
        num_eval = 0 if split == "dev" else num_eval
    if split == "test":
        if not (folder / TEST_FILE).is_file():
            raise FileNotFoundError(f"{folder / TEST_FILE}: file not found; task 'dart' needs it for the test split")
        held = _entries(folder / TEST_FILE)
    return _task(train, held, num_train, num_eval, seed)
