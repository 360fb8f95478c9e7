#!/usr/bin/env bash
# `make run`: serve on 127.0.0.1:50051 with the committed default model. Without GATE_REDIS_URL,
# a throw-away redis-server (no persistence) is started on a free port and stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

if [ -z "${GATE_REDIS_URL:-}" ]; then
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "refund-gate: no GATE_REDIS_URL and no redis-server binary." >&2
    echo "  Install one (Debian/Ubuntu: sudo apt-get install -y redis-server; macOS: brew install redis)" >&2
    echo "  or point the gate at a Redis: GATE_REDIS_URL=redis://host:6379/0 make run" >&2
    exit 2
  fi
  port=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  dir=$(mktemp -d)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --daemonize no --logfile "$dir/redis.log" &
  redis_pid=$!
  trap 'kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; rm -rf "$dir"' EXIT
  export GATE_REDIS_URL="redis://127.0.0.1:${port}/0"
  echo "refund-gate: started a throw-away redis-server on 127.0.0.1:${port} (data is not kept)" >&2
fi

"$BIN/refund-gate" serve "$@" &
gate_pid=$!
trap 'kill -TERM "$gate_pid" 2>/dev/null || true' INT TERM
wait "$gate_pid"
