# Batchery worker and producer image: `batchery` is the entrypoint, `worker` the default command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 batchery
WORKDIR /app

# Dependencies first, so code changes don't reinstall TensorFlow. TENSORFLOW replaces the
# CPU build (docker-compose.gpu.yml sets it to the CUDA build).
ARG TENSORFLOW=""
COPY pyproject.toml README.md ./
COPY producer/__init__.py producer/__init__.py
COPY worker/__init__.py worker/__init__.py
RUN pip install ".[worker,signing]" && pip uninstall -y batchery \
    && if [ -n "$TENSORFLOW" ]; then \
         pip uninstall -y tensorflow-cpu && pip install "$TENSORFLOW"; \
       fi

COPY producer producer
COPY worker worker
COPY models models
COPY examples examples
# Editable, so the package finds /app/models and /app/examples beside it.
RUN pip install --no-deps -e ".[worker,signing]"

USER batchery
# The model registry is baked in at /app/models; mount a volume there to manage it live.
ENV BATCHERY_MODEL_DIR=/app/models
ENTRYPOINT ["batchery"]
CMD ["worker"]
