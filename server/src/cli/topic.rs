//! `rill topic create | list | describe | delete`.

use std::fmt::Write as _;

use crate::client::Client;
use crate::error::{Error, ErrorCode, Result};
use crate::messages::{TopicDescription, TopicSettings};

use super::parse::format_fsync;
use super::{TopicCommand, TopicCreateArgs};

pub(super) async fn run(client: &Client, command: TopicCommand) -> Result<()> {
    match command {
        TopicCommand::Create(args) => create(client, args).await,
        TopicCommand::CreatePriority(args) => {
            let (name, lanes) = (args.topic.name.clone(), args.lanes);
            client.create_priority_topic(&name, lanes, settings(args.topic)).await?;
            println!("created priority topic {name} with {lanes} lanes");
            Ok(())
        }
        TopicCommand::List => {
            let mut names = client.list_topics().await?;
            names.sort();
            let mut out = String::new();
            for name in names {
                out.push_str(&name);
                out.push('\n');
            }
            print!("{out}");
            Ok(())
        }
        TopicCommand::Describe { name } => {
            let topics = client.metadata(&[name.as_str()]).await?;
            let Some(topic) = topics.into_iter().find(|t| t.name == name) else {
                return Err(Error::Server {
                    code: ErrorCode::TopicNotFound,
                    message: format!("topic '{name}' does not exist"),
                    retry_after_ms: None,
                });
            };
            print!("{}", describe(&topic));
            Ok(())
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            println!("deleted topic {name}");
            Ok(())
        }
    }
}

fn settings(args: TopicCreateArgs) -> TopicSettings {
    TopicSettings {
        partitions: args.partitions.unwrap_or(0), // 0: the server's default
        fsync: args.fsync,
        segment_size_bytes: args.segment_bytes,
        retention_bytes: args.retention_bytes,
        retention_ms: args.retention_ms,
    }
}

async fn create(client: &Client, args: TopicCreateArgs) -> Result<()> {
    let name = args.name.clone();
    client.create_topic(&name, settings(args)).await?;
    println!("created topic {name}");
    Ok(())
}

fn optional(value: Option<u64>) -> String {
    value.map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// A topic's configuration, then a table of its partitions.
fn describe(topic: &TopicDescription) -> String {
    let mut out = String::new();
    let fields = [
        ("topic", topic.name.clone()),
        ("partitions", topic.partitions.len().to_string()),
        ("fsync", format_fsync(topic.fsync)),
        ("segment bytes", topic.segment_size_bytes.to_string()),
        ("retention bytes", optional(topic.retention_bytes)),
        ("retention ms", optional(topic.retention_ms)),
    ];
    for (name, value) in fields {
        writeln!(out, "{name:<16} {value}").expect("writing to a String cannot fail");
    }
    writeln!(out, "\n{:>9}  {:>20}  {:>20}  {:>20}", "PARTITION", "LOG START", "END OFFSET", "SIZE BYTES")
        .expect("writing to a String cannot fail");
    let mut partitions = topic.partitions.clone();
    partitions.sort_by_key(|p| p.partition);
    for p in partitions {
        writeln!(out, "{:>9}  {:>20}  {:>20}  {:>20}", p.partition, p.log_start, p.end_offset, p.size_bytes)
            .expect("writing to a String cannot fail");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::PartitionInfo;
    use rill_engine::FsyncPolicy;

    /// The description lists the configuration and one row per partition, in order.
    #[test]
    fn describe_lists_config_and_partitions() {
        let topic = TopicDescription {
            name: "orders".into(),
            fsync: FsyncPolicy::Interval { interval_ms: 50 },
            segment_size_bytes: 4096,
            retention_bytes: None,
            retention_ms: Some(1000),
            partitions: vec![
                PartitionInfo { partition: 1, log_start: 0, end_offset: 5, size_bytes: 300 },
                PartitionInfo { partition: 0, log_start: 2, end_offset: 9, size_bytes: 400 },
            ],
        };
        let text = describe(&topic);
        assert!(text.contains("fsync            interval:50"), "{text}");
        assert!(text.contains("retention bytes  none"), "{text}");
        let rows: Vec<&str> = text.lines().skip_while(|l| !l.contains("PARTITION")).skip(1).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].trim_start().starts_with("0 "), "{text}");
    }
}
