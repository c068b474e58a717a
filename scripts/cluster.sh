#!/usr/bin/env bash
# Start the GPU cluster of cluster.yaml and submit farm work to it with `ray job submit`.
# Every command writes to an s3:// run store; the nodes reach S3 through their instance role.
#
#   scripts/cluster.sh up                          # ray up cluster.yaml (AWS credentials needed here)
#   scripts/cluster.sh run SPEC s3://bucket/run    # ufarm run SPEC --store ... on the cluster
#   scripts/cluster.sh evaluate s3://bucket/run    # ufarm evaluate ... as Ray tasks (report into the run)
#   scripts/cluster.sh tune SPEC s3://bucket/run   # ufarm tune SPEC --store ...
#   scripts/cluster.sh status s3://bucket/run      # ufarm status (runs here, reads S3 directly)
#   scripts/cluster.sh down
#
# The dashboard (job API) is reached through `ray dashboard`, which forwards port 8265 over SSH.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-cluster.yaml}
DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}

need_s3() {
  case "$1" in s3://*) ;; *) echo "cluster.sh: the run store must be an s3:// URI, got '$1'" >&2; exit 2 ;; esac
}

forward_dashboard() {
  if ! curl -fs "$DASHBOARD/api/version" >/dev/null 2>&1; then
    ray dashboard "$CLUSTER" >/dev/null 2>&1 &
    for _ in $(seq 30); do curl -fs "$DASHBOARD/api/version" >/dev/null 2>&1 && return; sleep 1; done
    echo "cluster.sh: no Ray dashboard at $DASHBOARD (is the cluster up?)" >&2; exit 1
  fi
}

submit() {
  forward_dashboard
  # specs and code travel with the job; the head node installed the project at set-up
  ray job submit --address "$DASHBOARD" --working-dir . -- "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) ray up -y "$CLUSTER" ;;
  down) ray down -y "$CLUSTER" ;;
  run) [ $# -ge 2 ] || { echo "usage: cluster.sh run SPEC s3://bucket/run" >&2; exit 2; }
       need_s3 "$2"; submit ufarm run "$1" --store "$2" --address auto --no-progress ;;
  evaluate) [ $# -ge 1 ] || { echo "usage: cluster.sh evaluate s3://bucket/run" >&2; exit 2; }
       need_s3 "$1"; submit ufarm evaluate --store "$1" --address auto --no-progress ;;
  tune) [ $# -ge 2 ] || { echo "usage: cluster.sh tune SPEC s3://bucket/run" >&2; exit 2; }
       need_s3 "$2"; submit ufarm tune "$1" --store "$2" --address auto --no-progress ;;
  status) [ $# -ge 1 ] || { echo "usage: cluster.sh status s3://bucket/run" >&2; exit 2; }
       .venv/bin/ufarm status --store "$1" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
