#!/usr/bin/env bash
# The fault campaign (docs/reliability.md): runs every fault scenario with campaign-size
# counts and prints one summary line per scenario.
#
#   scripts/fault-campaign.sh            full campaign: release build, campaign counts
#   scripts/fault-campaign.sh --short    CI-sized counts (the tests' defaults), debug build;
#                                        CI runs the same tests through `cargo test --workspace`
#                                        and `fuzz/run.sh 45` (.ci/run)
#
# Counts (environment; the defaults in parentheses are the full campaign's; with --short
# each test uses its CI default unless the variable is set):
#   RILL_KILL9_ROUNDS            SIGKILL rounds of the server under mixed load   (50; CI 12)
#   RILL_PAUSE_ROUNDS            SIGSTOP/SIGCONT pauses of the server            (20; CI 3)
#   RILL_LOST_RESPONSE_RECORDS   records acknowledged through the lossy proxy    (50000; CI 5000)
#   RILL_LOST_RESPONSE_DROPS     produce responses the proxy must have dropped   (500; CI 50)
#   RILL_FAULT_SEEDS             power-loss seeds per test in fault_storage.rs   (10000; CI 200/50/30)
#   RILL_BITFLIP_TRIALS          bit-flip trials, engine reads and rill inspect  (1000; CI 100/40)
#   RILL_REPLICATION_SEEDS       seeds of each three-replica simulation          (1000; CI 16/6)
#   FUZZ_SECONDS                 seconds per fuzz target for fuzz/run.sh         (60; short 10)
#   FUZZ_CAMPAIGN_RUNS           executions per target of the long fuzz campaign (off unless set,
#                                e.g. 10000000: hours per target on 2 cores, see reliability.md)
#   CAMPAIGN_ONLY="a b"          run only the named steps (names as in the summary)
# Seeds: each scenario prints its seed and the variable that replays it (RILL_KILL9_SEED,
# RILL_PAUSE_SEED, RILL_LOST_RESPONSE_SEED, RILL_FAULT_SEED for engine/tests/fault_storage.rs,
# RILL_REPLICATION_SEED for engine/tests/replication.rs).
#
# Every step's output goes to $CAMPAIGN_DIR/<step>.log (default target/fault-campaign/);
# the summary is printed at the end and written to $CAMPAIGN_DIR/summary.txt. Tests that
# print `campaign: scenario=… rounds=… acked=… lost=… duplicated=…` lines contribute those
# lines; other steps report their test or fuzz totals. Exits non-zero if any step failed
# (all steps run regardless).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
    "") ;;
    --short) mode=short ;;
    -h | --help)
        sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0 [--short]" >&2
        exit 2
        ;;
esac

if [ "$mode" = full ]; then
    export RILL_KILL9_ROUNDS="${RILL_KILL9_ROUNDS:-50}"
    export RILL_PAUSE_ROUNDS="${RILL_PAUSE_ROUNDS:-20}"
    export RILL_LOST_RESPONSE_RECORDS="${RILL_LOST_RESPONSE_RECORDS:-50000}"
    export RILL_LOST_RESPONSE_DROPS="${RILL_LOST_RESPONSE_DROPS:-500}"
    export RILL_FAULT_SEEDS="${RILL_FAULT_SEEDS:-10000}"
    export RILL_BITFLIP_TRIALS="${RILL_BITFLIP_TRIALS:-1000}"
    export RILL_REPLICATION_SEEDS="${RILL_REPLICATION_SEEDS:-1000}"
    fuzz_seconds="${FUZZ_SECONDS:-60}"
    profile=(--release)
else
    fuzz_seconds="${FUZZ_SECONDS:-10}"
    profile=()
fi

out="${CAMPAIGN_DIR:-target/fault-campaign}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
failed=()
started=$SECONDS

# Runs one integration test binary of a crate with --nocapture.
test_step() { # crate test [test args...]
    local crate="$1" test="$2"
    shift 2
    cargo test "${profile[@]}" -p "$crate" --test "$test" -- --nocapture "$@"
}

# Runs step NAME: the rest of the arguments are the command. Collects its `campaign:`
# lines, or its test/fuzz totals, into the summary.
step() { # name command...
    local name="$1"
    shift
    if [ -n "${CAMPAIGN_ONLY:-}" ] && ! [[ " $CAMPAIGN_ONLY " == *" $name "* ]]; then
        return 0
    fi
    local log="$out/$name.log" t0=$SECONDS rc
    echo "==> $name: $*"
    "$@" >"$log" 2>&1
    rc=$?
    local secs=$((SECONDS - t0)) status=ok
    [ "$rc" -eq 0 ] || { status="FAILED (exit $rc, log $log)"; failed+=("$name"); }
    {
        printf '%-22s %-6s %5ss  %s\n' "$name" "${status%% *}" "$secs" "$*"
        grep -h '^campaign: ' "$log" | sed 's/^/    /'
        if ! grep -q '^campaign: ' "$log"; then
            grep -h '^test result: ' "$log" | sed 's/^/    /'
            sed -n '/^==> summary/,$p' "$log" | sed 's/^/    /'
        fi
        [ "$rc" -eq 0 ] || tail -n 40 "$log" | sed 's/^/    | /'
    } >>"$summary"
    echo "    $status in ${secs}s"
}

echo "fault campaign ($mode) on $(uname -n), $(nproc) CPUs, $(date -u '+%Y-%m-%d %H:%M UTC')" | tee -a "$summary"
echo "build: cargo test ${profile[*]:-(debug)}" | tee -a "$summary"

# ---- scenarios -------------------------------------------------------------------------
# (a) SIGKILL of the real server under mixed produce / consume+commit / priority poll+ack load
step sigkill-server test_step rill-server server_kill9
# (f) lost produce responses through a dropping proxy, 8 idempotent producers
step lost-responses test_step rill-server lost_responses
# (g) SIGSTOP/SIGCONT pauses of the server under mixed load
step sigstop-pauses test_step rill-server server_pause
# (a) SIGKILL of an engine child process: plain appends, idempotent producers with
# retries, priority cursors
step sigkill-engine test_step rill-engine crash_kill9
step sigkill-producers test_step rill-engine producer_crash_kill9
step sigkill-priority test_step rill-engine priority_kill9
# (b) torn writes at every byte of the tail
step torn-tail test_step rill-engine torn_tail
# (c), (e) failed fsync / write / ENOSPC injected through the file layer; simulated power
# loss per seed under fsync = always, interval and never (RILL_FAULT_SEEDS each)
step fault-storage test_step rill-engine fault_storage
# (d, partly) damaged or missing indices are rebuilt, damaged sealed segments refused
step index-rebuild test_step rill-engine index_rebuild
# Every decoder fuzzed for a bounded time
step fuzz bash fuzz/run.sh "$fuzz_seconds"
# (c) ENOSPC on a real full file system: mounts a 4 MiB tmpfs (needs root; or set
# RILL_FULL_DISK_DIR to an empty directory on a small file system)
step full-disk test_step rill-engine full_disk --ignored
# (d) bit flips in sealed segments and indices: never served as valid, nothing below the
# damage lost; and reported by the real `rill inspect`
step bit-flips test_step rill-engine bit_flips
step inspect-bit-flips test_step rill-server inspect_bit_flips
# Replication: three replicas through random crashes (with and without power loss),
# restarts, elections and ISR changes (replay: RILL_REPLICATION_SEED); three servers
# failing over under acks=all
step replication-sim test_step rill-engine replication
step replication-server test_step rill-server replication
# (a) SIGKILL of the leader or a follower of three rill processes under acks=all load
# (RILL_CLUSTER_KILL9_ROUNDS, replay RILL_CLUSTER_KILL9_SEED); a network partition
step cluster-sigkill test_step rill-server cluster_kill9
step cluster-partition test_step rill-server cluster_partition
# The long fuzz campaign (each target to FUZZ_CAMPAIGN_RUNS executions), only when asked
if [ -n "${FUZZ_CAMPAIGN_RUNS:-}" ]; then
    step fuzz-campaign bash fuzz/run.sh campaign "$FUZZ_CAMPAIGN_RUNS"
fi

echo
echo "==> summary ($mode, $((SECONDS - started)) s; logs in $out)"
cat "$summary"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed steps: ${failed[*]}" >&2
    exit 1
fi
