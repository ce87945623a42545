# A Starling node with CUDA: `docker run --gpus all` joins a run and trains on the GPU.
#
#   docker build -f docker/node.Dockerfile -t starling-node .
#   docker run --gpus all -v starling-node:/data -p 7444:7444 \
#     -e STARLING_ADVERTISE_HOST=<your public address> \
#     starling-node 'starling://run.example.org:7443?fp=sha256:...' --upload-mbps 20
#
# The volume keeps the node's identity (its Ed25519 key) and caches across restarts.

# Build stage: a wheel of the project, so the runtime image holds no source tree or
# build tools.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY node ./node
COPY coordinator ./coordinator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Runtime: PyTorch with CUDA (torch is already installed there, so pip keeps it).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1000 starling \
    && mkdir -p /data && chown starling:starling /data
COPY --chmod=755 docker/node-entrypoint.sh /usr/local/bin/starling-node-entrypoint
USER 1000:1000
ENV STARLING_WORK_DIR=/data \
    STARLING_PEER_PORT=7444 \
    STARLING_METRICS_PORT=9100 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
# The peer service (other nodes fetch this node's shard means) and Prometheus metrics.
EXPOSE 7444 9100
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['STARLING_METRICS_PORT'], timeout=5)"]
ENTRYPOINT ["/usr/local/bin/starling-node-entrypoint"]
