"""batchpipe.cache: the request key and the answer cache (SQLite in a local folder), with real processes
for concurrent writers and a writer killed mid-write."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from batchpipe import BuildOptions, InputError, build_jsonl
from batchpipe.cache import CACHE_FILE, AnswerCache, request_key
from batchpipe.cli import main as cli

INCLUDE = str(Path(__file__).resolve().parents[1] / "include")


def lines_of(build: dict) -> list[bytes]:
    return [line for shard in build["shards"] for line in Path(shard["path"]).read_bytes().splitlines()]


def answer(key: str) -> bytes:
    return json.dumps({"custom_id": "row-0", "response": {"status_code": 200, "body": {"k": key}}}).encode()


# -- the request key -------------------------------------------------------------------------------------
def test_the_key_is_what_is_sent_never_the_row_or_the_image_path(tmp_path):
    for name, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), colour).save(tmp_path / name / "photo.png")
        (tmp_path / name / "in.csv").write_text(
            "id,prompt,image\n1,What is this?,photo.png\n2,What is this?,photo.png\n3,Other,\n4,Other,\n",
            encoding="utf-8",
        )
    opts = BuildOptions(image_column="image", id_column="id", dedupe=False)  # every line, to compare keys
    a = [request_key(x) for x in lines_of(build_jsonl(tmp_path / "a" / "in.csv", opts, tmp_path / "wa"))]
    b = [request_key(x) for x in lines_of(build_jsonl(tmp_path / "b" / "in.csv", opts, tmp_path / "wb"))]
    assert a[0] == a[1] and a[2] == a[3]  # same request on two rows (other custom_ids): one key
    assert a[0] != b[0]  # same prompt, same image path, other image bytes: another request
    assert a[2] == b[2]  # same text-only request in another file and run: the same key
    other_model = BuildOptions(image_column="image", id_column="id", model="gpt-4o-mini", dedupe=False)
    c = [
        request_key(x) for x in lines_of(build_jsonl(tmp_path / "a" / "in.csv", other_model, tmp_path / "wc"))
    ]
    assert c[0] != a[0] and c[2] != a[2]  # every parameter is part of the key


def test_a_custom_id_cannot_fake_the_end_of_itself():
    line = b'{"custom_id":"x\\",\\"method\\":1","method":"POST","url":"/v1/chat/completions","body":{}}\n'
    same = b'{"custom_id":"y","method":"POST","url":"/v1/chat/completions","body":{}}'
    assert request_key(line) == request_key(same)
    with pytest.raises(ValueError):
        request_key(b'{"method":"POST","custom_id":"x"}')


# -- the store -------------------------------------------------------------------------------------------
def ans(text: str) -> bytes:
    """A minimal answer line (what the cache keeps)."""
    return b'{"custom_id":"x","response":{"status_code":200,"body":{"t":"%s"}},"error":null}' % text.encode()


def test_modes_keep_and_look_up_as_they_say(tmp_path):
    one, other, two, new = ans("one"), ans("other"), ans("two"), ans("new")
    with AnswerCache(tmp_path / "c") as cache:
        assert cache.put_many([("k1", one, "/v1/chat/completions", "gpt-4o")]) == 1
        assert cache.put_many([("k1", other, None, None), ("k2", two, None, None)]) == 1  # k1 kept
        assert cache.get_many(["k1", "k2", "k3"]) == {"k1": one, "k2": two}
        cache.db.execute("UPDATE answers SET line = ? WHERE key = 'k2'", (two[:-9],))  # damaged
        assert cache.put_many([("k2", two, None, None)]) == 1  # a damaged entry is replaced
    with AnswerCache(tmp_path / "c", mode="read_only") as cache:
        assert cache.put_many([("k3", ans("three"), None, None)]) == 0
        assert cache.get_many(["k3"]) == {}
    with AnswerCache(tmp_path / "c", mode="refresh") as cache:
        assert cache.get_many(["k1"]) == {}  # refresh: everything is sent again
        assert cache.put_many([("k1", new, None, None)]) == 1
    with AnswerCache(tmp_path / "c") as cache:
        assert cache.get_many(["k1"]) == {"k1": new}
        assert cache.get_many(f"k{i}" for i in range(2000)) == {"k1": new, "k2": two}  # in chunks
    with pytest.raises(InputError, match="cache_mode: 'sometimes' is not one of"):
        AnswerCache(tmp_path / "c", mode="sometimes")


def test_a_file_that_is_not_a_cache_is_a_clear_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CACHE_FILE).write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(InputError, match="answers.sqlite cannot be used"):
        AnswerCache(tmp_path / "c")


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {include!r})
    from batchpipe.cache import AnswerCache
    first, count, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cache = AnswerCache(sys.argv[4])

    def entries(lo, hi):
        for i in range(lo, hi):
            yield f"k{{i:06d}}", (f"line {{i}} " * 50).encode(), "/v1/chat/completions", "gpt-4o"

    if marker == "-":  # write in transactions of 100, as fast as possible
        for lo in range(first, first + count, 100):
            cache.put_many(entries(lo, min(lo + 100, first + count)))
    else:  # one transaction that never ends: half of it written, then wait to be killed
        def stalled():
            yield from entries(first, first + count)
            open(marker, "w").close()
            time.sleep(120)
        cache.put_many(stalled())
    """
)


def writer(tmp_path: Path, *args: object) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(include=INCLUDE), encoding="utf-8")
    return subprocess.Popen([sys.executable, str(script), *map(str, args)])


def test_two_processes_writing_the_same_cache_leave_it_whole(tmp_path):
    folder = tmp_path / "cache"
    AnswerCache(folder).close()
    procs = [writer(tmp_path, 0, 3000, "-", folder), writer(tmp_path, 2000, 3000, "-", folder)]
    assert [p.wait(120) for p in procs] == [0, 0]
    with AnswerCache(folder) as cache:
        assert cache.check() == "ok"
        found = cache.get_many(f"k{i:06d}" for i in range(5000))
        assert len(found) == 5000 and cache.stats()["entries"] == 5000
        assert all(found[f"k{i:06d}"] == (f"line {i} " * 50).encode() for i in range(5000))


def test_a_writer_killed_mid_write_leaves_nothing_that_is_read_back(tmp_path):
    folder = tmp_path / "cache"
    with AnswerCache(folder) as cache:
        cache.put_many([("kept", b"before", None, None)])
    marker = tmp_path / "written"
    proc = writer(tmp_path, 0, 500, marker, folder)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer did not get going"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # 500 entries written in its transaction, not committed
    proc.wait(30)
    with AnswerCache(folder) as cache:
        assert cache.check() == "ok"
        assert cache.get_many(f"k{i:06d}" for i in range(500)) == {}
        assert cache.get_many(["kept"]) == {"kept": b"before"}
        assert cache.put_many([("k000001", b"after", None, None)]) == 1  # and it takes writes again
    # another process reading it sees the same
    with sqlite3.connect(folder / CACHE_FILE) as con:
        assert con.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 2


def test_stats_and_prune_from_the_command_line(tmp_path, capsys):
    folder = tmp_path / "cache"
    with AnswerCache(folder) as cache:
        cache.put_many([("old", answer("old"), None, None)])
        cache.db.execute("UPDATE answers SET created = created - 40 * 86400")
        cache.put_many([("new", answer("new"), None, None)])
    assert cli(["cache", "stats", str(folder), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 2 and stats["bytes"] == len(answer("old")) + len(answer("new"))
    assert stats["newest"] - stats["oldest"] > 39 * 86400
    assert cli(["cache", "prune", str(folder), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 entry kept more than 30 days ago" in out and "entries: 1 " in out
    with AnswerCache(folder) as cache:
        assert cache.get_many(["old", "new"]) == {"new": answer("new")}
    assert cli(["cache", "stats", str(tmp_path / "nowhere")]) == 2
    assert "no answer cache here" in capsys.readouterr().err
    assert cli(["cache", "prune", str(folder)]) == 2
    assert "--older-than DAYS (0 or more) is required" in capsys.readouterr().err


def test_the_key_is_what_follows_the_custom_id_for_either_request_shape():
    import hashlib

    body = b',"method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}'
    for cid in (b'"row-1"', b'"a \\"quoted\\" id"', b'"ends with a backslash \\\\"', b'"\\u00e9"'):
        line = b'{"custom_id":' + cid + body + b"\n"
        assert request_key(line) == hashlib.sha256(body).hexdigest()  # the key kept caches were made with
    claude = b',"params":{"model":"claude-x","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}}'
    assert request_key(b'{"custom_id":"row-1"' + claude) == request_key(b'{"custom_id":"k9"' + claude)
    assert request_key(b'{"custom_id":"row-1"' + claude) != request_key(b'{"custom_id":"row-1"' + body)
    for bad in (b'{"params":{},"custom_id":"x"}', b'{"custom_id":"unterminated', b'{"custom_id":"x"}'):
        with pytest.raises(ValueError):
            request_key(bad)
