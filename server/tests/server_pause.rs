//! SIGSTOP/SIGCONT pauses of the real `rill serve` binary under mixed load: while it is
//! stopped, clients time out and retry on new connections or wait; after SIGCONT the
//! server works through the old and the new requests, and the exactly-once checks hold.

mod common;

use std::time::{Duration, Instant};

use common::load::{self, Load, LoadConfig};
use common::{env_count, Rng, ServerProcess, RILL};
use rill_server::client::Client;

/// Pauses unless `RILL_PAUSE_ROUNDS` says otherwise.
const ROUNDS_DEFAULT: u64 = 3;
/// Longest pause (ms); each pause is seeded-random in 100 ms ..= this.
const PAUSE_MS_MAX: u64 = 3_000;
/// The producers' request timeout: shorter than the longest pause, so some attempts time
/// out (closing their connection) and are retried while the server is stopped.
const REQUEST_TIMEOUT_MS: u64 = 1_000;
const PRODUCERS: usize = 3;
/// Longest wait for the load to make progress after a pause.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed per pause, and for the rest of the scenario.
const ROUND_BUDGET: Duration = Duration::from_secs(15);
const BASE_BUDGET: Duration = Duration::from_secs(60);

/// Starts the binary with topics under `fsync = always` and the mixed load; for each round
/// waits for a seeded amount of progress, SIGSTOPs the server for a seeded random time up
/// to 3 s, SIGCONTs it, waits until producers and the priority cursor make progress again
/// (the server keeps working), and reads everything back with the same checks as the
/// SIGKILL scenario. At the end the priority cursor must settle every acknowledged
/// priority message, and a clean shutdown must leave a store `rill inspect` finds
/// undamaged. Prints a `campaign:` summary line. Seed printed; replay with
/// `RILL_PAUSE_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_survives_sigstop_pauses() {
    let rounds = env_count("RILL_PAUSE_ROUNDS", ROUNDS_DEFAULT);
    let started = Instant::now();
    let seed = Rng::seed_from_env("RILL_PAUSE_SEED");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "");
    let addr = server.addr;
    let admin = Client::connect(addr, "pause-admin").await.expect("connect");
    load::create_topics(&admin).await;
    drop(admin);

    let config = LoadConfig {
        producers: PRODUCERS,
        producer_addr: addr,
        key_by_producer: false,
        request_timeout_ms: REQUEST_TIMEOUT_MS,
        mixed: true,
    };
    let load = Load::start(addr, config, seed);
    let (mut paused_ms, mut longest_ms) = (0, 0);
    for round in 0..rounds {
        load.wait_for_progress(rng.range(50, 500), PROGRESS_TIMEOUT, || server.log()).await;
        let pause_ms = rng.range(100, PAUSE_MS_MAX);
        paused_ms += pause_ms;
        longest_ms = longest_ms.max(pause_ms);
        server.signal("STOP");
        // The fault itself: the server stays stopped this long.
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        server.signal("CONT");
        load.wait_for_progress(1, PROGRESS_TIMEOUT, || server.log()).await;
        let check = load.check().await;
        eprintln!("round {round}: paused {pause_ms} ms; after SIGCONT: {check:?}");
        assert!(check.clean(), "round {round}: faults after the pause: {check:?}");
    }
    let (check, lost_priority, ledger) = load.finish(PROGRESS_TIMEOUT).await;
    let stats = Client::connect(addr, "pause-stats").await.expect("connect").stats().await.expect("stats");
    let connections = stats.iter().find(|(name, _)| name == "connections_total").map(|(_, v)| *v).expect("counter");
    // Without reconnects: admin, producers, priority producer, two consumers, one per
    // check, and this one.
    let first_connections = 1 + PRODUCERS as u64 + 3 + rounds + 1 + 1;
    let extra = {
        let ledger = ledger.lock();
        format!(
            "paused_ms={paused_ms} connections={connections} consumed={} commits={} priority_deliveries={} priority_settled={} \
             priority_abandoned={} priority_ack_unknown={} failed={}",
            ledger.consumed,
            ledger.commits,
            ledger.deliveries,
            ledger.settled.len(),
            ledger.abandoned,
            ledger.settle_unknown.len(),
            ledger.failed.len()
        )
    };
    load::summary("sigstop-pauses", rounds, &check, lost_priority, &extra);
    assert!(check.clean(), "faults at the end: {check:?}");
    assert_eq!(lost_priority, 0, "acknowledged priority messages never settled");
    assert!(check.acked > 0 && check.priority_acked > 0, "the load made progress");
    if longest_ms >= 2 * REQUEST_TIMEOUT_MS {
        assert!(
            connections > first_connections,
            "requests timed out during a pause and were retried on new connections"
        );
    }

    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "clean shutdown after the pauses: {status}\n{}", server.log());
    let inspect = std::process::Command::new(RILL).arg("inspect").arg(&data).output().expect("run rill inspect");
    assert!(inspect.status.success(), "rill inspect finds no damage:\n{}", String::from_utf8_lossy(&inspect.stdout));
    let elapsed = started.elapsed();
    let budget = BASE_BUDGET + ROUND_BUDGET * rounds as u32;
    assert!(elapsed < budget, "the scenario took {elapsed:?}, over {budget:?}");
}
