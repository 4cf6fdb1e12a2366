# syntax=docker/dockerfile:1
# Tandem's image: the dependencies are built in one stage; the runtime stage
# holds only them and the server's own files, and runs as a non-root user.
# Build: docker build -t tandem .   Run: docker run -p 3001:3001 -v tandem-data:/data tandem

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# The lock pins every package, transitive ones included, by version and hash.
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/requirements.lock

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=3001 \
    DATA_DIR=/data \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid tandem --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tandem \
    && mkdir /data \
    && chown tandem:tandem /data
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY *.py ./
COPY static ./static
COPY sql ./sql
USER tandem:tandem
# The embedded store (SQLite) and its lock live here; one container per volume.
VOLUME ["/data"]
EXPOSE 3001
# SIGTERM starts the drain (readiness fails, PRE_DRAIN_DELAY, sockets closed
# with 1012) within SHUTDOWN_GRACE: give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
# Liveness with the image's own Python (no curl): exit 0 when /health/live answers 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '3001') + '/health/live', timeout=2)"]
CMD ["python", "server.py"]
