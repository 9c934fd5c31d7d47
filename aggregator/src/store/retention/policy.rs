//! What retention keeps, and what a run reports.

use std::time::Duration;

use serde::Serialize;

use super::measure::StorageSize;
use crate::store::StoreError;

/// Size retention deletes until the total is at most this percentage of the limit.
pub const LOW_WATER_PERCENT: u64 = 95;
/// Default number of events (or health rows, or orphan snapshot rows) per deletion transaction.
pub const DEFAULT_BATCH: usize = 1000;
/// Default time between runs.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// Default age limit (90 days).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(90 * 86_400);

/// What retention keeps. `None` turns a limit off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delete what is older than this.
    pub max_age: Option<Duration>,
    /// Keep the database plus the snapshot objects under this many bytes.
    pub max_total_bytes: Option<u64>,
    /// Time between runs.
    pub interval: Duration,
    /// Rows per deletion transaction (at least 1).
    pub batch: usize,
}

impl Default for RetentionPolicy {
    /// 90 days, no size limit, every 5 minutes, batches of 1000.
    fn default() -> Self {
        Self { max_age: Some(DEFAULT_MAX_AGE), max_total_bytes: None, interval: DEFAULT_INTERVAL, batch: DEFAULT_BATCH }
    }
}

impl RetentionPolicy {
    /// Nothing is ever deleted.
    pub fn off() -> Self {
        Self { max_age: None, max_total_bytes: None, ..Self::default() }
    }

    /// A limit is set.
    pub fn enabled(&self) -> bool {
        self.max_age.is_some() || self.max_total_bytes.is_some()
    }

    /// Events observed before this are too old (`None`: no age limit).
    pub fn cutoff_ms(&self, now_ms: i64) -> Option<i64> {
        self.max_age.map(|age| now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX)))
    }

    /// The total size retention brings the storage down to once it is above the limit.
    pub fn low_water_bytes(&self) -> Option<u64> {
        self.max_total_bytes.map(|max| (u128::from(max) * u128::from(LOW_WATER_PERCENT) / 100) as u64)
    }
}

/// Why a run deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetentionReason {
    Age,
    Size,
}

impl RetentionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionReason::Age => "age",
            RetentionReason::Size => "size",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "age" => Ok(RetentionReason::Age),
            "size" => Ok(RetentionReason::Size),
            other => Err(StoreError::Corrupt(format!("retention run reason {other:?}"))),
        }
    }
}

/// One recorded run (a row of `retention_runs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RetentionRun {
    pub id: i64,
    /// The `now` of the run, Unix ms.
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    pub reason: RetentionReason,
    pub deleted_events: u64,
    /// Health history rows.
    pub deleted_health: u64,
    /// Snapshot rows (each with a full frame and possibly a crop object).
    pub deleted_snapshots: u64,
    /// Snapshot object bytes (exact) plus the estimated database bytes of the deleted rows.
    pub freed_bytes: u64,
    /// `observed_at_ms` of the oldest event left after the run (`None`: no event left).
    pub oldest_kept_ms: Option<i64>,
    /// What was deleted, in words (the run's log line).
    pub detail: String,
}

/// Result of [`Retention::run_once`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// The runs recorded: at most one per reason, none when nothing was deleted.
    pub runs: Vec<RetentionRun>,
    /// Storage measured before the size pass (size limit set).
    pub size_before: Option<StorageSize>,
    /// Storage measured after the size pass, when it deleted something.
    pub size_after: Option<StorageSize>,
    /// Snapshot objects that could not be deleted (their rows are gone); logged.
    pub object_failures: u64,
    /// Events older than the age cutoff kept because each is its device's newest (high-water) event.
    pub kept_high_water: u64,
}

impl RetentionReport {
    /// The run recorded for `reason`, if it deleted anything.
    pub fn run(&self, reason: RetentionReason) -> Option<&RetentionRun> {
        self.runs.iter().find(|r| r.reason == reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_cutoff_and_low_water() {
        let p = RetentionPolicy {
            max_age: Some(Duration::from_secs(86_400)),
            max_total_bytes: Some(1000),
            ..RetentionPolicy::default()
        };
        assert_eq!(p.cutoff_ms(100_000_000), Some(100_000_000 - 86_400_000));
        assert_eq!(p.low_water_bytes(), Some(950));
        assert!(p.enabled());
        assert!(!RetentionPolicy::off().enabled());
        assert_eq!(RetentionPolicy::off().cutoff_ms(5), None);
        let huge = RetentionPolicy { max_age: Some(Duration::MAX), ..RetentionPolicy::default() };
        assert_eq!(huge.cutoff_ms(0), Some(-i64::MAX));
        let max = RetentionPolicy { max_total_bytes: Some(u64::MAX), ..RetentionPolicy::default() };
        assert_eq!(max.low_water_bytes(), Some((u128::from(u64::MAX) * 95 / 100) as u64));
    }
}
