//! The README's CLI quick start, run as written against the real `rill serve` binary.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ServerProcess, RILL};
use rill_engine::log::partitioner::partition_for_key;
use rill_server::cli::ADDR_ENV;

/// How long one CLI command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `rill args…` with `RILL_ADDR` set (as the README's commands rely on a server
/// address without `--addr`) and `stdin` as its input; returns its output, panicking if it
/// runs past [`COMMAND_TIMEOUT`].
fn rill(addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(RILL)
        .args(args)
        .env(ADDR_ENV, addr)
        .env_remove("RILL_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rill");
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input); // end of input
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).expect("read a pipe of rill");
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout is piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr is piped")));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll rill") {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("rill {args:?} did not finish in {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10)); // polling the exit status
    };
    Output { status, stdout: stdout.join().expect("stdout reader"), stderr: stderr.join().expect("stderr reader") }
}

/// Runs a command that must succeed; returns its stdout.
fn ok(addr: &str, args: &[&str], stdin: &str) -> String {
    let output = rill(addr, args, stdin);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "rill {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    stdout
}

/// Proves the README quick start works as documented: starts `rill serve` on ephemeral
/// ports with a temp data dir, then runs the README's commands through the binary with
/// `RILL_ADDR` pointing at it: `topic create` with 3 partitions, `produce --key` fed two
/// lines on stdin, `consume --from-beginning` printing exactly those lines, `topic describe`
/// showing end offset 2 in the key's partition and 0 elsewhere, a group consumer that
/// commits as it goes (bounded with `--max`) and then has nothing left, the same as a group
/// member (`--join`), and after a SIGTERM
/// shutdown `rill inspect` reporting a clean, undamaged store with exit status 0.
#[test]
fn readme_quick_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("rill-data");
    let mut server = ServerProcess::start(&data, &dir.path().join("server.log"), "127.0.0.1:0", "127.0.0.1:0");
    let addr = server.addr.to_string();
    let addr = addr.as_str();

    assert_eq!(ok(addr, &["topic", "create", "events", "--partitions", "3"], ""), "created topic events\n");
    assert_eq!(ok(addr, &["topic", "list"], ""), "events\n");
    let produced = ok(addr, &["produce", "events", "--key", "user-1"], "hello\nworld\n");
    assert_eq!(produced, "produced 2 records to events\n");
    assert_eq!(ok(addr, &["consume", "events", "--from-beginning"], ""), "hello\nworld\n");

    let described = ok(addr, &["topic", "describe", "events"], "");
    assert!(described.lines().any(|l| l.split_whitespace().eq(["partitions", "3"])), "{described}");
    let keyed = partition_for_key(b"user-1", 3);
    let rows: Vec<Vec<u64>> = described
        .lines()
        .skip_while(|line| !line.contains("END OFFSET"))
        .skip(1)
        .map(|line| line.split_whitespace().map(|n| n.parse().expect("a number")).collect())
        .collect();
    assert_eq!(rows.len(), 3, "one row per partition:\n{described}");
    for row in &rows {
        let (partition, log_start, end_offset) = (row[0], row[1], row[2]);
        let expected_end = if partition == u64::from(keyed) { 2 } else { 0 };
        assert_eq!((log_start, end_offset), (0, expected_end), "partition {partition}:\n{described}");
    }

    let group = ["consume", "events", "--group", "billing", "--follow", "--max", "2"];
    assert_eq!(ok(addr, &group, ""), "hello\nworld\n", "the group reads from the start");
    assert_eq!(ok(addr, &["consume", "events", "--group", "billing"], ""), "", "its position was committed");
    let member = ["consume", "events", "--group", "workers", "--join", "--follow", "--max", "2"];
    assert_eq!(ok(addr, &member, ""), "hello\nworld\n", "a sole member is assigned every partition");
    assert_eq!(ok(addr, &["consume", "events", "--group", "workers"], ""), "", "the member committed before leaving");

    let status = server.terminate();
    assert!(status.success(), "rill serve exits 0 on SIGTERM: {status}\n{}", server.log());
    let data = data.to_str().expect("UTF-8 temp path");
    let report = ok(addr, &["inspect", data], "");
    assert!(report.contains("clean shutdown"), "{report}");
    assert!(report.contains("inspected 1 topics, 3 partitions"), "{report}");
    assert!(report.contains(": no damage, 0 notes"), "{report}");
}
