"""The container set-up: Dockerfile, docker-compose.yaml and .env.example, checked without a Docker engine."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
REQUIREMENTS = REPO / "requirements.txt"

AIRFLOW_VERSION = "3.3.2"
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "flower",
)
SERVICES = ("postgres", "redis", *AIRFLOW_SERVICES, "local-batch-server")
#: host folder -> where every Airflow container sees it
MOUNTS = {
    "./dags": "/opt/airflow/dags",
    "./plugins": "/opt/airflow/plugins",
    "./include": "/opt/airflow/include",
    "./data": "/opt/airflow/data",
    "./logs": "/opt/airflow/logs",
}
#: something that looks like a real OpenAI key (the placeholder `sk-...` does not)
REAL_KEY = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as compose sees it, YAML merge keys (`<<: *anchor`) resolved."""
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def volumes_of(service: dict) -> dict[str, str]:
    """Bind mounts as {host path: container path}, with `${AIRFLOW_PROJ_DIR:-.}` read as `.`."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.replace("${AIRFLOW_PROJ_DIR:-.}", ".").split(":")[:2]
        mounts[source] = target
    return mounts


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(args.split())))
    return result


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def env_example() -> tuple[dict[str, str], list[str]]:
    """Active `KEY=value` lines of .env.example, and the commented-out ones."""
    active, commented = {}, []
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            commented.append(stripped.lstrip("# "))
        elif "=" in stripped:
            key, _, value = stripped.partition("=")
            active[key] = value
    return active, commented


# --- services and the common anchor ------------------------------------------------------------------


def test_all_services_exist(services):
    assert set(SERVICES) <= set(services), set(SERVICES) - set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"].startswith("redis:")
    assert services["flower"]["profiles"] == ["flower"], "flower is optional, under a profile"


def test_every_airflow_service_merges_the_x_airflow_common_anchor():
    # The composed node graph keeps aliases: `<<: *airflow-common` is the very node of x-airflow-common.
    root = yaml.compose(COMPOSE_FILE.read_text(encoding="utf-8"))
    top = {key.value: value for key, value in root.value}
    common = top["x-airflow-common"]
    service_nodes = {key.value: value for key, value in top["services"].value}
    for name in AIRFLOW_SERVICES:
        merged = [value for key, value in service_nodes[name].value if key.value == "<<"]
        assert merged and merged[0] is common, f"{name} does not use <<: *airflow-common"


def test_airflow_services_share_image_env_mounts_and_user(compose, services):
    common = compose["x-airflow-common"]
    assert common["build"]["context"] == "."
    for name in AIRFLOW_SERVICES:
        service = services[name]
        assert service["image"] == common["image"], name
        assert service["build"] == common["build"], name
        assert env_of(service).items() >= env_of(common).items(), f"{name} drops common environment"
        if name != "airflow-init":  # init runs as root to chown the volumes, like the official file
            assert service["user"] == common["user"] == "${AIRFLOW_UID:-50000}:0", name


def test_long_running_services_have_healthchecks(services):
    for name in set(SERVICES) - {"airflow-init"}:
        test = services[name].get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"


def test_airflow_services_wait_for_healthy_db_and_broker_and_for_init(services):
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        if name != "airflow-init":
            assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"


# --- executor, DB, broker, execution API ---------------------------------------------------------------


def test_celery_executor_with_postgres_db_and_redis_broker(compose, services):
    env = env_of(compose["x-airflow-common"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"

    db = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert db.scheme.startswith("postgresql") and db.hostname == "postgres"
    assert "postgres" in services

    backend = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"])
    assert backend.scheme == "db+postgresql" and backend.hostname == "postgres"

    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379
    assert "redis" in services

    db_env = services["postgres"]["environment"]
    assert (db.username, db.password, db.path.lstrip("/")) == (
        db_env["POSTGRES_USER"],
        db_env["POSTGRES_PASSWORD"],
        db_env["POSTGRES_DB"],
    )


def test_execution_api_url_points_at_the_apiserver_service(compose, services):
    url = urlsplit(env_of(compose["x-airflow-common"])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http",
        "airflow-apiserver",
        8080,
        "/execution/",
    )
    apiserver = services["airflow-apiserver"]
    assert command_of(apiserver) == ["api-server"]
    assert "8080:8080" in apiserver["ports"]


def test_one_jwt_secret_from_env_for_every_component(compose, services):
    secret = env_of(compose["x-airflow-common"])["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert secret.startswith("${AIRFLOW__API_AUTH__JWT_SECRET"), "must come from .env, not be written here"
    for name in AIRFLOW_SERVICES:
        assert env_of(services[name])["AIRFLOW__API_AUTH__JWT_SECRET"] == secret, name


def test_core_settings(compose):
    env = env_of(compose["x-airflow-common"])
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "true"
    assert env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"


def test_worker_runs_celery_worker_and_other_commands(services):
    assert command_of(services["airflow-worker"]) == ["celery", "worker"]
    assert command_of(services["airflow-scheduler"]) == ["scheduler"]
    assert command_of(services["airflow-dag-processor"]) == ["dag-processor"]
    assert command_of(services["airflow-triggerer"]) == ["triggerer"]
    assert command_of(services["flower"]) == ["celery", "flower"]


# --- mounts, PYTHONPATH, outputs ------------------------------------------------------------------------


def test_dags_plugins_include_data_logs_are_mounted_in_every_airflow_service(services):
    for name in AIRFLOW_SERVICES:
        mounts = volumes_of(services[name])
        for host, target in MOUNTS.items():
            assert mounts.get(host) == target, f"{name}: {host} not mounted at {target}"
    for host in MOUNTS:
        if host != "./logs":  # created by airflow-init at first start
            assert (REPO / host).is_dir(), f"{host} missing in the repo"


def test_pythonpath_makes_the_mounted_include_and_plugins_importable(compose, services):
    env = env_of(compose["x-airflow-common"])
    entries = env["PYTHONPATH"].split(":")
    assert MOUNTS["./include"] in entries and MOUNTS["./plugins"] in entries
    for name in AIRFLOW_SERVICES:
        assert env_of(services[name])["PYTHONPATH"] == env["PYTHONPATH"], name

    # Map the container paths back to the repo and look the packages up there only:
    # -S keeps site-packages (and this venv's editable install) out of sys.path.
    to_host = {target: str(REPO / host) for host, target in MOUNTS.items()}
    host_path = ":".join(to_host.get(entry, entry) for entry in entries)
    probe = (
        "import importlib.util as u, sys; "
        "specs = {m: u.find_spec(m) for m in ('batchpipe', 'local_batch_server', 'openai_batch_airflow')}; "
        "missing = [m for m, s in specs.items() if s is None]; "
        "sys.exit(', '.join(missing) or None)"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env={"PYTHONPATH": host_path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"not importable from PYTHONPATH: {result.stderr}"


def _default(value: str) -> str:
    """What compose makes of `${VAR:-default}` when VAR is not set in .env."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


def test_outputs_go_to_the_shared_data_volume(compose):
    env = env_of(compose["x-airflow-common"])
    data = MOUNTS["./data"]
    assert env["OPENAI_BATCH_OUTPUT_DIR"] == f"{data}/output"
    assert env["OPENAI_BATCH_OUTPUT_DIR"].startswith(_default(env["OPENAI_BATCH_OUTPUT_ROOTS"]))
    assert _default(env["OPENAI_BATCH_ALLOWED_ROOTS"]) == data
    # .env may widen both (e.g. to an s3:// prefix) and bring the aws connection
    assert env["OPENAI_BATCH_OUTPUT_ROOTS"].startswith("${OPENAI_BATCH_OUTPUT_ROOTS:-")
    assert env["AIRFLOW_CONN_AWS_DEFAULT"] == "${AIRFLOW_CONN_AWS_DEFAULT:-}"


# --- the OpenAI connection and secrets ------------------------------------------------------------------


def test_openai_connection_comes_from_the_environment(compose, services):
    value = env_of(compose["x-airflow-common"])["AIRFLOW_CONN_OPENAI_DEFAULT"]
    assert re.fullmatch(r"\$\{AIRFLOW_CONN_OPENAI_DEFAULT(:-)?\}", value), value
    for name in AIRFLOW_SERVICES:
        assert env_of(services[name])["AIRFLOW_CONN_OPENAI_DEFAULT"] == value, name


def test_no_api_key_in_compose_or_env_example():
    compose_text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "sk-" not in compose_text
    assert "OPENAI_API_KEY" not in compose_text
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert not REAL_KEY.search(example), "a real-looking key in .env.example"
    assert not REAL_KEY.search(DOCKERFILE.read_text(encoding="utf-8"))


def test_env_example_documents_every_setting_compose_needs():
    active, commented = env_example()
    for key in (
        "AIRFLOW_UID",
        "_AIRFLOW_WWW_USER_USERNAME",
        "_AIRFLOW_WWW_USER_PASSWORD",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW_CONN_OPENAI_DEFAULT",
    ):
        assert key in active, key
    # every variable compose insists on (`${VAR:?message}`) is in .env.example
    required = re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text(encoding="utf-8"))
    assert required and set(required) <= set(active)


def test_env_example_connections_target_the_local_server_and_openai(services):
    active, commented = env_example()
    offline = json.loads(active["AIRFLOW_CONN_OPENAI_DEFAULT"].strip("'"))
    assert offline["conn_type"] == "openai"
    host = urlsplit(offline["host"])
    server = services["local-batch-server"]
    port = command_of(server)[command_of(server).index("--port") + 1]
    assert (host.hostname, str(host.port), host.path) == ("local-batch-server", port, "/v1")
    assert offline["password"] and not offline["password"].startswith("sk-")

    online = [line for line in commented if line.startswith("AIRFLOW_CONN_OPENAI_DEFAULT=")]
    assert online, "no commented example for the real OpenAI API"
    real = json.loads(online[0].partition("=")[2].strip("'"))
    assert real["conn_type"] == "openai" and real["host"] == "https://api.openai.com/v1"
    assert real["password"] == "sk-...", "placeholder only"


# --- the local batch server -----------------------------------------------------------------------------


def test_local_batch_server_is_optional_under_the_offline_profile(compose, services):
    server = services["local-batch-server"]
    assert server["profiles"] == ["offline"]
    assert server["image"] == compose["x-airflow-common"]["image"], "same image as Airflow"
    command = command_of(server)
    assert command[:3] == ["python", "-m", "local_batch_server"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert options["--host"] == "0.0.0.0"
    assert options["--port"] == "8765"
    assert options["--data-dir"].startswith(MOUNTS["./data"] + "/")
    assert volumes_of(server)["./data"] == MOUNTS["./data"]
    # no Airflow service needs it: the default (online) stack starts without the profile
    for name in AIRFLOW_SERVICES:
        assert "local-batch-server" not in services[name].get("depends_on", {}), name


# --- the Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_starts_from_the_official_airflow_image():
    instructions = dockerfile_instructions()
    froms = [args for instruction, args in instructions if instruction == "FROM"]
    assert froms == [f"apache/airflow:{AIRFLOW_VERSION}-python3.11"]
    assert requirement_pins()["apache-airflow"] == AIRFLOW_VERSION, "image and requirements.txt disagree"


def test_dockerfile_installs_requirements_txt_and_the_pinned_celery_provider():
    instructions = dockerfile_instructions()
    copied = {}
    for instruction, args in instructions:
        if instruction == "COPY":
            parts = [part for part in args.split() if not part.startswith("--")]
            copied[parts[0]] = parts[-1]
    assert "requirements.txt" in copied, "requirements.txt is not copied into the image"
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    install = next((run for run in runs if f"-r {copied['requirements.txt']}" in run), None)
    assert install, "requirements.txt is copied but never pip-installed"
    assert "pip install" in install
    # Airflow itself held at the image's version, as the official docs advise
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install

    celery = re.search(r"apache-airflow-providers-celery==([\w.]+)", install)
    assert celery, "the Celery provider must be pinned exactly"
    # Anything the Dockerfile pins itself must agree with requirements.txt.
    pins = requirement_pins()
    for name, version in re.findall(r"([A-Za-z0-9][\w.\-]*)==([\w.]+)", install):
        normalized = re.sub(r"[-_.]+", "-", name).lower()
        if normalized in pins:
            assert pins[normalized] == version, (
                f"{name}: Dockerfile {version}, requirements.txt {pins[normalized]}"
            )


def test_requirements_txt_pins_what_the_image_needs():
    # requirements.txt is the image's dependency set: everything the DAG, plugins and server import.
    pins = requirement_pins()
    for name in (
        "apache-airflow",
        "apache-airflow-providers-openai",
        "openai",
        "pandas",
        "fastapi",
        "uvicorn",
        "apache-airflow-providers-amazon",  # s3:// through ObjectStoragePath
        "s3fs",
    ):
        assert re.fullmatch(r"\d+(\.\w+)+", pins.get(name, "")), f"{name} not pinned in requirements.txt"
    lines = [line.strip() for line in REQUIREMENTS.read_text().splitlines()]
    unpinned = [line for line in lines if line and not line.startswith("#") and "==" not in line]
    assert not unpinned, unpinned


def test_dockerfile_installs_the_project_packages_non_editable():
    instructions = dockerfile_instructions()
    sources = [args.split()[-2] for instruction, args in instructions if instruction == "COPY"]
    for needed in (
        "pyproject.toml",
        "include/batchpipe",
        "include/local_batch_server",
        "plugins/openai_batch_airflow",
    ):
        assert needed in sources, f"{needed} not copied into the image"
        assert (REPO / needed).exists(), needed
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert re.search(r"pip install --no-cache-dir --no-deps /\S+", runs)
    assert " -e " not in runs and "--editable" not in runs


# --- docker compose itself ----------------------------------------------------------------------------------


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the `docker compose` plugin is not installed")
def test_docker_compose_config_accepts_the_file():
    # Parses, interpolates and validates against the compose schema; needs no Docker engine.
    result = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(ENV_EXAMPLE),
            "--profile",
            "offline",
            "--profile",
            "flower",
            "config",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
