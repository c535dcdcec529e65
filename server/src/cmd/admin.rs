//! `ApiVersions` and `InitProducerId`.

use std::sync::Arc;

use super::{blocking, Shared};
use crate::error::Result;
use crate::messages::{api, Response, API_VERSION_V1};

/// Every api of protocol v1 with its version range.
pub fn api_versions() -> Response {
    Response::ApiVersions((0..api::COUNT).map(|key| (key, API_VERSION_V1, API_VERSION_V1)).collect())
}

/// Issues a producer identity (may reserve a new id block: an fsync).
pub async fn init_producer_id(shared: &Arc<Shared>, transactional_id: Option<String>) -> Result<Response> {
    let store = Arc::clone(&shared.store);
    let identity = blocking(move || Ok(store.init_producer(transactional_id.as_deref())?)).await?;
    Ok(Response::InitProducerId { producer_id: identity.producer_id, producer_epoch: identity.producer_epoch })
}
