//! Helpers shared by the tests that run the real `rill` binary: start `rill serve` on a data
//! directory, learn its bound addresses from the line it prints when ready, stop it with
//! SIGTERM or SIGKILL, and read its HTTP endpoints. A [`ServerProcess`] kills its child on
//! drop, so a failing test never leaks a server.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub mod cut;
pub mod load;
pub mod proxy;

/// Path of the `rill` binary built for these tests.
pub const RILL: &str = env!("CARGO_BIN_EXE_rill");

/// How long `rill serve` may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Prefix of the line `rill serve` prints once it accepts connections.
const READY_PREFIX: &str = "rill listening on ";

/// A `rill serve` child process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    /// Address of the protocol listener.
    pub addr: SocketAddr,
    /// Address of the metrics and health listener, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The data directory it serves.
    pub data_dir: PathBuf,
    log_path: PathBuf,
}

/// The addresses in `rill listening on A (metrics and health on http://M)` or
/// `rill listening on A (metrics disabled)`.
pub fn parse_ready_line(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let rest = line.trim().strip_prefix(READY_PREFIX)?;
    let (addr, rest) = rest.split_once(' ')?;
    let addr = addr.parse().ok()?;
    let metrics = match rest.split_once("http://") {
        Some((_, tail)) => Some(tail.trim_end_matches(')').parse().ok()?),
        None if rest.contains("metrics disabled") => None,
        None => return None,
    };
    Some((addr, metrics))
}

impl ServerProcess {
    /// Starts `rill serve` on `data_dir`; its stderr is appended to `log_path`. Panics (with
    /// the log) if it does not become ready.
    pub fn start(data_dir: &Path, log_path: &Path, listen: &str, metrics_listen: &str) -> ServerProcess {
        match Self::try_start(data_dir, log_path, listen, metrics_listen, &[]) {
            Ok(server) => server,
            Err(why) => panic!("rill serve did not start: {why}\n--- server log ---\n{}", read_log(log_path)),
        }
    }

    /// Like [`ServerProcess::start`], but retries while the server exits at once (its
    /// listener address may still be held briefly after the previous server was killed).
    pub fn start_retrying(data_dir: &Path, log_path: &Path, listen: &str, metrics_listen: &str) -> ServerProcess {
        Self::start_retrying_with(data_dir, log_path, listen, metrics_listen, &[])
    }

    /// [`ServerProcess::start_retrying`] with more `rill serve` arguments.
    pub fn start_retrying_with(
        data_dir: &Path,
        log_path: &Path,
        listen: &str,
        metrics_listen: &str,
        extra: &[String],
    ) -> ServerProcess {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match Self::try_start(data_dir, log_path, listen, metrics_listen, extra) {
                Ok(server) => return server,
                Err(why) if Instant::now() < deadline => eprintln!("rill serve failed to start, retrying: {why}"),
                Err(why) => panic!("rill serve did not start: {why}\n--- server log ---\n{}", read_log(log_path)),
            }
            std::thread::sleep(Duration::from_millis(50)); // polling: retry the start until the deadline
        }
    }

    fn try_start(
        data_dir: &Path,
        log_path: &Path,
        listen: &str,
        metrics_listen: &str,
        extra: &[String],
    ) -> Result<ServerProcess, String> {
        let log = File::options().create(true).append(true).open(log_path).expect("open the server log");
        let mut child = Command::new(RILL)
            .args(["serve", "--listen", listen, "--metrics-listen", metrics_listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn rill serve");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // Reads the ready line, then drains stdout until the child exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut server = ServerProcess {
            child: Some(child),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics_addr: None,
            data_dir: data_dir.to_path_buf(),
            log_path: log_path.to_path_buf(),
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => return Err("no ready line in time".into()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.wait_exit();
                return Err(format!("exited before it was ready ({status})"));
            }
        };
        let Some((addr, metrics_addr)) = parse_ready_line(&line) else {
            return Err(format!("unexpected ready line {line:?}"));
        };
        server.addr = addr;
        server.metrics_addr = metrics_addr;
        Ok(server)
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
        self.wait_exit()
    }

    /// Sends `signal` (a name `kill` understands, e.g. `STOP`, `CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args([format!("-{signal}"), self.pid().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// Sends SIGKILL (`Child::kill`) and reaps the process.
    pub fn kill(&mut self) {
        let child = self.child.as_mut().expect("the server is running");
        child.kill().expect("SIGKILL the server");
        self.wait_exit();
    }

    /// Waits (polling, bounded) for the child to exit and reaps it.
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server is running");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("poll the server's exit status") {
                return status;
            }
            if Instant::now() >= deadline {
                child.kill().ok();
                child.wait().ok();
                panic!("rill serve did not exit in time\n--- server log ---\n{}", read_log(&self.log_path));
            }
            std::thread::sleep(Duration::from_millis(10)); // polling the exit status
        }
    }

    /// The server's stderr so far (for failure messages).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// The metrics and health address; panics if the listener is disabled.
    pub fn http_addr(&self) -> SocketAddr {
        self.metrics_addr.expect("the metrics listener is enabled")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}

/// A port on the loopback interface that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// `GET path` over HTTP/1.1; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics listener");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.expect("write the HTTP request");
        let mut response = Vec::new();
        socket.read_to_end(&mut response).await.expect("read the HTTP response");
        response
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("HTTP answer in time");
    let text = String::from_utf8(response).expect("the HTTP response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    (status, body.to_string())
}

/// The value of the sample `series` (a metric name with its labels, exactly as rendered)
/// in a Prometheus text page.
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A count from environment variable `var` (campaign sizes), else `default`.
pub fn env_count(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{var} must be a count, got {text:?}")),
        Err(_) => default,
    }
}

/// A small deterministic generator (splitmix64) for seeded tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The seed from `var` if set, else one from the clock; printed so a failure can be
    /// replayed.
    pub fn seed_from_env(var: &str) -> u64 {
        let seed = match std::env::var(var) {
            Ok(text) => text.parse().unwrap_or_else(|_| panic!("{var} must be a u64, got {text:?}")),
            Err(_) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                now.as_nanos() as u64
            }
        };
        eprintln!("seed: {seed} (replay with {var}={seed})");
        seed
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// One of `items` (non-empty), uniformly.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
