//! `JoinGroup`, `GroupHeartbeat`, `LeaveGroup`, `MemberCommitOffset`: consumer-group
//! membership over the engine's coordinator (semantics: `engine/src/cursor/group.rs`).
//! Membership lives in memory; commits are durable and may fsync, so they run on the
//! blocking pool.

use std::sync::Arc;

use rill_engine::Assignment;

use super::{blocking, Shared};
use crate::error::Result;
use crate::messages::{GroupAssignment, Response};

fn to_wire(a: Assignment) -> Response {
    Response::Assignment(GroupAssignment {
        member_id: a.member_id,
        generation: a.generation,
        members: a.members,
        partitions: a.partitions,
    })
}

/// Joins (or renews a membership of) a group for existing topics.
pub fn join(
    shared: &Shared,
    group: String,
    member_id: Option<String>,
    session_timeout_ms: u32,
    topics: Vec<String>,
) -> Result<Response> {
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let assignment = shared.store.join_group(&group, member_id.as_deref(), &topics, u64::from(session_timeout_ms))?;
    Ok(to_wire(assignment))
}

/// Renews a session; answers the current assignment.
pub fn heartbeat(shared: &Shared, group: &str, member_id: &str) -> Result<Response> {
    Ok(to_wire(shared.store.group_heartbeat(group, member_id)?))
}

/// Leaves a group.
pub fn leave(shared: &Shared, group: &str, member_id: &str) -> Result<Response> {
    shared.store.leave_group(group, member_id)?;
    Ok(Response::Empty)
}

/// Commits a position as a member (fenced by generation and assignment); durable before
/// the answer.
pub async fn commit(
    shared: &Arc<Shared>,
    group: String,
    member_id: String,
    generation: u64,
    topic: String,
    partition: u32,
    offset: u64,
) -> Result<Response> {
    shared.store.partition(&topic, partition)?;
    let store = Arc::clone(&shared.store);
    blocking(move || Ok(store.commit_offset_as_member(&group, &member_id, generation, &topic, partition, offset)?))
        .await?;
    Ok(Response::Empty)
}
