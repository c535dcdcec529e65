#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for N seconds on a scratch copy of its
# committed seed corpus. Exits non-zero (printing the reproducer) if any target crashes.
#
#   fuzz/run.sh [seconds_per_target]     (default 60; CI runs `fuzz/run.sh 40`)
#   fuzz/run.sh campaign [runs]          (every target to `runs` executions, default 10000000,
#                                         with no time limit: the published campaign)
#
# The summary gives each target's executions and executions per second.
#
# Environment: FUZZ_TARGETS="a b" to run a subset; FUZZ_SANITIZER (default address);
# FUZZ_SCRATCH (default fuzz/target/scratch-corpus) for the working corpora, which are
# recreated from the seeds on every run unless FUZZ_KEEP_CORPUS=1.
#
# The build uses cargo-fuzz's defaults: release optimisations *with* debug assertions and
# overflow checks (the engine's debug_asserts and arithmetic overflow are part of what is
# being fuzzed) and AddressSanitizer. ASan costs some throughput, but a cold build of all
# the targets is a few minutes on 2 cores, so it fits CI's budget; see fuzz/README.md.
set -euo pipefail

runs=""
if [ "${1:-}" = campaign ]; then
    runs="${2:-10000000}"
    secs=0
    if ! [[ "$runs" =~ ^[0-9]+$ ]] || [ "$runs" -lt 1 ]; then
        echo "usage: $0 campaign [runs_per_target]" >&2
        exit 2
    fi
else
    secs="${1:-60}"
    if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
        echo "usage: $0 [seconds_per_target] | $0 campaign [runs_per_target]" >&2
        exit 2
    fi
fi
if [ -n "$runs" ]; then
    limit=(-runs="$runs")
    budget="$runs runs"
else
    limit=(-max_total_time="$secs")
    budget="${secs}s"
fi

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir"

targets="${FUZZ_TARGETS:-batch_decode batch_roundtrip segment_recovery topic_meta_decode varint snapshot_decode offsets_decode cursor_state_decode config_parse frame_decode store_ops kafka_records epochs_decode}"
sanitizer="${FUZZ_SANITIZER:-address}"
scratch="${FUZZ_SCRATCH:-$fuzz_dir/target/scratch-corpus}"
triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin_dir="$fuzz_dir/target/$triple/release"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

start=$SECONDS
echo "==> building fuzz targets (sanitizer: $sanitizer)"
cargo +nightly fuzz build --sanitizer "$sanitizer" --debug-assertions
echo "==> build took $((SECONDS - start)) s"

failed=()
summary=()
for target in $targets; do
    work="$scratch/$target"
    artifacts="$fuzz_dir/artifacts/$target"
    [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ] || rm -rf "$work"
    mkdir -p "$work" "$artifacts"
    # libFuzzer writes new inputs into the first corpus directory: the scratch copy, so the
    # committed seeds never grow.
    cp "$fuzz_dir/corpus/$target/"* "$work/"
    log="$scratch/$target.log"
    echo "==> $target: $budget"
    target_start=$SECONDS
    set +e
    "$bin_dir/$target" "$work" \
        "${limit[@]}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1
    rc=$?
    set -e
    elapsed=$((SECONDS - target_start))
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="?"
    if [[ "${execs:-}" =~ ^[0-9]+$ ]] && [ "$elapsed" -gt 0 ]; then
        rate=$((execs / elapsed))
    fi
    corpus="$(ls "$work" | wc -l)"
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$log"
        artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        echo "!!! $target FAILED (exit $rc); reproducer: ${artifact:-<none written, see $log>}"
        [ -n "$artifact" ] && echo "    reproduce: $bin_dir/$target $artifact"
        failed+=("$target")
        summary+=("$(printf '%-20s FAILED   execs %-10s exec/s %-8s %5ss  artifact %s' "$target" "${execs:-?}" "$rate" "$elapsed" "${artifact:-?}")")
    else
        summary+=("$(printf '%-20s ok       execs %-10s exec/s %-8s %5ss  corpus %s' "$target" "${execs:-?}" "$rate" "$elapsed" "$corpus")")
    fi
done

echo
echo "==> summary ($budget per target, total $((SECONDS - start)) s)"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed targets: ${failed[*]}" >&2
    exit 1
fi
