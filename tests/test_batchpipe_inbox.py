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
