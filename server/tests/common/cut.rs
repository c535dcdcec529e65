//! A plain loopback TCP relay that can be cut: while cut it refuses new connections and
//! closes the ones it carries, as a network partition between two nodes would. The tests
//! of a cluster put one on every path between nodes they may want to separate.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay from its own address to `target`.
#[derive(Debug)]
pub struct CutRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    changed: watch::Sender<bool>,
}

impl CutRelay {
    /// Relays connections to `target` from a fresh loopback port.
    pub async fn start(target: SocketAddr) -> CutRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let cut = Arc::new(AtomicBool::new(false));
        let (changed, _) = watch::channel(false);
        let relay = CutRelay { addr, cut: Arc::clone(&cut), changed };
        let watcher = relay.changed.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if cut.load(Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                let mut cut_signal = watcher.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = cut_signal.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        relay
    }

    /// Cuts (`true`) or heals (`false`) the path.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
        self.changed.send_replace(cut);
    }
}
