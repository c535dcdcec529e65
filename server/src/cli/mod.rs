//! The `rill` command line: argument definitions (clap) and every subcommand but `serve`,
//! which lives with the server.
//!
//! It owns: parsing arguments, talking to a server through [`crate::client`], printing,
//! exit statuses, and `rill inspect` (an offline, read-only check of a store directory).
//! It must never: write to a store directory, or panic on bad input (errors are printed and
//! turned into an exit status).

mod consume;
mod inspect;
pub mod parse;
mod priority;
mod produce;
mod topic;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use rill_engine::{FsyncPolicy, Header};

use crate::client::{Client, ConsumedRecord};
use crate::error::{Error, Result};

/// Server address used when neither `--addr` nor `RILL_ADDR` is given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7400";

/// Environment variable naming the server address.
pub const ADDR_ENV: &str = "RILL_ADDR";

/// Exit status of a command that failed (bad arguments are clap's status 2).
pub const EXIT_FAILURE: u8 = 1;

/// Exit status of `rill inspect` when it found damage that opening the store cannot repair.
pub const EXIT_CORRUPTION: u8 = 3;

/// Exit status of `rill inspect` when it found only damage that opening the store repairs
/// (a torn tail after a crash, missing or inconsistent indices).
pub const EXIT_REPAIRABLE: u8 = 4;

/// rill: a durable log for event streams.
#[derive(Debug, Parser)]
#[command(name = "rill", version, about, propagate_version = true)]
pub struct Cli {
    /// Server address [default: $RILL_ADDR, else 127.0.0.1:7400].
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The server address: `--addr`, else `$RILL_ADDR`, else [`DEFAULT_ADDR`].
    pub fn server_addr(&self) -> String {
        resolve_addr(self.addr.clone())
    }
}

fn resolve_addr(addr: Option<String>) -> String {
    addr.or_else(|| std::env::var(ADDR_ENV).ok().filter(|a| !a.is_empty())).unwrap_or_else(|| DEFAULT_ADDR.to_string())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Create, list, describe or delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Write records to a topic, one per line of stdin or a file.
    Produce(ProduceArgs),
    /// Print the records of a topic.
    Consume(ConsumeArgs),
    /// Lease messages of a priority topic with a named cursor, print them (lane, offset,
    /// value) and ack them (or nack them with --nack).
    ConsumePriority(ConsumePriorityArgs),
    /// Check a store directory offline (no server): segments, batches, checksums, indices.
    /// Never modifies files. Exit status 3: corrupt data; 4: only damage that opening the
    /// store repairs (a torn tail after a crash, indices); 0: no damage.
    Inspect(InspectArgs),
}

/// Arguments of `rill serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Store directory (overrides the configuration file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to accept clients on (overrides the configuration file).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address of the metrics endpoint (overrides the configuration file).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Address of the Kafka-protocol listener, e.g. 127.0.0.1:9092 (overrides the
    /// configuration file; empty disables it, the default).
    #[arg(long)]
    pub kafka_listen: Option<String>,
    /// This node's id in a replicated cluster (from 1; overrides the configuration file).
    #[arg(long)]
    pub node_id: Option<u32>,
    /// The cluster's controller voters, `1=host:port,2=host:port,…` (this node included;
    /// overrides the configuration file).
    #[arg(long, value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
}

/// `rill topic` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create(TopicCreateArgs),
    /// Create a priority topic: lane topics <name>.p0 (most urgent)… and <name>.dlq.
    CreatePriority(TopicCreatePriorityArgs),
    /// List topic names.
    List,
    /// Show a topic's configuration and partitions.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and all its records.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// Arguments of `rill topic create`.
#[derive(Debug, Args)]
pub struct TopicCreateArgs {
    /// Topic name: 1 to 249 characters of [A-Za-z0-9._-], not starting with '.'.
    pub name: String,
    /// Number of partitions [default: the server's].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// When appends are synced: always, never or interval:<ms> [default: the server's].
    #[arg(long, value_parser = parse::parse_fsync, value_name = "POLICY")]
    pub fsync: Option<FsyncPolicy>,
    /// Delete the oldest segments while a partition is larger than this.
    #[arg(long, value_name = "BYTES")]
    pub retention_bytes: Option<u64>,
    /// Delete segments whose newest record is older than this.
    #[arg(long, value_name = "MS")]
    pub retention_ms: Option<u64>,
    /// Segment file size.
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes: Option<u64>,
}

/// Arguments of `rill topic create-priority`.
#[derive(Debug, Args)]
pub struct TopicCreatePriorityArgs {
    /// Name and settings of every lane topic and the dead-letter topic.
    #[command(flatten)]
    pub topic: TopicCreateArgs,
    /// Number of lanes (1..=4).
    #[arg(long, default_value_t = 4)]
    pub lanes: u8,
}

/// Arguments of `rill consume-priority`.
#[derive(Debug, Args)]
pub struct ConsumePriorityArgs {
    /// Priority topic to read.
    pub topic: String,
    /// Cursor name (its state is kept by the server).
    #[arg(long)]
    pub cursor: String,
    /// Most messages to lease.
    #[arg(long, default_value_t = 100)]
    pub max: u32,
    /// Ack every message printed (the default).
    #[arg(long, conflicts_with = "nack")]
    pub ack: bool,
    /// Nack every message printed instead: it is delivered again after the backoff, or
    /// dead-lettered after its last allowed delivery.
    #[arg(long)]
    pub nack: bool,
}

/// Arguments of `rill produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to write to.
    pub topic: String,
    /// Key of every record (records without a key are spread over the partitions in turn).
    #[arg(long)]
    pub key: Option<String>,
    /// Header added to every record, as key=value (repeatable).
    #[arg(long = "header", value_parser = parse::parse_header, value_name = "KEY=VALUE")]
    pub headers: Vec<Header>,
    /// Read records from this file instead of stdin.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Write to lane K of priority topic <topic> (topic <topic>.pK).
    #[arg(long, value_name = "K")]
    pub lane: Option<u8>,
}

/// Output format of `rill consume`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Each record's value on its own line.
    Value,
    /// Each record as a one-line JSON object.
    Json,
}

/// Arguments of `rill consume`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("start").args(["from_beginning", "offset", "since"])))]
pub struct ConsumeArgs {
    /// Topic to read.
    pub topic: String,
    /// Start at the first record of each partition.
    #[arg(long)]
    pub from_beginning: bool,
    /// Start at this offset in every partition.
    #[arg(long)]
    pub offset: Option<u64>,
    /// Start at the first record written at or after a time: RFC 3339, Unix milliseconds,
    /// or a duration before now such as 10m or 1h30m.
    #[arg(long, value_parser = parse::parse_since, value_name = "TIME")]
    pub since: Option<parse::Since>,
    /// Consumer group: start at its committed offsets (unless told otherwise) and commit
    /// what was printed.
    #[arg(long)]
    pub group: Option<String>,
    /// Keep waiting for new records (stop with Ctrl-C). Without it, exit once caught up
    /// with the end offsets seen at start. Default start: the group's committed offsets
    /// with --group, else the end with --follow, else the beginning.
    #[arg(long)]
    pub follow: bool,
    /// Read as a member of the --group: only the partitions the group assigns, following
    /// rebalances, so several `rill consume --group G --join --follow` share a topic. Leaves
    /// the group on exit.
    #[arg(long, requires = "group", requires = "follow")]
    pub join: bool,
    /// Session timeout of a --join member (ms): it loses its partitions when silent this long.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub session_timeout_ms: u32,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Value)]
    pub format: OutputFormat,
}

/// Arguments of `rill inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Store directory (the server's data directory).
    pub dir: PathBuf,
    /// Also decode every record of every batch (slower; finds damage the checksum cannot,
    /// such as a writer bug).
    #[arg(long)]
    pub deep: bool,
}

/// `rill serve`: hands the flags to the server.
pub fn serve(args: ServeArgs) -> ExitCode {
    crate::server::run_cli(crate::server::ServeOptions {
        config: args.config,
        data_dir: args.data_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        kafka_listen: args.kafka_listen,
        node_id: args.node_id,
        peers: args.peers,
    })
}

/// Runs a subcommand other than `serve` against the server at `addr` (`None`: `$RILL_ADDR`
/// or [`DEFAULT_ADDR`]); prints errors and returns the exit status.
pub fn run(addr: Option<String>, command: Command) -> ExitCode {
    init_tracing();
    let addr = resolve_addr(addr);
    let remote = match command {
        Command::Serve(args) => return serve(args),
        Command::Inspect(args) => return inspect::run(&args),
        remote => remote,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(source) => return fail(&Error::io("start the async runtime", source)),
    };
    match runtime.block_on(run_remote(&addr, remote)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

async fn run_remote(addr: &str, command: Command) -> Result<()> {
    let client = Client::connect(addr, "rill-cli").await.map_err(|e| match e {
        Error::Io { source, .. } => Error::Io { op: "connect to the server", source },
        other => other,
    })?;
    match command {
        Command::Topic(command) => topic::run(&client, command).await,
        Command::Produce(args) => produce::run(client, args).await,
        Command::Consume(args) => consume::run(client, args).await,
        Command::ConsumePriority(args) => priority::consume(&client, args).await,
        Command::Serve(_) | Command::Inspect(_) => Err(Error::Config { reason: "not a remote command".into() }),
    }
}

/// Prints an error the way every subcommand does and returns the failure status.
fn fail(error: &Error) -> ExitCode {
    eprintln!("rill: error: {error}");
    ExitCode::from(EXIT_FAILURE)
}

/// Logs go to stderr, filtered by `RILL_LOG` as for the server (warnings by default).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RILL_LOG")
        .unwrap_or_else(|_unset| tracing_subscriber::EnvFilter::new("warn"));
    // Already initialised (a test harness, an embedding program): keep theirs.
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init().ok();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The clap definition is consistent (no conflicting names or groups).
    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    /// Global --addr, repeatable headers, mutually exclusive start flags and defaults parse
    /// as documented.
    #[test]
    fn arguments_parse() {
        let cli = Cli::try_parse_from(["rill", "produce", "t", "--header", "a=1", "--header", "b", "--addr", "h:1"])
            .expect("parses");
        assert_eq!(cli.server_addr(), "h:1");
        let Command::Produce(args) = cli.command else { panic!("produce expected") };
        assert_eq!(args.headers.len(), 2);
        assert!(Cli::try_parse_from(["rill", "consume", "t", "--from-beginning", "--offset", "3"]).is_err());
        let cli = Cli::try_parse_from(["rill", "consume", "t", "--since", "10m", "--format", "json"]).expect("parses");
        let Command::Consume(args) = cli.command else { panic!("consume expected") };
        assert_eq!(args.since, Some(parse::Since::Ago(600_000)));
        assert_eq!(args.format, OutputFormat::Json);
        let cli = Cli::try_parse_from(["rill", "topic", "create", "t", "--partitions", "3", "--fsync", "interval:5"])
            .expect("parses");
        let Command::Topic(TopicCommand::Create(args)) = cli.command else { panic!("topic create expected") };
        assert_eq!(args.fsync, Some(FsyncPolicy::Interval { interval_ms: 5 }));
        assert!(Cli::try_parse_from(["rill", "topic", "create", "t", "--fsync", "sometimes"]).is_err());
        let cli = Cli::try_parse_from(["rill", "serve", "--data-dir", "/d", "--listen", "0.0.0.0:1"]).expect("parses");
        assert!(matches!(cli.command, Command::Serve(ServeArgs { data_dir: Some(_), .. })));
        let cli = Cli::try_parse_from(["rill", "topic", "create-priority", "q", "--lanes", "3"]).expect("parses");
        let Command::Topic(TopicCommand::CreatePriority(args)) = cli.command else { panic!("create-priority") };
        assert_eq!((args.topic.name.as_str(), args.lanes), ("q", 3));
        let cli = Cli::try_parse_from(["rill", "produce", "q", "--lane", "2"]).expect("parses");
        let Command::Produce(args) = cli.command else { panic!("produce expected") };
        assert_eq!(args.lane, Some(2));
        let cli = Cli::try_parse_from(["rill", "consume-priority", "q", "--cursor", "c", "--nack"]).expect("parses");
        let Command::ConsumePriority(args) = cli.command else { panic!("consume-priority expected") };
        assert!(args.nack && !args.ack && args.max == 100);
        assert!(Cli::try_parse_from(["rill", "consume-priority", "q", "--cursor", "c", "--ack", "--nack"]).is_err());
        assert!(Cli::try_parse_from(["rill", "consume-priority", "q"]).is_err());
    }
}
