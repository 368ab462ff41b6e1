"""Checks ``validate_csv`` makes before anything is uploaded or paid for, each failing the task once (an
:class:`AirflowFailException`: retrying cannot fix a typo) with a message that says what to fix:

* :func:`check_keys`: settings (a run's conf, the inbox's ``defaults``) with keys that are no param, named
  with the closest param;
* :func:`check_model`: a model the API does not know (``GET /v1/models/{model}``), named with the closest
  models the API lists. A model that cannot be checked (the key may not read models, the API is down or
  answers 5xx after a few tries, the server has no model list) is a warning, and the run goes on;
* :func:`check_writable`: a local folder that is a file, lies below a file, or cannot be written.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from collections.abc import Iterable
from difflib import get_close_matches
from itertools import islice
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Tries of the model check for a connection error, 408, 409, 429 or 5xx (the openai client's retries).
MODEL_CHECK_RETRIES = 3
MODEL_CHECK_TIMEOUT = 20.0
#: At most this many listed models are compared (a server listing without end cannot hold the run).
MAX_LISTED_MODELS = 10_000
#: A model param that is really an API key (pasted into the wrong field).
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")
#: Names longer than this are not compared (difflib is quadratic), only reported.
MAX_COMPARED = 100


def _fail(message: str):
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def _quoted(text: str) -> str:
    from batchpipe.csvio import quote_value

    return quote_value(text)


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``known`` most like ``name`` (difflib), closest first; none for an overlong name."""
    return get_close_matches(name, list(known), n, 0.6) if len(name) <= MAX_COMPARED else []


def check_keys(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """Fail naming the keys of ``given`` that are not in ``known`` (shortened, a few) and, for each of the
    first five, the closest known key. ``what`` names the settings, e.g. ``the run conf``."""
    from batchpipe.csvio import column_list

    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    close = ((k, closest(k, known, 1)) for k in unknown[:50])  # a hint is worth no more than 50 looks
    matched = islice(((k, m) for k, m in close if m), 5)
    hints = [f"'{column_list([k])}': did you mean {m[0]!r}?" for k, m in matched]
    noun = "param" if len(unknown) == 1 else "params"
    raise _fail(
        f"unknown {noun} in {what}: {column_list(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
    )


def check_model(api: Any, model: str, conn_id: str) -> None:
    """Fail when the API behind ``api`` (an :class:`~openai_batch_airflow.hooks.OpenAIBatchHook`, or an
    OpenAI client, which is asked through a hook) does not know ``model``; warn when that cannot be told.

    Unknown: ``GET /v1/models/{model}`` answers 404 ``model_not_found``, or any other 404 (or the name
    cannot even be put in the URL, such as ``..``) while the model list (``GET /v1/models``) works and
    lacks the model. A listed model always passes. The message names the three closest listed models.
    Not checked (a warning): 401/403 (a key restricted to some endpoints may not read models), a
    connection error, a timeout or 429/5xx after a few tries (a flaky models endpoint must not block a
    batch; the upload has its own retries), a 404 without ``model_not_found`` from a server that lists no
    models (an OpenAI-compatible server without ``/v1/models``), any other API error.
    """
    import openai

    from openai_batch_airflow.hooks import BatchAPI, OpenAIBatchHook

    if _KEY_LIKE.search(model):  # never put a key in a URL, a log line or a message
        raise _fail(
            "the model param looks like an API key (sk-…): nothing was sent; put the key in the Airflow "
            "connection and a model name such as gpt-4o-mini in the model param"
        )
    hook = api if isinstance(api, BatchAPI) else OpenAIBatchHook(conn_id, client=api)
    name = _quoted(model)
    try:
        hook.retrieve_model(model, max_retries=MODEL_CHECK_RETRIES, timeout=MODEL_CHECK_TIMEOUT)
        return
    except openai.NotFoundError as exc:
        said_unknown = _error_code(exc) == "model_not_found"
    except ValueError:  # a name the client will not put in a URL (".", ".."): not a model either
        said_unknown = False
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        _not_checked(name, f"the key may not read models (HTTP {exc.status_code})")
        return
    except openai.APIStatusError as exc:
        _not_checked(name, f"HTTP {exc.status_code} from GET /models/{{model}}")
        return
    except openai.APIError as exc:  # connection error, timeout
        _not_checked(name, f"{type(exc).__name__}: {exc}")
        return
    listed, why = _listed_models(hook)
    if listed is not None and model in listed:
        return  # a name the route cannot take (e.g. with "/") that the list does hold
    if not listed and not said_unknown:  # no list, or an empty one: nothing to tell a typo by
        _not_checked(name, f"the API serves no model list ({why or 'it is empty'})")
        return
    hint = ""
    if listed:
        near = closest(model, listed)
        hint = f" (did you mean {', '.join(repr(m) for m in near)}?)" if near else ""
    raise _fail(
        f"model {name} is not known to connection {conn_id!r}{hint}: nothing was sent; fix the model "
        "param (the API's GET /v1/models lists the models this key may use)"
    )


def _error_code(exc: Any) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        return inner.get("code")
    return getattr(exc, "code", None)


def _listed_models(hook: Any) -> tuple[list[str] | None, str]:
    """The model ids the API lists (at most :data:`MAX_LISTED_MODELS`), or None and why not."""
    import openai

    options = {"max_retries": MODEL_CHECK_RETRIES, "timeout": MODEL_CHECK_TIMEOUT}
    try:
        listed = hook.list_models(MAX_LISTED_MODELS, **options)
    except openai.APIStatusError as exc:
        return None, f"GET /models: HTTP {exc.status_code}"
    except openai.APIError as exc:
        return None, f"GET /models: {type(exc).__name__}"
    except Exception as exc:  # a list that is not one (HTML, bad JSON, odd shapes): not a list to go by
        return None, f"GET /models answered something that is not a model list ({type(exc).__name__})"
    return [m for m in listed if isinstance(m, str) and m], ""


def _not_checked(name: str, why: str) -> None:
    log.warning(
        "model %s not checked: %s; going on (a wrong model fails when the batch is created)", name, why
    )


def check_writable(folder: Path) -> None:
    """Create the local ``folder`` (and its parents), then write and delete a probe file in it; fail naming
    the folder and the reason: a path that is (or lies below) a file, no write permission, a read-only file
    system, no space."""
    from batchpipe.paths import quote_path

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{uuid.uuid4().hex}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise _fail(f"cannot write to {quote_path(folder)}: {_why_not_writable(folder, exc)}") from None


def _why_not_writable(folder: Path, exc: OSError) -> str:
    if isinstance(exc, NotADirectoryError | FileExistsError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            from batchpipe.paths import quote_path

            return f"{quote_path(blocker)} is a file, not a folder"
    if isinstance(exc, PermissionError):
        return f"no permission to write ({exc.strerror})"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or type(exc).__name__
