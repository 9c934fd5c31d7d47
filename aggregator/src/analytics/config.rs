//! `[analytics]`: the worker's settings as written in the configuration file, and their
//! validation (every error with its path).

use std::time::Duration;

use its_shared::config::ConfigErrors;
use serde::Deserialize;

use super::anomaly::Thresholds;

/// `[analytics]` as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAnalytics {
    /// Compute rollups and look for anomalies (default true).
    pub enabled: bool,
    /// Milliseconds between passes of the worker when nothing wakes it (100..=60000; default 1000).
    pub interval_ms: u64,
    /// |robust score| from which a value is an anomaly (2..=20; default 3.5).
    pub anomaly_score: f64,
    /// Weeks of history of a volume baseline (2..=52; default 8).
    pub baseline_weeks: u32,
    /// Fewest baseline samples before anything is judged (3..=200; default 6).
    pub min_baseline_samples: u32,
    /// Minutes before a minute that form its speed baseline (5..=240; default 30).
    pub speed_window_minutes: u32,
    /// A speed drop must also be below this fraction of the baseline (0.1..=0.95; default 0.6).
    pub speed_drop_ratio: f64,
    /// Fewest measured crossings in a minute for a speed verdict (1..=1000; default 3).
    pub min_speed_crossings: u64,
    /// Seconds after a bucket closes before it is checked, for late events (0..=3600; default 30).
    pub check_delay_s: u64,
}

impl Default for RawAnalytics {
    fn default() -> Self {
        let t = Thresholds::default();
        Self {
            enabled: true,
            interval_ms: 1000,
            anomaly_score: t.score,
            baseline_weeks: 8,
            min_baseline_samples: t.min_samples as u32,
            speed_window_minutes: 30,
            speed_drop_ratio: t.speed_drop_ratio,
            min_speed_crossings: t.min_crossings,
            check_delay_s: 30,
        }
    }
}

/// `[analytics]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticsConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub thresholds: Thresholds,
    pub baseline_weeks: u32,
    pub speed_window: Duration,
    pub check_delay: Duration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        let mut e = ConfigErrors::new("defaults");
        RawAnalytics::default().validate(&mut e)
    }
}

impl RawAnalytics {
    /// The validated settings; problems are pushed to `e` with their paths.
    pub fn validate(&self, e: &mut ConfigErrors) -> AnalyticsConfig {
        let a = self;
        e.check((100..=60_000).contains(&a.interval_ms), "analytics.interval_ms", || {
            "must be between 100 and 60000".into()
        });
        e.check((2.0..=20.0).contains(&a.anomaly_score), "analytics.anomaly_score", || {
            "must be between 2 and 20".into()
        });
        e.check((2..=52).contains(&a.baseline_weeks), "analytics.baseline_weeks", || "must be between 2 and 52".into());
        e.check((3..=200).contains(&a.min_baseline_samples), "analytics.min_baseline_samples", || {
            "must be between 3 and 200".into()
        });
        e.check((5..=240).contains(&a.speed_window_minutes), "analytics.speed_window_minutes", || {
            "must be between 5 and 240".into()
        });
        e.check((0.1..=0.95).contains(&a.speed_drop_ratio), "analytics.speed_drop_ratio", || {
            "must be between 0.1 and 0.95".into()
        });
        e.check((1..=1000).contains(&a.min_speed_crossings), "analytics.min_speed_crossings", || {
            "must be between 1 and 1000".into()
        });
        e.check(a.check_delay_s <= 3600, "analytics.check_delay_s", || "must be at most 3600".into());
        AnalyticsConfig {
            enabled: a.enabled,
            interval: Duration::from_millis(a.interval_ms),
            thresholds: Thresholds {
                score: a.anomaly_score,
                min_samples: a.min_baseline_samples as usize,
                speed_drop_ratio: a.speed_drop_ratio,
                min_crossings: a.min_speed_crossings,
            },
            baseline_weeks: a.baseline_weeks,
            speed_window: Duration::from_secs(u64::from(a.speed_window_minutes) * 60),
            check_delay: Duration::from_secs(a.check_delay_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_all_reported_with_their_paths() {
        let raw = RawAnalytics { interval_ms: 5, anomaly_score: 0.5, speed_drop_ratio: 2.0, ..Default::default() };
        let mut e = ConfigErrors::new("test");
        raw.validate(&mut e);
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, vec!["analytics.interval_ms", "analytics.anomaly_score", "analytics.speed_drop_ratio"]);
    }
}
