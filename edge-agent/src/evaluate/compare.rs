//! The agent's crossings against the truth: pure functions, no I/O.
//!
//! - **Counts.** A crossing at time `t` belongs to a truth row when `start <= t < end`: a crossing
//!   exactly on the boundary between two intervals is in the later one (the convention of
//!   interval counts: 0:15:00 starts the second quarter hour). It is counted by every row of its
//!   line and direction whose class matches its label (`*`: [`VEHICLE_CLASSES`]). With a
//!   comparison interval, the rows of one bin (`[k * interval, (k + 1) * interval)`), line,
//!   direction and class are summed first, truth and measurement alike.
//! - **Accuracy** of a set of rows: `1 - sum |measured - truth| / sum truth`, the errors taken
//!   per row (interval) before they are summed, so a lane over-counted in one quarter hour and
//!   under-counted in the next does not come out exact; at least 0. With no road user in the
//!   truth it is 1 when nothing was measured either, else 0.
//! - **Passes.** Each test pass is matched to a crossing of its line and direction within the
//!   match window, nearest first over all pairs (so the order of the file does not matter), each
//!   crossing to at most one pass; a pass left without one is missed.
//!
//! [`VEHICLE_CLASSES`]: super::truth::VEHICLE_CLASSES

use std::collections::BTreeMap;

use its_shared::event::Direction;
use serde::Serialize;

use super::truth::{ClassFilter, TestPass, TruthCount};

/// Accuracies within this of the threshold pass it (they are ratios of small integers).
const EPS: f64 = 1e-9;

/// A line crossing the agent reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Crossing {
    /// Milliseconds from the start of the recording.
    pub t_ms: i64,
    pub line: String,
    pub direction: Direction,
    /// The road user's class (the model's label).
    pub class: String,
    pub speed_kmh: Option<f64>,
}

/// One compared row: an interval, line, direction and class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IntervalRow {
    pub start_ms: i64,
    pub end_ms: i64,
    pub line: String,
    pub direction: Direction,
    pub class: ClassFilter,
    pub truth: u32,
    pub measured: u32,
    /// Lines of the truth file the row comes from.
    pub truth_lines: Vec<usize>,
}

impl IntervalRow {
    /// `measured - truth`.
    pub fn error(&self) -> i64 {
        i64::from(self.measured) - i64::from(self.truth)
    }

    /// The error relative to the truth (0.1 = 10 %); `None` when the truth is 0.
    pub fn error_ratio(&self) -> Option<f64> {
        (self.truth > 0).then(|| self.error() as f64 / f64::from(self.truth))
    }
}

/// The rows of one line and direction together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineTotal {
    pub line: String,
    pub direction: Direction,
    pub truth: u64,
    pub measured: u64,
    /// Sum of the rows' absolute errors.
    pub abs_error: u64,
    pub accuracy: f64,
}

/// The counts compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountComparison {
    pub rows: Vec<IntervalRow>,
    pub totals: Vec<LineTotal>,
    pub truth: u64,
    pub measured: u64,
    pub abs_error: u64,
    /// Over every row; see the module documentation.
    pub accuracy: f64,
    /// Lines and directions whose accuracy is at least the threshold, of all compared.
    pub lines_at_threshold: usize,
    pub threshold: f64,
    /// Crossings the agent reported that no truth row covers (another line, class or time).
    pub crossings_not_compared: usize,
}

/// `1 - abs_error / truth`, at least 0; 1 or 0 when the truth is 0 (see the module doc).
pub fn accuracy(abs_error: u64, truth: u64) -> f64 {
    if truth == 0 {
        return if abs_error == 0 { 1.0 } else { 0.0 };
    }
    (1.0 - abs_error as f64 / truth as f64).max(0.0)
}

/// Whether `accuracy` reaches `threshold`.
pub fn reaches(accuracy: f64, threshold: f64) -> bool {
    accuracy + EPS >= threshold
}

fn covers(row: &TruthCount, c: &Crossing) -> bool {
    row.start_ms <= c.t_ms
        && c.t_ms < row.end_ms
        && row.line == c.line
        && row.direction == c.direction
        && row.class.matches(&c.class)
}

/// Compares the crossings with the truth rows; with `interval_ms`, in bins of that length (the
/// rows must each lie in one bin, as [`super::truth::parse_counts`] checks). `threshold` is the
/// accuracy a line and direction must reach to be counted in `lines_at_threshold`.
pub fn compare_counts(
    truth: &[TruthCount],
    crossings: &[Crossing],
    interval_ms: Option<i64>,
    threshold: f64,
) -> CountComparison {
    // (start, end or bin, line, direction, class) → row.
    let mut rows: BTreeMap<(i64, i64, String, Direction, ClassFilter), IntervalRow> = BTreeMap::new();
    for t in truth {
        let (start, end) = match interval_ms {
            Some(bin) if bin > 0 => {
                let k = t.start_ms.div_euclid(bin);
                (k * bin, (k + 1) * bin)
            }
            _ => (t.start_ms, t.end_ms),
        };
        let measured = crossings.iter().filter(|c| covers(t, c)).count() as u32;
        let row =
            rows.entry((start, end, t.line.clone(), t.direction, t.class.clone())).or_insert_with(|| IntervalRow {
                start_ms: t.start_ms,
                end_ms: t.end_ms,
                line: t.line.clone(),
                direction: t.direction,
                class: t.class.clone(),
                truth: 0,
                measured: 0,
                truth_lines: Vec::new(),
            });
        // A bin shows the time its rows cover.
        row.start_ms = row.start_ms.min(t.start_ms);
        row.end_ms = row.end_ms.max(t.end_ms);
        row.truth = row.truth.saturating_add(t.count);
        row.measured = row.measured.saturating_add(measured);
        row.truth_lines.push(t.file_line);
    }
    let rows: Vec<IntervalRow> = rows.into_values().collect();
    let mut per_line: BTreeMap<(String, Direction), (u64, u64, u64)> = BTreeMap::new();
    for r in &rows {
        let e = per_line.entry((r.line.clone(), r.direction)).or_default();
        e.0 += u64::from(r.truth);
        e.1 += u64::from(r.measured);
        e.2 += r.error().unsigned_abs();
    }
    let totals: Vec<LineTotal> = per_line
        .into_iter()
        .map(|((line, direction), (truth, measured, abs_error))| LineTotal {
            line,
            direction,
            truth,
            measured,
            abs_error,
            accuracy: accuracy(abs_error, truth),
        })
        .collect();
    let (t, m, e) = totals.iter().fold((0, 0, 0), |(t, m, e), l| (t + l.truth, m + l.measured, e + l.abs_error));
    CountComparison {
        lines_at_threshold: totals.iter().filter(|l| reaches(l.accuracy, threshold)).count(),
        totals,
        rows,
        truth: t,
        measured: m,
        abs_error: e,
        accuracy: accuracy(e, t),
        threshold,
        crossings_not_compared: crossings.iter().filter(|c| !truth.iter().any(|t| covers(t, c))).count(),
    }
}

/// How a test pass was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassStatus {
    /// Matched to a crossing with a speed.
    Measured,
    /// Matched to a crossing that carries no speed (no calibration, or a track too short).
    NoSpeed,
    /// No crossing of that line and direction within the match window.
    Missed,
}

/// One test pass against the agent's crossing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassResult {
    pub file_line: usize,
    pub t_ms: i64,
    pub line: String,
    pub direction: Direction,
    pub truth_kmh: f64,
    pub status: PassStatus,
    /// The matched crossing's time and class.
    pub measured_t_ms: Option<i64>,
    pub measured_class: Option<String>,
    pub measured_kmh: Option<f64>,
    /// `measured - truth`, km/h.
    pub error_kmh: Option<f64>,
}

/// The speeds over all passes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeedSummary {
    pub passes: usize,
    pub measured: usize,
    pub no_speed: usize,
    pub missed: usize,
    /// Mean absolute error of the measured passes, km/h.
    pub mae_kmh: Option<f64>,
    /// Largest absolute error, km/h.
    pub max_error_kmh: Option<f64>,
}

/// Matches each pass to a crossing (see the module documentation).
pub fn match_passes(passes: &[TestPass], crossings: &[Crossing], window_ms: i64) -> Vec<PassResult> {
    let mut pairs: Vec<(i64, usize, usize)> = Vec::new();
    for (i, p) in passes.iter().enumerate() {
        for (j, c) in crossings.iter().enumerate() {
            let dt = (c.t_ms - p.t_ms).abs();
            if c.line == p.line && c.direction == p.direction && dt <= window_ms {
                pairs.push((dt, i, j));
            }
        }
    }
    pairs.sort_unstable();
    let mut of_pass: Vec<Option<usize>> = vec![None; passes.len()];
    let mut taken = vec![false; crossings.len()];
    for (_, i, j) in pairs {
        if of_pass[i].is_none() && !taken[j] {
            of_pass[i] = Some(j);
            taken[j] = true;
        }
    }
    passes
        .iter()
        .zip(of_pass)
        .map(|(p, j)| {
            let c = j.map(|j| &crossings[j]);
            let measured_kmh = c.and_then(|c| c.speed_kmh);
            PassResult {
                file_line: p.file_line,
                t_ms: p.t_ms,
                line: p.line.clone(),
                direction: p.direction,
                truth_kmh: p.speed_kmh,
                status: match (c, measured_kmh) {
                    (None, _) => PassStatus::Missed,
                    (Some(_), None) => PassStatus::NoSpeed,
                    (Some(_), Some(_)) => PassStatus::Measured,
                },
                measured_t_ms: c.map(|c| c.t_ms),
                measured_class: c.map(|c| c.class.clone()),
                measured_kmh,
                error_kmh: measured_kmh.map(|m| m - p.speed_kmh),
            }
        })
        .collect()
}

/// Sums up the passes.
pub fn speed_summary(results: &[PassResult]) -> SpeedSummary {
    let errors: Vec<f64> = results.iter().filter_map(|r| r.error_kmh.map(f64::abs)).collect();
    SpeedSummary {
        passes: results.len(),
        measured: errors.len(),
        no_speed: results.iter().filter(|r| r.status == PassStatus::NoSpeed).count(),
        missed: results.iter().filter(|r| r.status == PassStatus::Missed).count(),
        mae_kmh: (!errors.is_empty()).then(|| errors.iter().sum::<f64>() / errors.len() as f64),
        max_error_kmh: errors.iter().copied().reduce(f64::max),
    }
}

/// What the acceptance test requires.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Criteria {
    /// Overall count accuracy at least this.
    pub min_accuracy: f64,
    /// Each test pass measured within this many km/h...
    pub max_speed_error_kmh: f64,
    /// ...and at least this share of the test passes found with a speed (a vehicle that comes into
    /// the picture just before the line may be counted before its speed can be measured).
    pub min_speed_share: f64,
}

/// PASS or FAIL, with why it failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    /// One sentence per criterion missed (empty when passed).
    pub reasons: Vec<String>,
}

/// The verdict: counts accurate enough overall, and (with passes) enough of them measured, every
/// measured one within the speed tolerance.
pub fn verdict(counts: &CountComparison, passes: &[PassResult], c: &Criteria) -> Verdict {
    let mut reasons = Vec::new();
    if !reaches(counts.accuracy, c.min_accuracy) {
        reasons.push(format!(
            "count accuracy {:.1} % is below the required {:.1} % ({} counted wrong of {})",
            counts.accuracy * 100.0,
            c.min_accuracy * 100.0,
            counts.abs_error,
            counts.truth
        ));
    }
    let s = speed_summary(passes);
    let measured = s.passes.saturating_sub(s.missed + s.no_speed);
    if s.passes > 0 && (measured as f64) < c.min_speed_share * s.passes as f64 - 1e-9 {
        reasons.push(format!(
            "{measured} of {} test passes measured ({} not found within the match window, {} counted without a speed); at least {:.0} % required",
            s.passes,
            s.missed,
            s.no_speed,
            c.min_speed_share * 100.0
        ));
    }
    let over = passes.iter().filter(|p| p.error_kmh.is_some_and(|e| e.abs() > c.max_speed_error_kmh)).count();
    if over > 0 {
        reasons.push(format!(
            "{over} test pass(es) measured more than {} km/h off (worst {:.1} km/h)",
            c.max_speed_error_kmh,
            s.max_error_kmh.unwrap_or(0.0)
        ));
    }
    Verdict { pass: reasons.is_empty(), reasons }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start_s: i64, end_s: i64, line: &str, d: Direction, class: ClassFilter, count: u32) -> TruthCount {
        TruthCount {
            file_line: 0,
            start_ms: start_s * 1000,
            end_ms: end_s * 1000,
            line: line.into(),
            direction: d,
            class,
            count,
        }
    }

    fn car() -> ClassFilter {
        ClassFilter::Class("car".into())
    }

    fn crossing(t_ms: i64, line: &str, d: Direction, class: &str, speed: Option<f64>) -> Crossing {
        Crossing { t_ms, line: line.into(), direction: d, class: class.into(), speed_kmh: speed }
    }

    #[test]
    fn a_crossing_on_an_interval_boundary_counts_in_the_later_interval() {
        use Direction::In;
        let truth = [row(0, 60, "a", In, car(), 1), row(60, 120, "a", In, car(), 1)];
        let at = |ms| vec![crossing(ms, "a", In, "car", None)];
        let measured = |c: &CountComparison| c.rows.iter().map(|r| r.measured).collect::<Vec<_>>();
        assert_eq!(measured(&compare_counts(&truth, &at(59_999), None, 0.95)), [1, 0]);
        assert_eq!(measured(&compare_counts(&truth, &at(60_000), None, 0.95)), [0, 1], "the boundary is the later's");
        assert_eq!(measured(&compare_counts(&truth, &at(0), None, 0.95)), [1, 0], "start is included");
        let c = compare_counts(&truth, &at(120_000), None, 0.95);
        assert_eq!(measured(&c), [0, 0], "end is excluded");
        assert_eq!(c.crossings_not_compared, 1);
    }

    #[test]
    fn star_counts_every_vehicle_and_nothing_else() {
        use Direction::Out;
        let truth = [
            row(0, 60, "a", Out, ClassFilter::Vehicles, 4),
            row(0, 60, "a", Out, ClassFilter::Class("person".into()), 1),
        ];
        let crossings: Vec<Crossing> = ["car", "truck", "bus", "motorcycle", "bicycle", "person", "dog"]
            .iter()
            .enumerate()
            .map(|(i, c)| crossing(i as i64 * 1000, "a", Out, c, None))
            .collect();
        let c = compare_counts(&truth, &crossings, None, 0.95);
        let star = c.rows.iter().find(|r| r.class == ClassFilter::Vehicles).expect("row");
        assert_eq!(star.measured, 4, "car, truck, bus, motorcycle");
        let person = c.rows.iter().find(|r| r.class != ClassFilter::Vehicles).expect("row");
        assert_eq!(person.measured, 1);
        assert_eq!(c.crossings_not_compared, 2, "the bicycle and the dog");
        assert_eq!(c.accuracy, 1.0);
    }

    #[test]
    fn other_lines_directions_and_classes_are_not_counted() {
        use Direction::{In, Out};
        let truth = [row(0, 60, "a", In, car(), 2)];
        let crossings = [
            crossing(1000, "a", In, "car", None),
            crossing(2000, "a", Out, "car", None),
            crossing(3000, "b", In, "car", None),
            crossing(4000, "a", In, "truck", None),
        ];
        let c = compare_counts(&truth, &crossings, None, 0.95);
        assert_eq!((c.rows[0].truth, c.rows[0].measured, c.rows[0].error()), (2, 1, -1));
        assert_eq!(c.rows[0].error_ratio(), Some(-0.5));
        assert_eq!(c.crossings_not_compared, 3);
    }

    #[test]
    fn accuracy_sums_the_absolute_errors_of_the_intervals() {
        use Direction::{In, Out};
        // Lane a/in: +2 then -2 (net 0, yet 4 wrong of 20); a/out exact.
        let truth =
            [row(0, 900, "a", In, car(), 10), row(900, 1800, "a", In, car(), 10), row(0, 1800, "a", Out, car(), 20)];
        let mut crossings = Vec::new();
        for k in 0..12 {
            crossings.push(crossing(k * 1000, "a", In, "car", None));
        }
        for k in 0..8 {
            crossings.push(crossing(900_000 + k * 1000, "a", In, "car", None));
        }
        for k in 0..20 {
            crossings.push(crossing(k * 1000, "a", Out, "car", None));
        }
        let c = compare_counts(&truth, &crossings, None, 0.95);
        let a_in = &c.totals[0];
        assert_eq!((a_in.truth, a_in.measured, a_in.abs_error), (20, 20, 4));
        assert!((a_in.accuracy - 0.8).abs() < 1e-12);
        assert_eq!(c.totals[1].accuracy, 1.0);
        assert_eq!((c.truth, c.measured, c.abs_error), (40, 40, 4));
        assert!((c.accuracy - 0.9).abs() < 1e-12);
        assert_eq!(c.lines_at_threshold, 1, "only a/out reaches 95 %");
        assert!(reaches(accuracy(1, 20), 0.95), "exactly 95 % passes despite rounding");
        assert!(!reaches(accuracy(2, 39), 0.95));
    }

    #[test]
    fn accuracy_of_empty_truth_and_of_gross_overcounts() {
        assert_eq!(accuracy(0, 0), 1.0);
        assert_eq!(accuracy(3, 0), 0.0);
        assert_eq!(accuracy(30, 10), 0.0, "never negative");
        assert_eq!(accuracy(0, 7), 1.0);
    }

    #[test]
    fn with_an_interval_rows_are_summed_per_bin() {
        use Direction::In;
        // Loop detector minutes compared per 15 min; minute 3 missing from the truth.
        let mut truth: Vec<TruthCount> =
            (0..15).filter(|m| *m != 3).map(|m| row(m * 60, m * 60 + 60, "a", In, car(), 1)).collect();
        truth.push(row(900, 960, "a", In, car(), 2));
        let crossings: Vec<Crossing> = (0..16).map(|m| crossing(m * 60_000 + 30_000, "a", In, "car", None)).collect();
        let c = compare_counts(&truth, &crossings, Some(900_000), 0.95);
        assert_eq!(c.rows.len(), 2);
        assert_eq!((c.rows[0].start_ms, c.rows[0].end_ms, c.rows[0].truth, c.rows[0].measured), (0, 900_000, 14, 14));
        assert_eq!(c.rows[0].truth_lines.len(), 14);
        assert_eq!(
            (c.rows[1].start_ms, c.rows[1].end_ms, c.rows[1].truth, c.rows[1].measured),
            (900_000, 960_000, 2, 1)
        );
        assert_eq!(c.crossings_not_compared, 1, "minute 3's crossing has no truth");
    }

    #[test]
    fn passes_match_the_nearest_crossing_once_and_the_verdict_follows() {
        use Direction::{In, Out};
        let pass = |t_ms, d, kmh| TestPass { file_line: 0, t_ms, line: "a".into(), direction: d, speed_kmh: kmh };
        let passes = [pass(10_000, In, 50.0), pass(12_500, In, 60.0), pass(30_000, In, 40.0), pass(40_000, Out, 30.0)];
        let crossings = [
            crossing(11_900, "a", In, "car", Some(58.0)),
            crossing(10_400, "a", In, "truck", Some(53.0)),
            crossing(30_100, "a", Out, "car", Some(40.0)),
            crossing(40_200, "a", Out, "car", None),
        ];
        let r = match_passes(&passes, &crossings, 2000);
        assert_eq!(r[0].measured_t_ms, Some(10_400));
        assert_eq!(r[0].measured_class.as_deref(), Some("truck"));
        assert_eq!(r[1].measured_t_ms, Some(11_900), "nearest over all pairs, each crossing once");
        assert_eq!(r[1].error_kmh, Some(-2.0));
        assert_eq!(r[2].status, PassStatus::Missed, "a crossing in the other direction is not it");
        assert_eq!(r[3].status, PassStatus::NoSpeed);
        let s = speed_summary(&r);
        assert_eq!((s.passes, s.measured, s.missed, s.no_speed), (4, 2, 1, 1));
        assert_eq!(s.mae_kmh, Some(2.5));
        assert_eq!(s.max_error_kmh, Some(3.0));

        // One car in (the truck is not a car).
        let counts = compare_counts(&[row(0, 60, "a", In, car(), 1)], &crossings, None, 0.95);
        let criteria = Criteria { min_accuracy: 0.95, max_speed_error_kmh: 5.0, min_speed_share: 0.9 };
        let v = verdict(&counts, &r, &criteria);
        assert!(!v.pass);
        assert_eq!(v.reasons.len(), 1, "{:?}", v.reasons);
        assert!(v.reasons[0].starts_with("2 of 4 test passes measured (1 not found"), "{:?}", v.reasons);
        // Half of them measured is enough when half is what is asked for.
        assert!(verdict(&counts, &r, &Criteria { min_speed_share: 0.5, ..criteria }).pass);
        let v = verdict(&counts, &r[..2], &criteria);
        assert!(v.pass, "{:?}", v.reasons);
        let v = verdict(&counts, &r[..2], &Criteria { max_speed_error_kmh: 2.5, ..criteria });
        assert_eq!(v.reasons, vec!["1 test pass(es) measured more than 2.5 km/h off (worst 3.0 km/h)".to_string()]);
        let off = compare_counts(&[row(0, 60, "a", In, car(), 5)], &crossings, None, 0.95);
        let v = verdict(&off, &[], &criteria);
        assert_eq!(
            v.reasons,
            vec!["count accuracy 20.0 % is below the required 95.0 % (4 counted wrong of 5)".to_string()]
        );
    }
}
