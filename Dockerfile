# rqworkers: Redis-backed reliable queue consumer service.
#   docker build -t rqworkers .
#   docker run --rm -e REDIS_URL=redis://redis-host:6379/0 rqworkers
# The config is read from /app/config/rqworkers.toml (docker-compose mounts ./config there).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user that runs the service; /app stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 rqworkers \
    && useradd --system --uid 10001 --gid rqworkers --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rqworkers \
    && install -d -o rqworkers -g rqworkers -m 0755 /run/rqworkers
# The pid file (for `rqworkers reload`) in a directory of its own, which only rqworkers writes.
ENV RQWORKERS_PID_FILE=/run/rqworkers/rqworkers.pid

WORKDIR /app
# What gets copied is trimmed by .dockerignore (no .git, venvs, tests, caches).
COPY . /app
# Optional extras, e.g. `docker build --build-arg EXTRAS=otel` for tracing (docs/tracing.md).
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && rm -rf /app/build /app/*.egg-info

# By number: a pod with runAsNonRoot can then verify it is no root (a name cannot be checked).
USER 10001:10001
# rqworkers drains in-flight messages on SIGTERM; docker-compose allows it 40s (stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["rqworkers", "run", "--config", "/app/config/rqworkers.toml"]
