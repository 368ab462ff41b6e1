import json
import os
import threading
import time

import pytest

from batchpipe.errors import InputError
from batchpipe.inbox import claim_new_files, read_sidecar, settle


def drop(inbox, name, sidecar=None, age=3600):
    path = inbox / name
    path.write_text("prompt\nhello\n", encoding="utf-8")
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
    old = time.time() - age
    os.utime(path, (old, old))
    return path


def test_claim_moves_files_with_their_sidecars_and_a_second_claim_finds_nothing(tmp_path):
    drop(tmp_path, "a.csv", {"end_row": 5})
    drop(tmp_path, "b.csv")
    (tmp_path / "notes.txt").write_text("not a csv")
    claimed = claim_new_files(tmp_path, "run1")
    assert [c["name"] for c in claimed] == ["a.csv", "b.csv"]
    assert claimed[0]["csv"] == str(tmp_path / "processing" / "run1" / "a.csv")
    assert read_sidecar(claimed[0]["sidecar"]) == {"end_row": 5} and claimed[1]["sidecar"] is None
    assert not (tmp_path / "a.csv").exists() and (tmp_path / "notes.txt").exists()
    assert claim_new_files(tmp_path, "run2") == []
    assert not (tmp_path / "processing" / "run2").exists()


def test_young_files_wait_for_the_next_run(tmp_path):
    drop(tmp_path, "fresh.csv", age=0)
    assert claim_new_files(tmp_path, "r", min_age_seconds=60) == []
    assert [c["name"] for c in claim_new_files(tmp_path, "r", min_age_seconds=0)] == ["fresh.csv"]


def test_overlapping_claims_never_take_the_same_file(tmp_path):
    for i in range(200):
        drop(tmp_path, f"f{i:03d}.csv")
    results: dict[str, list] = {}
    start = threading.Barrier(4)

    def worker(name):
        start.wait()
        results[name] = claim_new_files(tmp_path, name)

    threads = [threading.Thread(target=worker, args=(f"run{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [c["name"] for claimed in results.values() for c in claimed]
    assert sorted(names) == [f"f{i:03d}.csv" for i in range(200)]  # each exactly once


def test_settle_moves_to_done_or_failed(tmp_path):
    drop(tmp_path, "a.csv", {"model": "gpt-4o-mini"})
    drop(tmp_path, "b.csv")
    a, b = claim_new_files(tmp_path, "c1")
    assert settle(a, tmp_path, "c1", "done") == str(tmp_path / "done" / "c1" / "a.csv")
    settle(b, tmp_path, "c1", "failed")
    assert (tmp_path / "done" / "c1" / "a.json").exists() and (tmp_path / "failed" / "c1" / "b.csv").exists()
    assert not (tmp_path / "processing" / "c1").exists()


def test_bad_sidecar_and_missing_inbox(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"modle": "gpt-4o"}')
    with pytest.raises(InputError, match="unknown settings modle"):
        read_sidecar(bad, allowed={"model"})
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        read_sidecar(bad)
    with pytest.raises(InputError, match="does not exist"):
        claim_new_files(tmp_path / "nope", "r")


# --- an inbox in object storage (through fsspec; here its real local filesystem) -----------------


def test_claim_new_objects_takes_each_ready_csv_once_and_settles_it(tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    from batchpipe.inbox import CLAIMS, claim_new_objects, settle_objects

    fs, inbox = LocalFileSystem(), str(tmp_path / "inbox")
    fs.makedirs(inbox)
    for name in ("a.csv", "b.csv", "held.csv", "young.csv"):
        fs.pipe(f"{inbox}/{name}", b"prompt\nhi\n")
    fs.pipe(f"{inbox}/a.json", b'{"model": "gpt-4o-mini"}')
    fs.pipe(f"{inbox}/notes.txt", b"not a csv")
    now = time.time()
    for name in ("a.csv", "b.csv", "held.csv"):
        os.utime(f"{inbox}/{name}", (now - 120, now - 120))
    # another run is claiming held.csv right now: its marker exists
    marker = (
        f"{inbox}/processing/{CLAIMS}/held.csv.{str(fs.info(f'{inbox}/held.csv')['mtime']).replace('.', '')}"
    )
    fs.makedirs(f"{inbox}/processing/{CLAIMS}")
    fs.pipe(marker, b"other")

    claimed = claim_new_objects(fs, inbox, "run1", min_age_seconds=60, now=now)
    assert claimed == [
        {"name": "a.csv", "csv": "processing/run1/a.csv", "sidecar": "processing/run1/a.json"},
        {"name": "b.csv", "csv": "processing/run1/b.csv", "sidecar": None},
    ]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(inbox, detail=False) if fs.isfile(p)) == [
        "held.csv",
        "notes.txt",
        "young.csv",
    ]
    assert fs.ls(f"{inbox}/processing/{CLAIMS}", detail=False) == [marker]  # the winner removed its own
    assert claim_new_objects(fs, inbox, "run2", min_age_seconds=60, now=now) == []  # nothing twice

    assert settle_objects(fs, claimed[0], inbox, "run1", "done") == "done/run1/a.csv"
    assert settle_objects(fs, claimed[1], inbox, "run1", "failed") == "failed/run1/b.csv"
    assert fs.cat(f"{inbox}/done/run1/a.json") == b'{"model": "gpt-4o-mini"}'
    assert fs.exists(f"{inbox}/failed/run1/b.csv") and not fs.exists(f"{inbox}/processing/run1/a.csv")


def test_claim_new_objects_needs_the_inbox(tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    from batchpipe.inbox import claim_new_objects

    with pytest.raises(InputError, match="does not exist"):
        claim_new_objects(LocalFileSystem(), str(tmp_path / "nowhere"), "run1")
