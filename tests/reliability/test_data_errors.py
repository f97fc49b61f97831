"""Every data error names the file, the line and the problem (issue 12)."""

from __future__ import annotations

import pytest

from fedlpp.data.examples_file import ExamplesFileError, read_examples
from fedlpp.data.files import read_table
from fedlpp.data.sst2 import load_sst2_files


def test_a_field_beyond_the_csv_size_limit_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "trainset.csv"
    path.write_text('mr,ref\nname[A],fine\nname[B],"' + "x" * 200_000 + '"\n')
    with pytest.raises(ValueError, match=r"trainset\.csv, line 3: field larger than field limit"):
        read_table(path, ("mr", "ref"))


def test_bytes_that_are_not_utf8_are_named_with_file_and_line(tmp_path):
    path = tmp_path / "devset.csv"
    path.write_bytes(b"mr,ref\nname[A],caf\xc3\xa9\nname[B],caf\xe9\n")
    with pytest.raises(ValueError, match=r"devset\.csv, line 3: not UTF-8 text \(byte 0xe9"):
        read_table(path, ("mr", "ref"))
    jsonl = tmp_path / "client.jsonl"
    jsonl.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xff"}\n')
    with pytest.raises(ExamplesFileError, match=r"client\.jsonl, line 2: not UTF-8"):
        read_examples(jsonl)


def test_an_sst2_row_with_an_extra_field_is_refused(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull one\t0\textra\n")
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: 3 fields, more than the header's 2"):
        load_sst2_files(str(tmp_path), 0, 0, 0)


def test_a_row_with_too_few_fields_names_its_line(tmp_path):
    path = tmp_path / "trainset.csv"
    path.write_text("mr,ref\nname[A],fine\nname[B]\n")
    with pytest.raises(ValueError, match=r"trainset\.csv, line 3: fewer fields than the header"):
        read_table(path, ("mr", "ref"))


def test_deeply_nested_json_in_a_clients_file_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "client.jsonl"
    path.write_text('{"input": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ExamplesFileError, match=r"client\.jsonl, line 1"):
        read_examples(path)


def test_a_line_separator_inside_a_json_string_is_text_not_a_line_break(tmp_path):
    import json

    from fedlpp.data.examples_file import write_examples
    from fedlpp.data.schema import Example

    path = tmp_path / "client.jsonl"
    path.write_text(json.dumps({"input": "a\u2028b\x85c", "output": "d"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_examples(path)[0].prompt == "a\u2028b\x85c"
    write_examples(path, [Example(prompt="p", target="t")])
    assert len(read_examples(path)) == 1
