"""One run's settings, resolved once: :class:`RunConfig`.

A task body calls :meth:`RunConfig.resolve` at its top with the run's params and run id and passes the
frozen result down: the params, the Airflow Variables and the environment are read here and nowhere
else in the task bodies. Tasks run in separate processes, so each task resolves once for itself.

The Variable and environment names the task bodies, the inbox and the notifier read are constants of
this module (the scratch folder's stays in :mod:`storage`; the DAG files read their schedule and retry
settings themselves, at parse time).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from openai_batch_airflow import storage

#: The batch APIs the pipeline speaks (param ``provider``), and the connection each uses by default.
DEFAULT_CONN_IDS = {
    "openai": "openai_default",
    "azure_openai": "azure_openai_default",
    "anthropic": "anthropic_default",
}

#: Airflow Variable and environment variable that give the answer cache when param ``cache_dir`` is empty.
CACHE_DIR_VARIABLE = "openai_batch_cache_dir"
CACHE_DIR_ENV = "OPENAI_BATCH_CACHE_DIR"
#: Airflow Variable and environment variable that give the default output folder.
OUTPUT_DIR_VARIABLE = "openai_batch_output_dir"
OUTPUT_DIR_ENV = "OPENAI_BATCH_OUTPUT_DIR"
#: Variables adding to OPENAI_BATCH_ALLOWED_ROOTS / OPENAI_BATCH_OUTPUT_ROOTS (os.pathsep-separated).
ALLOWED_ROOTS_VARIABLE = "openai_batch_allowed_roots"
OUTPUT_ROOTS_VARIABLE = "openai_batch_output_roots"
#: Variable overriding the shipped price table (param ``prices`` wins over it).
PRICES_VARIABLE = "openai_batch_prices"
#: Variable giving the enqueued-token limit (param ``max_enqueued_tokens`` wins over it).
MAX_ENQUEUED_TOKENS_VARIABLE = "openai_batch_max_enqueued_tokens"
#: Airflow Variable / environment variable that turn the model check off (false, 0, no, off): for a
#: server whose model names its GET /v1/models does not list (a gateway, deployment names).
CHECK_MODEL_VARIABLE = "openai_batch_check_model"
CHECK_MODEL_ENV = "OPENAI_BATCH_CHECK_MODEL"
#: The inbox folder of ``openai_batch_inbox`` when its ``inbox`` param is empty.
INBOX_VARIABLE = "openai_batch_inbox"
INBOX_ENV = "OPENAI_BATCH_INBOX"
#: The webhook run notifications are POSTed to (the environment variable wins).
WEBHOOK_ENV = "OPENAI_BATCH_NOTIFY_WEBHOOK"
WEBHOOK_VARIABLE = "openai_batch_notify_webhook"

#: Environment variable bounding the mapped task instances of a run's shards (default
#: :data:`batchpipe.build.SHARD_GROUPS`, 64; never more than Airflow's ``[core] max_map_length``).
SHARD_GROUPS_ENV = "OPENAI_BATCH_SHARD_GROUPS"

OFF = ("false", "0", "no", "off")


def variable(name: str) -> str | None:
    """The Airflow Variable ``name``, None when it is not set."""
    from airflow.sdk import Variable

    return Variable.get(name, default=None)


@contextmanager
def fail_on_bad_input() -> Iterator[None]:
    """Bad input fails the task at once: retrying cannot fix a CSV."""
    from airflow.sdk.exceptions import AirflowFailException

    from batchpipe.errors import InputError

    try:
        yield
    except InputError as exc:
        raise AirflowFailException(str(exc)) from exc


def _deployments(conn_id: str) -> dict[str, Any]:
    """The Azure connection's extra ``deployments`` (``{"<deployment>": "<model>"}``): each deployment is
    priced as its model. Empty when the connection or the extra is missing (the hook reports a missing
    connection when it is used)."""
    try:
        from airflow.sdk import BaseHook

        found = BaseHook.get_connection(conn_id).extra_dejson.get("deployments")
    except Exception:
        return {}
    return found if isinstance(found, dict) else {}


def default_output_dir() -> str:
    """Param ``output_dir`` when empty: Variable, then environment, then ``$AIRFLOW_HOME``."""
    value = variable(OUTPUT_DIR_VARIABLE) or os.environ.get(OUTPUT_DIR_ENV)
    if value:
        return value
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return os.path.join(home, "openai_batch_results")


def run_folder_name(run_id: str) -> str:
    """The run's folder name: the run id when it is filesystem-safe, else its safe form plus a short hash
    of the run id, so ``batch:1``, ``batch+1`` and ``batch_1`` never share (and overwrite) one folder."""
    from batchpipe.naming import unique_name

    return unique_name(run_id)


def run_location(params: Mapping[str, Any], run_id: str) -> storage.Location:
    """The run folder, ``<output_dir>/<input file stem>/<run folder name>`` (``output_dir`` empty: the
    default output folder), from the run's params (or its conf: ``input_csv``, ``output_dir``,
    ``storage_conn_id``)."""
    conn = params.get("storage_conn_id") or None
    stem, folder = storage.input_stem(params["input_csv"]), run_folder_name(run_id)
    return storage.location(params.get("output_dir") or default_output_dir(), conn) / stem / folder


def build_options(params: Mapping[str, Any]):
    """The library's build options from the params, checked. A CSV in object storage with no image
    folder given: relative image paths resolve against the CSV's own folder in the store."""
    from batchpipe.options import BuildOptions

    params = dict(params)
    if not params.get("image_base_dir"):
        params["image_base_dir"] = storage.store_folder_of(params["input_csv"])
    with fail_on_bad_input():
        opts = BuildOptions.from_dict(params)  # the build options among the params
        opts.validate()
    return opts


def _max_enqueued_tokens(params: Mapping[str, Any]) -> int | None:
    from batchpipe.errors import InputError
    from batchpipe.paths import clip

    value = params.get("max_enqueued_tokens") or variable(MAX_ENQUEUED_TOKENS_VARIABLE)
    if not value:
        return None
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if limit < 1:
        raise InputError(
            f"max_enqueued_tokens {clip(str(value), 80)!r} (param, else Variable "
            f"{MAX_ENQUEUED_TOKENS_VARIABLE}) is not a whole number of tokens of at least 1"
        )
    return limit


def shard_groups() -> int:
    """How many mapped task instances a run's shards get at most: :data:`SHARD_GROUPS_ENV`, else 64, and
    never more than ``[core] max_map_length`` (Airflow refuses to map over more)."""
    from airflow.configuration import conf

    from batchpipe.build import SHARD_GROUPS
    from batchpipe.errors import InputError

    value = os.environ.get(SHARD_GROUPS_ENV, "").strip() or str(SHARD_GROUPS)
    try:
        groups = int(value)
    except ValueError:
        groups = 0
    if groups < 1:
        raise InputError(f"{SHARD_GROUPS_ENV}={value[:40]!r} is not a whole number of at least 1")
    return min(groups, conf.getint("core", "max_map_length", fallback=1024))


def _model_check_on() -> bool:
    switch = variable(CHECK_MODEL_VARIABLE) or os.environ.get(CHECK_MODEL_ENV) or ""
    return switch.strip().lower() not in OFF


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline task needs to know about its run, typed; see :meth:`resolve`."""

    run_id: str
    #: Param ``input_csv`` as given (a local path or a URL).
    input_csv: str
    #: ``<output_dir>/<input file stem>/<run folder name>``: a Path, or an ObjectStoragePath.
    run_dir: storage.Location
    #: ``<work_dir>/<input file stem>/<run folder name>``, or ``<run_dir>/work`` without a work_dir.
    work_dir: storage.Location
    #: The connection for object-storage URLs (None: the URL's own or the filesystem's default).
    storage_conn_id: str | None
    #: The batch API's connection (param ``conn_id``, else the provider's :data:`DEFAULT_CONN_IDS`).
    conn_id: str
    #: Allowed input roots (None: anywhere): OPENAI_BATCH_ALLOWED_ROOTS plus the Variable.
    read_roots: Any
    #: Allowed output roots (None: anywhere): OPENAI_BATCH_OUTPUT_ROOTS plus the Variable.
    output_roots: Any
    #: The shipped, dated price table with param ``prices`` (else Variable) merged in.
    prices: Mapping[str, Any]
    #: The library's build options (:class:`batchpipe.options.BuildOptions`), checked.
    build: Any
    #: The enqueued prompt-token limit of the model; None: no limit.
    max_enqueued_tokens: int | None
    #: Whether validate asks the API about the model.
    check_model: bool
    completion_window: str
    check_interval: float
    estimate_only: bool
    keep_temp_files: bool
    csv_formula_escape: bool
    expected_output_tokens: int | None
    max_cost_usd: float | None
    #: Mapped task instances the shards get at most (:func:`shard_groups`): more shards are grouped.
    shard_groups: int = 64
    #: The answer cache's folder (a Path, or an ObjectStoragePath); None: no cache.
    cache_dir: storage.Location | None = None
    #: ``read_write``, ``read_only`` or ``refresh`` (:data:`batchpipe.cache.CACHE_MODES`).
    cache_mode: str = "read_write"

    def open_cache(self):
        """The run's answer cache (:class:`batchpipe.cache.AnswerCache` for a local folder, else
        :class:`~batchpipe.cache.ObjectAnswerCache`), None without one; a local cache that cannot be
        opened fails the task (a retry cannot fix it)."""
        if self.cache_dir is None:
            return None
        with fail_on_bad_input():
            return storage.answer_cache(self.cache_dir, self.cache_mode)

    @property
    def model(self) -> str:
        return self.build.model

    @property
    def endpoint(self) -> str:
        return self.build.endpoint

    @property
    def provider(self) -> str:
        """``openai``, ``azure_openai`` or ``anthropic``: whose batch API the run uses."""
        return self.build.provider

    def hook(self):
        """The run's batch-API hook (:func:`openai_batch_airflow.hooks.batch_hook`)."""
        from openai_batch_airflow.hooks import batch_hook

        return batch_hook(self.provider, self.conn_id)

    @classmethod
    def resolve(cls, params: Mapping[str, Any], run_id: str) -> RunConfig:
        """The run's settings from its ``params``, the Airflow Variables and the environment.

        Fails the task at once (AirflowFailException: a retry cannot fix them) on bad build options, a bad
        price override or token limit, an output or work folder that is not a usable location (a scheme
        nothing reads, a password in the URL) or lies outside the allowed output roots.
        """
        from batchpipe.estimate import load_prices, with_aliases
        from batchpipe.paths import PathNotAllowed, allowed_roots, check_within, output_roots

        build = build_options(params)
        conn = params.get("storage_conn_id") or None
        stem, folder = storage.input_stem(params["input_csv"]), run_folder_name(run_id)
        roots = output_roots(extra=variable(OUTPUT_ROOTS_VARIABLE))
        try:
            run_dir = run_location(params, run_id)
            check_within(str(run_dir), roots, "output folder")
            if params.get("work_dir"):
                work_dir = storage.location(params["work_dir"], conn) / stem / folder
                check_within(str(work_dir), roots, "work folder")
            else:
                work_dir = run_dir / "work"
            cache_mode = params.get("cache_mode") or "read_write"
            cache_dir = None
            where = params.get("cache_dir") or variable(CACHE_DIR_VARIABLE) or os.environ.get(CACHE_DIR_ENV)
            if where and cache_mode != "off":
                cache_dir = storage.location(where, conn)
                check_within(str(cache_dir), roots, "cache folder")
        except (PathNotAllowed, ValueError) as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(exc)) from exc
        with fail_on_bad_input():
            prices = load_prices(params.get("prices") or variable(PRICES_VARIABLE) or None)
            limit = _max_enqueued_tokens(params)
            groups = shard_groups()
        conn_id = params.get("conn_id") or DEFAULT_CONN_IDS[build.provider]
        if build.provider == "azure_openai":  # a deployment is priced as the model the connection names
            prices = with_aliases(prices, _deployments(conn_id))
        return cls(
            run_id=run_id,
            input_csv=str(params["input_csv"]),
            run_dir=run_dir,
            work_dir=work_dir,
            storage_conn_id=conn,
            conn_id=conn_id,
            read_roots=allowed_roots(extra=variable(ALLOWED_ROOTS_VARIABLE)),
            output_roots=roots,
            prices=prices,
            build=build,
            max_enqueued_tokens=limit,
            check_model=_model_check_on(),
            completion_window=params.get("completion_window") or "24h",
            check_interval=max(float(params.get("check_interval") or 60), 1.0),
            estimate_only=bool(params.get("estimate_only")),
            keep_temp_files=bool(params.get("keep_temp_files")),
            csv_formula_escape=params.get("csv_formula_escape", True) is not False,
            expected_output_tokens=params.get("expected_output_tokens"),
            max_cost_usd=params.get("max_cost_usd"),
            shard_groups=groups,
            cache_dir=cache_dir,
            cache_mode=cache_mode,
        )
