# A Starling coordinator: membership, data, rounds, checkpoints and the dashboard. The
# same slim CPU image runs CPU nodes too (entrypoint starling-node-entrypoint; see
# compose.yaml).
#
#   docker build -f docker/coordinator.Dockerfile -t starling-coordinator .
#   docker run -v starling-run:/run-dir -p 7443:7443 -p 8080:8080 \
#     -e STARLING_ADVERTISE_HOST=run.example.org starling-coordinator
#
# On first start it creates the run in the volume (from /config/run.toml when one is
# mounted, else the defaults on the embedded corpus); later starts resume it.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY node ./node
COPY coordinator ./coordinator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=build /wheels /tmp/wheels
# The coordinator never trains: PyTorch's CPU build is enough (and a tenth the size).
RUN pip install --no-cache-dir torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1000 starling \
    && mkdir -p /run-dir /data && chown starling:starling /run-dir /data
COPY --chmod=755 docker/coordinator-entrypoint.sh /usr/local/bin/starling-coordinator-entrypoint
COPY --chmod=755 docker/node-entrypoint.sh /usr/local/bin/starling-node-entrypoint
USER 1000:1000
ENV STARLING_RUN_DIR=/run-dir \
    STARLING_CONFIG=/config/run.toml \
    STARLING_GRPC_PORT=7443 \
    STARLING_HTTP_PORT=8080 \
    PYTHONUNBUFFERED=1
# /data: a CPU node's work dir (identity and caches) when the image runs a node.
VOLUME ["/run-dir", "/data"]
# gRPC (nodes) and HTTP (dashboard, JSON API, /metrics).
EXPOSE 7443 8080
# gRPC's health service, over TLS pinned to the run's own certificate.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["starling", "coordinator", "health", "/run-dir"]
ENTRYPOINT ["/usr/local/bin/starling-coordinator-entrypoint"]
