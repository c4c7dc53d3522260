#!/usr/bin/env bash
# Starts a complete local cluster on the default model: one prefill worker, one decode worker and
# the router, as separate processes on 127.0.0.1, after installing what the build needs
# (scripts/setup.sh serve) and building the release binaries. Ctrl-C stops all three.
#
#   PORT      the router's port (8000); the workers take 7001 (gRPC) / 7101 (kv-transfer) and 7002.
#   Each process logs to .cache/serve/<name>.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
port="${PORT:-8000}"
logs="$root/.cache/serve"
say() { echo "==> $*" >&2; }

say "[1/4] set-up: the build's protoc and the default model (scripts/setup.sh serve)"
scripts/setup.sh serve
model="$(scripts/fetch-model.sh)"

say "[2/4] building the release binaries (cargo build --release; about 7 minutes the first time on 2 cores, seconds after)"
cargo build --release --bins --locked
bin="${CARGO_TARGET_DIR:-$root/target}/release"

for p in "$port" 7001 7101 7002; do
  if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5)' "$p" 2>/dev/null; then
    echo "port $p on 127.0.0.1 is taken (another cluster still running?); PORT=... moves the router" >&2
    exit 1
  fi
done

say "[3/4] starting prefill-worker (127.0.0.1:7001, kv-transfer :7101), decode-worker (:7002), router (:$port); logs in ${logs#"$root"/}/"
mkdir -p "$logs"
names=()
pids=()
start() {
  local name="$1"
  shift
  "$bin/$name" "$@" >"$logs/$name.log" 2>&1 &
  names+=("$name")
  pids+=($!)
}
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 0' INT TERM
# The process that exited, with the end of its log.
died() {
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "${names[$i]} exited $1; the end of ${logs#"$root"/}/${names[$i]}.log:" >&2
      tail -n 20 "$logs/${names[$i]}.log" >&2
      return
    fi
  done
}

start prefill-worker --model "$model" --listen 127.0.0.1:7001 --kv-listen 127.0.0.1:7101
start decode-worker --model "$model" --listen 127.0.0.1:7002
start router --host 127.0.0.1 --port "$port" --prefill http://127.0.0.1:7001 --decode http://127.0.0.1:7002

say "[4/4] waiting for the workers to load the model and the router to see them"
url="http://127.0.0.1:$port"
# The model's name once the router is ready (its /v1/models), else nothing.
ready_model() {
  python3 - "$url" <<'PY' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/ready", timeout=2) as r:
    assert r.status == 200
with urllib.request.urlopen(sys.argv[1] + "/v1/models", timeout=2) as r:
    print(json.load(r)["data"][0]["id"])
PY
}
started=$SECONDS
until name="$(ready_model)"; do
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { died "during start-up"; exit 1; }
  done
  sleep 0.3
done
cat <<MSG

Cluster ready in $((SECONDS - started)) s: $url  (model: $name)
  prefill-worker 127.0.0.1:7001 (kv-transfer 7101), decode-worker 127.0.0.1:7002; logs in ${logs#"$root"/}/

Try:
  curl $url/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$name", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "max_tokens": 32, "temperature": 0}'

Ctrl-C (or kill $$) stops the cluster.
MSG
set +e
wait -n "${pids[@]}"
died "unexpectedly"
exit 1
