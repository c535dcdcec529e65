#!/usr/bin/env bash
# Replication cost (issue 10): acks=all on a 3-node cluster on loopback against acks=leader
# on one node, in one run, same client, same workload. Not run in CI. See docs/benchmarks.md
# ("Replication").
#
#   bench/cluster.sh
#
# Environment: OUT (results directory, default target/bench-cluster/<UTC time>), RUNS
# (alternating runs of each setup, default 3), DURATION (measured seconds per run, default 5),
# PRODUCERS (default 16), SIZE (message bytes, default 100), SYSTEM (`server`: a batch of 16
# per request, the default; `server-producer`: through the client Producer), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
PRODUCERS=${PRODUCERS:-16}
SYSTEM=${SYSTEM:-server}
SIZE=${SIZE:-100}
OUT=${OUT:-target/bench-cluster/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rill-cluster.XXXXXX")
RILL=target/release/rill
BENCH=target/release/rill-bench
say() { echo "cluster.sh: $*" >&2; }

if [ "${SKIP_BUILD:-}" != 1 ]; then
  cargo build --release -p rill-server -p rill-bench >&2
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_port() { # port
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  say "nothing listens on $1"; exit 1
}

# One node on its own (acks=leader) and three in a cluster (acks=all, min_insync_replicas=2).
"$RILL" serve --data-dir "$WORK/single" --listen 127.0.0.1:17500 --metrics-listen "" >"$WORK/single.out" 2>"$WORK/single.log" &
pids+=($!)
PEERS=1=127.0.0.1:17611,2=127.0.0.1:17612,3=127.0.0.1:17613
for i in 1 2 3; do
  "$RILL" serve --data-dir "$WORK/node$i" --listen "127.0.0.1:1750$i" --metrics-listen "" \
    --node-id "$i" --peers "$PEERS" >"$WORK/node$i.out" 2>"$WORK/node$i.log" &
  pids+=($!)
done
for port in 17500 17501 17502 17503; do wait_port "$port"; done
sleep 3 # the controller elects a leader and every node registers

COMMON=(--systems "$SYSTEM" --server external --workloads produce --durability always
        --message-size "$SIZE" --producers "$PRODUCERS" --batch 16 --inflight 1
        --duration "$DURATION" --warmup 1)
{
  echo "# rill-bench cluster, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r); rill $(git rev-parse --short HEAD)"
  echo "workload: ${COMMON[*]}"
  echo
  echo "| run | single node, acks=leader (msg/s) | 3 nodes, acks=all (msg/s) | ratio |"
  echo "|---:|---:|---:|---:|"
} > "$OUT/README.md"

rate() { # json file -> msg/s of the first result
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["results"][0]["msgs_per_s"]))' "$1"
}

for run in $(seq 1 "$RUNS"); do
  say "run $run: single node, acks=leader"
  "$BENCH" --json load "${COMMON[@]}" --addr 127.0.0.1:17500 --acks leader > "$OUT/single-$run.json"
  say "run $run: 3 nodes, acks=all (leader: the first node of the partition's replicas)"
  # The controller makes the first replica the leader; the topic's partition 0 goes to
  # node 1 when all three are alive.
  "$BENCH" --json load "${COMMON[@]}" --addr 127.0.0.1:17501 --acks all > "$OUT/cluster-$run.json"
  single=$(rate "$OUT/single-$run.json")
  cluster=$(rate "$OUT/cluster-$run.json")
  ratio=$(python3 -c "print(f'{$cluster/$single:.2f}')")
  echo "| $run | $single | $cluster | $ratio |" >> "$OUT/README.md"
done
cat "$OUT/README.md"
say "results in $OUT"
