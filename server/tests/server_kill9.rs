//! SIGKILL of the real `rill serve` binary under mixed load (idempotent producers, a
//! consumer group fetching and committing, a priority cursor polling, acking and nacking):
//! after every crash and restart, every acknowledged record is in the log exactly once at
//! the position its acknowledgement named, no position changed its record, committed
//! offsets never moved backwards, and no priority message acked by the server came back.

mod common;

use std::time::{Duration, Instant};

use common::load::{self, Load, LoadConfig};
use common::{env_count, free_port, Rng, ServerProcess, RILL};
use rill_server::client::Client;

/// Crash-and-restart rounds unless `RILL_KILL9_ROUNDS` says otherwise (the fault campaign
/// runs ≥ 50).
const ROUNDS_DEFAULT: u64 = 12;
/// Concurrent producers of the plain topic, each with its own connection and producer id.
const PRODUCERS: usize = 3;
/// Time allowed per round, and for the rest of the scenario.
const ROUND_BUDGET: Duration = Duration::from_secs(10);
const BASE_BUDGET: Duration = Duration::from_secs(60);
/// Longest wait for the load to make progress after a restart.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the binary on a fixed loopback port (chosen free up front, so clients reconnect
/// to the same address after a restart) with topics under `fsync = always`, runs the mixed
/// load, and for each round waits until the load has made a seeded amount of progress,
/// waits a seeded random moment more, SIGKILLs the server (`Child::kill`), restarts it on
/// the same directory and port, and reads everything back: each acknowledged record at its
/// acknowledged position, no record twice, every position holding the record it held
/// before, committed offsets not below any confirmed commit or earlier read. At the end
/// the producers stop, the priority cursor must settle every acknowledged priority message
/// (none lost or skipped; acked ones never redelivered); after one more SIGKILL the
/// restarted cursor may deliver only messages whose ack response was lost; and a clean
/// shutdown leaves a store `rill inspect` finds undamaged. Prints a `campaign:` summary line. Seed printed;
/// replay with `RILL_KILL9_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_survives_sigkill_exactly_once() {
    let rounds = env_count("RILL_KILL9_ROUNDS", ROUNDS_DEFAULT);
    let started = Instant::now();
    let seed = Rng::seed_from_env("RILL_KILL9_SEED");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = ServerProcess::start_retrying(&data, &log, &listen, "");
    let addr = server.addr;
    let admin = Client::connect(addr, "kill9-admin").await.expect("connect");
    load::create_topics(&admin).await;
    drop(admin);

    let config = LoadConfig {
        producers: PRODUCERS,
        producer_addr: addr,
        key_by_producer: false,
        request_timeout_ms: 5_000,
        mixed: true,
    };
    let load = Load::start(addr, config, seed);
    let mut total = load::Check::default();
    for round in 0..rounds {
        load.wait_for_progress(rng.range(20, 300), PROGRESS_TIMEOUT, || server.log()).await;
        tokio::time::sleep(Duration::from_millis(rng.range(0, 40))).await; // the random kill moment
        let acked = load.acked.load(std::sync::atomic::Ordering::Relaxed);
        server = tokio::task::block_in_place(|| {
            server.kill();
            ServerProcess::start_retrying(&data, &log, &listen, "")
        });
        assert_eq!(server.addr, addr, "restarted on the same address");
        let check = load.check().await;
        eprintln!("round {round}: SIGKILL after {acked} acknowledged messages; after restart: {check:?}");
        assert!(check.clean(), "round {round}: faults after the restart: {check:?}");
        total = check;
    }
    load.wait_for_progress(50, PROGRESS_TIMEOUT, || server.log()).await;
    let (check, lost_priority, ledger) = load.finish(PROGRESS_TIMEOUT).await;
    let extra = {
        let ledger = ledger.lock();
        format!(
            "consumed={} commits={} priority_deliveries={} priority_settled={} priority_ack_errors={} \
             priority_abandoned={} priority_ack_unknown={} failed={}",
            ledger.consumed,
            ledger.commits,
            ledger.deliveries,
            ledger.settled.len(),
            ledger.ack_errors,
            ledger.abandoned,
            ledger.settle_unknown.len(),
            ledger.failed.len()
        )
    };
    load::summary("sigkill-mixed", rounds, &check, lost_priority, &extra);
    assert!(check.clean(), "faults at the end: {check:?}");
    assert_eq!(lost_priority, 0, "acknowledged priority messages never settled");
    assert!(check.acked > total.acked || rounds == 0, "the load made progress after the last round");
    assert!(check.priority_acked > 0, "priority messages were produced");

    // One more crash with nothing in flight, then: the acks whose response was lost either
    // landed (the message is not delivered again) or did not (it is); nothing else comes back.
    server = tokio::task::block_in_place(|| {
        server.kill();
        ServerProcess::start_retrying(&data, &log, &listen, "")
    });
    let in_doubt = load::resolve_in_doubt(addr, &ledger).await;
    println!(
        "campaign: scenario=sigkill-mixed-in-doubt-acks rounds=1 acked={} lost=0 duplicated={} \
         in_doubt_redelivered={} in_doubt_settled={}",
        in_doubt.redelivered + in_doubt.settled,
        in_doubt.violations,
        in_doubt.redelivered,
        in_doubt.settled
    );
    assert_eq!(in_doubt.violations, 0, "only in-doubt messages come back after the final restart");

    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "clean shutdown after the crashes: {status}\n{}", server.log());
    let inspect = std::process::Command::new(RILL).arg("inspect").arg(&data).output().expect("run rill inspect");
    let report = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "rill inspect finds no damage:\n{report}");
    let elapsed = started.elapsed();
    let budget = BASE_BUDGET + ROUND_BUDGET * rounds as u32;
    eprintln!("{rounds} SIGKILL rounds in {elapsed:?}");
    assert!(elapsed < budget, "the scenario took {elapsed:?}, over {budget:?}");
}
