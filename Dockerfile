# Airflow image for the OpenAI Batch pipeline: the official image plus this project's pins and packages.
#
#   docker compose build            (docker-compose.yaml builds and tags it for every Airflow service)
#   docker build -t openai-batch-pipeline-airflow .
#
# The official image already ships the `celery`, `postgres` and `redis` extras, built against the
# constraints of its Airflow version: the Celery provider, celery[redis] + kombu, flower,
# psycopg2-binary (SQLAlchemy driver for the metadata DB and the Celery result backend) and redis
# (the Celery broker client). We rely on those. psycopg2-binary and redis are named below unpinned
# only so pip fails loudly if a base image ever lacks them; pip keeps an installed version that
# satisfies the requirement, so the image's own constraint-pinned copies stay.
FROM apache/airflow:3.3.2-python3.11

# 1. Third-party pins, exactly as tested locally (requirements.txt), plus the Celery executor's
#    provider pinned to the version pip resolves for apache-airflow 3.3.2 (3.26.0, which needs
#    apache-airflow>=2.11.0 and celery[redis]>=5.5,<6). "apache-airflow==${AIRFLOW_VERSION}" stops
#    pip from ever up- or downgrading the Airflow the image was built with (official advice).
COPY --chown=airflow:0 requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r /tmp/requirements.txt \
        "apache-airflow-providers-celery==3.26.0" \
        psycopg2-binary \
        redis

# 2. This project's packages, installed NON-editable: batchpipe and local_batch_server (from
#    include/) and openai_batch_airflow (from plugins/). Every container built from this image can
#    import them with no bind mounts (the Kubernetes executor's pods, a worker on another host).
#    docker-compose.yaml additionally mounts ./include and ./plugins and puts them first on
#    PYTHONPATH, so during development the mounted sources shadow these copies (edit, no rebuild).
#    --no-deps: the dependencies are the pins installed above.
COPY --chown=airflow:0 pyproject.toml /tmp/openai-batch-pipeline/pyproject.toml
COPY --chown=airflow:0 include/batchpipe /tmp/openai-batch-pipeline/include/batchpipe
COPY --chown=airflow:0 include/local_batch_server /tmp/openai-batch-pipeline/include/local_batch_server
COPY --chown=airflow:0 plugins/openai_batch_airflow /tmp/openai-batch-pipeline/plugins/openai_batch_airflow
RUN pip install --no-cache-dir --no-deps /tmp/openai-batch-pipeline \
    && rm -rf /tmp/openai-batch-pipeline /tmp/requirements.txt \
    && cd / \
    && python -c "import importlib.metadata as md, importlib.util as u; \
print({d: md.version(d) for d in ('apache-airflow', 'apache-airflow-providers-celery', 'celery', \
'psycopg2-binary', 'redis', 'openai-batch-pipeline')}); \
missing = [m for m in ('batchpipe', 'local_batch_server', 'openai_batch_airflow') if u.find_spec(m) is None]; \
assert not missing, missing"
