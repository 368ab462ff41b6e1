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
    with pytest.raises(
        InputError, match=r"bad\.csv: data row 1 \(0-based; line 3 of the file\) has 3 fields"
    ):
        list(iter_rows(p))


def test_unparsable_quotes(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('a,b\n1,"unterminated\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.csv: line \d+: cannot parse CSV"):
        list(iter_rows(p))


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("a,b\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        InputError, match=r"latin\.csv: line 2: byte 0xE9 is not valid UTF-8 \(in data row 0 "
    ):
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


# ------------------------------------------------------------------ never echo what is not a CSV


CANARY = "sk-canary-5a1f0c3e9d"


@pytest.mark.parametrize("target", ["/proc/self/environ", "/proc/self/cmdline", "/dev/zero", "/dev/null"])
def test_pseudo_files_are_refused_without_echoing_content(monkeypatch, target):
    """/proc files stat as regular files: refused by where they live, before a byte is read."""
    from batchpipe import BuildOptions, validate_csv

    monkeypatch.setenv("LEAK_CANARY", CANARY)
    monkeypatch.delenv("OPENAI_BATCH_ALLOWED_ROOTS", raising=False)
    for call in (lambda: read_header(target), lambda: list(iter_rows(target)),
                 lambda: count_rows(target), lambda: validate_csv(target, BuildOptions())):  # fmt: skip
        error = _guarded(call).get("error")  # /dev/zero has no end of line: reading it would never end
        assert isinstance(error, InputError) and "not a regular file" in str(error), error
        assert CANARY not in str(error) and "LEAK_CANARY" not in str(error)


def test_symlink_to_proc_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAK_CANARY", CANARY)
    link = tmp_path / "innocent.csv"
    link.symlink_to("/proc/self/environ")
    with pytest.raises(InputError, match=r"innocent\.csv.*not a regular file") as caught:
        read_header(link)
    assert CANARY not in str(caught.value)


def _guarded(call, seconds=5):
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it blocks."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked on the FIFO"
    return box


def test_fifo_is_refused_without_blocking(tmp_path):
    import os

    from batchpipe import BuildOptions, validate_csv

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    try:
        for call in (lambda: read_header(fifo), lambda: list(iter_rows(fifo)),
                     lambda: validate_csv(fifo, BuildOptions())):  # fmt: skip
            box = _guarded(call)
            assert isinstance(box.get("error"), InputError), box
            assert "pipe.csv" in str(box["error"]) and "not a regular file" in str(box["error"])
    finally:  # unblock a reader stuck in open() (if any), so its thread can end
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody has it open, as it should be
            pass


def test_directory_and_socket_are_refused(tmp_path):
    import socket

    with pytest.raises(InputError, match=r"is a directory"):
        read_header(tmp_path)
    sock_path = tmp_path / "s.csv"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(InputError, match=r"s\.csv.*not a regular file"):
            read_header(sock_path)


def test_huge_header_message_is_bounded(tmp_path):
    """A 10,000-column header of long names: the 'not found' message quotes a few names, shortened."""
    from batchpipe import BuildOptions, validate_csv

    names = [f"{CANARY}-column-{i:05d}-" + "x" * 200 for i in range(10_000)]
    p = tmp_path / "wide.csv"
    p.write_text(",".join(names) + "\n" + ",".join("v" for _ in names) + "\n", encoding="utf-8")
    for opts in (BuildOptions(), BuildOptions(prompt_template="{nope}"), BuildOptions(id_column="nope")):
        with pytest.raises(InputError, match=r"wide\.csv: .*not.* \(columns: .* and 99\d\d more\)") as caught:
            validate_csv(p, opts, allowed_roots=None)
        assert len(str(caught.value)) < 1000, len(str(caught.value))
    for fake in ("a" * 5000, "line\none"):
        msg = str(pytest.raises(InputError, validate_csv, p, BuildOptions(prompt_column=fake)).value)
        assert len(msg) < 1000 and "\n" not in msg


def test_duplicate_header_name_is_shortened(tmp_path):
    long = CANARY + "y" * 5000
    p = tmp_path / "dup.csv"
    p.write_text(f"{long},{long}\n1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"dup\.csv: duplicate column name") as caught:
        read_header(p)
    assert len(str(caught.value)) < 300


def test_column_list_helper():
    from batchpipe.csvio import column_list

    assert column_list(["id", "prompt"]) == "id, prompt"
    assert column_list([]) == "(none)"
    many = column_list([f"c{i}" for i in range(25)])
    assert many == "c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 and 15 more"
    long = column_list(["z" * 100])
    assert long == "z" * 39 + "…"  # the head only: the tail of a key=value line is where a secret ends
    assert column_list(["a\nb"]) == "a\\nb"  # control characters cannot forge a log line


def test_duplicate_id_and_placeholder_messages_are_shortened(tmp_path):
    from batchpipe import BuildOptions, validate_csv

    long_id = CANARY + "i" * 100_000
    p = tmp_path / "ids.csv"
    p.write_text(f"id,prompt\n{long_id},a\n{long_id},b\n", encoding="utf-8")
    pattern = r"ids\.csv: column 'id': duplicate id 'sk-canary.*' in data row 0 .* and data row 1 "
    with pytest.raises(InputError, match=pattern) as e:
        validate_csv(p, BuildOptions(id_column="id"), allowed_roots=None)
    assert len(str(e.value)) < 500
    template = "{" + "t" * 100_000 + "}"
    msg = str(pytest.raises(InputError, validate_csv, p, BuildOptions(prompt_template=template)).value)
    assert "prompt_template placeholder {ttt" in msg and len(msg) < 500


def test_an_env_or_json_file_read_as_a_csv_never_shows_its_values(tmp_path):
    from batchpipe import BuildOptions, validate_csv

    key = "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAAAAAAZZZZZZZZZZ"
    for text in (f"OPENAI_API_KEY={key}\nX=1\n", f'{{"conn_type": "openai", "password": "{key}"}}\n'):
        src = tmp_path / "settings.csv"
        src.write_text(text, encoding="utf-8")
        with pytest.raises(InputError) as caught:
            validate_csv(src, BuildOptions(), allowed_roots=None)
        message = str(caught.value)
        assert "not found" in message and "sk-proj" not in message and "ZZZZ" not in message, message


# ------------------------------------------------------------------ issue 12: right line numbers


def test_row_label_says_both_once():
    from batchpipe.csvio import row_label

    assert row_label(7, 9) == "data row 7 (0-based; line 9 of the file)"
    assert row_label(0, None) == "data row 0 (0-based)"


def _latin1_file(path, bad_line_no, total_lines=2000):
    """A CSV whose physical line ``bad_line_no`` holds a Latin-1 é; a quoted cell spanning three lines
    comes first (so data row != line - 2), the rest is UTF-8, long enough for several read chunks."""
    parts = [b"id,prompt\n", 'm,"first\nsecond\nthird — ü"\n'.encode()]  # lines 2-4: data row 0
    for n in range(5, total_lines + 1):
        parts.append(f"r{n},café au lait\n".encode("latin-1" if n == bad_line_no else "utf-8"))
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("bad_line", [5, 1347, 1501, 1999])
def test_not_utf8_names_the_exact_line_byte_and_row(tmp_path, bad_line):
    """The decoder reads ahead in chunks: the line the csv reader is on is not where the bad byte is."""
    p = _latin1_file(tmp_path / "latin.csv", bad_line)
    # data row 0 spans lines 2-4, so the row on physical line L (L >= 5) is L - 4
    messages = [
        str(pytest.raises(InputError, call).value)
        for call in (lambda: list(iter_rows(p)), lambda: count_rows(p))
    ]
    try:
        read_header(p)  # reads only the first chunk: a bad byte far down may not be seen, which is fine
    except InputError as exc:
        messages.append(str(exc))
    for message in messages:
        assert f"line {bad_line} " in message or f"line {bad_line}:" in message, message
        assert "0xE9" in message and "UTF-8" in message, message
        assert f"data row {bad_line - 4} (0-based; line {bad_line} of the file)" in message, message
        assert "save the file as UTF-8" in message, message
        assert "near line" not in message


def test_not_utf8_inside_a_multiline_cell_and_in_the_header(tmp_path):
    p = tmp_path / "ml.csv"
    p.write_bytes(b'id,prompt\nok,fine\nm,"one\ntw\xf6\nthree"\n')
    message = str(pytest.raises(InputError, lambda: list(iter_rows(p))).value)
    assert "line 4" in message and "0xF6" in message, message
    assert "data row 1 (0-based; line 3 of the file)" in message, message
    h = tmp_path / "h.csv"
    h.write_bytes(b"\xef\xbb\xbfid,pr\xe9mpt\r\nx,y\r\n")  # BOM, CRLF, bad byte in the header
    message = str(pytest.raises(InputError, read_header, h).value)
    assert "line 1" in message and "0xE9" in message and "header" in message, message


def test_rows_know_their_physical_line(tmp_path):
    from batchpipe.csvio import _iter_lists

    p = tmp_path / "in.csv"
    p.write_text('a,b\n1,"x\ny"\n\n2,z\r\n3,"p\r\nq\r\nr"\n4,w\n', encoding="utf-8", newline="")
    got = [(index, line) for index, _, _, line in _iter_lists(p, with_lines=True)]
    assert got == [(0, 2), (1, 5), (2, 6), (3, 9)]


def test_too_many_fields_names_row_and_line_after_a_multiline_cell(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('a,b\n1,"two\nlines"\n3,4,5\n', encoding="utf-8")
    with pytest.raises(
        InputError,
        match=r"bad\.csv: data row 1 \(0-based; line 4 of the file\) has 3 fields, the header has 2",
    ):
        list(iter_rows(p))


@pytest.mark.parametrize("cut", [-1, 0, 1])
def test_not_utf8_across_a_read_chunk_and_at_the_end(tmp_path, cut):
    """A broken sequence straddling the 1 MiB read chunk, CRLF line ends, and one cut off at the end."""
    head = b"id,prompt\r\n"
    line = b"r,0123456789\r\n"  # 14 bytes
    n = (1 << 20) // len(line)
    body = head + line * n
    pad = (1 << 20) + cut - len(body) - 2
    body += b"p," + b"x" * pad  # the lead byte lands on the chunk boundary (+cut)
    p = tmp_path / "big.csv"
    p.write_bytes(body + b"\xc3(\r\nz,ok\r\n")
    message = str(pytest.raises(InputError, count_rows, p).value)
    assert f"line {n + 2}: byte 0xC3 is not valid UTF-8 (in data row {n} (0-based; line {n + 2} " in message
    t = tmp_path / "cut.csv"
    t.write_bytes(b"a,b\n1,2\n3,\xe2\x82")  # the euro sign's first two bytes, then the end of the file
    message = str(pytest.raises(InputError, lambda: list(iter_rows(t))).value)
    assert "line 3: byte 0xE2" in message and "data row 1 (0-based; line 3 of the file)" in message, message
