#!/usr/bin/env bash
# Entrypoint of the node image: `starling node join` with the container's settings.
#
# The join URL is the first argument, else $STARLING_JOIN_URL, else the contents of the
# file $STARLING_JOIN_URL_FILE (compose mounts the coordinator's run directory, where
# `starling coordinator serve` writes join_url; the node waits up to
# $STARLING_JOIN_URL_WAIT_S seconds for it). Further arguments go to `starling node join`.
set -euo pipefail

url=""
if [[ $# -gt 0 && "$1" == starling://* ]]; then
  url="$1"
  shift
elif [[ -n "${STARLING_JOIN_URL:-}" ]]; then
  url="$STARLING_JOIN_URL"
elif [[ -n "${STARLING_JOIN_URL_FILE:-}" ]]; then
  deadline=$((SECONDS + ${STARLING_JOIN_URL_WAIT_S:-120}))
  until [[ -s "$STARLING_JOIN_URL_FILE" ]]; do
    if ((SECONDS >= deadline)); then
      echo "error: $STARLING_JOIN_URL_FILE did not appear; is the coordinator serving?" >&2
      exit 2
    fi
    sleep 1
  done
  url="$(<"$STARLING_JOIN_URL_FILE")"
fi
if [[ -z "$url" ]]; then
  echo "error: no join URL: pass starling://... as the first argument or set STARLING_JOIN_URL" >&2
  exit 2
fi

args=(node join "$url" --work-dir "${STARLING_WORK_DIR:-/data}")
args+=(--peer-port "${STARLING_PEER_PORT:-0}")
if [[ -n "${STARLING_ADVERTISE_HOST:-}" ]]; then
  args+=(--advertise-host "$STARLING_ADVERTISE_HOST")
fi
if [[ -n "${STARLING_METRICS_PORT:-}" ]]; then
  args+=(--metrics-port "$STARLING_METRICS_PORT" --metrics-host "${STARLING_METRICS_HOST:-0.0.0.0}")
fi
if [[ -n "${STARLING_DEVICE:-}" ]]; then
  args+=(--device "$STARLING_DEVICE")
fi
exec starling "${args[@]}" "$@"
