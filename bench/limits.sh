#!/usr/bin/env bash
# The machine's physical limits next to rill's own figures, in one run (issue 8):
#   * sequential write bandwidth: dd 1 GiB with conv=fdatasync;
#   * fdatasync latency and rate: fio, sequential writes of 4 KiB and 64 KiB, each followed
#     by fdatasync (one writer, 5 s each);
#   * loopback TCP bandwidth: `rill-bench loopback` (one connection), and iperf3 if present;
#   * the disk's ack-latency floor at fsync=always: `rill-bench sync-floor` (4 KiB write +
#     fdatasync back to back; an append arriving during one sync waits for the rest of it and
#     all of the next), measured just before and just after rill's end-to-end run;
# then rill's figures from `rill-bench load` (embedded append, fsync=always syncs, server
# throughput, end-to-end latency at 50,000 msg/s, replay) printed as a fraction of them. Not
# run in CI.
#
#   bench/limits.sh            # DIR=<data dir on the disk to measure> (default ./target)
#
# Environment: DIR, OUT (default target/bench-limits/<UTC time>), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-target}
OUT=${OUT:-target/bench-limits/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" "$DIR"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "$DIR/rill-limits.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
say() { echo "limits.sh: $*" >&2; }

if ! command -v fio >/dev/null; then
  say "installing fio (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
if [ "${SKIP_BUILD:-}" != 1 ]; then
  say "building rill-bench and rill, release"
  cargo build --release -q -p rill-bench -p rill-server --bins
fi
BENCH=target/release/rill-bench

# --- limits ------------------------------------------------------------------------------
say "dd: 1 GiB sequential write + fdatasync"
sync
dd if=/dev/zero of="$SCRATCH/dd" bs=1M count=1024 conv=fdatasync 2> "$OUT/dd.txt"
rm -f "$SCRATCH/dd"

for bs in 4k 64k; do
  say "fio: $bs writes, fdatasync after each, 5 s"
  fio --name="sync-$bs" --directory="$SCRATCH" --rw=write --bs="$bs" --size=256M --fdatasync=1 \
    --ioengine=sync --runtime=5 --time_based --output-format=json > "$OUT/fio-$bs.json"
  rm -f "$SCRATCH"/sync-*
done

say "loopback TCP"
"$BENCH" --json loopback --seconds 3 > "$OUT/loopback.json"
if command -v iperf3 >/dev/null; then
  iperf3 -s -1 -B 127.0.0.1 -p 15201 > /dev/null 2>&1 &
  server=$!
  sleep 0.5
  iperf3 -c 127.0.0.1 -p 15201 -t 3 -J > "$OUT/iperf3.json" || true
  wait "$server" 2>/dev/null || true
fi

# --- rill --------------------------------------------------------------------------------
say "rill: embedded append 1 KiB x 100 per batch, fsync=never (vs. sequential write)"
"$BENCH" --dir "$SCRATCH" --json load --systems embedded --workloads produce --durability none \
  --message-size 1024 --producers 1 --batch 100 --inflight 4 --duration 5 > "$OUT/rill-append.json"
say "rill: 100 B, 64 producers x 16, fsync=always (vs. fdatasync rate)"
"$BENCH" --dir "$SCRATCH" --json load --systems embedded,server --workloads produce --durability always \
  --message-size 100 --producers 64 --batch 16 --inflight 1 --duration 5 > "$OUT/rill-always.json"
say "rill: server, 1 KiB, 8 producers, fsync=never (vs. loopback bandwidth)"
"$BENCH" --dir "$SCRATCH" --json load --systems server --workloads produce --durability none \
  --message-size 1024 --producers 8 --batch 64 --inflight 4 --duration 5 > "$OUT/rill-server.json"
# The fsync=never runs above leave data for the kernel to write back; flush it first, so
# that the floor and the latency run do not share the disk with that writeback.
sync
say "sync floor (before), then rill: end-to-end latency at 50,000 msg/s, fsync=always, then sync floor (after)"
"$BENCH" --dir "$SCRATCH" --json sync-floor --seconds 5 --write-bytes 4096 > "$OUT/sync-floor-before.json"
"$BENCH" --dir "$SCRATCH" --json load --systems embedded,server --workloads e2e --durability always \
  --rate 50000 --message-size 100 --producers 4 --batch 16 --duration 5 > "$OUT/rill-e2e.json"
"$BENCH" --dir "$SCRATCH" --json sync-floor --seconds 5 --write-bytes 4096 > "$OUT/sync-floor-after.json"
say "rill: replay 1 GiB from the page cache"
"$BENCH" --dir "$SCRATCH" --json load --systems embedded,server --workloads replay --durability none \
  --message-size 1024 --producers 2 --batch 100 --inflight 4 --replay-mib "${REPLAY_MIB:-1024}" > "$OUT/rill-replay.json"

python3 - "$OUT" <<'EOF' | tee "$OUT/limits.md"
import json, re, sys, os
out = sys.argv[1]
def load(name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)["results"]
def one(results, system, workload=None):
    for r in results:
        if r["system"] == system and (workload is None or r["workload"] == workload):
            return r
    return None
dd = open(os.path.join(out, "dd.txt")).read()
m = re.search(r"^(\d+) bytes.*copied, ([0-9.]+) s", dd, re.M)
seq_mb = int(m.group(1)) / 1e6 / float(m.group(2))
fio = {}
for bs in ("4k", "64k"):
    job = json.load(open(os.path.join(out, f"fio-{bs}.json")))["jobs"][0]
    sync = job["sync"]
    lat = sync.get("lat_ns", sync)
    pct = lat.get("percentile", {})
    fio[bs] = dict(rate=lat["N"] / (job["job_runtime"] / 1e3),
                   p50=pct.get("50.000000", float("nan")) / 1e3,
                   p99=pct.get("99.000000", float("nan")) / 1e3,
                   mean=lat["mean"] / 1e3)
def lines(name):
    return [json.loads(l) for l in open(os.path.join(out, name)) if l.startswith("{")]
loop = lines("loopback.json")
floor = {}
for when in ("before", "after"):
    floor[when] = {r["metric"]: r["value"] for r in lines(f"sync-floor-{when}.json")}
loop_mb = next(r["value"] for r in loop if r["metric"] == "tcp_bandwidth")
iperf_mb = None
try:
    iperf_mb = json.load(open(os.path.join(out, "iperf3.json")))["end"]["sum_received"]["bits_per_second"] / 8e6
except Exception:
    pass
print("| limit | value |\n|---|--:|")
print(f"| sequential write, dd 1 GiB + fdatasync | {seq_mb:,.0f} MB/s |")
for bs, f in fio.items():
    print(f"| {bs} write + fdatasync (fio) | {f['rate']:,.0f} syncs/s; fdatasync p50 {f['p50']:.0f} µs, p99 {f['p99']:.0f} µs, mean {f['mean']:.0f} µs |")
for when, f in floor.items():
    print(f"| fsync=always ack floor, {when} the e2e run (sync-floor: 4 KiB write + fdatasync back to back, {f['syncs_per_s']:,.0f} syncs/s, sync p99 {f['write_sync_p99']:.2f} ms) | p50 {f['ack_floor_p50']:.2f} ms, p99 {f['ack_floor_p99']:.2f} ms, p99.9 {f['ack_floor_p999']:.2f} ms |")
print(f"| loopback TCP, rill-bench loopback (1 connection) | {loop_mb:,.0f} MB/s |")
if iperf_mb:
    print(f"| loopback TCP, iperf3 (1 stream) | {iperf_mb:,.0f} MB/s |")
print()
print("| rill figure | value | limit | fraction |\n|---|--:|--:|--:|")
def row(label, value, unit, limit, lunit):
    print(f"| {label} | {value:,.0f} {unit} | {limit:,.0f} {lunit} | {value / limit:.2f} |")
a = one(load("rill-append.json"), "rill-embedded")
row("embedded append, 1 KiB x 100, fsync=never (payload)", a["mb_per_s"], "MB/s", seq_mb, "MB/s seq. write")
for r in load("rill-always.json"):
    fs = r["extra"].get("fsyncs/s")
    if fs:
        row(f"{r['system']} fsync=always, 64 producers: fsyncs/s", fs, "/s", fio["64k"]["rate"], "64 KiB syncs/s")
        print(f"| {r['system']} fsync=always: msg/s, bytes per fsync | {r['msgs_per_s']:,.0f} msg/s | {r['extra'].get('B/fsync', float('nan')):,.0f} B/fsync | |")
before, after = floor["before"]["ack_floor_p99"], floor["after"]["ack_floor_p99"]
for r in load("rill-e2e.json"):
    if r.get("latency_us"):
        p99 = r["latency_us"]["p99"] / 1e3
        print(f"| {r['system']} e2e p99 at 50,000 msg/s, fsync=always | {p99:.2f} ms | ack floor p99 {before:.2f} ms before, {after:.2f} ms after (fraction: of their mean) | {p99 / ((before + after) / 2):.2f} |")
s = one(load("rill-server.json"), "rill-server")
tcp_mb = max(loop_mb, iperf_mb or 0)
row("server produce, 1 KiB, fsync=never (payload)", s["mb_per_s"], "MB/s", tcp_mb, "MB/s loopback (best of the two)")
for r in load("rill-replay.json"):
    row(f"{r['system']} replay from the page cache (payload)", r["mb_per_s"], "MB/s", 2000, "MB/s (issue's 2 GB/s bar)")
EOF
say "results in $OUT"
