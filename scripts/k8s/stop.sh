#!/usr/bin/env bash
# Stop a control plane started by scripts/k8s/start.sh STATE_DIR (only its own
# processes, by the pids it recorded). All are asked to stop at once and given four
# seconds together (not four each, one after another: a test session's teardown
# waited 8 s), then killed.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
S=$1
pids=()
for name in sched kcm apiserver etcd; do
  f="$S/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  pids+=("$pid")
  rm -f "$f"
done
for _ in $(seq 40); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" -eq 1 ] || break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
