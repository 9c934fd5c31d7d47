//! Storage status: how much is stored and what retention deleted.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState};
use crate::store::retention::{Retention, RetentionPolicy, RetentionRun, StorageSize, list_runs};

/// Runs listed by [`storage`].
const RUNS_SHOWN: u32 = 50;

#[derive(Debug, Serialize, ToSchema)]
pub struct StorageStatus {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// What size retention counts now.
    pub size: StorageSize,
    /// The latest retention runs that deleted something, newest first: what, how much, why.
    pub retention_runs: Vec<RetentionRun>,
}

/// Stored data and the latest retention runs (what was deleted, when and why).
#[utoipa::path(get, path = "/api/v1/system/storage", tag = "system", extensions(("x-permission" = json!("system:read"))),
    responses((status = 200, description = "Sizes and retention runs", body = StorageStatus)))]
pub async fn storage(State(state): State<AppState>) -> Result<Json<StorageStatus>, ApiError> {
    let db = state.store.db();
    let size = Retention::new(db.clone(), state.snapshots.clone(), RetentionPolicy::off()).measure().await?;
    let retention_runs = list_runs(&db, RUNS_SHOWN).await?;
    Ok(Json(StorageStatus { backend: state.store.backend().to_owned(), size, retention_runs }))
}
