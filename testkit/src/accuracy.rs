//! Accuracy of the traffic analytics against ground truth: synthetic traffic footage (real
//! vehicle pictures driving at known speeds through a known calibration, see
//! [`crate::footage::traffic`]) is encoded to H.264 and run through the whole agent pipeline
//! (decode, detection, tracking, [`SceneAnalyzer`]); the events are compared with the truth.
//!
//! - counts per line and direction: detected against true crossings;
//! - speed: each true crossing is matched to a detected crossing of the same line and direction
//!   within 1 s; its speed is compared with the vehicle's true speed at the true crossing time;
//! - wrong-way, stopped vehicle, congestion: each true incident must be reported in its zone
//!   within 2 s of when the rule says it is due (a stop: `stopped_after_s` after it began;
//!   congestion: `sustain_s` after it began; wrong-way: when the vehicle has gone 10 m against
//!   the lane); any other report of that kind is a false alarm.

use std::collections::BTreeMap;
use std::path::Path;

use its_shared::event::EventKind;

use crate::footage::traffic::TrafficFootage;
use its_agent::analyze::SceneAnalyzer;
use its_agent::analyze::config::{RawCalibrationPoint, RawCongestion, RawLine, RawScene, RawZone, SceneSpec};
use its_agent::buffer::NewEvent;
use its_agent::detect::Detector;
use its_agent::detect::regions::DetectionSpec;
use its_agent::pipeline::VisionSettings;

/// A stop is reported after this long standing still (the clips' no-stopping lanes).
pub const STOPPED_AFTER_S: f64 = 10.0;
/// Congestion must last this long before it is reported (the queue clip's lane).
pub const CONGESTION_SUSTAIN_S: f64 = 5.0;
/// A report this close to when it is due is on time.
pub const ON_TIME_S: f64 = 2.0;
/// A detected crossing within this of a true one (same line and direction) is that crossing.
const MATCH_S: f64 = 1.0;

/// The agent's scene configuration for synthetic traffic footage, as an operator would write it
/// from the survey: the calibration points, the lines and zones of the layout.
pub fn scene_config(footage: &TrafficFootage) -> RawScene {
    let l = &footage.layout;
    RawScene {
        image_size: Some([l.image_size.0, l.image_size.1]),
        calibration: l.calibration.iter().map(|&(image, ground)| RawCalibrationPoint { image, ground }).collect(),
        lines: l
            .lines
            .iter()
            .map(|line| RawLine {
                name: line.name.clone(),
                points: line.image.clone(),
                in_side: line.in_side.to_string(),
                classes: Vec::new(),
            })
            .collect(),
        zones: l
            .zones
            .iter()
            .map(|z| RawZone {
                name: z.name.clone(),
                polygon: z.image.clone(),
                direction: z.direction.map(|d| d.to_vec()).unwrap_or_default(),
                stopped_after_s: if z.no_stopping { STOPPED_AFTER_S } else { 0.0 },
                congestion: Some(RawCongestion {
                    min_occupancy: 4,
                    max_mean_speed_kmh: 10.0,
                    sustain_s: CONGESTION_SUSTAIN_S,
                    clear_s: 5.0,
                    report_every_s: 0.0,
                }),
                ..RawZone::default()
            })
            .collect(),
        ..RawScene::default()
    }
}

/// `scene` as the TOML of an agent camera's scene: the `[cameras.scene]` table and its
/// sub-tables, to append after the keys of a `[[cameras]]` entry of the agent's configuration
/// (which it then parses back to `scene`). Written out by hand (the configuration types only
/// read TOML); numbers keep a decimal point where the field is a float.
pub fn scene_toml(scene: &RawScene) -> String {
    use std::fmt::Write;
    let points = |v: &[[f64; 2]]| {
        let items: Vec<String> = v.iter().map(|p| format!("[{:?}, {:?}]", p[0], p[1])).collect();
        format!("[{}]", items.join(", "))
    };
    let strings = |v: &[String]| {
        let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
        format!("[{}]", items.join(", "))
    };
    let mut t = String::from("[cameras.scene]\n");
    // (writing to a String cannot fail)
    if let Some([w, h]) = scene.image_size {
        let _ = writeln!(t, "image_size = [{w}, {h}]");
    }
    let _ = writeln!(t, "max_reprojection_error_m = {:?}", scene.max_reprojection_error_m);
    let _ = writeln!(t, "counts_interval_s = {}", scene.counts_interval_s);
    let _ = writeln!(t, "snapshot_kinds = {}", strings(&scene.snapshot_kinds));
    let _ = writeln!(t, "snapshots_per_minute = {}", scene.snapshots_per_minute);
    let sp = &scene.speed;
    let _ = writeln!(t, "\n[cameras.scene.speed]");
    let _ = writeln!(t, "window_s = {:?}", sp.window_s);
    let _ = writeln!(t, "min_track_s = {:?}", sp.min_track_s);
    let _ = writeln!(t, "min_distance_m = {:?}", sp.min_distance_m);
    let _ = writeln!(t, "max_kmh = {:?}", sp.max_kmh);
    for c in &scene.calibration {
        let _ = writeln!(t, "\n[[cameras.scene.calibration]]");
        let _ = writeln!(t, "image = [{:?}, {:?}]", c.image[0], c.image[1]);
        let _ = writeln!(t, "ground = [{:?}, {:?}]", c.ground[0], c.ground[1]);
    }
    for l in &scene.lines {
        let _ = writeln!(t, "\n[[cameras.scene.lines]]");
        let _ = writeln!(t, "name = {:?}", l.name);
        let _ = writeln!(t, "points = {}", points(&l.points));
        let _ = writeln!(t, "in_side = {:?}", l.in_side);
        let _ = writeln!(t, "classes = {}", strings(&l.classes));
    }
    for z in &scene.zones {
        let _ = writeln!(t, "\n[[cameras.scene.zones]]");
        let _ = writeln!(t, "name = {:?}", z.name);
        let _ = writeln!(t, "polygon = {}", points(&z.polygon));
        let _ = writeln!(t, "direction = {}", points(&z.direction));
        let _ = writeln!(t, "classes = {}", strings(&z.classes));
        let _ = writeln!(t, "dwell_s = {:?}", z.dwell_s);
        let _ = writeln!(t, "stopped_after_s = {:?}", z.stopped_after_s);
        let _ = writeln!(t, "stopped_suppress_s = {:?}", z.stopped_suppress_s);
        let _ = writeln!(t, "wrong_way_min_m = {:?}", z.wrong_way_min_m);
        let _ = writeln!(t, "wrong_way_min_px = {:?}", z.wrong_way_min_px);
        if let Some(c) = &z.congestion {
            let _ = writeln!(t, "\n[cameras.scene.zones.congestion]");
            let _ = writeln!(t, "min_occupancy = {}", c.min_occupancy);
            let _ = writeln!(t, "max_mean_speed_kmh = {:?}", c.max_mean_speed_kmh);
            let _ = writeln!(t, "sustain_s = {:?}", c.sustain_s);
            let _ = writeln!(t, "clear_s = {:?}", c.clear_s);
            let _ = writeln!(t, "report_every_s = {:?}", c.report_every_s);
        }
    }
    t
}

/// Runs the footage through the real pipeline and the analyzer; returns the events with the stream
/// time (seconds from the first frame) each was observed at.
pub fn run_footage(
    footage: &TrafficFootage,
    spec: SceneSpec,
    detectors: Vec<Box<dyn Detector>>,
    settings: VisionSettings,
    dir: &Path,
) -> anyhow::Result<Vec<(f64, NewEvent)>> {
    let s = &footage.footage;
    let path = dir.join(format!("{}.264", s.name));
    crate::footage::encode_footage(s, &path, 26, 30)?;
    let detection = default_detection(&spec);
    Ok(run_recording(&path, s.name, s.fps, spec, detection, detectors, settings)?.events)
}

/// The detection regions the agent plans by default for a camera with scene `spec`.
pub fn default_detection(spec: &SceneSpec) -> DetectionSpec {
    let mut errors = its_shared::config::ConfigErrors::new("detection");
    its_agent::config::RawDetection::default().validate("detection", spec, &mut errors)
}

/// What a recording's run through the pipeline gave: the analyzer's events (stream time from
/// the first frame, event) and what detection cost.
#[derive(Debug, Clone, Default)]
pub struct RecordingRun {
    pub events: Vec<(f64, NewEvent)>,
    pub frames: u64,
    /// Detector runs over all frames (tiles run).
    pub inferences: u64,
    /// Wall time of the run (seconds).
    pub seconds: f64,
}

/// Runs an H.264 recording through the real pipeline with `detection` and the scene analyzer.
pub fn run_recording(
    path: &Path,
    name: &str,
    fps: f64,
    spec: SceneSpec,
    detection: DetectionSpec,
    detectors: Vec<Box<dyn Detector>>,
    settings: VisionSettings,
) -> anyhow::Result<RecordingRun> {
    let mut analyzer = SceneAnalyzer::new(name, spec);
    // Wall time of the first frame (footage time 0): events are timed against it.
    let mut first: Option<i64> = None;
    let mut run = RecordingRun::default();
    let started = std::time::Instant::now();
    crate::footage::replay_file(path, name, fps, detection, detectors, settings, |r| {
        let wall0 = *first.get_or_insert(r.wall_ms);
        if !r.end_of_stream {
            run.frames += 1;
            run.inferences += u64::from(r.inferences);
        }
        for a in analyzer.process(&r) {
            let t = (a.event.observed_at_ms - wall0) as f64 / 1000.0;
            run.events.push((t, a.event));
        }
    })?;
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// How one clip was measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accuracy {
    /// The clip's name.
    pub footage: String,
    pub clean: bool,
    /// (line, direction) → (true, detected).
    pub counts: BTreeMap<(String, &'static str), (u32, u32)>,
    /// Absolute speed errors (km/h) and relative errors of the matched crossings.
    pub speed_errors: Vec<f64>,
    pub speed_rel_errors: Vec<f64>,
    /// True crossings with no detected crossing within 1 s.
    pub crossings_unmatched: u32,
    /// Per true incident (kind, zone): the report's delay from when it was due (None: missed).
    pub incidents: Vec<(&'static str, String, Option<f64>)>,
    /// Reports of wrong-way, stopped vehicle or congestion that match no true incident.
    pub false_alarms: Vec<(&'static str, String, f64)>,
}

impl Accuracy {
    pub fn counts_exact(&self) -> bool {
        self.counts.values().all(|(t, d)| t == d)
    }

    /// Sum over lines and directions of |detected - true|, and the true total.
    pub fn count_error(&self) -> (u32, u32) {
        let err = self.counts.values().map(|(t, d)| t.abs_diff(*d)).sum();
        (err, self.counts.values().map(|(t, _)| t).sum())
    }

    pub fn speed_mae(&self) -> Option<f64> {
        (!self.speed_errors.is_empty()).then(|| self.speed_errors.iter().sum::<f64>() / self.speed_errors.len() as f64)
    }

    /// Mean relative speed error (0.05 = 5%).
    pub fn speed_mean_rel(&self) -> Option<f64> {
        (!self.speed_rel_errors.is_empty())
            .then(|| self.speed_rel_errors.iter().sum::<f64>() / self.speed_rel_errors.len() as f64)
    }

    pub fn speed_max(&self) -> Option<f64> {
        self.speed_errors.iter().copied().reduce(f64::max)
    }

    pub fn speed_max_rel(&self) -> Option<f64> {
        self.speed_rel_errors.iter().copied().reduce(f64::max)
    }

    /// Incidents reported on time (within [`ON_TIME_S`] of when due).
    pub fn incidents_on_time(&self) -> usize {
        self.incidents.iter().filter(|(_, _, d)| d.is_some_and(|d| d.abs() <= ON_TIME_S)).count()
    }

    pub const TABLE_HEADER: &'static str = "| scene | clean | crossings (true) | count error | crossings matched | speed MAE km/h | mean % | worst km/h | worst % | incidents on time | worst delay s | false alarms |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

    pub fn table_row(&self) -> String {
        let (err, total) = self.count_error();
        let opt = |v: Option<f64>, k: f64| v.map_or("–".to_string(), |v| format!("{:.1}", v * k));
        let worst_delay = self.incidents.iter().filter_map(|(_, _, d)| d.map(f64::abs)).reduce(f64::max);
        format!(
            "| {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {}/{} | {} | {} |",
            self.footage,
            if self.clean { "yes" } else { "no" },
            total,
            err,
            total.saturating_sub(self.crossings_unmatched),
            total,
            opt(self.speed_mae(), 1.0),
            opt(self.speed_mean_rel(), 100.0),
            opt(self.speed_max(), 1.0),
            opt(self.speed_max_rel(), 100.0),
            self.incidents_on_time(),
            self.incidents.len(),
            opt(worst_delay, 1.0),
            self.false_alarms.len(),
        )
    }
}

/// Compares the events of a run with the footage's truth.
pub fn evaluate(footage: &TrafficFootage, events: &[(f64, NewEvent)]) -> Accuracy {
    let truth = &footage.truth;
    let mut acc = Accuracy { footage: footage.footage.name.to_string(), clean: footage.clean, ..Accuracy::default() };
    for line in &footage.layout.lines {
        for d in ["in", "out"] {
            acc.counts.insert((line.name.clone(), d), (0, 0));
        }
    }
    for c in &truth.crossings {
        acc.counts.entry((c.line.clone(), c.direction)).or_insert((0, 0)).0 += 1;
    }
    let mut detected: Vec<(f64, String, &'static str, Option<f32>, bool)> = Vec::new();
    for (t, e) in events {
        if let EventKind::LineCrossing { line, direction, speed_kmh, .. } = &e.kind {
            acc.counts.entry((line.clone(), direction.as_str())).or_insert((0, 0)).1 += 1;
            detected.push((*t, line.clone(), direction.as_str(), *speed_kmh, false));
        }
    }
    // Speeds: match each true crossing to the nearest unmatched detection.
    for c in &truth.crossings {
        let best = detected
            .iter_mut()
            .filter(|d| !d.4 && d.1 == c.line && d.2 == c.direction && (d.0 - c.t_s).abs() <= MATCH_S)
            .min_by(|a, b| (a.0 - c.t_s).abs().total_cmp(&(b.0 - c.t_s).abs()));
        let Some(d) = best else {
            acc.crossings_unmatched += 1;
            continue;
        };
        d.4 = true;
        let true_speed = truth.vehicles.iter().find(|v| v.id == c.vehicle).and_then(|v| v.speed_at(c.t_s));
        if let (Some(measured), Some(truth)) = (d.3, true_speed) {
            let err = (f64::from(measured) - truth).abs();
            acc.speed_errors.push(err);
            if truth > 1.0 {
                acc.speed_rel_errors.push(err / truth);
            }
        }
    }
    // Incidents.
    let mut reports: Vec<(&'static str, String, f64, bool)> = Vec::new();
    for (t, e) in events {
        match &e.kind {
            EventKind::WrongWay { zone, .. } => reports.push(("wrong_way", zone.clone(), *t, false)),
            EventKind::StoppedVehicle { zone, .. } => reports.push(("stopped_vehicle", zone.clone(), *t, false)),
            EventKind::Congestion { zone, phase: its_shared::event::Phase::Started, .. } => {
                reports.push(("congestion", zone.clone(), *t, false))
            }
            _ => {}
        }
    }
    let mut due: Vec<(&'static str, String, f64)> = Vec::new();
    due.extend(truth.wrong_way.iter().map(|w| ("wrong_way", w.zone.clone(), w.t_s)));
    due.extend(truth.stops.iter().map(|s| ("stopped_vehicle", s.zone.clone(), s.t_start_s + STOPPED_AFTER_S)));
    due.extend(
        truth
            .congestion
            .iter()
            .filter(|c| c.t_end_s - c.t_start_s >= CONGESTION_SUSTAIN_S)
            .map(|c| ("congestion", c.zone.clone(), c.t_start_s + CONGESTION_SUSTAIN_S)),
    );
    for (kind, zone, t_due) in due {
        let best = reports
            .iter_mut()
            .filter(|r| !r.3 && r.0 == kind && r.1 == zone && (r.2 - t_due).abs() <= 10.0)
            .min_by(|a, b| (a.2 - t_due).abs().total_cmp(&(b.2 - t_due).abs()));
        let delay = best.map(|r| {
            r.3 = true;
            r.2 - t_due
        });
        acc.incidents.push((kind, zone, delay));
    }
    acc.false_alarms = reports.into_iter().filter(|r| !r.3).map(|r| (r.0, r.1, r.2)).collect();
    acc
}
