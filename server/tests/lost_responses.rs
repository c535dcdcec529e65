//! Lost produce responses: eight idempotent producers write through a loopback proxy that
//! drops 10 % of the responses to produce requests (and closes that connection, as a
//! network failure would). Every batch whose response was lost is already in the log, so
//! every retry must be recognised as a duplicate and answered with the original offsets.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::load::{self, Load, LoadConfig};
use common::proxy::DropProxy;
use common::{env_count, Rng, ServerProcess, RILL};
use rill_server::client::Client;

/// Producers, each with its own connection through the proxy and its own producer id.
const PRODUCERS: usize = 8;
/// Share of produce responses the proxy drops, in percent.
const DROP_PERCENT: u64 = 10;
/// Records to acknowledge unless `RILL_LOST_RESPONSE_RECORDS` says otherwise.
const RECORDS_DEFAULT: u64 = 5_000;
/// Dropped responses to reach at least, unless `RILL_LOST_RESPONSE_DROPS` says otherwise.
const DROPS_DEFAULT: u64 = 50;
/// Longest the load may go without progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the whole run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Starts the binary and the proxy, creates the topics (`fsync = always`), runs eight
/// idempotent producers through the proxy, each keying every message by its producer id
/// (so all of a producer's messages go to one partition, in send order), until at least
/// the wanted number of records were acknowledged and responses dropped. Then checks: no
/// message failed for good (the client recovered from every lost response), every
/// acknowledged message at its acknowledged position, no message twice, each producer's
/// messages in the log in send order; and that a clean shutdown leaves a store `rill
/// inspect` finds undamaged. Prints a `campaign:` summary line (rounds = responses
/// dropped). Seed printed; replay with `RILL_LOST_RESPONSE_SEED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producers_recover_from_lost_responses() {
    let records = env_count("RILL_LOST_RESPONSE_RECORDS", RECORDS_DEFAULT);
    let drops = env_count("RILL_LOST_RESPONSE_DROPS", DROPS_DEFAULT);
    let seed = Rng::seed_from_env("RILL_LOST_RESPONSE_SEED");
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, log) = (dir.path().join("data"), dir.path().join("server.log"));
    let mut server = ServerProcess::start(&data, &log, "127.0.0.1:0", "");
    let admin = Client::connect(server.addr, "lost-admin").await.expect("connect");
    load::create_topics(&admin).await;
    let proxy = DropProxy::start(server.addr, DROP_PERCENT, seed).await;

    let config = LoadConfig {
        producers: PRODUCERS,
        producer_addr: proxy.addr,
        key_by_producer: true,
        request_timeout_ms: 10_000,
        mixed: false,
    };
    let load = Load::start(server.addr, config, seed);
    let deadline = Instant::now() + RUN_TIMEOUT;
    while load.acked.load(Ordering::Relaxed) < records || proxy.stats.dropped.load(Ordering::Relaxed) < drops {
        assert!(Instant::now() < deadline, "{records} records and {drops} dropped responses within {RUN_TIMEOUT:?}");
        load.wait_for_progress(1, PROGRESS_TIMEOUT, || server.log()).await;
    }
    let (check, _, ledger) = load.finish(PROGRESS_TIMEOUT).await;
    let dropped = proxy.stats.dropped.load(Ordering::Relaxed);
    let duplicates = proxy.stats.duplicates.load(Ordering::Relaxed);
    let failed = ledger.lock().failed.clone();
    let extra = format!(
        "responses_dropped={dropped} responses_forwarded={} duplicate_answers={duplicates} connections={} failed={}",
        proxy.stats.forwarded.load(Ordering::Relaxed),
        proxy.stats.connections.load(Ordering::Relaxed),
        failed.len()
    );
    load::summary("lost-responses", dropped, &check, 0, &extra);
    assert!(check.clean(), "faults: {check:?}");
    assert!(failed.is_empty(), "messages failed for good although every fault was recoverable: {failed:?}");
    assert!(check.acked >= records, "acknowledged {} records", check.acked);
    assert!(dropped >= drops, "dropped {dropped} responses");
    assert!(duplicates > 0, "retries of batches whose response was lost are answered as duplicates");

    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "clean shutdown: {status}\n{}", server.log());
    let inspect = std::process::Command::new(RILL).arg("inspect").arg(&data).output().expect("run rill inspect");
    assert!(inspect.status.success(), "rill inspect finds no damage:\n{}", String::from_utf8_lossy(&inspect.stdout));
}
