//! # rill-server
//!
//! The rill log server (`rill serve`), its Rust client, and the `rill` CLI. A thin layer:
//! it parses frames, calls `rill-engine`, and never touches segment files itself. The wire
//! protocol is specified in `docs/protocol.md`.
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod client;
pub mod cluster;
pub mod cmd;
pub mod config;
pub mod conn;
pub mod controller;
pub mod error;
pub mod frame;
pub mod kafka;
pub mod limits;
pub mod messages;
pub mod metrics;
pub mod server;

pub use error::{Error, ErrorCode, Result};
