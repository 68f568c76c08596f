# Batchery worker and producer image: `batchery` is the entrypoint, `worker` the default command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 batchery
WORKDIR /app

# Dependencies first, so code changes don't reinstall TensorFlow: exactly the versions and
# hashes of the lock (the worker and signing extras; `make lock` refreshes it). TENSORFLOW
# replaces the CPU build (docker-compose.gpu.yml sets it to the CUDA build, unlocked).
ARG TENSORFLOW=""
COPY requirements/worker.txt requirements/worker.txt
RUN pip install --require-hashes -r requirements/worker.txt \
    && if [ -n "$TENSORFLOW" ]; then \
         pip uninstall -y tensorflow-cpu && pip install "$TENSORFLOW"; \
       fi

COPY pyproject.toml README.md ./
COPY producer producer
COPY gateway gateway
COPY batchery batchery
COPY worker worker
COPY bench bench
COPY models models
COPY examples examples
# Editable, so the package finds /app/models and /app/examples beside it; its dependencies
# are the lock's, installed above.
RUN pip install --no-deps -e .

USER batchery
# The model registry is baked in at /app/models; mount a volume there to manage it live.
ENV BATCHERY_MODEL_DIR=/app/models
ENTRYPOINT ["batchery"]
CMD ["worker"]
