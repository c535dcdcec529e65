//! `Metadata`, `CreateTopic`, `DeleteTopic`.

use std::sync::Arc;

use rill_engine::TopicConfig;

use super::{blocking, Shared};
use crate::error::Result;
use crate::messages::{PartitionInfo, Response, TopicDescription, TopicSettings};

/// Describes the named topics, or all of them.
pub fn metadata(shared: &Shared, names: &[String]) -> Result<Response> {
    let names = if names.is_empty() { shared.store.topics() } else { names.to_vec() };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let topic = shared.store.topic(&name)?;
        let config = topic.config();
        out.push(TopicDescription {
            name,
            fsync: config.fsync,
            segment_size_bytes: config.segment_size_bytes,
            retention_bytes: config.retention_bytes,
            retention_ms: config.retention_ms,
            partitions: topic
                .partitions()
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id(),
                    log_start: p.log_start_offset(),
                    end_offset: p.end_offset(),
                    size_bytes: p.size_bytes(),
                })
                .collect(),
        });
    }
    Ok(Response::Metadata(out))
}

/// Creates a topic, filling unset settings from the server's topic defaults. In a cluster
/// the controller assigns its replicas (`replication_factor` of the configuration) and each
/// replica creates it locally when the metadata reaches it.
pub async fn create(shared: &Arc<Shared>, name: String, settings: TopicSettings) -> Result<Response> {
    let config = topic_config(shared, &settings)?;
    create_with(shared, name, config, None).await
}

/// Creates a topic with `config`: in the store, or in a cluster through the controller with
/// `replication_factor` replicas per partition (`None`: the server's `replication_factor`).
pub async fn create_with(
    shared: &Arc<Shared>,
    name: String,
    config: TopicConfig,
    replication_factor: Option<u32>,
) -> Result<Response> {
    if let Some(controller) = &shared.controller {
        rill_engine::log::store::validate_topic_name(&name)?;
        config.validate()?;
        let cmd = crate::controller::Command::CreateTopic {
            name,
            partitions: config.partitions,
            replication_factor: replication_factor.unwrap_or(shared.config.replication_factor),
            config: crate::controller::TopicSettings {
                fsync: crate::cluster::link::fsync_name(config.fsync),
                segment_size_bytes: config.segment_size_bytes,
                retention_bytes: config.retention_bytes,
                retention_ms: config.retention_ms,
            },
        };
        return controller_answer(controller.propose(cmd).await?);
    }
    let store = Arc::clone(&shared.store);
    blocking(move || Ok(store.create_topic(&name, config).map(drop)?)).await?;
    Ok(Response::Empty)
}

/// The topic configuration of `settings`, unset ones from the server's topic defaults.
pub(crate) fn topic_config(shared: &Shared, settings: &TopicSettings) -> Result<TopicConfig> {
    let defaults = &shared.config.topic_defaults;
    Ok(TopicConfig {
        partitions: if settings.partitions == 0 { defaults.partitions } else { settings.partitions },
        fsync: match settings.fsync {
            Some(policy) => policy,
            None => defaults.fsync_policy()?,
        },
        segment_size_bytes: settings.segment_size_bytes.unwrap_or(defaults.segment_size_bytes),
        retention_bytes: settings.retention_bytes.or(defaults.retention_bytes),
        retention_ms: settings.retention_ms.or(defaults.retention_ms),
        ..TopicConfig::default()
    })
}

/// A controller's verdict as a response.
fn controller_answer(result: crate::controller::CommandResult) -> Result<Response> {
    use crate::controller::{CommandResult, Rejection};
    let code = match result {
        CommandResult::Applied => return Ok(Response::Empty),
        CommandResult::Rejected(Rejection::TopicExists { .. }) => crate::ErrorCode::TopicExists,
        CommandResult::Rejected(Rejection::TopicNotFound { .. }) => crate::ErrorCode::TopicNotFound,
        CommandResult::Rejected(Rejection::NotEnoughAliveNodes { .. }) => crate::ErrorCode::NotEnoughReplicas,
        CommandResult::Rejected(_) => crate::ErrorCode::InvalidConfig,
    };
    let message = match result {
        CommandResult::Rejected(why) => why.to_string(),
        CommandResult::Applied => String::new(),
    };
    Err(crate::Error::Server { code, message, retry_after_ms: None })
}

/// Deletes a topic and its data (in a cluster: through the controller; replicas keep
/// their local files until an operator removes them).
pub async fn delete(shared: &Arc<Shared>, name: String) -> Result<Response> {
    if let Some(controller) = &shared.controller {
        return controller_answer(controller.propose(crate::controller::Command::DeleteTopic { name }).await?);
    }
    let store = Arc::clone(&shared.store);
    blocking(move || Ok(store.delete_topic(&name)?)).await?;
    Ok(Response::Empty)
}
