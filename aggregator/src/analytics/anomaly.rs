//! Anomaly detection arithmetic (no I/O): robust baselines (median and MAD) and the two checks.
//!
//! - **Volume** (`volume_high` / `volume_low`): a line's count in a closed 15-minute bucket
//!   against the same time of week in the previous weeks (the bucket itself and its two
//!   neighbours, so 8 weeks give up to 24 samples). Score = (value − median) / spread, where
//!   spread = max(1.4826 × MAD, √median, 1): the MAD scaled to a standard deviation, floored by
//!   the Poisson noise of a count so that a quiet, very regular road does not turn every small
//!   difference into an anomaly. Flagged when |score| ≥ the threshold, the difference is at least
//!   [`MIN_VOLUME_DIFFERENCE`] road users, and the baseline has enough samples.
//! - **Speed drop** (`speed_drop`): a line's mean speed in a closed minute against the per-minute
//!   means of the preceding window (default 30 minutes) — sudden, so the recent past is the
//!   baseline. Flagged when the score ≤ −threshold (spread floored at [`MIN_SPEED_SPREAD_KMH`]),
//!   the value is below `ratio` × median, and the minute has enough measured crossings: a likely
//!   incident (traffic slowing behind an obstruction).

/// One week in milliseconds: the step of time-of-week baselines.
pub const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;
/// A volume anomaly needs at least this absolute difference from the baseline (road users).
pub const MIN_VOLUME_DIFFERENCE: f64 = 5.0;
/// Floor of the speed spread, km/h (speed noise on a steady road).
pub const MIN_SPEED_SPREAD_KMH: f64 = 2.0;

/// A robust centre and spread of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub median: f64,
    /// 1.4826 × MAD (a standard deviation for normal data), floored as the check requires.
    pub spread: f64,
    pub samples: usize,
}

/// The median of `values` (sorts them); `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// Median and scaled MAD of `samples`, the spread floored at `floor`.
pub fn robust_baseline(samples: &[f64], floor: f64) -> Option<Baseline> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    let m = median(&mut v)?;
    let mut deviations: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
    let mad = median(&mut deviations)?;
    Some(Baseline { median: m, spread: (1.4826 * mad).max(floor), samples: v.len() })
}

/// The settings of the checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// |score| at or above which a value is anomalous (3.5 is the usual cut for MAD scores).
    pub score: f64,
    /// Fewest baseline samples a verdict needs.
    pub min_samples: usize,
    /// Speed drop: the value must also be below this fraction of the median.
    pub speed_drop_ratio: f64,
    /// Speed drop: fewest measured crossings in the minute.
    pub min_crossings: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { score: 3.5, min_samples: 6, speed_drop_ratio: 0.6, min_crossings: 3 }
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub kind: &'static str,
    pub baseline: Baseline,
    pub score: f64,
}

/// The volume check of one line's count against its time-of-week samples.
pub fn volume(value: f64, samples: &[f64], t: &Thresholds) -> Option<Verdict> {
    if samples.len() < t.min_samples {
        return None;
    }
    let b = robust_baseline(samples, 1.0)?;
    let b = Baseline { spread: b.spread.max(b.median.max(0.0).sqrt()), ..b };
    let score = (value - b.median) / b.spread;
    if score.abs() < t.score || (value - b.median).abs() < MIN_VOLUME_DIFFERENCE {
        return None;
    }
    Some(Verdict { kind: if score > 0.0 { "volume_high" } else { "volume_low" }, baseline: b, score })
}

/// The speed-drop check of one line's mean speed in a minute (`crossings` measured) against the
/// preceding minutes' means.
pub fn speed_drop(value: f64, crossings: u64, history: &[f64], t: &Thresholds) -> Option<Verdict> {
    if history.len() < t.min_samples || crossings < t.min_crossings {
        return None;
    }
    let b = robust_baseline(history, MIN_SPEED_SPREAD_KMH)?;
    let score = (value - b.median) / b.spread;
    (score <= -t.score && value < t.speed_drop_ratio * b.median).then_some(Verdict {
        kind: "speed_drop",
        baseline: b,
        score,
    })
}

/// The buckets of the baseline of a 15-minute bucket: the same time of week in each of the
/// previous `weeks` weeks, with its neighbours on either side.
pub fn time_of_week_buckets(bucket_ms: i64, bucket_len_ms: i64, weeks: u32) -> Vec<i64> {
    let mut out = Vec::with_capacity(weeks as usize * 3);
    for w in 1..=i64::from(weeks) {
        for d in -1..=1 {
            out.push(bucket_ms - w * WEEK_MS + d * bucket_len_ms);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_mad_resist_outliers() {
        let b = robust_baseline(&[10.0, 11.0, 9.0, 10.0, 12.0, 500.0], 0.0).expect("baseline");
        assert_eq!(b.median, 10.5);
        // deviations 0.5 0.5 1.5 0.5 1.5 489.5 -> median 1.0
        assert!((b.spread - 1.4826).abs() < 1e-9);
        assert_eq!(b.samples, 6);
        assert_eq!(robust_baseline(&[], 1.0), None);
    }

    #[test]
    fn a_busy_slot_against_a_quiet_baseline_is_high_volume_and_normal_noise_is_not() {
        let t = Thresholds::default();
        let samples = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0, 98.0, 102.0];
        assert_eq!(volume(106.0, &samples, &t), None, "within the noise");
        let v = volume(180.0, &samples, &t).expect("anomaly");
        assert_eq!(v.kind, "volume_high");
        assert!(v.score > 3.5);
        let v = volume(20.0, &samples, &t).expect("anomaly");
        assert_eq!(v.kind, "volume_low");
        // Too few weeks of history: no verdict at all.
        assert_eq!(volume(500.0, &samples[..3], &t), None);
    }

    #[test]
    fn small_counts_need_a_real_difference() {
        let t = Thresholds::default();
        // A night slot: 0-2 vehicles; 6 is unusual in score but only a handful of cars.
        let samples = [0.0, 1.0, 0.0, 2.0, 1.0, 0.0, 1.0];
        assert_eq!(volume(4.0, &samples, &t), None);
        assert_eq!(volume(12.0, &samples, &t).map(|v| v.kind), Some("volume_high"));
    }

    #[test]
    fn a_sudden_speed_drop_is_flagged_and_a_slow_drift_or_thin_minute_is_not() {
        let t = Thresholds::default();
        let history = [62.0, 58.0, 61.0, 60.0, 59.0, 63.0, 57.0, 60.0, 61.0, 59.0];
        let v = speed_drop(18.0, 8, &history, &t).expect("incident");
        assert_eq!(v.kind, "speed_drop");
        assert!(v.score < -3.5);
        assert_eq!(speed_drop(52.0, 8, &history, &t), None, "a little slower");
        assert_eq!(speed_drop(18.0, 1, &history, &t), None, "one slow car is no incident");
        assert_eq!(speed_drop(18.0, 8, &history[..4], &t), None, "too little history");
    }

    #[test]
    fn time_of_week_buckets_step_back_by_weeks_with_neighbours() {
        let b = 10 * WEEK_MS;
        let got = time_of_week_buckets(b, 900_000, 2);
        assert_eq!(
            got,
            vec![
                b - WEEK_MS - 900_000,
                b - WEEK_MS,
                b - WEEK_MS + 900_000,
                b - 2 * WEEK_MS - 900_000,
                b - 2 * WEEK_MS,
                b - 2 * WEEK_MS + 900_000
            ]
        );
    }
}
