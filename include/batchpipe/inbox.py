"""An inbox folder of CSVs processed exactly once (no Airflow here).

Layout under the inbox folder::

    inbox/questions.csv          new files (and optional sidecars questions.json)
    inbox/processing/<claim>/    claimed by one run: moved here atomically
    inbox/done/<claim>/          processed
    inbox/failed/<claim>/        not processed: the pipeline run failed, the sidecar was bad, or a
                                 sidecar had no CSV; ``<name>.error.txt`` beside it says why

A claim is ``os.rename`` of the CSV into ``processing/<claim>/``: atomic on one file system, so of
two overlapping runs exactly one gets each file (the other's rename finds nothing and moves on).

A file is claimed only when it looks finished: older than ``min_age_seconds`` and unchanged (size and
modification time; in object storage size and ETag) across two looks at the folder
``stable_seconds`` apart. A file still being written is left for the next run.

A sidecar ``<name>.json`` next to ``<name>.csv`` holds settings for that file, with the same keys as
the pipeline's params. It travels only with its CSV, and only when both were in the same look. A
sidecar that does not parse, names an unknown setting, or holds a ``response_schema`` that strict
structured outputs refuse (:func:`batchpipe.schema.check_response_schema`, the run's own check), fails
its own file: the CSV and sidecar go to ``failed/<claim>/`` with a reason file, no pipeline run is
started for it, and the other files are claimed as usual. Settings are passed on as written. A sidecar
found with no CSV of its name (e.g. written after its CSV was claimed) is an orphan: logged while
younger than ``min_age_seconds`` (its CSV may be on its way), then moved to ``failed/<claim>/``
with a reason file, so it can never be applied to an unrelated later file of the same name.

A plain file named ``processing``, ``done`` or ``failed`` in the inbox is refused (an
:class:`InputError` naming it, before anything is claimed): those names are the inbox's own folders.

An inbox in object storage (:func:`claim_new_objects`, :func:`settle_objects`, on an fsspec-style
filesystem) has no rename. There a claim is the exclusive creation of a marker
``processing/.claims/<name>.<etag>`` (``open(..., "xb")``: a conditional write on S3), which exactly
one run wins; the winner copies the CSV (and sidecar) to ``processing/<claim>/``, deletes the
originals and then its marker. A run that dies between the copy and the delete leaves the marker, so
the file stays put until the marker is removed by hand: never processed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from datetime import UTC, datetime
from difflib import get_close_matches
from itertools import islice
from pathlib import Path
from typing import Any

from .csvio import column_list
from .errors import InputError
from .naming import unique_name
from .paths import clip

log = logging.getLogger(__name__)

STATES = ("processing", "done", "failed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- names


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._")


def claim_name(run_id: str, try_number: int = 1) -> str:
    """The folder name of one claim: the inbox run's id as :func:`batchpipe.naming.unique_name` makes it
    (safe, at most 130 characters, a short hash added when it had to change), plus ``_try<n>`` from the
    second try on, so a cleared or retried run never shares a claim folder (nor pipeline run ids) with
    its earlier try."""
    name = unique_name(run_id, max_len=130)  # manual__a:1 and manual__a+1 never share one
    return name if try_number <= 1 else f"{name}_try{try_number}"


def run_name(claim: str, file_name: str) -> str:
    """The pipeline run id of inbox file ``file_name`` claimed by ``claim``:
    ``inbox__<claim>__<readable stem>_<8 hex of sha256(file_name)>``. Unique per file name (``2026 Q1.csv``
    and ``2026_Q1.csv`` differ), made of Airflow's allowed run id characters, at most 250 long."""
    stem = file_name[: -len(".csv")] if file_name.endswith(".csv") else file_name
    digest = hashlib.sha256(file_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    readable = _safe(stem)[:80] or "file"
    return f"inbox__{claim[:140]}__{readable}_{digest}"


def error_file(path: str) -> str:
    """Where the reason a file failed is written: ``<path>.error.txt``."""
    return f"{path}.error.txt"


# --------------------------------------------------------------------------- one look at the folder


def _signatures(entries: dict[str, tuple]) -> dict[str, tuple]:
    return {name: sig for name, sig in entries.items() if name.endswith((".csv", ".json"))}


def _ready(
    first: dict[str, tuple],
    second: dict[str, tuple],
    mtimes: dict[str, float | None],
    min_age: float,
    now: float,
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """From two looks at the inbox (name -> signature), the CSVs to claim with their sidecar (or None),
    and the orphan sidecars to move aside. A name counts only when its signature is the same in both."""
    csvs, orphans = [], []
    waiting: list[tuple[str, float]] = []  # (name, when it is old enough)
    for name in sorted(second):
        stable = first.get(name) == second[name]
        mtime = mtimes.get(name)
        old = mtime is None or now - mtime >= min_age
        if name.endswith(".csv"):
            sidecar = name[: -len(".csv")] + ".json"
            if sidecar in second and first.get(sidecar) != second[sidecar]:
                log.info("%s: its sidecar is still changing; left for the next run", name)
            elif not stable:
                log.info(
                    "%s: still changing (size or time differs between two looks); left for the next run", name
                )
            elif old:
                csvs.append((name, sidecar if sidecar in second else None))
            else:
                waiting.append((name, mtime + min_age))
        elif name[: -len(".json")] + ".csv" not in second and name[: -len(".json")] + ".csv" not in first:
            if stable and old:
                orphans.append(name)
            else:
                log.warning("%s: a sidecar without its CSV (left for now; moved to failed/ once %ss old)",
                            name, min_age)  # fmt: skip
    if waiting:
        waiting.sort(key=lambda w: w[1])
        log.info(
            "%d file(s) younger than min_age_seconds=%g wait for a later run (may still be arriving): %s",
            len(waiting),
            min_age,
            "; ".join(f"{clip(name, 80)} ready from {_utc(ready)}" for name, ready in waiting[:10])
            + (f"; and {len(waiting) - 10} more" if len(waiting) > 10 else ""),
        )
    return csvs, orphans


def _utc(when: float) -> str:
    try:
        return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # min_age_seconds of centuries, a file dated far off
        return "a time past the year 9999"


def _orphan_reason(path: Any) -> str:
    csv = str(path)[: -len(".json")] + ".csv"
    return (
        f"{path}: a sidecar without its CSV {csv.rsplit('/', 1)[-1]} (written after its CSV was claimed, or "
        "the CSV never came); moved aside so that it is never applied to a later file"
    )


def _check_layout(inbox: Path) -> None:
    for state in STATES:
        path = inbox / state
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise InputError(
                f"{path}: a file named {state!r} is in the way of the inbox's own {state}/ folder; "
                "rename or remove it (nothing was claimed or moved)"
            )


def _local_look(inbox: Path) -> tuple[dict[str, tuple], dict[str, float]]:
    sigs, mtimes = {}, {}
    with os.scandir(inbox) as it:
        for entry in it:
            try:
                if not entry.is_file(follow_symlinks=False):
                    if entry.name.endswith((".csv", ".json")) and entry.name not in STATES:
                        log.warning("%s: not a regular file (a folder or a link); left alone", entry.path)
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            sigs[entry.name] = (st.st_size, st.st_mtime_ns)
            mtimes[entry.name] = st.st_mtime
    return _signatures(sigs), mtimes


def _two_looks(look, stable_seconds: float):
    first, _ = look()
    if stable_seconds > 0 and first:
        time.sleep(stable_seconds)
    second, mtimes = look()
    return first, second, mtimes


# --------------------------------------------------------------------------- local folder


def claim_new_files(
    inbox: str | os.PathLike,
    claim: str,
    min_age_seconds: float = 0,
    stable_seconds: float = 0,
    allowed: set[str] | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Move every ready ``*.csv`` of ``inbox`` (with its sidecar) to ``processing/<claim>/``.

    Returns one ``{"name", "csv", "sidecar", "settings", "error"}`` per file this call claimed or
    failed, in name order. ``error`` is None for a claimed file (``settings``: its sidecar's, checked
    against ``allowed``); else the reason, with ``csv``/``sidecar`` already in ``failed/<claim>/``
    (an orphan sidecar: ``csv`` None).
    """
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise InputError(f"inbox folder {inbox} does not exist")
    _check_layout(inbox)
    first, second, mtimes = _two_looks(lambda: _local_look(inbox), stable_seconds)
    csvs, orphans = _ready(first, second, mtimes, min_age_seconds, time.time() if now is None else now)
    target = inbox / "processing" / claim
    results = []
    for name, sidecar in csvs:
        target.mkdir(parents=True, exist_ok=True)
        dest = target / name
        try:
            os.rename(inbox / name, dest)
        except FileNotFoundError:
            continue  # another run took it first
        item = {"name": name, "csv": str(dest), "sidecar": None, "settings": {}, "error": None}
        if sidecar:
            item["sidecar"] = str(target / sidecar)
            try:
                os.rename(inbox / sidecar, item["sidecar"])
            except FileNotFoundError:
                item["sidecar"] = None
                item["error"] = f"{inbox / sidecar}: the sidecar vanished while its CSV was claimed"
        if item["error"] is None:
            try:
                item["settings"] = read_sidecar(item["sidecar"], allowed)
            except InputError as exc:
                item["error"] = str(exc)
        if item["error"]:
            item["csv"] = settle(item, inbox, claim, "failed", item["error"])
            item["sidecar"] = item["sidecar"] and str(Path(item["csv"]).with_suffix(".json"))
            log.error("%s: not processed: %s", name, item["error"])
        results.append(item)
    for name in orphans:
        reason = _orphan_reason(inbox / name)
        failed = inbox / "failed" / claim
        failed.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(inbox / name, failed / name)
        except FileNotFoundError:
            continue
        (failed / error_file(name)).write_text(reason + "\n", encoding="utf-8")
        log.error("%s", reason)
        results.append(
            {"name": name, "csv": None, "sidecar": str(failed / name), "settings": {}, "error": reason}
        )
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    return sorted(results, key=lambda r: r["name"])


def read_sidecar(path: str | os.PathLike | None, allowed: set[str] | None = None) -> dict[str, Any]:
    """The settings of a sidecar file ({} without one); unknown keys are an error naming them."""
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON object ({exc})") from None
    return parse_sidecar(text, str(path), allowed)


def parse_sidecar(text: str, path: str, allowed: set[str] | None = None) -> dict[str, Any]:
    """:func:`read_sidecar` for a sidecar's text (``path`` names it in messages)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not a readable JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: must hold a JSON object of settings")
    if allowed is not None and (unknown := sorted(set(data) - allowed)):
        # a sidecar may be any JSON: its keys are quoted shortened, and only a few of them
        close = ((k, get_close_matches(k, allowed, 1)) for k in unknown if len(k) <= 100)
        hints = [f"{k!r}: did you mean {m[0]!r}?" for k, m in islice(((k, m) for k, m in close if m), 5)]
        raise InputError(
            f"{path}: unknown settings {column_list(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
        )
    _check_response_schema(data.get("response_schema"), path)
    return data


def _check_response_schema(schema: Any, path: str) -> None:
    """A sidecar's ``response_schema`` checked as the run would check it (None, "" and {} are an empty
    field: no schema); :class:`InputError` naming the sidecar and the offending place. The sidecar's value
    is left as written: the run adds what strict mode needs itself."""
    if schema is None or schema == {} or (isinstance(schema, str) and not schema.strip()):
        return
    from .schema import check_response_schema

    try:
        check_response_schema(schema, "response_schema")
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def settle(
    claimed: dict[str, Any], inbox: str | os.PathLike, claim: str, state: str, reason: str | None = None
) -> str:
    """Move a claimed CSV (and sidecar) from ``processing/<claim>/`` to ``done/`` or ``failed/``; a
    ``reason`` (why it failed) is written beside it as ``<name>.error.txt``. Returns the CSV's new path."""
    if state not in ("done", "failed"):
        raise ValueError(f"state must be done or failed, not {state!r}")
    _check_layout(Path(inbox))
    dest_dir = Path(inbox) / state / claim
    dest_dir.mkdir(parents=True, exist_ok=True)
    src = Path(claimed["csv"])
    dest = dest_dir / src.name
    os.replace(src, dest)
    if claimed.get("sidecar"):
        os.replace(claimed["sidecar"], dest.with_suffix(".json"))
    if reason:
        Path(error_file(str(dest))).write_text(reason + "\n", encoding="utf-8")
    processing = src.parent
    if processing.exists() and not any(processing.iterdir()):
        processing.rmdir()
    return str(dest)


# --------------------------------------------------------------------------- object storage

CLAIMS = ".claims"


def _mtime(entry: dict[str, Any]) -> float | None:
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = entry.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _version(entry: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", str(entry.get("ETag") or entry.get("etag") or _mtime(entry) or ""))


def _object_look(fs: Any, inbox: str) -> tuple[dict[str, tuple], dict[str, float | None]]:
    fs.invalidate_cache(inbox)  # a second look must not be served from the listing cache
    try:
        entries = fs.ls(inbox, detail=True)
    except FileNotFoundError:
        raise InputError(f"inbox folder {inbox} does not exist") from None
    sigs, mtimes = {}, {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file":
            continue
        if name in STATES:
            raise InputError(
                f"{inbox}/{name}: a file named {name!r} is in the way of the inbox's own {name}/ folder; "
                "rename or remove it (nothing was claimed or moved)"
            )
        sigs[name] = (entry.get("size"), _version(entry), _mtime(entry))
        mtimes[name] = _mtime(entry)
    return _signatures(sigs), mtimes


def claim_new_objects(
    fs: Any,
    inbox: str,
    claim: str,
    min_age_seconds: float = 0,
    now: float | None = None,
    stable_seconds: float = 0,
    allowed: set[str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`claim_new_files` for an inbox in object storage: ``fs`` an fsspec-style filesystem,
    ``inbox`` a path in it. Returns ``{"name", "csv", "sidecar", "settings", "error"}`` with paths
    relative to ``inbox``."""
    inbox = inbox.rstrip("/")
    first, second, mtimes = _two_looks(lambda: _object_look(fs, inbox), stable_seconds)
    csvs, orphans = _ready(first, second, mtimes, min_age_seconds, time.time() if now is None else now)
    results = []
    if csvs:
        fs.makedirs(f"{inbox}/processing/{CLAIMS}", exist_ok=True)  # folders: nothing to make on S3
    for name, sidecar in csvs:
        marker = f"{inbox}/processing/{CLAIMS}/{name}.{second[name][1][:64]}"
        try:
            with fs.open(marker, "xb") as fh:
                fh.write(claim.encode())
        except FileExistsError:
            continue  # another run holds it
        dest = f"processing/{claim}/{name}"
        fs.makedirs(f"{inbox}/processing/{claim}", exist_ok=True)
        try:
            fs.copy(f"{inbox}/{name}", f"{inbox}/{dest}")
        except FileNotFoundError:
            fs.rm(marker)
            continue  # another run took it first
        item = {"name": name, "csv": dest, "sidecar": None, "settings": {}, "error": None}
        if sidecar:
            item["sidecar"] = f"processing/{claim}/{sidecar}"
            try:
                fs.copy(f"{inbox}/{sidecar}", f"{inbox}/{item['sidecar']}")
                fs.rm(f"{inbox}/{sidecar}")
                text = fs.cat(f"{inbox}/{item['sidecar']}").decode("utf-8")
            except FileNotFoundError:
                item["sidecar"] = None
                item["error"] = f"{inbox}/{sidecar}: the sidecar vanished while its CSV was claimed"
            except UnicodeDecodeError as exc:
                item["error"] = f"{inbox}/{sidecar}: not a readable JSON object ({exc})"
            else:
                try:
                    item["settings"] = parse_sidecar(text, f"{inbox}/{sidecar}", allowed)
                except InputError as exc:
                    item["error"] = str(exc)
        fs.rm(f"{inbox}/{name}")
        fs.rm(marker)
        if item["error"]:
            item["csv"] = settle_objects(fs, item, inbox, claim, "failed", item["error"])
            item["sidecar"] = item["sidecar"] and item["csv"][: -len(".csv")] + ".json"
            log.error("%s: not processed: %s", name, item["error"])
        results.append(item)
    for name in orphans:
        reason = _orphan_reason(f"{inbox}/{name}")
        dest = f"failed/{claim}/{name}"
        fs.makedirs(f"{inbox}/failed/{claim}", exist_ok=True)
        try:
            fs.mv(f"{inbox}/{name}", f"{inbox}/{dest}")
        except FileNotFoundError:
            continue
        fs.pipe(f"{inbox}/{error_file(dest)}", (reason + "\n").encode())
        log.error("%s", reason)
        results.append({"name": name, "csv": None, "sidecar": dest, "settings": {}, "error": reason})
    return sorted(results, key=lambda r: r["name"])


def settle_objects(
    fs: Any, claimed: dict[str, Any], inbox: str, claim: str, state: str, reason: str | None = None
) -> str:
    """:func:`settle` for an inbox in object storage; returns the CSV's new path relative to ``inbox``."""
    if state not in ("done", "failed"):
        raise ValueError(f"state must be done or failed, not {state!r}")
    inbox = inbox.rstrip("/")
    dest = f"{state}/{claim}/{claimed['name']}"
    fs.makedirs(f"{inbox}/{state}/{claim}", exist_ok=True)
    fs.mv(f"{inbox}/{claimed['csv']}", f"{inbox}/{dest}")
    if claimed.get("sidecar"):
        fs.mv(f"{inbox}/{claimed['sidecar']}", f"{inbox}/{dest[: -len('.csv')]}.json")
    if reason:
        fs.pipe(f"{inbox}/{error_file(dest)}", (reason + "\n").encode())
    return dest
