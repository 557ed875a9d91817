# syntax=docker/dockerfile:1
# encoding-service: a slim, non-root image. Settings are ENCODER_* environment variables.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, the versions uv.lock pins (with their hashes), so that a code change does
# not reinstall them and a build installs what CI tested. uv only exports the lock, from a venv of
# its own that stays in this stage.
COPY pyproject.toml uv.lock ./
RUN python -m venv /opt/uv && /opt/uv/bin/pip install uv==0.13.9 \
    && /opt/uv/bin/uv export --frozen --no-dev --no-emit-project --extra otel --format requirements-txt -o requirements.txt \
    && pip install --require-hashes --no-deps --requirement requirements.txt
COPY README.md ./
COPY service ./service
RUN pip install --no-deps . && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ENCODER_HOST=0.0.0.0 \
    ENCODER_PORT=8000 \
    ENCODER_LOG_FORMAT=json
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin encoder
COPY --from=build /opt/venv /opt/venv
USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ENCODER_PORT', '8000') + '/healthz', timeout=2)"]
CMD ["encoding-service", "serve"]
