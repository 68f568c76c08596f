# Batchery's images, one per role, from one Dockerfile (docs/operations.md, "Images"):
#   docker build -t batchery:latest .                            the worker with TensorFlow
#       (Keras and LiteRT versions), also the producer's CLI and the gateway
#   docker build --target lite -t batchery-lite:latest .         a worker without TensorFlow:
#       LiteRT (.tflite) versions only
#   docker build --target gateway -t batchery-gateway:latest .   `batchery serve` and the
#       producer's CLI, no model runtime
# The full worker is the last stage, so a plain `docker build .` (and compose's `build: .`)
# builds it. `batchery` is every image's entrypoint.

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 batchery
WORKDIR /app
# The model registry is baked in at /app/models; mount a volume there to manage it live.
ENV BATCHERY_MODEL_DIR=/app/models
ENTRYPOINT ["batchery"]

# The code, the same in every image (under a megabyte; a gateway image also carries worker/,
# unused there, so that `pip install -e .` finds every package pyproject.toml names).
FROM scratch AS code
COPY pyproject.toml README.md /app/
COPY producer /app/producer
COPY gateway /app/gateway
COPY batchery /app/batchery
COPY worker /app/worker
COPY bench /app/bench
COPY models /app/models
COPY examples /app/examples

# Dependencies first in every image, so code changes don't reinstall them: exactly the
# versions and hashes of that image's lock (`make lock` refreshes them; lite.txt and
# gateway.txt hold the versions worker.txt has).

# The gateway: a producer, no TensorFlow and no LiteRT.
FROM base AS gateway
COPY requirements/gateway.txt requirements/gateway.txt
RUN pip install --require-hashes -r requirements/gateway.txt
COPY --from=code /app /app
# Editable, so the package finds /app/models and /app/examples beside it; its dependencies
# are the lock's, installed above.
RUN pip install --no-deps -e .
USER batchery
# Refuses a non-loopback address without BATCHERY_API_KEYS (or --allow-unauthenticated).
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# The LiteRT worker's dependencies: the full worker is built on them too, so the two images
# share this layer.
FROM base AS lite-deps
COPY requirements/lite.txt requirements/lite.txt
RUN pip install --require-hashes -r requirements/lite.txt

# A worker without TensorFlow: it serves LiteRT model versions only.
FROM lite-deps AS lite
COPY --from=code /app /app
RUN pip install --no-deps -e .
USER batchery
CMD ["worker"]

# The full worker (also the producer's CLI and the gateway): TensorFlow on top of the lite
# worker's dependencies. TENSORFLOW replaces the CPU build (docker-compose.gpu.yml sets it to
# the CUDA build, unlocked).
FROM lite-deps AS worker
ARG TENSORFLOW=""
COPY requirements/worker.txt requirements/worker.txt
RUN pip install --require-hashes -r requirements/worker.txt \
    && if [ -n "$TENSORFLOW" ]; then \
         pip uninstall -y tensorflow-cpu && pip install "$TENSORFLOW"; \
       fi
COPY --from=code /app /app
RUN pip install --no-deps -e .
USER batchery
CMD ["worker"]
