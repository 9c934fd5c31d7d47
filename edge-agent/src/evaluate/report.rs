//! The evaluation's report: what was run (recording, scene, model, detection settings), the
//! comparison, and the verdict; as a table for people, per-interval CSV and JSON of everything.

use std::fmt::Write as _;

use serde::Serialize;

use super::compare::{
    CountComparison, Criteria, IntervalRow, LineTotal, PassResult, PassStatus, SpeedSummary, Verdict,
};
use super::truth::format_time;

/// Everything the evaluation found (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub recording: RecordingInfo,
    pub scene: SceneInfo,
    pub model: ModelInfo,
    pub detection: DetectionInfo,
    pub truth: TruthInfo,
    pub criteria: Criteria,
    pub intervals: Vec<RowOut>,
    pub totals: Vec<LineTotal>,
    pub passes: Vec<PassOut>,
    pub summary: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordingInfo {
    pub path: String,
    /// The camera whose settings were used.
    pub camera: String,
    /// Stream time of the last frame, seconds from the first.
    pub duration_s: f64,
    pub frames_decoded: u64,
    pub frames_detected: u64,
    pub decode_errors: u64,
    pub detect_errors: u64,
    pub frames_dropped: u64,
    /// Wall-clock time of the evaluation, seconds.
    pub processing_s: f64,
    /// Frames decoded per second of processing.
    pub frames_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SceneLine {
    pub name: String,
    pub points: Vec<[f64; 2]>,
    pub in_side: &'static str,
    pub classes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SceneInfo {
    /// The file (and table) the scene was read from.
    pub source: String,
    pub image_size: Option<(u32, u32)>,
    pub calibrated: bool,
    /// Mean reprojection error of the calibration, metres.
    pub calibration_error_m: Option<f64>,
    pub lines: Vec<SceneLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
    pub backend: String,
    pub input: (u32, u32),
    pub score_threshold: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct DetectionInfo {
    /// Frames per second detected (0: every frame).
    pub detect_fps: f64,
    /// Frame rate assumed for an Annex-B recording (MP4 files carry their own).
    pub file_fps: Option<f64>,
    pub tracker_high_score: f32,
    pub tracker_low_score: f32,
    pub tracker_max_lost_s: f32,
    pub tracker_min_hits: u32,
    /// Classes tracked as one.
    pub merged_classes: Vec<Vec<String>>,
    /// Where in the picture the detector ran (the camera's `[cameras.detection]`, validated).
    pub regions: String,
    /// Tiles of the detection plan (1: the whole frame).
    pub tiles: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TruthInfo {
    pub counts: String,
    pub passes: Option<String>,
    /// Comparison interval (`--interval`), seconds; `None`: the truth file's own rows.
    pub interval_s: Option<f64>,
    pub match_window_s: f64,
}

/// A compared row as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RowOut {
    pub start: String,
    pub end: String,
    pub start_s: f64,
    pub end_s: f64,
    #[serde(flatten)]
    pub row: IntervalRow,
    pub error: i64,
    /// `None` when the truth is 0.
    pub error_pct: Option<f64>,
}

impl From<&IntervalRow> for RowOut {
    fn from(r: &IntervalRow) -> Self {
        Self {
            start: format_time(r.start_ms),
            end: format_time(r.end_ms),
            start_s: r.start_ms as f64 / 1000.0,
            end_s: r.end_ms as f64 / 1000.0,
            row: r.clone(),
            error: r.error(),
            error_pct: r.error_ratio().map(|e| e * 100.0),
        }
    }
}

/// A test pass as reported.
#[derive(Debug, Clone, Serialize)]
pub struct PassOut {
    pub time: String,
    pub measured_time: Option<String>,
    #[serde(flatten)]
    pub pass: PassResult,
}

impl From<&PassResult> for PassOut {
    fn from(p: &PassResult) -> Self {
        Self { time: format_time(p.t_ms), measured_time: p.measured_t_ms.map(format_time), pass: p.clone() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub verdict: &'static str,
    pub pass: bool,
    /// Why it failed.
    pub reasons: Vec<String>,
    pub truth: u64,
    pub measured: u64,
    pub abs_error: u64,
    /// `1 - sum |error| / sum truth` over the compared rows.
    pub accuracy: f64,
    /// Lines and directions at `min_accuracy` or better, of `lines_compared`.
    pub lines_at_min_accuracy: usize,
    pub lines_compared: usize,
    pub crossings_measured: usize,
    /// Crossings no truth row covers (another line, class or time).
    pub crossings_not_compared: usize,
    /// `None` without a passes file.
    pub speed: Option<SpeedSummary>,
    pub frames_decoded: u64,
    pub frames_detected: u64,
    /// Detector runs per detected frame (above 1 with tiles).
    pub inferences_per_frame: Option<f64>,
    pub frames_per_s: f64,
    /// What may make the result less trustworthy (truth beyond the end of the recording,
    /// undecodable or dropped frames).
    pub warnings: Vec<String>,
}

impl Report {
    /// Assembles the report's comparison part; the rest is filled by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        recording: RecordingInfo,
        scene: SceneInfo,
        model: ModelInfo,
        detection: DetectionInfo,
        truth: TruthInfo,
        criteria: Criteria,
        counts: &CountComparison,
        passes: Option<&[PassResult]>,
        verdict: Verdict,
        crossings_measured: usize,
        inferences_per_frame: Option<f64>,
        warnings: Vec<String>,
    ) -> Self {
        let summary = Summary {
            verdict: if verdict.pass { "PASS" } else { "FAIL" },
            pass: verdict.pass,
            reasons: verdict.reasons,
            truth: counts.truth,
            measured: counts.measured,
            abs_error: counts.abs_error,
            accuracy: counts.accuracy,
            lines_at_min_accuracy: counts.lines_at_threshold,
            lines_compared: counts.totals.len(),
            crossings_measured,
            crossings_not_compared: counts.crossings_not_compared,
            speed: passes.map(super::compare::speed_summary),
            frames_decoded: recording.frames_decoded,
            frames_detected: recording.frames_detected,
            inferences_per_frame,
            frames_per_s: recording.frames_per_s,
            warnings,
        };
        Self {
            recording,
            scene,
            model,
            detection,
            truth,
            criteria,
            intervals: counts.rows.iter().map(RowOut::from).collect(),
            totals: counts.totals.clone(),
            passes: passes.unwrap_or_default().iter().map(PassOut::from).collect(),
            summary,
        }
    }

    /// The human-readable report (stdout).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let r = &self.recording;
        let _ = writeln!(out, "Acceptance test of {} (camera {}, scene {})", r.path, r.camera, self.scene.source);
        let _ = writeln!(
            out,
            "{} on {}; {} frames decoded ({}), {} detected, in {:.1} s ({:.1} frames/s)",
            self.model.name,
            self.model.backend,
            r.frames_decoded,
            format_time((r.duration_s * 1000.0).round() as i64),
            r.frames_detected,
            r.processing_s,
            r.frames_per_s
        );
        let s = &self.summary;
        if let Some(ipf) = s.inferences_per_frame {
            let _ = writeln!(
                out,
                "{ipf:.2} detector inferences per detected frame ({} tile(s) in the detection plan)",
                self.detection.tiles
            );
        }

        let _ = writeln!(out, "\nCounts per interval");
        let mut rows = vec![cells(&["interval", "line", "dir", "class", "truth", "measured", "error", "error %"])];
        for i in &self.intervals {
            rows.push(vec![
                format!("{}-{}", i.start, i.end),
                i.row.line.clone(),
                i.row.direction.as_str().into(),
                i.row.class.to_string(),
                i.row.truth.to_string(),
                i.row.measured.to_string(),
                format!("{:+}", i.error),
                i.error_pct.map_or("-".into(), |p| format!("{p:+.1}")),
            ]);
        }
        out.push_str(&columns(&rows, &[false, false, false, false, true, true, true, true]));

        let _ = writeln!(out, "\nTotals per line and direction");
        let mut rows = vec![cells(&["line", "dir", "truth", "measured", "sum |error|", "accuracy %"])];
        for t in &self.totals {
            rows.push(vec![
                t.line.clone(),
                t.direction.as_str().into(),
                t.truth.to_string(),
                t.measured.to_string(),
                t.abs_error.to_string(),
                format!("{:.1}", t.accuracy * 100.0),
            ]);
        }
        out.push_str(&columns(&rows, &[false, false, true, true, true, true]));
        let _ = writeln!(
            out,
            "\nOverall count accuracy {:.1} % ({} counted wrong of {}; {} measured); {} of {} line/directions at {:.0} % or better",
            s.accuracy * 100.0,
            s.abs_error,
            s.truth,
            s.measured,
            s.lines_at_min_accuracy,
            s.lines_compared,
            self.criteria.min_accuracy * 100.0
        );
        if s.crossings_not_compared > 0 {
            let _ = writeln!(
                out,
                "{} of {} crossings measured are not compared (no truth row covers their line, class or time)",
                s.crossings_not_compared, s.crossings_measured
            );
        }

        if let Some(sp) = &s.speed {
            let _ = writeln!(out, "\nTest passes");
            let mut rows = vec![cells(&[
                "time",
                "line",
                "dir",
                "truth km/h",
                "measured km/h",
                "error km/h",
                "crossing at",
                "class",
            ])];
            for p in &self.passes {
                let q = &p.pass;
                rows.push(vec![
                    p.time.clone(),
                    q.line.clone(),
                    q.direction.as_str().into(),
                    format!("{:.1}", q.truth_kmh),
                    match q.status {
                        PassStatus::Measured => q.measured_kmh.map_or("-".into(), |v| format!("{v:.1}")),
                        PassStatus::NoSpeed => "no speed".into(),
                        PassStatus::Missed => "missed".into(),
                    },
                    q.error_kmh.map_or("-".into(), |e| format!("{e:+.1}")),
                    p.measured_time.clone().unwrap_or_else(|| "-".into()),
                    q.measured_class.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            out.push_str(&columns(&rows, &[false, false, false, true, true, true, false, false]));
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} km/h"));
            let _ = writeln!(
                out,
                "\nSpeed MAE {}, max error {} ({} of {} passes measured, {} missed, {} without speed)",
                opt(sp.mae_kmh),
                opt(sp.max_error_kmh),
                sp.measured,
                sp.passes,
                sp.missed,
                sp.no_speed
            );
        }

        if !s.warnings.is_empty() {
            let _ = writeln!(out, "\nWarnings");
            for w in &s.warnings {
                let _ = writeln!(out, "  - {w}");
            }
        }
        let mut criteria = format!("count accuracy >= {:.1} %", self.criteria.min_accuracy * 100.0);
        if s.speed.is_some() {
            let _ = write!(
                criteria,
                ", at least {:.0} % of test passes measured, each within {} km/h",
                self.criteria.min_speed_share * 100.0,
                self.criteria.max_speed_error_kmh
            );
        }
        let _ = writeln!(out, "\nVerdict: {} ({criteria})", s.verdict);
        for reason in &s.reasons {
            let _ = writeln!(out, "  - {reason}");
        }
        out
    }

    /// One CSV row per interval, line, direction and class (`--csv`).
    pub fn intervals_csv(&self) -> String {
        let mut out = String::from("start,end,line,direction,class,truth,measured,error,error_pct\n");
        for i in &self.intervals {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{}",
                i.start,
                i.end,
                i.row.line,
                i.row.direction.as_str(),
                i.row.class,
                i.row.truth,
                i.row.measured,
                i.error,
                i.error_pct.map_or(String::new(), |p| format!("{p:.2}"))
            );
        }
        out
    }
}

fn cells(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Rows as aligned columns (`right`: right-aligned, for numbers), two spaces apart.
fn columns(rows: &[Vec<String>], right: &[bool]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..n).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let w = widths[c];
                if right.get(c).copied().unwrap_or(false) { format!("{s:>w$}") } else { format!("{s:<w$}") }
            })
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use its_shared::event::Direction;

    use super::*;
    use crate::evaluate::compare::{compare_counts, match_passes, verdict};
    use crate::evaluate::truth::{ClassFilter, TestPass, TruthCount};

    fn sample() -> Report {
        let truth = [
            TruthCount {
                file_line: 2,
                start_ms: 0,
                end_ms: 900_000,
                line: "east".into(),
                direction: Direction::In,
                class: ClassFilter::Vehicles,
                count: 3,
            },
            TruthCount {
                file_line: 3,
                start_ms: 0,
                end_ms: 900_000,
                line: "east".into(),
                direction: Direction::Out,
                class: ClassFilter::Class("person".into()),
                count: 0,
            },
        ];
        let crossing = |t_ms, kmh| super::super::compare::Crossing {
            t_ms,
            line: "east".into(),
            direction: Direction::In,
            class: "car".into(),
            speed_kmh: Some(kmh),
        };
        let crossings = [crossing(1000, 48.0), crossing(5000, 50.0)];
        let counts = compare_counts(&truth, &crossings, None, 0.95);
        let passes = match_passes(
            &[TestPass { file_line: 2, t_ms: 1500, line: "east".into(), direction: Direction::In, speed_kmh: 50.0 }],
            &crossings,
            2000,
        );
        let criteria = Criteria { min_accuracy: 0.95, max_speed_error_kmh: 5.0, min_speed_share: 0.9 };
        let v = verdict(&counts, &passes, &criteria);
        Report::new(
            RecordingInfo {
                path: "rec.264".into(),
                camera: "gate-1".into(),
                duration_s: 899.9,
                frames_decoded: 9000,
                frames_detected: 9000,
                decode_errors: 0,
                detect_errors: 0,
                frames_dropped: 0,
                processing_s: 300.0,
                frames_per_s: 30.0,
            },
            SceneInfo {
                source: "scene.toml".into(),
                image_size: Some((1280, 720)),
                calibrated: true,
                calibration_error_m: Some(0.1),
                lines: Vec::new(),
            },
            ModelInfo {
                name: "m".into(),
                path: "m.onnx".into(),
                backend: "tract".into(),
                input: (300, 300),
                score_threshold: 0.5,
            },
            DetectionInfo {
                detect_fps: 10.0,
                file_fps: Some(10.0),
                tracker_high_score: 0.5,
                tracker_low_score: 0.1,
                tracker_max_lost_s: 1.0,
                tracker_min_hits: 3,
                merged_classes: Vec::new(),
                regions: "full".into(),
                tiles: 1,
            },
            TruthInfo { counts: "c.csv".into(), passes: Some("p.csv".into()), interval_s: None, match_window_s: 2.0 },
            criteria,
            &counts,
            Some(&passes),
            v,
            crossings.len(),
            Some(1.0),
            Vec::new(),
        )
    }

    #[test]
    fn the_table_shows_rows_totals_passes_and_the_verdict() {
        let t = sample().table();
        assert!(t.contains("0:00:00-0:15:00  east  in   *           3         2     -1    -33.3"), "{t}");
        assert!(t.contains("0:00:00-0:15:00  east  out  person      0         0     +0        -"), "{t}");
        assert!(
            t.contains("Overall count accuracy 66.7 % (1 counted wrong of 3; 2 measured); 1 of 2 line/directions"),
            "{t}"
        );
        assert!(t.contains("0:00:01.500  east  in         50.0           48.0        -2.0  0:00:01      car"), "{t}");
        assert!(t.contains("Speed MAE 2.0 km/h, max error 2.0 km/h (1 of 1 passes measured"), "{t}");
        assert!(
            t.contains(
                "Verdict: FAIL (count accuracy >= 95.0 %, at least 90 % of test passes measured, each within 5 km/h)\n  - count accuracy 66.7 %"
            ),
            "{t}"
        );
    }

    #[test]
    fn csv_and_json_carry_every_row_and_the_summary() {
        let r = sample();
        let csv = r.intervals_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "start,end,line,direction,class,truth,measured,error,error_pct");
        assert_eq!(lines[1], "0:00:00,0:15:00,east,in,*,3,2,-1,-33.33");
        assert_eq!(lines[2], "0:00:00,0:15:00,east,out,person,0,0,0,");
        let json = serde_json::to_value(&r).expect("serialises");
        assert_eq!(json["summary"]["verdict"], "FAIL");
        assert_eq!(json["summary"]["truth"], 3);
        assert_eq!(json["intervals"][0]["class"], "*");
        assert_eq!(json["intervals"][0]["direction"], "in");
        assert_eq!(json["intervals"][0]["start"], "0:00:00");
        assert_eq!(json["intervals"][0]["error"], -1);
        assert_eq!(json["passes"][0]["status"], "measured");
        assert_eq!(json["passes"][0]["error_kmh"], -2.0);
        assert_eq!(json["summary"]["speed"]["max_error_kmh"], 2.0);
        assert_eq!(json["summary"]["inferences_per_frame"], 1.0);
        assert_eq!(json["recording"]["frames_per_s"], 30.0);
    }
}
