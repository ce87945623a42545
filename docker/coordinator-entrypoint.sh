#!/usr/bin/env bash
# Entrypoint of the coordinator image: create the run on first start, then serve it.
#
# $STARLING_RUN_DIR (a volume) holds the run; on first start it is created from
# $STARLING_CONFIG when that file exists (mount your run.toml there), else from the
# defaults (the `tiny` preset on the embedded corpus). Later starts resume the run.
# Further arguments go to `starling coordinator serve`.
set -euo pipefail

run_dir="${STARLING_RUN_DIR:-/run-dir}"
config="${STARLING_CONFIG:-/config/run.toml}"
if [[ ! -f "$run_dir/coordinator.db" ]]; then
  init=(coordinator init "$run_dir")
  if [[ -f "$config" ]]; then
    init+=(--config "$config")
  fi
  starling "${init[@]}"
fi

args=(coordinator serve "$run_dir" --host "${STARLING_HOST:-0.0.0.0}")
args+=(--grpc-port "${STARLING_GRPC_PORT:-7443}" --http-port "${STARLING_HTTP_PORT:-8080}")
if [[ -n "${STARLING_ADVERTISE_HOST:-}" ]]; then
  args+=(--advertise-host "$STARLING_ADVERTISE_HOST")
fi
exec starling "${args[@]}" "$@"
