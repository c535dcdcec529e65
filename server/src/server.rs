//! The accept loop, connection limit, metrics listener and graceful shutdown.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rill_engine::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cmd::Shared;
use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Rejection};

/// A running server: its bound addresses and the handle to stop it.
#[derive(Debug)]
pub struct ServerHandle {
    /// Address of the protocol listener.
    pub addr: std::net::SocketAddr,
    /// Address of the metrics listener, if enabled.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Address of the Kafka-protocol listener, if enabled.
    pub kafka_addr: Option<std::net::SocketAddr>,
    /// Replication, when `node_id` is set: the controller integration applies partition
    /// roles through it.
    pub cluster: Option<Arc<crate::cluster::ReplicaManager>>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<()>>,
}

impl ServerHandle {
    /// Begins a graceful shutdown and waits for it: in-flight requests are answered, the
    /// store is closed cleanly.
    pub async fn shutdown(self) -> Result<()> {
        self.stop.send_replace(true);
        self.done.await.map_err(|e| Error::io("server task", std::io::Error::other(e.to_string())))?
    }
}

/// Opens the store, binds the listeners and serves in the background.
pub async fn start(config: ServerConfig) -> Result<ServerHandle> {
    config.validate()?;
    let data_dir = config.data_dir.clone();
    let backend = rill_engine::io::Backend::parse(&config.io_backend).unwrap_or(rill_engine::io::Backend::Std);
    let storage = match backend.storage() {
        Ok(storage) => storage,
        Err(e) => {
            tracing::warn!(%e, "io backend {:?} is unavailable; using std", config.io_backend);
            std::sync::Arc::new(rill_engine::io::StdStorage)
        }
    };
    let store_config = StoreConfig { storage, node_id: config.node_id, ..StoreConfig::default() };
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, store_config))
        .await
        .map_err(|e| Error::io("open store", std::io::Error::other(e.to_string())))??;
    let store = Arc::new(store);
    let listener = TcpListener::bind(&config.listen).await.map_err(|e| Error::io("bind listener", e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("listener address", e))?;
    let metrics = Arc::new(Metrics::default());
    let metrics_addr = if config.metrics_listen.is_empty() {
        None
    } else {
        let http =
            TcpListener::bind(&config.metrics_listen).await.map_err(|e| Error::io("bind metrics listener", e))?;
        let http_addr = http.local_addr().map_err(|e| Error::io("metrics listener address", e))?;
        tokio::spawn(crate::metrics::serve_http(http, Arc::clone(&metrics), Arc::clone(&store)));
        Some(http_addr)
    };
    let (stop, stop_rx) = watch::channel(false);
    let cluster = (config.node_id != 0).then(|| {
        let cluster_config = crate::cluster::ClusterConfig {
            node_id: config.node_id,
            min_insync_replicas: config.min_insync_replicas,
            replica_lag_time_max_ms: config.replica_lag_time_max_ms,
            ack_timeout_ms: config.replica_ack_timeout_ms,
            ..crate::cluster::ClusterConfig::default()
        };
        crate::cluster::ReplicaManager::new(Arc::clone(&store), cluster_config)
    });
    let isr_checks = cluster.as_ref().map(|c| c.spawn_isr_checks());
    let kafka = if config.kafka_listen.is_empty() { None } else { Some(crate::kafka::bind(&config).await?) };
    let controller = match &cluster {
        Some(_) if !config.peers.is_empty() => {
            let peers = config.controller_peers()?;
            let listen = peers[&config.node_id];
            let advertised_addr = if config.advertised_listener.is_empty() {
                addr.to_string()
            } else {
                config.advertised_listener.clone()
            };
            let controller_config = crate::controller::ControllerConfig {
                node_id: config.node_id,
                listen,
                peers,
                dir: config.data_dir.join("controller"),
                heartbeat_timeout_ms: config.node_timeout_ms,
                advertised_addr,
                kafka_addr: kafka.as_ref().map(crate::kafka::KafkaBinding::advertised).unwrap_or_default(),
            };
            Some(Arc::new(crate::controller::Controller::start(controller_config).await?))
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        store,
        config,
        metrics,
        inflight_bytes: AtomicU64::new(0),
        shutdown: stop_rx.clone(),
        priority_cursors: Default::default(),
        cluster: cluster.clone(),
        controller: controller.clone(),
    });
    let link = match (&controller, &cluster) {
        (Some(controller), Some(cluster)) => Some(tokio::spawn(crate::cluster::link::run(
            Arc::clone(controller),
            Arc::clone(cluster),
            Arc::clone(&shared.store),
            stop_rx.clone(),
        ))),
        _ => None,
    };
    tracing::info!(%addr, ?metrics_addr, data_dir = %shared.config.data_dir.display(), "rill serving");
    let (kafka_addr, kafka_done) = match kafka {
        None => (None, None),
        Some(binding) => {
            let (kafka_addr, kafka_done) = crate::kafka::start(Arc::clone(&shared), binding);
            (Some(kafka_addr), Some(kafka_done))
        }
    };
    tokio::spawn(close_idle_cursors(Arc::clone(&shared), stop_rx.clone()));
    let cluster_tasks: Vec<tokio::task::JoinHandle<()>> = isr_checks.into_iter().chain(link).collect();
    let done = tokio::spawn(accept_loop(listener, shared, stop_rx, kafka_done, controller, cluster_tasks));
    Ok(ServerHandle { addr, metrics_addr, kafka_addr, cluster, stop, done })
}

/// Closes idle priority cursors (see [`crate::cmd::priority::close_idle`]) until shutdown,
/// checking a few times per idle period.
async fn close_idle_cursors(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let idle = Duration::from_millis(shared.config.priority_cursor_idle_close_ms);
    let mut ticks = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
        let sweeper = Arc::clone(&shared);
        match tokio::task::spawn_blocking(move || crate::cmd::priority::close_idle(&sweeper, idle)).await {
            Ok(0) => {}
            Ok(closed) => tracing::debug!(closed, "closed idle priority cursors"),
            Err(e) => tracing::warn!(%e, "closing idle priority cursors failed"),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    kafka_done: Option<tokio::task::JoinHandle<()>>,
    controller: Option<Arc<crate::controller::Controller>>,
    cluster_tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Result<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, _peer)) = accepted else { continue };
                shared.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
                if connections.len() >= shared.config.max_connections {
                    shared.metrics.reject(Rejection::TooManyConnections);
                    drop(socket);
                    continue;
                }
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    shared.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                    crate::conn::serve(socket, Arc::clone(&shared)).await;
                    shared.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
    shared.metrics.shutting_down.store(true, Ordering::Relaxed);
    drop(listener);
    tracing::info!(connections = connections.len(), "shutting down: draining connections");
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(shared.config.shutdown_timeout_ms), drain).await.is_err() {
        tracing::warn!("shutdown timeout: closing remaining connections");
        connections.shutdown().await;
    }
    if let Some(kafka) = kafka_done {
        // The Kafka listener drains its own connections (same timeout) before the store closes.
        drop(kafka.await);
    }
    // The replication tasks hold the store: they end before it closes, so the directory is
    // free once shutdown returns.
    for task in &cluster_tasks {
        task.abort();
    }
    for task in cluster_tasks {
        let _ended = task.await;
    }
    if let Some(cluster) = &shared.cluster {
        cluster.stop().await;
    }
    if let Some(controller) = controller {
        controller.shutdown().await;
    }
    let store = Arc::clone(&shared.store);
    tokio::task::spawn_blocking(move || store.shutdown())
        .await
        .map_err(|e| Error::io("close store", std::io::Error::other(e.to_string())))??;
    tracing::info!("store closed cleanly");
    Ok(())
}

/// What `rill serve` takes on the command line (each overrides the TOML file).
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// TOML configuration file.
    pub config: Option<std::path::PathBuf>,
    /// Data directory.
    pub data_dir: Option<std::path::PathBuf>,
    /// Protocol listener address.
    pub listen: Option<String>,
    /// Metrics listener address (empty string disables it).
    pub metrics_listen: Option<String>,
    /// Kafka-protocol listener address (empty string disables it).
    pub kafka_listen: Option<String>,
    /// Node id in a cluster.
    pub node_id: Option<u32>,
    /// Controller voters, `id=host:port` each.
    pub peers: Option<Vec<String>>,
}

/// Builds the configuration from the defaults, an optional TOML file and flags.
pub fn config_from_args(args: &ServeOptions) -> Result<ServerConfig> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(listen) = &args.metrics_listen {
        config.metrics_listen = listen.clone();
    }
    if let Some(listen) = &args.kafka_listen {
        config.kafka_listen = listen.clone();
    }
    if let Some(node_id) = args.node_id {
        config.node_id = node_id;
    }
    if let Some(peers) = &args.peers {
        config.peers = peers.clone();
    }
    config.validate()?;
    Ok(config)
}

/// `rill serve`: runs until SIGTERM or ctrl-c, then shuts down gracefully.
pub fn run_cli(args: ServeOptions) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RILL_LOG").unwrap_or_else(|_| "info".into());
    // A second initialisation (tests) keeps the first subscriber.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    drop(tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init());
    let config = match config_from_args(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("rill serve: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rill serve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve_until_signal(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rill serve: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_until_signal(config: ServerConfig) -> Result<()> {
    // Installed before the address is printed: whoever reads it may signal at once.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| Error::io("install SIGTERM handler", e))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| Error::io("install SIGINT handler", e))?;
    let handle = start(config).await?;
    match handle.metrics_addr {
        Some(metrics) => println!("rill listening on {} (metrics and health on http://{metrics})", handle.addr),
        None => println!("rill listening on {} (metrics disabled)", handle.addr),
    }
    if let Some(kafka) = handle.kafka_addr {
        println!("Kafka protocol listening on {kafka}");
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("signal received");
    handle.shutdown().await
}
