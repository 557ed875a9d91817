# syntax=docker/dockerfile:1
# encoding-service: a slim, non-root image. Settings are ENCODER_* environment variables.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --requirement requirements.txt
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
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ENCODER_PORT', '8000') + '/healthz', timeout=2)"]
CMD ["encoding-service", "serve"]
