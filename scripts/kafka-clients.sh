#!/usr/bin/env bash
# Existing Kafka clients against rill's Kafka listener (issue 9): kafka-python and
# confluent-kafka (librdkafka), unchanged, against the real `rill serve --kafka-listen`.
#
#   scripts/kafka-clients.sh
#
# 1. Makes a Python venv ($KAFKA_VENV, default target/kafka-venv; reused) with the pinned
#    clients and every codec library kafka-python uses (python-snappy on cramjam, lz4,
#    zstandard); PyPI must be reachable the first time.
# 2. Starts `rill serve` (target/debug/rill, built if missing) on free loopback ports with
#    a fresh data directory, waits until the Kafka port accepts.
# 3. Per client, server/tests/kafka_clients.py phase `main` (its own topic kc-CLIENT):
#    CreateTopics, 10,000 idempotent keyed messages over the five codecs, a consumer group
#    reads them back exactly once and commits, a raw Fetch checks the stored batches.
# 4. Stops the server with SIGTERM (it must exit 0), starts it again on the same data
#    directory, and runs phase `resume` per client (committed offsets survived, 1,000 more
#    messages, a new group member reads exactly those), then phase `admin` (DeleteTopics;
#    a produce to the deleted topic fails within a deadline).
# 5. Reads each topic with rill's own CLI (`rill consume TOPIC --from-beginning --format
#    json`) and compares every record with what the clients delivered (phase `cli`).
# 6. Stops the server (exit 0 required) and runs `rill inspect --deep` on the data directory.
#
# Environment: RILL_LOG (server log filter, default info; use debug to diagnose), KAFKA_VENV,
# PYTHON (interpreter that creates the venv, default python3), CARGO_TARGET_DIR.
# Everything (data, server logs, per-client state and CLI output) is under
# target/kafka-clients/; the server log's tail is printed when a step fails.
# Exits non-zero if any step failed; the last line is `kafka-clients: N passed, M failed`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

case "${1:-}" in
    "") ;;
    -h | --help)
        sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: $0" >&2
        exit 2
        ;;
esac

# The versions this proof was run with; a bump is a deliberate change.
requirements=(
    "kafka-python==3.0.12"
    "confluent-kafka==2.16.1"
    "python-snappy==0.7.3"
    "cramjam==2.14.0"
    "lz4==4.4.5"
    "zstandard==0.25.0"
    "crc32c==2.9.post0"
)
clients=(kafka-python confluent-kafka)

target_dir="${CARGO_TARGET_DIR:-target}"
rill="$target_dir/debug/rill"
venv="${KAFKA_VENV:-target/kafka-venv}"
work="target/kafka-clients"
data="$work/data"
export RILL_LOG="${RILL_LOG:-info}"

die() {
    echo "kafka-clients: FAILED: $*" >&2
    exit 1
}

# --- the rill binary -------------------------------------------------------------------
if [ ! -x "$rill" ]; then
    echo "==> building $rill"
    cargo build -p rill-server --bin rill || die "cargo build -p rill-server --bin rill failed"
fi
serve_help=$("$rill" serve --help 2>&1)
[[ "$serve_help" == *--kafka-listen* ]] ||
    die "$rill has no --kafka-listen (stale build? run: cargo build -p rill-server --bin rill)"

# --- the venv --------------------------------------------------------------------------
python="$venv/bin/python"
stamp="$venv/.kafka-clients-requirements"
if [ ! -x "$python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]; then
    echo "==> Python venv $venv: ${requirements[*]}"
    if [ ! -x "$python" ]; then
        "${PYTHON:-python3}" -m venv "$venv" || die "could not create a venv with ${PYTHON:-python3} -m venv"
    fi
    "$python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" ||
        die "pip install ${requirements[*]} failed"
    echo "${requirements[*]}" >"$stamp"
fi
"$python" -c '
import kafka, kafka.codec as c, confluent_kafka as ck
missing = [n for n, ok in (("snappy", c.has_snappy()), ("lz4", c.has_lz4()), ("zstd", c.has_zstd())) if not ok]
assert not missing, "kafka-python lacks codecs: %s" % missing
print("    kafka-python %s, confluent-kafka %s (librdkafka %s)"
      % (kafka.__version__, ck.__version__, ck.libversion()[0]))
' || die "the venv's clients do not import with every codec"

# --- the server ------------------------------------------------------------------------
rm -rf "$work"
mkdir -p "$work"
read -r rill_port kafka_port < <("$python" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')
addr="127.0.0.1:$rill_port"
bootstrap="127.0.0.1:$kafka_port"
server_pid=""
server_log=""
server_runs=0

stop_on_exit() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null
        for _ in $(seq 100); do
            kill -0 "$server_pid" 2>/dev/null || return
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null
    fi
}
trap stop_on_exit EXIT

port_open() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_server() {
    server_runs=$((server_runs + 1))
    server_log="$work/server-$server_runs.log"
    echo "==> rill serve (run $server_runs): --listen $addr --kafka-listen $bootstrap, log $server_log"
    "$rill" serve --data-dir "$data" --listen "$addr" --metrics-listen '' --kafka-listen "$bootstrap" \
        >"$server_log" 2>&1 &
    server_pid=$!
    local deadline=$((SECONDS + 60))
    until port_open "$kafka_port" && port_open "$rill_port"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            tail -n 40 "$server_log" | sed 's/^/    | /' >&2
            die "rill serve exited during start"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "rill serve did not accept on $bootstrap and $addr within 60s"
        sleep 0.1
    done
}

stop_server() { # must exit 0 after SIGTERM within 60s
    kill -TERM "$server_pid"
    local deadline=$((SECONDS + 60))
    while kill -0 "$server_pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            kill -KILL "$server_pid"
            die "rill serve did not stop within 60s of SIGTERM (log $server_log)"
        fi
        sleep 0.1
    done
    wait "$server_pid"
    local rc=$?
    server_pid=""
    [ "$rc" -eq 0 ] || {
        tail -n 40 "$server_log" | sed 's/^/    | /' >&2
        die "rill serve exited with status $rc after SIGTERM (log $server_log)"
    }
}

# --- the steps -------------------------------------------------------------------------
passed=0
failed=0
failures=()
declare -A main_ok

step() { # name command... ; prints the command's output, keeps going on failure
    local name="$1"
    shift
    echo "==> $name"
    local log_lines_before
    log_lines_before=$(wc -l <"$server_log")
    if "$@"; then
        passed=$((passed + 1))
        return 0
    fi
    failed=$((failed + 1))
    failures+=("$name")
    echo "    server log since the step began ($server_log, RILL_LOG=$RILL_LOG), last 40 lines:" >&2
    tail -n "+$((log_lines_before + 1))" "$server_log" | tail -n 40 | sed 's/^/    | /' >&2
    return 1
}

phase() { # client phase [args...]
    local client="$1" phase="$2"
    shift 2
    timeout 600 "$python" server/tests/kafka_clients.py "$client" "$phase" --bootstrap "$bootstrap" \
        --state "$work/state-$client.json" "$@"
}

cli_check() { # client
    local client="$1" out="$work/cli-$1.json"
    timeout 300 "$rill" --addr "$addr" consume "kc-$client" --from-beginning --format json >"$out" || {
        echo "rill consume kc-$client exited with status $?" >&2
        return 1
    }
    phase "$client" cli --cli-json "$out"
}

start_server
for client in "${clients[@]}"; do
    step "$client main" phase "$client" main && main_ok[$client]=1
done

echo "==> restart: SIGTERM, then rill serve again on $data"
stop_server
start_server

for client in "${clients[@]}"; do
    if [ -n "${main_ok[$client]:-}" ]; then
        step "$client resume" phase "$client" resume
    else
        echo "==> $client resume: skipped ($client main failed)"
    fi
done
for client in "${clients[@]}"; do
    step "$client admin" phase "$client" admin
done
for client in "${clients[@]}"; do
    if [ -n "${main_ok[$client]:-}" ]; then
        step "$client cli" cli_check "$client"
    else
        echo "==> $client cli: skipped ($client main failed)"
    fi
done

echo "==> stop, then rill inspect --deep $data"
stop_server
if "$rill" inspect --deep "$data" >"$work/inspect.txt" 2>&1; then
    passed=$((passed + 1))
    echo "    inspect: no damage"
else
    rc=$?
    failed=$((failed + 1))
    failures+=("inspect")
    tail -n 40 "$work/inspect.txt" | sed 's/^/    | /' >&2
    echo "kafka-clients: rill inspect --deep exited with status $rc" >&2
fi

[ "$failed" -eq 0 ] || echo "kafka-clients: failed steps: ${failures[*]}" >&2
echo "kafka-clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
