"""CSV reading: text fidelity, ranges, fatal parse errors."""

import csv

import pytest

from batchpipe import InputError
from batchpipe.csvio import count_rows, iter_rows, read_header

TRICKY = [
    {"id": "1", "zip": "007", "prompt": "hello, world", "note": ""},
    {"id": "2", "zip": "", "prompt": 'she said "hi"', "note": "NA"},
    {"id": "3", "zip": "0042", "prompt": "line one\nline two\r\nline three", "note": "null"},
    {"id": "4", "zip": "1e5", "prompt": "  leading and trailing spaces  ", "note": "nan"},
    {"id": "5", "zip": "00", "prompt": "unicode: 日本語 — Ünïcødé 🚀", "note": "None"},
]


def write_csv(path, rows, header=None, bom=False):
    header = header or list(rows[0])
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("bom", [False, True])
def test_text_fidelity(tmp_path, bom):
    p = write_csv(tmp_path / "in.csv", TRICKY, bom=bom)
    assert read_header(p) == ["id", "zip", "prompt", "note"]
    got = list(iter_rows(p))
    assert [i for i, _ in got] == [0, 1, 2, 3, 4]
    assert [r for _, r in got] == TRICKY
    for _, r in got:
        assert all(type(v) is str for v in r.values())


def test_row_range(tmp_path):
    rows = [{"n": str(i)} for i in range(20)]
    p = write_csv(tmp_path / "in.csv", rows)
    assert [i for i, _ in iter_rows(p, 0, 10)] == list(range(10))
    assert [r["n"] for _, r in iter_rows(p, 5, 8)] == ["5", "6", "7"]
    assert [i for i, _ in iter_rows(p, 18, None)] == [18, 19]
    assert list(iter_rows(p, 25, None)) == []
    assert count_rows(p) == 20


def test_short_rows_padded_blank_lines_skipped(tmp_path):
    p = tmp_path / "in.csv"
    p.write_text("a,b,c\n1,2\n\n4,5,6\n", encoding="utf-8")
    assert list(iter_rows(p)) == [(0, {"a": "1", "b": "2", "c": ""}), (1, {"a": "4", "b": "5", "c": "6"})]


def test_empty_file(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty\.csv: file is empty"):
        read_header(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: file not found"):
        read_header(tmp_path / "nope.csv")


def test_too_many_fields_names_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("a,b\n1,2\n3,4,5\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.csv: line 3: row 1 has 3 fields, the header has 2"):
        list(iter_rows(p))


def test_unparsable_quotes(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('a,b\n1,"unterminated\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.csv: line \d+: cannot parse CSV"):
        list(iter_rows(p))


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("a,b\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin\.csv: not valid UTF-8"):
        list(iter_rows(p))


def test_duplicate_header(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text("a,a\n1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"dup\.csv: duplicate column name 'a'"):
        read_header(p)


def test_long_field(tmp_path):
    big = "x" * 300_000
    p = write_csv(tmp_path / "big.csv", [{"prompt": big}])
    assert next(iter_rows(p))[1]["prompt"] == big
