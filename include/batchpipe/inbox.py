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
"""

from __future__ import annotations

import json
import os
import time
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
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
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
