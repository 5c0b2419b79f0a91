"""In-memory rows (`readers.Rows`): a list of dicts or a `datasets.Dataset` read like a file, its
bad rows named "in-memory data, row N" as a file's are named by line or row."""
import copy
import dataclasses
import pickle

import pytest

from directpo.data.formats import DataError, Example, SkipReport, load_examples
from directpo.data.readers import Rows, read_records

ROWS = [
    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Loud."},
]


def test_in_memory_rows_parse_like_a_file():
    examples = load_examples(Rows(ROWS))
    assert [(e.prompt, e.chosen, e.rejected, e.row) for e in examples] == [
        ("What is 2+2?", " 4.", " 5.", 0), ("Name a colour.", " Blue.", " Loud.", 1)]
    assert all(isinstance(e, Example) and e.source == "in-memory data" for e in examples)


def test_a_bad_in_memory_row_names_its_row_and_field():
    bad = [ROWS[0], {"prompt": "p", "chosen": 3, "rejected": "r"}]
    with pytest.raises(DataError) as ei:
        load_examples(Rows(bad))
    assert str(ei.value) == "in-memory data, row 2, field 'chosen': expected a string, got int"
    with pytest.raises(DataError, match=r"^my rows, row 2: a list, not a dict of fields$"):
        load_examples(Rows([ROWS[0], ["not", "a", "row"]], name="my rows"))
    report = SkipReport()
    assert len(load_examples(Rows([ROWS[0], "x", ROWS[1]]), on_invalid="skip", report=report)) == 2
    assert report.counts == {"malformed": 1}
    with pytest.raises(DataError, match="^in-memory data: no usable rows"):
        load_examples(Rows([]))
    with pytest.raises(DataError, match="a split .* not from rows given in memory"):
        list(read_records(Rows(ROWS), "test"))


def test_a_datasets_dataset_is_read_row_by_row():
    import datasets

    examples = load_examples(Rows(datasets.Dataset.from_list(ROWS)))
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                     for r in ROWS]


def test_rows_are_a_name_in_settings_and_never_copied():
    rows = Rows(ROWS)

    @dataclasses.dataclass
    class Settings:
        data: str

    assert dataclasses.asdict(Settings(rows))["data"] is rows  # asdict deep-copies: the rows stay shared
    assert copy.copy(rows) is rows and copy.deepcopy(rows) is rows
    back = pickle.loads(pickle.dumps(rows))
    assert back == "in-memory data" and back.rows == ROWS and isinstance(back, Rows)
    with pytest.raises(TypeError, match="a list of dicts or a `datasets.Dataset`"):
        Rows("data.jsonl")
    with pytest.raises(TypeError, match=r"pass one split"):
        Rows({"train": ROWS})
