#!/usr/bin/env bash
# Stop a control plane started by scripts/k8s/start.sh STATE_DIR (only its own
# processes, by the pids it recorded).
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
S=$1
for name in sched kcm apiserver etcd; do
  f="$S/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
done
