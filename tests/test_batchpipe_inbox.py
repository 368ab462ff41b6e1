import json
import os
import re
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


def test_young_files_wait_for_the_next_run(tmp_path, caplog):
    drop(tmp_path, "fresh.csv", age=0)
    drop(tmp_path, "older.csv", age=30)
    caplog.set_level("INFO", logger="batchpipe.inbox")
    assert claim_new_files(tmp_path, "r", min_age_seconds=60) == []
    # not a silent "nothing new": how many wait, and from when each is ready (the older one first)
    (said,) = [r.getMessage() for r in caplog.records if "wait for a later run" in r.getMessage()]
    assert said.startswith("2 file(s) younger than min_age_seconds=60 wait for a later run")
    ready = time.time() - 30 + 60
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ready))
    assert f"older.csv ready from {when}" in said and said.index("older.csv") < said.index("fresh.csv")
    os.utime(tmp_path / "older.csv", (time.time() - 3600, time.time() - 3600))
    claimed = claim_new_files(tmp_path, "r", min_age_seconds=0)
    assert [c["name"] for c in claimed] == ["fresh.csv", "older.csv"]


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
        {
            "name": "a.csv",
            "csv": "processing/run1/a.csv",
            "sidecar": "processing/run1/a.json",
            "settings": {"model": "gpt-4o-mini"},
            "error": None,
        },
        {"name": "b.csv", "csv": "processing/run1/b.csv", "sidecar": None, "settings": {}, "error": None},
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


# --- both layouts: a local folder, and object storage through fsspec (its local filesystem) ---------


class Inbox:
    """One inbox on disk, claimed and settled either as a local folder or through fsspec."""

    def __init__(self, root, mode):
        self.root, self.mode = root, mode
        root.mkdir(exist_ok=True)

    def claim(self, claim, **kwargs):
        from fsspec.implementations.local import LocalFileSystem

        from batchpipe.inbox import claim_new_objects

        if self.mode == "local":
            claimed = claim_new_files(self.root, claim, **kwargs)
        else:
            claimed = claim_new_objects(LocalFileSystem(), str(self.root), claim, **kwargs)
        for item in claimed:  # paths relative to the inbox in both layouts
            for key in ("csv", "sidecar"):
                if item[key] and os.path.isabs(item[key]):
                    item[key] = os.path.relpath(item[key], self.root)
        return claimed

    def settle(self, item, claim, state, reason=None):
        from fsspec.implementations.local import LocalFileSystem

        from batchpipe.inbox import settle_objects

        if self.mode == "local":
            absolute = {
                k: (str(self.root / v) if k in ("csv", "sidecar") and v else v) for k, v in item.items()
            }
            return os.path.relpath(settle(absolute, self.root, claim, state, reason), self.root)
        return settle_objects(LocalFileSystem(), item, str(self.root), claim, state, reason)

    def files(self):
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


@pytest.fixture(params=["local", "object"])
def box(request, tmp_path):
    return Inbox(tmp_path / "inbox", request.param)


def test_run_names_are_unique_per_file_readable_and_valid_airflow_run_ids():
    """Issue 11 item 2: ``2026 Q1.csv`` and ``2026_Q1.csv`` (and names with no ASCII letters) used to
    share one pipeline run id."""
    from batchpipe.inbox import claim_name, run_name

    claim = claim_name("scheduled__2026-11-30T02:00:00+00:00")
    assert claim.startswith("scheduled__2026-11-30T02_00_00_00_00-") and len(claim) == 45
    assert claim_name("manual__a:1") != claim_name("manual__a+1")  # their files' run ids differ too
    assert len(claim_name("x:" * 125)) <= 130
    names = ["2026 Q1.csv", "2026_Q1.csv", "2026-Q1.csv", "données.csv", "日本.csv", "中国.csv", "….csv",
             ".csv", "x" * 251 + ".csv", "x" * 250 + "y.csv", "a.b.csv"]  # fmt: skip
    runs = [run_name(claim, n) for n in names]
    assert len(set(runs)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_.~:+-]+", r) and len(r) <= 250 for r in runs)
    assert runs[0].startswith(f"inbox__{claim}__2026_Q1_") and runs[3].startswith(f"inbox__{claim}__donn_es_")
    assert run_name(claim, "2026 Q1.csv") == runs[0]  # stable: settle finds the run claim triggered
    assert claim_name("manual__x", try_number=2) == "manual__x_try2" != claim_name("manual__x")


def test_a_bad_sidecar_fails_only_its_own_file(box):
    """Issue 11 item 3: one bad sidecar used to fail the whole claim, stranding every file."""
    for name, sidecar in (("a.csv", {"modle": "x"}), ("b.csv", {"model": "m"}), ("c.csv", None)):
        drop(box.root, name, sidecar)
    (box.root / "d.csv").write_text("prompt\nhi\n")
    (box.root / "d.json").write_text("{not json")
    os.utime(box.root / "d.csv", (0, 0))
    os.utime(box.root / "d.json", (0, 0))
    claimed = box.claim("c1", allowed={"model", "end_row"})
    by_name = {c["name"]: c for c in claimed}
    assert sorted(by_name) == ["a.csv", "b.csv", "c.csv", "d.csv"]
    assert by_name["a.csv"]["error"].endswith("unknown settings modle ('modle': did you mean 'model'?)")
    assert "a.json" in by_name["a.csv"]["error"] and "not a readable JSON object" in by_name["d.csv"]["error"]
    assert by_name["a.csv"]["csv"] == "failed/c1/a.csv" and by_name["a.csv"]["sidecar"] == "failed/c1/a.json"
    b = {"name": "b.csv", "csv": "processing/c1/b.csv", "sidecar": "processing/c1/b.json"}
    assert by_name["b.csv"] == {**b, "settings": {"model": "m"}, "error": None}
    assert by_name["c.csv"]["error"] is None and by_name["c.csv"]["settings"] == {}
    assert "unknown settings modle" in (box.root / "failed/c1/a.csv.error.txt").read_text()
    assert [f for f in box.files() if not f.startswith("processing/.claims")] == [
        "failed/c1/a.csv", "failed/c1/a.csv.error.txt", "failed/c1/a.json",
        "failed/c1/d.csv", "failed/c1/d.csv.error.txt", "failed/c1/d.json",
        "processing/c1/b.csv", "processing/c1/b.json", "processing/c1/c.csv",
    ]  # fmt: skip
    assert box.claim("c2", allowed={"model"}) == []


def test_a_sidecar_without_its_csv_is_moved_aside_never_applied_to_a_later_file(box):
    """Issue 11 item 16: a sidecar that arrives after its CSV was claimed stayed in the inbox and was
    applied, silently, to a later unrelated file of the same name."""
    drop(box.root, "x.csv")
    assert [c["sidecar"] for c in box.claim("run1", min_age_seconds=60)] == [None]
    late = box.root / "x.json"
    late.write_text(json.dumps({"model": "expensive"}))  # arrives after x.csv was claimed
    # young: its CSV may be on its way; left where it is (and logged)
    assert box.claim("run2", min_age_seconds=60) == [] and late.exists()
    os.utime(late, (time.time() - 120, time.time() - 120))
    (orphan,) = box.claim("run3", min_age_seconds=60)
    assert orphan["name"] == "x.json" and orphan["csv"] is None and orphan["sidecar"] == "failed/run3/x.json"
    assert "a sidecar without its CSV x.csv" in orphan["error"]
    assert "without its CSV" in (box.root / "failed/run3/x.json.error.txt").read_text()
    drop(box.root, "x.csv")  # an unrelated later file of the same name
    (later,) = box.claim("run4", min_age_seconds=60)
    assert later["sidecar"] is None and later["settings"] == {} and later["error"] is None
    # a sidecar dropped with its CSV still travels with it
    drop(box.root, "y.csv", {"model": "m"})
    (y,) = box.claim("run5", min_age_seconds=60)
    assert y["settings"] == {"model": "m"} and y["sidecar"] == "processing/run5/y.json"


@pytest.mark.parametrize("reserved", ["done", "failed", "processing"])
def test_a_plain_file_named_like_the_inbox_folders_is_refused_before_anything_moves(box, reserved):
    """Issue 11 item 17: a plain file ``done``/``failed``/``processing`` broke claim or settle
    (NotADirectoryError) and left files in processing/."""
    drop(box.root, "a.csv")
    (box.root / reserved).write_text("oops")
    with pytest.raises(InputError, match=rf"inbox/{reserved}: a file named '{reserved}' is in the way"):
        box.claim("c1")
    assert box.files() == ["a.csv", reserved]  # nothing claimed or moved


def test_settle_refuses_a_plain_file_in_the_way_clearly(box):
    drop(box.root, "a.csv")
    (item,) = box.claim("c1")
    (box.root / "done").write_text("oops")
    if box.mode == "local":
        with pytest.raises(InputError, match="inbox/done: a file named 'done' is in the way"):
            box.settle(item, "c1", "done")
    (box.root / "done").unlink()
    assert box.settle(item, "c1", "done") == "done/c1/a.csv"


def claim_while_writing(box, write, **kwargs):
    """``box.claim(**kwargs)`` while a thread calls ``write(i)`` every 20 ms (i = 0, 1, ...)."""
    stop = threading.Event()

    def writer():
        for i in range(10_000):
            if stop.is_set():
                return
            write(i)
            time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.1)
        return box.claim(**kwargs)
    finally:
        stop.set()
        thread.join()


def test_a_file_still_being_written_is_not_claimed(box):
    """Issue 11 item 18: a CSV still being written when claimed was split in two."""
    drop(box.root, "steady.csv")
    growing = box.root / "growing.csv"
    growing.write_text("prompt\n")
    with open(growing, "a") as fh:
        claimed = claim_while_writing(box, lambda i: (fh.write(f"row {i}\n"), fh.flush()), claim="c1",
                                      stable_seconds=0.5)  # fmt: skip
    assert [c["name"] for c in claimed] == ["steady.csv"]
    assert growing.exists()
    written = growing.read_text()
    (late,) = box.claim("c2", stable_seconds=0.1)
    assert late["name"] == "growing.csv" and (box.root / late["csv"]).read_text() == written


def test_a_sidecar_still_being_written_holds_its_csv_back(box):
    drop(box.root, "a.csv")
    sidecar = box.root / "a.json"
    sidecar.write_text("{")
    write = lambda i: sidecar.write_text("{" + " " * i)  # noqa: E731
    assert claim_while_writing(box, write, claim="c1", stable_seconds=0.5) == []
    sidecar.write_text('{"model": "m"}')
    (a,) = box.claim("c2", stable_seconds=0.1)
    assert a["settings"] == {"model": "m"}


def test_failed_settle_writes_the_reason_beside_the_file(box):
    drop(box.root, "a.csv", {"model": "m"})
    (a,) = box.claim("c1")
    assert box.settle(a, "c1", "failed", "pipeline run r ended failed") == "failed/c1/a.csv"
    assert (box.root / "failed/c1/a.csv.error.txt").read_text() == "pipeline run r ended failed\n"
    assert (box.root / "failed/c1/a.json").exists()


def test_overlapping_claims_with_sidecars_never_lose_a_sidecar_silently(tmp_path):
    for i in range(100):
        drop(tmp_path, f"f{i:03d}.csv", {"end_row": i})
    results: dict[str, list] = {}
    start = threading.Barrier(4)

    def worker(name):
        start.wait()
        results[name] = claim_new_files(tmp_path, name, allowed={"end_row"})

    threads = [threading.Thread(target=worker, args=(f"run{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    items = [c for claimed in results.values() for c in claimed if c["name"].endswith(".csv")]
    assert sorted(c["name"] for c in items) == [f"f{i:03d}.csv" for i in range(100)]  # each exactly once
    for c in items:  # with its own settings, or failed with a reason: never processed with none
        assert c["error"] or c["settings"] == {"end_row": int(c["name"][1:4])}


def test_folders_and_links_named_like_csvs_are_left_alone(tmp_path):
    """A folder ``x.csv`` was claimed (moved into processing/) and a link ``secret.csv`` pointing
    outside the inbox was followed: only regular files are claimed."""
    (tmp_path / "x.csv").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.csv"
    outside.write_text("prompt\nsecret\n")
    (tmp_path / "secret.csv").symlink_to(outside)
    drop(tmp_path, "real.csv")
    assert [c["name"] for c in claim_new_files(tmp_path, "c1")] == ["real.csv"]
    assert (tmp_path / "x.csv").is_dir() and (tmp_path / "secret.csv").is_symlink()


def test_a_sidecar_full_of_unknown_keys_is_quoted_shortened():
    from batchpipe.inbox import parse_sidecar

    keys = {("k" * 500) + str(i): 1 for i in range(1000)} | {"modle": "x"}
    with pytest.raises(InputError) as caught:
        parse_sidecar(json.dumps(keys), "in/x.json", allowed={"model", "prompt_column"})
    message = str(caught.value)
    assert len(message) < 1000 and "and 991 more" in message
    assert "'modle': did you mean 'model'?" in message


def test_the_wait_log_survives_far_times_and_hostile_names(tmp_path, caplog):
    caplog.set_level("INFO", logger="batchpipe.inbox")
    drop(tmp_path, "fresh\nFORGED LOG LINE\x1b[2J.csv", age=0)
    assert claim_new_files(tmp_path, "r", min_age_seconds=1e12) == []  # centuries: no crash
    (said,) = [r.getMessage() for r in caplog.records if "wait for a later run" in r.getMessage()]
    assert "past the year 9999" in said and "\n" not in said and "\x1b" not in said


REVIEW_SCHEMA = {  # no additionalProperties: the run adds them; the inbox passes the schema on as dropped
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "score": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    },
    "required": ["sentiment", "score"],
}


def test_a_sidecar_response_schema_travels_unchanged_and_a_bad_one_fails_only_its_own_file(box):
    """A sidecar may shape one file's answers (``response_schema``, ``output_prefix``): its settings, the
    run conf of that file, are the sidecar's exactly. A schema strict structured outputs refuse fails
    only its own file, at claim (no pipeline run), with the reason the run's own check would give."""
    good = {"response_schema": REVIEW_SCHEMA, "output_prefix": "answer_", "model": "gpt-4o-mini"}
    as_text = {"response_schema": json.dumps(REVIEW_SCHEMA)}  # the form and the CLI send JSON text
    drop(box.root, "good.csv", good)
    drop(box.root, "text.csv", as_text)
    drop(box.root, "none.csv", {"response_schema": None, "output_prefix": ""})  # empty form fields
    drop(box.root, "array.csv", {"response_schema": {"type": "array", "items": {"type": "string"}}})
    drop(box.root, "loose.csv", {"response_schema": {**REVIEW_SCHEMA, "required": ["sentiment"]}})
    drop(box.root, "broken.csv", {"response_schema": "{not json"})
    allowed = {"model", "response_schema", "output_prefix"}
    by_name = {c["name"]: c for c in box.claim("c1", allowed=allowed)}
    for name, sidecar in (("good.csv", good), ("text.csv", as_text)):
        assert by_name[name]["error"] is None and by_name[name]["settings"] == sidecar
        assert by_name[name]["csv"] == f"processing/c1/{name}"
    assert "additionalProperties" not in by_name["good.csv"]["settings"]["response_schema"]  # as dropped
    assert by_name["none.csv"]["error"] is None
    assert by_name["none.csv"]["settings"] == {"response_schema": None, "output_prefix": ""}
    why = {name: by_name[name]["error"] for name in ("array.csv", "loose.csv", "broken.csv")}
    root = 'array.json: response_schema: the root must have "type": "object" (got \'array\')'
    assert why["array.csv"].endswith(root)
    assert 'loose.json: response_schema: $: every property must be listed in "required"' in why["loose.csv"]
    assert "'score'" in why["loose.csv"]
    assert "broken.json: response_schema: not valid JSON" in why["broken.csv"]
    for name in why:
        assert by_name[name]["csv"] == f"failed/c1/{name}"
        assert by_name[name]["sidecar"] == f"failed/c1/{name[: -len('.csv')]}.json"
        assert (box.root / f"failed/c1/{name}.error.txt").read_text() == why[name] + "\n"
    assert sorted(f for f in box.files() if f.startswith("processing/c1/")) == [
        "processing/c1/good.csv", "processing/c1/good.json", "processing/c1/none.csv",
        "processing/c1/none.json", "processing/c1/text.csv", "processing/c1/text.json",
    ]  # fmt: skip
