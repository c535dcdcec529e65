//! The controller protocol (docs/protocol.md, "Controller protocol v1"): framing, the
//! request and response messages, the client side openraft sends its RPCs through, and the
//! server side that answers them.
//!
//! Owns the TCP connections between controllers. Every failure to reach or understand a
//! peer is an error returned to the caller (openraft retries), never a panic; a peer that
//! sends a bad frame is disconnected. Must never apply commands or touch files.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::{Command, CommandResult};
use super::TypeConfig;
use crate::limits::CONTROLLER_FRAME_SIZE_BYTES_MAX;
use crate::{Error, Result};

/// The version byte that starts every frame's payload.
pub(crate) const PROTOCOL_VERSION: u8 = 1;

/// A request from one controller to another: one per frame, answered by one [`Response`].
#[derive(Serialize, Deserialize)]
pub(crate) enum Request {
    /// Raft append entries (also the Raft heartbeat).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft vote.
    Vote(VoteRequest<u32>),
    /// One chunk of a Raft snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command proposed on a follower, for the Raft leader to write.
    Forward(Command),
    /// A node's liveness heartbeat, for the Raft leader.
    Heartbeat {
        /// The node that is alive.
        node_id: u32,
    },
}

/// Why a forwarded request was not carried out.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum ForwardError {
    /// The receiver is not the Raft leader; `leader` is its guess of who is.
    #[error("not the raft leader (leader: {leader:?})")]
    NotLeader {
        /// The leader as the receiver knows it.
        leader: Option<u32>,
    },
    /// The receiver failed to write the command.
    #[error("{reason}")]
    Failed {
        /// What went wrong.
        reason: String,
    },
}

/// The answer to a [`Request`], of the same kind.
#[derive(Serialize, Deserialize)]
pub(crate) enum Response {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<u32>, RaftError<u32>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u32>, RaftError<u32>>),
    /// To `InstallSnapshot`.
    InstallSnapshot(Result<InstallSnapshotResponse<u32>, RaftError<u32, InstallSnapshotError>>),
    /// To `Forward`.
    Forward(Result<CommandResult, ForwardError>),
    /// To `Heartbeat`.
    Heartbeat(Result<(), ForwardError>),
}

/// Encodes `message` as one frame: length (u32, LE; the bytes after it), version, JSON.
pub(crate) fn encode_frame(message: &impl Serialize) -> Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    frame.push(PROTOCOL_VERSION);
    serde_json::to_writer(&mut frame, message).map_err(|source| Error::ControllerCodec { what: "frame", source })?;
    let len = frame.len() - 4;
    match u32::try_from(len) {
        Ok(len) if len <= CONTROLLER_FRAME_SIZE_BYTES_MAX => frame[..4].copy_from_slice(&len.to_le_bytes()),
        _ => {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            return Err(Error::FrameTooLarge { len, max: CONTROLLER_FRAME_SIZE_BYTES_MAX });
        }
    }
    Ok(frame)
}

/// Reads one frame and decodes its message; `None` on a clean end of stream before a frame.
pub(crate) async fn read_frame<T: for<'de> Deserialize<'de>>(stream: &mut TcpStream) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io("read controller frame", e)),
    }
    let len = u32::from_le_bytes(len);
    if len > CONTROLLER_FRAME_SIZE_BYTES_MAX {
        return Err(Error::FrameTooLarge { len, max: CONTROLLER_FRAME_SIZE_BYTES_MAX });
    }
    if len == 0 {
        return Err(Error::malformed("empty controller frame"));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await.map_err(|e| Error::io("read controller frame", e))?;
    decode_payload(&body).map(Some)
}

/// Decodes a frame's payload (version byte and JSON).
pub(crate) fn decode_payload<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    match body.split_first() {
        Some((&PROTOCOL_VERSION, json)) => {
            serde_json::from_slice(json).map_err(|source| Error::ControllerCodec { what: "frame", source })
        }
        Some((&version, _)) => {
            Err(Error::malformed(format!("controller protocol version {version}, expected {PROTOCOL_VERSION}")))
        }
        None => Err(Error::malformed("empty controller frame")),
    }
}

/// A connection to one peer, opened on first use and dropped after any failure.
pub(crate) struct PeerClient {
    /// The peer's id.
    pub(crate) target: u32,
    addr: String,
    stream: Option<TcpStream>,
}

/// How a call failed: before any byte was sent (the peer is unreachable) or after.
pub(crate) enum CallError {
    /// Could not connect.
    Unreachable(Error),
    /// Failed after connecting, or timed out.
    Network(Error),
}

impl CallError {
    fn into_rpc<E: std::error::Error>(self) -> RPCError<u32, BasicNode, E> {
        match self {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }

    /// The underlying error.
    pub(crate) fn into_error(self) -> Error {
        match self {
            CallError::Unreachable(e) | CallError::Network(e) => e,
        }
    }
}

impl PeerClient {
    /// A client of `target` at `addr`; connects lazily.
    pub(crate) fn new(target: u32, addr: String) -> PeerClient {
        PeerClient { target, addr, stream: None }
    }

    /// Sends `request` and waits up to `ttl` for its response.
    pub(crate) async fn call(&mut self, request: &Request, ttl: Duration) -> Result<Response, CallError> {
        let frame = encode_frame(request).map_err(CallError::Network)?;
        let timeout_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match tokio::time::timeout(ttl, self.call_frame(&frame)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_elapsed) => {
                self.stream = None;
                Err(CallError::Network(Error::Timeout { what: "a controller response", timeout_ms }))
            }
        }
    }

    async fn call_frame(&mut self, frame: &[u8]) -> Result<Response, CallError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(&self.addr)
                    .await
                    .map_err(|e| CallError::Unreachable(Error::io("connect to controller peer", e)))?;
                stream.set_nodelay(true).map_err(|e| CallError::Unreachable(Error::io("set nodelay", e)))?;
                self.stream.insert(stream)
            }
        };
        stream.write_all(frame).await.map_err(|e| CallError::Network(Error::io("write controller frame", e)))?;
        match read_frame(stream).await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(CallError::Network(Error::ConnectionClosed)),
            Err(e) => Err(CallError::Network(e)),
        }
    }
}

fn unexpected<E: std::error::Error>(kind: &str) -> RPCError<u32, BasicNode, E> {
    RPCError::Network(NetworkError::new(&Error::malformed(format!("a controller answered {kind} with another kind"))))
}

/// Makes a [`PeerClient`] per Raft peer for openraft. A peer is reached at the address this
/// node's own configuration gives it (`peers`), not the one recorded in the Raft membership
/// by the node that initialised the group: each node may reach the others by its own path
/// (a relay, another interface).
pub(crate) struct Network {
    /// This node's view of every voter's controller address.
    pub(crate) peers: std::collections::BTreeMap<u32, std::net::SocketAddr>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u32, node: &BasicNode) -> PeerClient {
        let addr = self.peers.get(&target).map_or_else(|| node.addr.clone(), ToString::to_string);
        PeerClient::new(target, addr)
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u32>, RPCError<u32, BasicNode, RaftError<u32>>> {
        match self.call(&Request::AppendEntries(rpc), option.hard_ttl()).await.map_err(CallError::into_rpc)? {
            Response::AppendEntries(result) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("append entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u32>, RPCError<u32, BasicNode, RaftError<u32, InstallSnapshotError>>> {
        match self.call(&Request::InstallSnapshot(rpc), option.hard_ttl()).await.map_err(CallError::into_rpc)? {
            Response::InstallSnapshot(result) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(unexpected("install snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u32>,
        option: RPCOption,
    ) -> Result<VoteResponse<u32>, RPCError<u32, BasicNode, RaftError<u32>>> {
        match self.call(&Request::Vote(rpc), option.hard_ttl()).await.map_err(CallError::into_rpc)? {
            Response::Vote(result) => result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(unexpected("vote")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame carries its length and the version byte; a wrong version or bad JSON is a
    /// protocol or codec error, not a panic.
    #[test]
    fn frame_layout_and_bad_payloads() {
        let frame = encode_frame(&Request::Heartbeat { node_id: 7 }).expect("encodes");
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(len, frame.len() - 4);
        assert_eq!(frame[4], PROTOCOL_VERSION);
        let back: Request = decode_payload(&frame[4..]).expect("decodes");
        assert!(matches!(back, Request::Heartbeat { node_id: 7 }));
        let mut wrong_version = frame[4..].to_vec();
        wrong_version[0] = 2;
        assert!(matches!(decode_payload::<Request>(&wrong_version), Err(Error::Protocol { .. })));
        assert!(matches!(decode_payload::<Request>(&[PROTOCOL_VERSION, b'{']), Err(Error::ControllerCodec { .. })));
        assert!(matches!(decode_payload::<Request>(&[]), Err(Error::Protocol { .. })));
    }
}
