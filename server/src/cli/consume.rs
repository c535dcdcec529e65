//! `rill consume`: prints records of every partition of a topic (or, with `--join`, of the
//! partitions a consumer group assigns), optionally committing the position of the group.

use std::io::Write;

use crate::client::{Client, ConsumedRecord, Consumer, StartPosition};
use crate::error::{Error, ErrorCode, Result};

use super::parse::record_json;
use super::{ConsumeArgs, OutputFormat};

/// Longest wait of one poll; bounds how late Ctrl-C and the caught-up check are noticed.
const POLL_WAIT_MS: u32 = 500;

pub(super) async fn run(client: Client, args: ConsumeArgs) -> Result<()> {
    let start = start_position(&args, now_ms());
    let mut consumer = match (&args.group, args.join) {
        (Some(group), true) => Consumer::join(client, group, &args.topic, args.session_timeout_ms).await?,
        _ => Consumer::new(client, args.group.clone(), &args.topic, start).await?,
    };
    // Without --follow, stop at the end offsets seen at start.
    let limits: Option<Vec<u64>> = (!args.follow).then(|| consumer.end_offsets().to_vec());
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    loop {
        let caught_up = limits.as_ref().is_some_and(|ends| consumer.positions().iter().zip(ends).all(|(p, e)| p >= e));
        if caught_up || args.max.is_some_and(|max| printed >= max) {
            break;
        }
        let records = tokio::select! {
            records = consumer.poll(POLL_WAIT_MS) => records?,
            interrupted = tokio::signal::ctrl_c() => {
                interrupted.map_err(|source| Error::io("wait for Ctrl-C", source))?;
                break;
            }
        };
        let take = Take { limits: limits.as_deref(), max: args.max.map(|max| max - printed) };
        let selection = take.select(&records);
        for (record, _) in records.iter().zip(&selection.take).filter(|(_, take)| **take) {
            let written = write_record(&mut out, record, args.format);
            if let Err(source) = written {
                return stop_on_broken_pipe(source);
            }
            printed += 1;
        }
        if let Err(source) = out.flush() {
            return stop_on_broken_pipe(source);
        }
        for (partition, offset) in selection.rewinds {
            consumer.seek(partition, offset)?;
        }
        if args.group.is_some() && !records.is_empty() {
            commit(&mut consumer).await?;
        }
    }
    if args.group.is_some() {
        commit(&mut consumer).await?;
    }
    consumer.leave().await
}

/// Commits; a member's commit refused by a rebalance is not fatal (the records it covered
/// are read again by their new owner).
async fn commit(consumer: &mut Consumer) -> Result<()> {
    match consumer.commit().await {
        Err(Error::Server {
            code: ErrorCode::StaleGeneration | ErrorCode::PartitionNotAssigned | ErrorCode::UnknownMember,
            message,
            ..
        }) if consumer.membership().is_some() => {
            tracing::warn!(%message, "commit refused after a rebalance; following the new assignment");
            Ok(())
        }
        other => other,
    }
}

/// The reader of the output went away (`rill consume t | head`): a normal end.
fn stop_on_broken_pipe(source: std::io::Error) -> Result<()> {
    if source.kind() == std::io::ErrorKind::BrokenPipe {
        return Ok(());
    }
    Err(Error::io("write output", source))
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Where to start: as asked; else the group's committed offsets; else the end when
/// following (like `tail -f`), the beginning otherwise (like `cat`).
fn start_position(args: &ConsumeArgs, now_ms: i64) -> StartPosition {
    if args.from_beginning {
        StartPosition::Earliest
    } else if let Some(offset) = args.offset {
        StartPosition::Offset(offset)
    } else if let Some(since) = args.since {
        StartPosition::Timestamp(since.resolve(now_ms))
    } else if args.group.is_some() {
        StartPosition::Committed
    } else if args.follow {
        StartPosition::Latest
    } else {
        StartPosition::Earliest
    }
}

/// Which records of a poll to print.
struct Take<'a> {
    /// Per partition, the offset to stop at (without --follow).
    limits: Option<&'a [u64]>,
    /// Records still allowed by --max.
    max: Option<u64>,
}

/// The outcome of [`Take::select`].
#[derive(Debug, PartialEq, Eq)]
struct Selection {
    /// Whether to print each record, in poll order.
    take: Vec<bool>,
    /// For each partition where records were left out, the offset of the first one left
    /// out (the consumer is moved back there so that a commit does not skip it).
    rewinds: Vec<(u32, u64)>,
}

impl Take<'_> {
    fn select(&self, records: &[ConsumedRecord]) -> Selection {
        let mut take = Vec::with_capacity(records.len());
        let mut rewinds: Vec<(u32, u64)> = Vec::new();
        let mut budget = self.max;
        for record in records {
            let below_limit = self
                .limits
                .is_none_or(|limits| limits.get(record.partition as usize).is_some_and(|&limit| record.offset < limit));
            let within_max = budget.is_none_or(|left| left > 0);
            let cut = rewinds.iter().any(|(p, _)| *p == record.partition);
            let taken = below_limit && within_max && !cut;
            if taken {
                budget = budget.map(|left| left - 1);
            } else if !cut {
                rewinds.push((record.partition, record.offset));
            }
            take.push(taken);
        }
        Selection { take, rewinds }
    }
}

fn write_record(out: &mut impl Write, record: &ConsumedRecord, format: OutputFormat) -> std::io::Result<()> {
    match format {
        OutputFormat::Value => {
            out.write_all(record.value.as_deref().unwrap_or_default())?;
            out.write_all(b"\n")
        }
        OutputFormat::Json => writeln!(out, "{}", record_json(record)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse::Since;
    use bytes::Bytes;

    fn record(partition: u32, offset: u64) -> ConsumedRecord {
        ConsumedRecord {
            partition,
            offset,
            timestamp_ms: 0,
            key: None,
            value: Some(Bytes::from(format!("{partition}:{offset}"))),
            headers: Vec::new(),
        }
    }

    fn args(follow: bool, group: Option<&str>) -> ConsumeArgs {
        ConsumeArgs {
            topic: "t".into(),
            from_beginning: false,
            offset: None,
            since: None,
            group: group.map(str::to_string),
            follow,
            join: false,
            session_timeout_ms: 10_000,
            max: None,
            format: OutputFormat::Value,
        }
    }

    /// The default start depends on --group and --follow; explicit flags win.
    #[test]
    fn start_position_defaults() {
        assert_eq!(start_position(&args(false, None), 0), StartPosition::Earliest);
        assert_eq!(start_position(&args(true, None), 0), StartPosition::Latest);
        assert_eq!(start_position(&args(true, Some("g")), 0), StartPosition::Committed);
        let mut since = args(false, Some("g"));
        since.since = Some(Since::Ago(1_000));
        assert_eq!(start_position(&since, 5_000), StartPosition::Timestamp(4_000));
    }

    /// --max and the caught-up limits cut a poll's records per partition, and each cut
    /// partition is rewound to its first record not printed.
    #[test]
    fn take_cuts_and_rewinds() {
        let records = vec![record(0, 5), record(1, 0), record(0, 6), record(1, 1), record(0, 7)];
        let limits = [7, 10];
        let selection = Take { limits: Some(&limits), max: None }.select(&records);
        assert_eq!(selection, Selection { take: vec![true, true, true, true, false], rewinds: vec![(0, 7)] });
        let selection = Take { limits: None, max: Some(2) }.select(&records);
        assert_eq!(selection, Selection { take: vec![true, true, false, false, false], rewinds: vec![(0, 6), (1, 1)] });
        let selection = Take { limits: None, max: None }.select(&records);
        assert_eq!(selection, Selection { take: vec![true; 5], rewinds: Vec::new() });
    }

    /// Values print one per line (a null value as an empty line); JSON prints one object
    /// per line.
    #[test]
    fn records_print_per_format() {
        let mut out = Vec::new();
        write_record(&mut out, &record(0, 1), OutputFormat::Value).expect("writes");
        let null = ConsumedRecord { value: None, ..record(0, 2) };
        write_record(&mut out, &null, OutputFormat::Value).expect("writes");
        write_record(&mut out, &record(1, 3), OutputFormat::Json).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["0:1", ""]);
        assert!(lines[2].starts_with("{\"partition\":1,\"offset\":3"), "{text}");
    }
}
