//! `its-agent evaluate`: the acceptance test of a camera. A recording of the camera is run through
//! the agent's own pipeline (decode, detection, tracking, the camera's scene analysis: the code the
//! agent runs, as fast as the machine allows, no frame dropped) and its line crossings are
//! compared with counts a person made (and, optionally, test vehicles of known speed); the result
//! is a table, CSV, JSON and a PASS/FAIL verdict. How a site engineer runs it:
//! `docs/acceptance-test.md`.
//!
//! - [`truth`]: the truth files (counts per interval, test passes) and their checks;
//! - [`compare`]: crossings binned into the truth's intervals, accuracy, passes matched, verdict
//!   (pure functions);
//! - [`report`]: the table, the per-interval CSV and the JSON;
//! - [`run`]: the recording as the configured camera, through the pipeline and the analyzer.
//!
//! Exit codes: [`EXIT_PASS`], [`EXIT_FAIL`], [`EXIT_NOT_EVALUATED`].
//!
//! May depend on: `config` (the camera, detector and tracker as the agent validates them),
//! `analyze` (the scene and its analyzer), `pipeline` (decode, detection, tracking), `vision`
//! (loading the configured detector), `source` (the recording's frame rate, for the report).

pub mod compare;
pub mod report;
pub mod run;
pub mod truth;

use std::path::{Path, PathBuf};

use its_shared::config::ConfigErrors;

use crate::source::VideoSource;
use compare::{Criteria, compare_counts, match_passes, verdict};
use report::{DetectionInfo, ModelInfo, RecordingInfo, Report, SceneInfo, SceneLine, TruthInfo};
use run::{EvaluationPlan, RunOutcome, SceneSource};
use truth::{TestPass, TruthCount, TruthErrors, format_time};

/// The recording met every criterion.
pub const EXIT_PASS: u8 = 0;
/// The recording was evaluated and missed a criterion.
pub const EXIT_FAIL: u8 = 1;
/// Nothing was evaluated: a truth file, the scene, the configuration or an argument is wrong, or
/// the recording could not be read (the message says which and where); also when the report
/// files asked for could not be written.
pub const EXIT_NOT_EVALUATED: u8 = 2;

/// A truth interval may end this long after the last frame before it is flagged (ms): a
/// recording stopped by hand ends a moment before the count sheet's last quarter hour.
const END_TOLERANCE_MS: i64 = 1000;

/// What to evaluate (the command line's `evaluate`).
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub recording: PathBuf,
    pub truth: PathBuf,
    pub passes: Option<PathBuf>,
    /// The configured camera whose scene and detection settings are used.
    pub camera: Option<String>,
    /// A file holding just a scene table (replaces the camera's scene).
    pub scene: Option<PathBuf>,
    /// Frame rate of an Annex-B recording (default: the camera's `file_fps`).
    pub fps: Option<f64>,
    /// Compare in bins of this length (ms) instead of the truth file's own rows.
    pub interval_ms: Option<i64>,
    pub csv: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub min_accuracy: f64,
    pub max_speed_error_kmh: f64,
    /// Share of the test passes that must be found with a speed.
    pub min_speed_share: f64,
    pub match_window_ms: i64,
}

/// Why nothing was evaluated.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    /// An argument is out of range or names something that does not exist.
    #[error("{0}")]
    Usage(String),
    /// The camera, detector or tracker configuration is invalid.
    #[error("{0}")]
    Config(ConfigErrors),
    /// The scene file cannot be read or parsed, or has nothing to compare.
    #[error("scene: {0}")]
    Scene(String),
    /// Problems of the truth files, each with file:line.
    #[error("{0}")]
    Truth(TruthErrors),
    /// The recording is missing or unreadable.
    #[error("recording: {0}")]
    Recording(String),
    /// The detector does not load.
    #[error("detector: {0}")]
    Detector(String),
    /// The pipeline could not be started.
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// A report file could not be written.
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

impl EvaluateOptions {
    fn check(&self) -> Result<(), EvaluateError> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.min_accuracy) {
            problems.push(format!("--min-accuracy {} is outside 0..=1 (0.95 = 95 %)", self.min_accuracy));
        }
        if !(self.max_speed_error_kmh.is_finite() && self.max_speed_error_kmh > 0.0) {
            problems.push(format!("--max-speed-error {} must be above 0 (km/h)", self.max_speed_error_kmh));
        }
        if !(0.0..=1.0).contains(&self.min_speed_share) {
            problems.push(format!("--min-speed-share {} is outside 0..=1", self.min_speed_share));
        }
        if !(1..=60_000).contains(&self.match_window_ms) {
            problems.push(format!("--match-window {} s is outside (0, 60]", self.match_window_ms as f64 / 1000.0));
        }
        if self.interval_ms.is_some_and(|i| i <= 0) {
            problems.push("--interval must be longer than 0".into());
        }
        if self.fps.is_some_and(|f| !(f.is_finite() && f > 0.0)) {
            problems.push("--fps must be above 0".into());
        }
        if self.camera.is_none() && self.scene.is_none() {
            problems.push("give --camera ID (a camera of --config) or --scene FILE (a scene table)".into());
        }
        if problems.is_empty() { Ok(()) } else { Err(EvaluateError::Usage(problems.join("\n"))) }
    }
}

/// Checks the inputs, runs the recording and compares: the report (with its verdict), or why
/// nothing could be evaluated. `source` names the configuration in messages.
pub fn evaluate(opts: &EvaluateOptions, raw: &crate::config::RawConfig, source: &str) -> Result<Report, EvaluateError> {
    opts.check()?;
    let scene = match (&opts.scene, &opts.camera) {
        (Some(path), camera) => SceneSource::File { path: path.clone(), camera: camera.clone() },
        (None, Some(id)) => SceneSource::Camera(id.clone()),
        (None, None) => return Err(EvaluateError::Usage("give --camera or --scene".into())),
    };
    let plan = run::plan(raw, source, &opts.recording, &scene, opts.fps)?;
    // Every problem of both truth files before the (long) run.
    let lines = plan.line_names();
    let counts = truth::read_counts(&opts.truth, &lines, opts.interval_ms);
    let passes = opts.passes.as_deref().map(|p| truth::read_passes(p, &lines, opts.match_window_ms)).transpose();
    let (counts, passes) = match (counts, passes) {
        (Ok(c), Ok(p)) => (c, p),
        (c, p) => {
            let mut all = TruthErrors::default();
            all.issues.extend(c.err().into_iter().flat_map(|e| e.issues));
            all.issues.extend(p.err().into_iter().flat_map(|e| e.issues));
            return Err(EvaluateError::Truth(all));
        }
    };
    tracing::info!(
        recording = %opts.recording.display(),
        camera = %plan.camera_id,
        truth_rows = counts.len(),
        passes = passes.as_ref().map_or(0, Vec::len),
        "evaluating the recording"
    );
    let outcome = run::run_recording(&plan)?;
    Ok(assemble(opts, &plan, &outcome, &counts, passes.as_deref()))
}

fn assemble(
    opts: &EvaluateOptions,
    plan: &EvaluationPlan,
    outcome: &RunOutcome,
    counts: &[TruthCount],
    passes: Option<&[TestPass]>,
) -> Report {
    let criteria = Criteria {
        min_accuracy: opts.min_accuracy,
        max_speed_error_kmh: opts.max_speed_error_kmh,
        min_speed_share: opts.min_speed_share,
    };
    let comparison = compare_counts(counts, &outcome.crossings, opts.interval_ms, opts.min_accuracy);
    let pass_results = passes.map(|p| match_passes(p, &outcome.crossings, opts.match_window_ms));
    let v = verdict(&comparison, pass_results.as_deref().unwrap_or_default(), &criteria);
    let file = |p: &Path| p.display().to_string();

    let mut warnings = Vec::new();
    let end = outcome.last_frame_ms + END_TOLERANCE_MS;
    for c in counts.iter().filter(|c| c.end_ms > end) {
        warnings.push(format!(
            "{}:{}: the interval ends at {}, after the end of the recording ({}): its measured count may be short",
            file(&opts.truth),
            c.file_line,
            format_time(c.end_ms),
            format_time(outcome.last_frame_ms)
        ));
    }
    if let Some(path) = &opts.passes {
        for p in passes.unwrap_or_default().iter().filter(|p| p.t_ms > end) {
            warnings.push(format!(
                "{}:{}: the pass at {} is after the end of the recording ({})",
                file(path),
                p.file_line,
                format_time(p.t_ms),
                format_time(outcome.last_frame_ms)
            ));
        }
    }
    if outcome.decode_errors > 0 {
        warnings.push(format!("{} undecodable frame(s) in the recording (damaged file?)", outcome.decode_errors));
    }
    if outcome.detect_errors > 0 {
        warnings.push(format!("detection failed on {} frame(s)", outcome.detect_errors));
    }
    if outcome.frames_dropped > 0 {
        warnings.push(format!("{} frame(s) dropped before detection", outcome.frames_dropped));
    }

    let v_cfg = &plan.vision;
    let camera = v_cfg.cameras.first();
    let labels = |set: &Vec<usize>| -> Vec<String> {
        set.iter().filter_map(|&c| v_cfg.manifest.labels.get(c).cloned().flatten()).map(|l| l.to_string()).collect()
    };
    let recording = RecordingInfo {
        path: file(&plan.recording),
        camera: plan.camera_id.clone(),
        duration_s: outcome.last_frame_ms as f64 / 1000.0,
        frames_decoded: outcome.frames_decoded,
        frames_detected: outcome.frames_detected,
        decode_errors: outcome.decode_errors,
        detect_errors: outcome.detect_errors,
        frames_dropped: outcome.frames_dropped,
        processing_s: outcome.processing_s,
        frames_per_s: outcome.frames_decoded as f64 / outcome.processing_s.max(1e-3),
    };
    let s = &plan.scene;
    let scene = SceneInfo {
        source: plan.scene_source.clone(),
        image_size: s.image_size,
        calibrated: s.calibration.is_some(),
        calibration_error_m: s.calibration.as_ref().map(|c| c.reprojection.mean_m),
        lines: s
            .lines
            .iter()
            .map(|l| SceneLine {
                name: l.name.clone(),
                points: l.points.clone(),
                in_side: if l.in_left { "left" } else { "right" },
                classes: l.classes.clone(),
            })
            .collect(),
    };
    let m = &v_cfg.manifest;
    let model = ModelInfo {
        name: m.name.clone(),
        path: file(&m.model_path),
        backend: outcome.backend.clone(),
        input: (m.input.width, m.input.height),
        score_threshold: m.score_threshold,
    };
    let t = &v_cfg.tracker;
    let detection = DetectionInfo {
        detect_fps: camera.map_or(0.0, |c| c.detect_fps),
        file_fps: camera.and_then(|c| match &c.source {
            VideoSource::File(f) => Some(f.fps),
            VideoSource::Rtsp(_) => None,
        }),
        tracker_high_score: t.high_score,
        tracker_low_score: t.low_score,
        tracker_max_lost_s: t.max_lost_s,
        tracker_min_hits: t.min_hits,
        merged_classes: v_cfg.merged_classes.iter().map(labels).collect(),
        regions: camera.map_or_else(String::new, |c| format!("{:?}", c.detection)),
        tiles: outcome.detection_tiles,
    };
    let truth = TruthInfo {
        counts: file(&opts.truth),
        passes: opts.passes.as_deref().map(file),
        interval_s: opts.interval_ms.map(|i| i as f64 / 1000.0),
        match_window_s: opts.match_window_ms as f64 / 1000.0,
    };
    Report::new(
        recording,
        scene,
        model,
        detection,
        truth,
        criteria,
        &comparison,
        pass_results.as_deref(),
        v,
        outcome.crossings.len(),
        outcome.inferences_per_frame,
        warnings,
    )
}

/// Runs the evaluation for the command line: prints the table (or every problem), writes the
/// CSV and JSON asked for, and returns the exit code.
pub fn run_cli(opts: &EvaluateOptions, raw: &crate::config::RawConfig, source: &str) -> u8 {
    let report = match evaluate(opts, raw, source) {
        Ok(r) => r,
        Err(e) => {
            eprint!("{e}");
            if !e.to_string().ends_with('\n') {
                eprintln!();
            }
            eprintln!("nothing was evaluated");
            return EXIT_NOT_EVALUATED;
        }
    };
    print!("{}", report.table());
    let mut written = Ok(());
    if let Some(path) = &opts.csv {
        written = written.and_then(|()| write(path, report.intervals_csv()));
    }
    if let Some(path) = &opts.json {
        written = written.and_then(|()| {
            let json = serde_json::to_string_pretty(&report).map_err(|e| EvaluateError::Write {
                path: path.display().to_string(),
                source: std::io::Error::other(e),
            })?;
            write(path, json + "\n")
        });
    }
    if let Err(e) = written {
        eprintln!("{e}");
        return EXIT_NOT_EVALUATED;
    }
    if report.summary.pass { EXIT_PASS } else { EXIT_FAIL }
}

fn write(path: &Path, text: String) -> Result<(), EvaluateError> {
    std::fs::write(path, text).map_err(|source| EvaluateError::Write { path: path.display().to_string(), source })
}
