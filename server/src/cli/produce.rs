//! `rill produce`: one record per input line, sent through an idempotent [`Producer`].

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::client::{Client, Producer, ProducerConfig};
use crate::error::{Error, Result};

use super::ProduceArgs;

/// Lines read ahead of the producer.
const LINES_QUEUED_MAX: usize = 1024;
/// Records sent but not yet acknowledged; the oldest is awaited before sending more.
const RECEIPTS_PENDING_MAX: usize = 16 * 1024;

pub(super) async fn run(client: Client, mut args: ProduceArgs) -> Result<()> {
    if let Some(lane) = args.lane {
        // A lane is an ordinary topic: produce to it like to any other.
        args.topic = rill_engine::cursor::priority::lane_topic_name(&args.topic, lane);
    }
    let mut produced = 0u64;
    let result = produce(client, &args, &mut produced).await;
    match &result {
        Ok(()) => println!("produced {produced} records to {}", args.topic),
        Err(_) => eprintln!("rill: {produced} records to {} were acknowledged before the error", args.topic),
    }
    result
}

async fn produce(client: Client, args: &ProduceArgs, produced: &mut u64) -> Result<()> {
    let producer = Producer::new(client, ProducerConfig::default())?;
    let (tx, mut lines) = mpsc::channel(LINES_QUEUED_MAX);
    let source = args.file.clone();
    // Blocking reads stay off the runtime's threads.
    std::thread::Builder::new()
        .name("rill-produce-input".into())
        .spawn(move || read_lines(source, &tx))
        .map_err(|source| Error::io("start the input reader", source))?;
    let key = args.key.clone().map(Bytes::from);
    let mut receipts = VecDeque::new();
    while let Some(line) = lines.recv().await {
        let line = line?;
        receipts.push_back(producer.send(&args.topic, key.clone(), Bytes::from(line), args.headers.clone()));
        if receipts.len() >= RECEIPTS_PENDING_MAX {
            if let Some(receipt) = receipts.pop_front() {
                receipt.await?;
                *produced += 1;
            }
        }
    }
    producer.flush().await;
    while let Some(receipt) = receipts.pop_front() {
        receipt.await?;
        *produced += 1;
    }
    Ok(())
}

/// Sends each line of the file (or stdin) without its line ending; stops at the first read
/// error (sent as the last item) or when the receiver is gone.
fn read_lines(source: Option<PathBuf>, tx: &mpsc::Sender<Result<Vec<u8>>>) {
    let input: Box<dyn BufRead> = match &source {
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Box::new(std::io::BufReader::new(file)),
            Err(source) => {
                tx.blocking_send(Err(Error::io("open the input file", source))).ok();
                return;
            }
        },
        None => Box::new(std::io::stdin().lock()),
    };
    for line in split_lines(input) {
        let failed = line.is_err();
        if tx.blocking_send(line.map_err(|source| Error::io("read input", source))).is_err() || failed {
            return;
        }
    }
}

/// Lines of `input` split at `\n`, without the `\n` or a `\r` before it; no line follows a
/// final newline.
fn split_lines(input: impl BufRead) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
    input.split(b'\n').map(|line| {
        line.map(|mut line| {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            line
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Line endings (LF and CRLF) are stripped, empty lines are records, and a final newline
    /// does not add an empty record.
    #[test]
    fn lines_split_like_a_text_file() {
        let input = &b"a\r\nb\n\nc\xff\n"[..];
        let lines: Vec<Vec<u8>> = split_lines(input).collect::<std::io::Result<_>>().expect("reads");
        assert_eq!(lines, vec![b"a".to_vec(), b"b".to_vec(), Vec::new(), b"c\xff".to_vec()]);
        let lines: Vec<Vec<u8>> = split_lines(&b"last"[..]).collect::<std::io::Result<_>>().expect("reads");
        assert_eq!(lines, vec![b"last".to_vec()]);
    }
}
