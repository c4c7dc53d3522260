#!/usr/bin/env bash
# Starts a complete local cluster on the default model: one prefill worker,
# one decode worker and the router, as separate processes on 127.0.0.1.
# Ctrl-C stops all three.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
port="${PORT:-8000}"
model="$(scripts/fetch-model.sh)"
cargo build --release --bins --locked
bin="${CARGO_TARGET_DIR:-$root/target}/release"

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

"$bin/prefill-worker" --model "$model" --listen 127.0.0.1:7001 --kv-listen 127.0.0.1:7101 & pids+=($!)
"$bin/decode-worker" --model "$model" --listen 127.0.0.1:7002 & pids+=($!)
"$bin/router" --host 127.0.0.1 --port "$port" --prefill http://127.0.0.1:7001 --decode http://127.0.0.1:7002 & pids+=($!)

until curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1; do
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a process exited during start-up" >&2; exit 1; }; done
  sleep 0.5
done
name="$(curl -s "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
cat <<MSG

Cluster ready: http://127.0.0.1:$port  (model: $name)
Try:
  curl http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$name", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
Ctrl-C stops the cluster.
MSG
wait -n "${pids[@]}"
