//! A loopback TCP proxy between clients and a real server that loses responses to produce
//! requests. It follows the protocol v1 framing (docs/protocol.md): every frame is a u32
//! little-endian length and a payload; a request payload starts with api key (u16) and
//! correlation id (u32), a response payload with the correlation id (u32). Requests with
//! api key 6 (Produce) or 13 (ProduceLane) are remembered by correlation id; when the
//! response with that id comes back, it is dropped with the configured probability: it
//! never reaches the client, and the proxy closes that client connection and its server
//! connection at once, as a network failure would (the client reconnects and retries).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Rng;

/// Api keys whose responses may be dropped.
const PRODUCE_API_KEYS: [u16; 2] = [6, 13];
/// Largest frame the proxy forwards (the server's limit is 16 MiB + 64 KiB).
const FRAME_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Counters of a running proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Produce responses passed on.
    pub forwarded: AtomicU64,
    /// Produce responses dropped (each closed its connection).
    pub dropped: AtomicU64,
    /// Produce responses passed on that answered a retry as a duplicate.
    pub duplicates: AtomicU64,
}

/// The proxy; stops accepting when dropped (open connections end with the runtime).
#[derive(Debug)]
pub struct DropProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<ProxyStats>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for DropProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl DropProxy {
    /// Listens on a free loopback port and forwards to `server`, dropping each produce
    /// response with probability `drop_percent`/100 (decisions seeded by `seed`).
    pub async fn start(server: SocketAddr, drop_percent: u64, seed: u64) -> DropProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stats = Arc::new(ProxyStats::default());
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let accept = tokio::spawn({
            let stats = Arc::clone(&stats);
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let (stats, rng) = (Arc::clone(&stats), Arc::clone(&rng));
                    tokio::spawn(async move {
                        let Ok(upstream) = TcpStream::connect(server).await else { return };
                        relay(client, upstream, drop_percent, &stats, &rng).await;
                    });
                }
            }
        });
        DropProxy { addr, stats, accept }
    }
}

/// Relays one connection until either side closes or a response is dropped; then both
/// sockets are closed (dropped).
async fn relay(client: TcpStream, server: TcpStream, drop_percent: u64, stats: &ProxyStats, rng: &Mutex<Rng>) {
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let produce_ids = Mutex::new(HashSet::new());
    let requests = async {
        while let Some(frame) = read_frame(&mut client_read).await {
            if frame.len() >= 8 + 4 {
                let api_key = u16::from_le_bytes([frame[4], frame[5]]);
                let correlation_id = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]);
                if PRODUCE_API_KEYS.contains(&api_key) {
                    produce_ids.lock().insert(correlation_id);
                }
            }
            // Remembered before it is forwarded, so its response cannot come back first.
            if server_write.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    let responses = async {
        while let Some(frame) = read_frame(&mut server_read).await {
            if frame.len() >= 4 + 4 {
                let correlation_id = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
                if produce_ids.lock().remove(&correlation_id) {
                    if rng.lock().below(100) < drop_percent {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        return; // lost: the connection ends without it
                    }
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    // Success body: base_offset u64, last_offset u64, duplicate bool.
                    let success = frame.get(8..10) == Some(&[0, 0][..]);
                    if success && frame.get(10 + 16) == Some(&1) {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if client_write.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = responses => {}
    }
}

/// Reads one whole frame (length prefix included); `None` at end of stream or on error.
async fn read_frame(socket: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut length = [0u8; 4];
    socket.read_exact(&mut length).await.ok()?;
    let len = u32::from_le_bytes(length) as usize;
    if len > FRAME_BYTES_MAX {
        return None;
    }
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&length);
    socket.read_exact(&mut frame[4..]).await.ok()?;
    Some(frame)
}
