"""E2E and SST-2 from tiny local fixtures and a fake `datasets` hub; the registry."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedlpp.data import TASKS, TaskData, get_task_loader, load_task, register_task

E2E_TRAIN = (
    "mr,ref\r\n"
    '"name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]",'
    "The Vaults pub near Café Adriatic has prices over £30.\r\n"
    '"name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]",'
    '"Near Café Adriatic, The Vaults is a pub, costing more than £30."\r\n'
    '"name[Aromi], food[Chinese], area[riverside]",  Aromi serves Chinese food by the river.  \r\n'
    '"name[Blue Spice], eatType[coffee shop]",Blue Spice is a coffee shop.\r\n'
)
E2E_DEV = (
    "mr,ref\r\n"
    '"name[Zizzi], eatType[restaurant], food[Italian]",Zizzi is an Italian restaurant.\r\n'
    '"name[Alimentum], area[city centre]",Alimentum is in the city centre.\r\n'
    '"name[Zizzi], eatType[restaurant], food[Italian]",'
    '"Zizzi, a restaurant, serves Italian food."\r\n'
    '"name[Zizzi], eatType[restaurant], food[Italian]",Zizzi is an Italian restaurant.\r\n'
    '"name[Café Rouge], eatType[pub]",Café Rouge is a pub with prices around £20.\r\n'
)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def e2e_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "trainset.csv", E2E_TRAIN)
    _write(tmp_path / "devset.csv", E2E_DEV)
    return tmp_path


def _sst2_lines(n: int) -> str:
    rows = [f'a "quoted" sentence number {i} \t{i % 2}' for i in range(n)]
    return "sentence\tlabel\n" + "\n".join(rows) + "\n"


@pytest.fixture
def sst2_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "train.tsv", _sst2_lines(40))
    return tmp_path


def test_e2e_train_rows_keep_crlf_and_non_ascii(e2e_dir: Path) -> None:
    task = load_task("e2e", path=str(e2e_dir))
    assert (task.name, task.kind, len(task.train)) == ("e2e", "generation", 4)
    first = task.train[0]
    assert first.prompt == (
        "Describe the restaurant.\nData: name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]\nText:"
    )
    assert first.target == "The Vaults pub near Café Adriatic has prices over £30."
    assert task.train[2].target == "Aromi serves Chinese food by the river."
    assert [e.group for e in task.train] == ["pub", "pub", "", "coffee shop"]
    assert not any("\r" in e.target or "\r" in e.prompt for e in task.train)


def test_e2e_eval_groups_references_by_mr_in_first_seen_order(e2e_dir: Path) -> None:
    task = load_task("e2e", path=str(e2e_dir))
    assert [e.prompt.split("Data: ")[1].split(",")[0] for e in task.eval] == [
        "name[Zizzi]",
        "name[Alimentum]",
        "name[Café Rouge]",
    ]
    zizzi = task.eval[0]
    # Duplicated references are kept, as the official scorer keeps them.
    assert zizzi.references == (
        "Zizzi is an Italian restaurant.",
        "Zizzi, a restaurant, serves Italian food.",
        "Zizzi is an Italian restaurant.",
    )
    assert zizzi.target == zizzi.references[0]
    assert [e.group for e in task.eval] == ["restaurant", "", "pub"]
    assert task.eval[2].references == ("Café Rouge is a pub with prices around £20.",)


def test_e2e_subsets_are_seeded(e2e_dir: Path) -> None:
    a = load_task("e2e", path=str(e2e_dir), num_train=2, num_eval=2, seed=5)
    b = load_task("e2e", path=str(e2e_dir), num_train=2, num_eval=2, seed=5)
    full = load_task("e2e", path=str(e2e_dir))
    assert a == b and len(a.train) == 2 and len(a.eval) == 2
    assert set(a.train) <= set(full.train) and set(a.eval) <= set(full.eval)
    seen = {load_task("e2e", path=str(e2e_dir), num_train=2, seed=s).train for s in range(20)}
    assert len(seen) > 1
    with pytest.raises(ValueError, match="asked for 9 examples but only 4"):
        load_task("e2e", path=str(e2e_dir), num_train=9)


def test_e2e_missing_file_names_it(tmp_path: Path) -> None:
    _write(tmp_path / "trainset.csv", E2E_TRAIN)
    with pytest.raises(FileNotFoundError, match=r"devset\.csv.*columns \['mr', 'ref'\]"):
        load_task("e2e", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_task("e2e", path=str(tmp_path / "nowhere"))


def test_e2e_wrong_columns_are_named(e2e_dir: Path) -> None:
    _write(e2e_dir / "devset.csv", "meaning,text\r\na,b\r\n")
    with pytest.raises(
        ValueError,
        match=r"devset\.csv: expected columns \['mr', 'ref'\], found \['meaning', 'text'\]",
    ):
        load_task("e2e", path=str(e2e_dir))


def test_e2e_without_source_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"path=.*hf_id="):
        load_task("e2e")


def test_sst2_holds_out_a_seeded_eval_split(sst2_dir: Path) -> None:
    task = load_task("sst2", path=str(sst2_dir), num_eval=10, seed=2)
    assert (task.kind, task.num_labels, task.label_names) == (
        "classification",
        2,
        ("negative", "positive"),
    )
    assert (len(task.train), len(task.eval)) == (30, 10)
    assert not set(task.train) & set(task.eval)
    every = sorted(e.prompt for e in task.train + task.eval)
    assert every == sorted(f'a "quoted" sentence number {i}' for i in range(40))
    for example in task.train + task.eval:
        number = int(example.prompt.rsplit(" ", 1)[1])
        assert example.label == number % 2 and example.group == str(example.label)
        assert example.target == ""
    assert load_task("sst2", path=str(sst2_dir), num_eval=10, seed=2) == task
    assert load_task("sst2", path=str(sst2_dir), num_eval=10, seed=3).eval != task.eval


def test_sst2_default_holdout_and_train_subset(sst2_dir: Path) -> None:
    task = load_task("sst2", path=str(sst2_dir), num_train=7)
    # Default: 872 (the GLUE dev size) but at most a tenth of a small file.
    assert (len(task.train), len(task.eval)) == (7, 4)


def test_sst2_uses_dev_tsv_when_present(sst2_dir: Path) -> None:
    _write(sst2_dir / "dev.tsv", "sentence\tlabel\ngreat fun \t1\ndull \t0\n")
    task = load_task("sst2", path=str(sst2_dir))
    assert len(task.train) == 40
    assert [(e.prompt, e.label) for e in task.eval] == [("great fun", 1), ("dull", 0)]


def test_sst2_bad_label_and_bad_header(sst2_dir: Path) -> None:
    _write(sst2_dir / "dev.tsv", "sentence\tlabel\nfine\t2\n")
    with pytest.raises(ValueError, match=r"dev\.tsv row 1: label 2"):
        load_task("sst2", path=str(sst2_dir))
    _write(sst2_dir / "train.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match=r"train\.tsv: expected columns \['sentence', 'label'\]"):
        load_task("sst2", path=str(sst2_dir))


def test_sst2_shared_file_when_present(shared_data: Path) -> None:
    task = load_task("sst2", path=str(shared_data / "sst2"), num_train=100, seed=0)
    assert (len(task.train), len(task.eval)) == (100, 872)
    assert {e.label for e in task.eval} == {0, 1}


def test_e2e_shared_files_when_present(shared_data: Path) -> None:
    task = load_task("e2e", path=str(shared_data / "e2e"))
    assert (len(task.train), len(task.eval)) == (42061, 547)
    assert sum(len(e.references) for e in task.eval) == 4672


# --- the hub, through a fake `datasets` module -------------------------------------


def _install_fake_datasets(
    monkeypatch: pytest.MonkeyPatch,
    splits: Mapping[str, list[dict[str, Any]]],
    calls: list[tuple[str, str | None]],
) -> None:
    def load_dataset(repo: str, config: str | None = None) -> Mapping[str, list[dict[str, Any]]]:
        calls.append((repo, config))
        return splits

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_e2e_hub_gem_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    refs = ["Zizzi is a pub.", "Zizzi, a pub.", "A pub called Zizzi."]
    splits = {
        "train": [{"meaning_representation": "name[Zizzi], eatType[pub]", "target": r, "references": [r]} for r in refs],
        "validation": [
            {
                "meaning_representation": "name[Aromi], eatType[restaurant]",
                "target": "Aromi.",
                "references": ["Aromi.", "The Aromi."],
            }
        ]
        * 2,
    }
    calls: list[tuple[str, str | None]] = []
    _install_fake_datasets(monkeypatch, splits, calls)
    task = load_task("e2e", hf_id="GEM/e2e_nlg")
    assert calls == [("GEM/e2e_nlg", None)]
    assert [e.target for e in task.train] == refs
    assert [e.group for e in task.train] == ["pub"] * 3
    assert len(task.eval) == 1
    assert task.eval[0].references == ("Aromi.", "The Aromi.")
    assert task.eval[0].prompt == "Describe the restaurant.\nData: name[Aromi], eatType[restaurant]\nText:"


def test_e2e_hub_tuetschek_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"meaning_representation": "name[A]", "human_reference": "A one."},
        {"meaning_representation": "name[A]", "human_reference": "A two."},
        {"meaning_representation": "name[B]", "human_reference": "B."},
    ]
    _install_fake_datasets(monkeypatch, {"train": rows, "validation": rows, "test": []}, [])
    task = load_task("e2e", hf_id="tuetschek/e2e_nlg")
    assert len(task.train) == 3
    assert [e.references for e in task.eval] == [("A one.", "A two."), ("B.",)]


def test_hub_unknown_fields_and_splits_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_datasets(monkeypatch, {"train": [{"input": "x", "output": "y"}], "validation": []}, [])
    with pytest.raises(ValueError, match=r"meaning_representation.*found \['input', 'output'\]"):
        load_task("e2e", hf_id="someone/e2e")
    _install_fake_datasets(monkeypatch, {"training": []}, [])
    with pytest.raises(ValueError, match=r"splits \['train'\], found \['training'\]"):
        load_task("e2e", hf_id="someone/e2e")


def test_sst2_hub_glue_config_and_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    splits = {
        "train": [
            {"sentence": "good ", "label": 1, "idx": 0},
            {"sentence": "bad", "label": 0, "idx": 1},
        ],
        "validation": [{"sentence": "fine", "label": 1, "idx": 0}],
        "test": [{"sentence": "?", "label": -1, "idx": 0}],
    }
    calls: list[tuple[str, str | None]] = []
    _install_fake_datasets(monkeypatch, splits, calls)
    task = load_task("sst2", hf_id="glue")
    assert calls == [("glue", "sst2")]
    assert [(e.prompt, e.label, e.group) for e in task.train] == [("good", 1, "1"), ("bad", 0, "0")]
    assert [(e.prompt, e.label) for e in task.eval] == [("fine", 1)]
    load_task("sst2", hf_id="stanfordnlp/sst2")
    assert calls[-1] == ("stanfordnlp/sst2", None)


def test_hub_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_task("sst2", hf_id="stanfordnlp/sst2")


# --- the registry ------------------------------------------------------------------


def test_registry_lists_valid_names_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"weather", "e2e", "sst2"} <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'nope'; valid tasks: \[.*'e2e'.*'sst2'.*'weather'"):
        get_task_loader("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task("e2e", TASKS["e2e"])

    def tiny(*, path: str, hf_id: str, num_train: int, num_eval: int, seed: int) -> TaskData:
        return TaskData(name="tiny", kind="generation", train=(), eval=())

    monkeypatch.setitem(TASKS, "tiny", tiny)
    assert load_task("tiny").name == "tiny"


def test_load_task_rejects_bad_arguments(e2e_dir: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        load_task("e2e", path=str(e2e_dir), hf_id="GEM/e2e_nlg")
    with pytest.raises(ValueError, match=">= 0"):
        load_task("weather", num_train=-1)
