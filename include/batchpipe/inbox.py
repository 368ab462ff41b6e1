"""An inbox folder of CSVs processed exactly once (no Airflow here).

Layout under the inbox folder::

    inbox/questions.csv          new files (and optional sidecars questions.json)
    inbox/processing/<claim>/    claimed by one run: moved here atomically
    inbox/done/<claim>/          processed
    inbox/failed/<claim>/        the pipeline run for it failed

A claim is ``os.rename`` of the CSV into ``processing/<claim>/``: atomic on one file system, so of
two overlapping runs exactly one gets each file (the other's rename finds nothing and moves on).
Files younger than ``min_age_seconds`` are left for the next run (they may still be being written).
A sidecar ``<name>.json`` next to ``<name>.csv`` holds settings for that file, with the same keys as
the pipeline's params; it travels with its CSV.

An inbox in object storage (:func:`claim_new_objects`, :func:`settle_objects`, on an fsspec-style
filesystem) has no rename. There a claim is the exclusive creation of a marker
``processing/.claims/<name>.<etag>`` (``open(..., "xb")``: a conditional write on S3), which exactly
one run wins; the winner copies the CSV (and sidecar) to ``processing/<claim>/``, deletes the
originals and then its marker. A run that dies between the copy and the delete leaves the marker, so
the file stays put until the marker is removed by hand: never processed twice.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import InputError

STATES = ("processing", "done", "failed")


def claim_new_files(inbox: str | os.PathLike, claim: str, min_age_seconds: float = 0) -> list[dict[str, Any]]:
    """Move every ready ``*.csv`` of ``inbox`` (with its sidecar) to ``processing/<claim>/``.

    Returns one ``{"name", "csv", "sidecar"}`` per file this call claimed, in name order.
    """
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise InputError(f"inbox folder {inbox} does not exist")
    target = inbox / "processing" / claim
    now = time.time()
    claimed = []
    for csv_path in sorted(inbox.glob("*.csv")):
        try:
            if now - csv_path.stat().st_mtime < min_age_seconds:
                continue
        except FileNotFoundError:
            continue  # another run took it meanwhile
        target.mkdir(parents=True, exist_ok=True)
        dest = target / csv_path.name
        try:
            os.rename(csv_path, dest)
        except FileNotFoundError:
            continue  # another run took it first
        sidecar = csv_path.with_suffix(".json")
        sidecar_dest = None
        try:
            os.rename(sidecar, dest.with_suffix(".json"))
            sidecar_dest = str(dest.with_suffix(".json"))
        except FileNotFoundError:
            pass
        claimed.append({"name": csv_path.name, "csv": str(dest), "sidecar": sidecar_dest})
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    return claimed


def read_sidecar(path: str | os.PathLike | None, allowed: set[str] | None = None) -> dict[str, Any]:
    """The settings of a sidecar file ({} without one); unknown keys are an error naming them."""
    if not path:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
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
        raise InputError(f"{path}: unknown settings {', '.join(unknown)}")
    return data


def settle(claimed: dict[str, Any], inbox: str | os.PathLike, claim: str, state: str) -> str:
    """Move a claimed CSV (and sidecar) from ``processing/<claim>/`` to ``done/`` or ``failed/``."""
    if state not in ("done", "failed"):
        raise ValueError(f"state must be done or failed, not {state!r}")
    dest_dir = Path(inbox) / state / claim
    dest_dir.mkdir(parents=True, exist_ok=True)
    src = Path(claimed["csv"])
    dest = dest_dir / src.name
    os.replace(src, dest)
    if claimed.get("sidecar"):
        os.replace(claimed["sidecar"], dest.with_suffix(".json"))
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


def claim_new_objects(
    fs: Any, inbox: str, claim: str, min_age_seconds: float = 0, now: float | None = None
) -> list[dict[str, Any]]:
    """:func:`claim_new_files` for an inbox in object storage: ``fs`` an fsspec-style filesystem,
    ``inbox`` a path in it. Returns ``{"name", "csv", "sidecar"}`` with paths relative to ``inbox``."""
    inbox = inbox.rstrip("/")
    now = time.time() if now is None else now
    try:
        entries = fs.ls(inbox, detail=True)
    except FileNotFoundError:
        raise InputError(f"inbox folder {inbox} does not exist") from None
    claimed = []
    fs.makedirs(f"{inbox}/processing/{CLAIMS}", exist_ok=True)  # folders: nothing to make on S3
    for entry in sorted(entries, key=lambda e: e["name"]):
        path = entry["name"].rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not name.endswith(".csv"):
            continue
        mtime = _mtime(entry)
        if mtime is not None and now - mtime < min_age_seconds:
            continue
        version = re.sub(r"[^A-Za-z0-9]", "", str(entry.get("ETag") or entry.get("etag") or mtime or ""))
        marker = f"{inbox}/processing/{CLAIMS}/{name}.{version[:64]}"
        try:
            with fs.open(marker, "xb") as fh:
                fh.write(claim.encode())
        except FileExistsError:
            continue  # another run holds it
        dest = f"processing/{claim}/{name}"
        fs.makedirs(f"{inbox}/processing/{claim}", exist_ok=True)
        try:
            fs.copy(path, f"{inbox}/{dest}")
        except FileNotFoundError:
            fs.rm(marker)
            continue  # another run took it first
        sidecar, sidecar_dest = path[: -len(".csv")] + ".json", None
        if fs.exists(sidecar):
            sidecar_dest = dest[: -len(".csv")] + ".json"
            fs.copy(sidecar, f"{inbox}/{sidecar_dest}")
            fs.rm(sidecar)
        fs.rm(path)
        fs.rm(marker)
        claimed.append({"name": name, "csv": dest, "sidecar": sidecar_dest})
    return claimed


def settle_objects(fs: Any, claimed: dict[str, Any], inbox: str, claim: str, state: str) -> str:
    """:func:`settle` for an inbox in object storage; returns the CSV's new path relative to ``inbox``."""
    if state not in ("done", "failed"):
        raise ValueError(f"state must be done or failed, not {state!r}")
    inbox = inbox.rstrip("/")
    dest = f"{state}/{claim}/{claimed['name']}"
    fs.makedirs(f"{inbox}/{state}/{claim}", exist_ok=True)
    fs.mv(f"{inbox}/{claimed['csv']}", f"{inbox}/{dest}")
    if claimed.get("sidecar"):
        fs.mv(f"{inbox}/{claimed['sidecar']}", f"{inbox}/{dest[: -len('.csv')]}.json")
    return dest
