//! One camera's traffic analytics: tracked road users in, traffic events out.
//!
//! Every road user is followed at the bottom-centre of its box (where it touches the road),
//! mapped to configured pixels and, with a calibration, to metres on the ground. Per frame:
//!
//! - **Count lines**: a crossing counts when the point moves from one side of the line to the
//!   other (a point exactly on the line is on neither side, so a box standing on the line does not
//!   count). One road user is counted at most once per direction on a line, and a crossing back
//!   only after it moved away from the first crossing (2% of the picture diagonal): a box
//!   jittering across the line counts once.
//! - **Speed** ([`super::speed`]): fitted over the last `window_s` of ground positions, ignoring
//!   boxes cut by the picture edge; at most `max_kmh`. Each track's `speed_measurement` is the
//!   median of its speeds while it moved, once it ends.
//! - **Zones**: enter on the first position inside, exit after three positions outside (a box
//!   jittering on the edge does not flap) or when the track ends; one `zone_dwell` past `dwell_s`.
//! - **Stopped vehicle**: a road user whose smoothed position stays within 1 m (25 px without a
//!   calibration) for `stopped_after_s` in a zone where stopping is abnormal; one event per stop,
//!   and none for a vehicle standing where one was already reported in the last
//!   `stopped_suppress_s` (a parked car is reported once, even when its track is lost and found).
//! - **Wrong-way**: inside a zone with a direction, movement against it by `wrong_way_min_m`
//!   (from the furthest point reached along the direction), once per road user and zone.
//! - **Congestion**: occupancy at least `min_occupancy` and (with a calibration) mean speed at
//!   most `max_mean_speed_kmh`, sustained `sustain_s` → `started`; `ongoing` reports; neither
//!   for `clear_s` → `cleared`.
//! - **Counts**: per line, class and direction, and per zone its occupancy (mean and most road
//!   users in it, fraction of frames occupied, entries), every `counts_interval` (aligned to the
//!   wall clock), and what is left when the stream ends.

use std::collections::{BTreeMap, HashMap, VecDeque};

use its_shared::event::{ClassCount, Direction, EventKind, ObjectRef, Phase};
use its_shared::geometry::{Point, distance, polygon_contains, polyline_crossing};

use super::speed::{GroundSample, robust_velocity};
use crate::analyze::config::{LineSpec, SceneSpec, ZoneSpec};
use crate::buffer::NewEvent;
use crate::pipeline::FrameResult;

/// Wrong-way progress is measured on the median position over this long (a box shrinking for a
/// few frames behind a passing vehicle is not a movement).
const WRONG_WAY_SMOOTHING_S: f64 = 0.5;
/// Time outside a zone before a road user counts as having left it: a box jittering on the edge,
/// or shrunk for a moment by a vehicle passing in front, does not leave.
const EXIT_AFTER_S: f64 = 1.0;
/// Radius (metres, or configured pixels without a calibration) a standing vehicle stays within.
const STILL_RADIUS_M: f64 = 1.0;
const STILL_RADIUS_PX: f64 = 25.0;
/// Where a road user stands is the median of its positions over this long: robust to the box
/// shrinking while another vehicle passes in front (under a second at traffic speeds).
const STILL_WINDOW_S: f64 = 2.5;
/// A reported stop suppresses new reports within this distance (metres / pixels).
const SUPPRESS_RADIUS_M: f64 = 3.0;
const SUPPRESS_RADIUS_PX: f64 = 30.0;
/// A track counts as moving (for its median speed) above this.
const MOVING_KMH: f64 = 3.0;
/// A box edge this close to the picture edge (pixels) is cut: its bottom-centre is not where the
/// road user is.
const EDGE_MARGIN_PX: f32 = 3.0;
/// How much history a track keeps (seconds); at least the speed window.
const HISTORY_S: f64 = 4.0;

/// A road user as one frame shows it.
struct Seen {
    id: u64,
    label: String,
    score: f32,
    bbox: [f32; 4],
    bbox_px: [f32; 4],
    /// Where and when the tracker first saw it (configured pixels), before its track was
    /// confirmed: a road user confirmed just past a line still counts.
    first: (Point, f64),
}

/// A picture to attach to an event: the box (frame pixels) to draw and crop, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotAsk {
    pub bbox: Option<[f32; 4]>,
}

/// An event and, if wanted, the picture to attach.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyzedEvent {
    pub event: NewEvent,
    pub snapshot: Option<SnapshotAsk>,
}

#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    /// Configured pixels.
    img: Point,
    ground: Option<Point>,
    /// The box touches the picture edge.
    cut: bool,
}

#[derive(Debug, Clone, Default)]
struct LineState {
    /// Last position strictly on one side of the line (configured pixels), and its time.
    last: Option<(Point, f64)>,
    counted: Option<(Direction, Point)>,
}

#[derive(Debug, Clone, Default)]
struct ZoneState {
    inside: bool,
    /// Since when it has been outside (while still counted inside).
    outside_since: Option<f64>,
    entered_t: f64,
    dwell_reported: bool,
    /// Furthest progress along the zone direction since entering, and whether wrong-way was
    /// reported.
    best_along: Option<f64>,
    wrong_way_reported: bool,
    stop_reported: bool,
}

/// A crossing waiting for the speed around it.
#[derive(Debug, Clone)]
struct PendingCrossing {
    line: String,
    direction: Direction,
    t: f64,
    at_ms: i64,
    object: ObjectRef,
    bbox_px: [f32; 4],
}

#[derive(Debug, Clone)]
struct TrackState {
    label: String,
    score: f32,
    /// Latest box, normalised (events) and in frame pixels (snapshots).
    bbox: [f32; 4],
    bbox_px: [f32; 4],
    samples: VecDeque<Sample>,
    lines: Vec<LineState>,
    zones: Vec<ZoneState>,
    /// Latest speed estimate, km/h, and the velocity it comes from (m/s on the ground).
    speed_kmh: Option<f64>,
    velocity: Option<[f64; 2]>,
    /// Speeds while moving (time, km/h), for the track's median.
    moving_speeds: Vec<(f64, f32)>,
    /// Where and since when the road user stands (smoothed position in metres or pixels).
    still: Option<(f64, Point)>,
    /// Zone index → time spent in it (for the speed measurement's zone).
    zone_time: Vec<f64>,
    pending: Vec<PendingCrossing>,
}

/// A zone's occupancy over a counting interval.
#[derive(Debug, Clone, Default)]
struct Occupancy {
    frames: u32,
    occupied_frames: u32,
    sum: u64,
    max: u32,
    entered: u32,
}

#[derive(Debug, Clone, Default)]
struct CongestionState {
    cond_since: Option<f64>,
    clear_since: Option<f64>,
    active: bool,
    last_report: f64,
}

/// Traffic analytics of one camera.
#[derive(Debug)]
pub struct SceneAnalyzer {
    camera: String,
    spec: SceneSpec,
    tracks: HashMap<u64, TrackState>,
    /// Per zone: stops reported (position, time).
    reported_stops: Vec<Vec<(Point, f64)>>,
    congestion: Vec<CongestionState>,
    /// Per line: (label, direction) → count in the current interval.
    counts: Vec<BTreeMap<(String, Direction), u32>>,
    /// Per zone: occupancy over the current interval.
    occupancy: Vec<Occupancy>,
    /// Wall-clock start of the current counting interval (ms), once a frame was seen.
    interval_start_ms: Option<i64>,
    /// Times (stream seconds) of the snapshots of the last minute.
    snapshots: VecDeque<f64>,
}

fn dir_of(in_left: bool, sign: i8) -> Direction {
    // `sign` is the side the movement ends on, as `geometry::side` reports it: positive is the
    // counter-clockwise side in a y-up frame, which on a picture (y down) is the right-hand side.
    let ends_left = sign < 0;
    if ends_left == in_left { Direction::In } else { Direction::Out }
}

impl SceneAnalyzer {
    pub fn new(camera: &str, spec: SceneSpec) -> Self {
        let (lines, zones) = (spec.lines.len(), spec.zones.len());
        Self {
            camera: camera.to_string(),
            tracks: HashMap::new(),
            reported_stops: vec![Vec::new(); zones],
            congestion: vec![CongestionState::default(); zones],
            counts: vec![BTreeMap::new(); lines],
            occupancy: vec![Occupancy::default(); zones],
            interval_start_ms: None,
            snapshots: VecDeque::new(),
            spec,
        }
    }

    pub fn spec(&self) -> &SceneSpec {
        &self.spec
    }

    /// Replaces the scene (hot reload). The counts so far are reported first, then every road
    /// user is followed afresh against the new lines and zones.
    pub fn reconfigure(&mut self, spec: SceneSpec, wall_ms: i64) -> Vec<AnalyzedEvent> {
        let mut out = Vec::new();
        if let Some(start) = self.interval_start_ms {
            self.flush_counts(start, wall_ms, &mut out);
        }
        *self = Self::new(&self.camera, spec);
        out
    }

    /// The events one frame result gives.
    pub fn process(&mut self, r: &FrameResult) -> Vec<AnalyzedEvent> {
        let mut out = Vec::new();
        self.roll_interval(r.wall_ms, &mut out);
        let (fw, fh) = (r.size.0.max(1) as f32, r.size.1.max(1) as f32);
        let scale = match self.spec.image_size {
            Some((w, h)) => (w as f64 / fw as f64, h as f64 / fh as f64),
            None => (1.0, 1.0),
        };
        let wall_at = |t: f64| r.wall_ms - ((r.t_s - t) * 1000.0).round() as i64;
        for t in &r.tracks {
            let b = t.bbox;
            let img = [f64::from((b[0] + b[2]) / 2.0) * scale.0, f64::from(b[3]) * scale.1];
            let cut = b[0] <= EDGE_MARGIN_PX
                || b[1] <= EDGE_MARGIN_PX
                || b[2] >= fw - EDGE_MARGIN_PX
                || b[3] >= fh - EDGE_MARGIN_PX;
            let ground = self.spec.calibration.as_ref().and_then(|c| c.to_ground(img));
            let label = r.manifest.label(t.class_id).map_or_else(|| format!("class-{}", t.class_id), |l| l.to_string());
            let sample = Sample { t: r.t_s, img, ground, cut };
            let norm = [b[0] / fw, b[1] / fh, b[2] / fw, b[3] / fh].map(|v| v.clamp(0.0, 1.0));
            let f = t.first_bbox;
            let first_img = [f64::from((f[0] + f[2]) / 2.0) * scale.0, f64::from(f[3]) * scale.1];
            let seen =
                Seen { id: t.id, label, score: t.score, bbox: norm, bbox_px: b, first: (first_img, t.first_seen_s) };
            self.update_track(seen, sample, &wall_at, &mut out);
        }
        for e in &r.ended {
            self.end_track(e.id, wall_at(e.last_seen_s), &mut out);
        }
        if !r.end_of_stream {
            for (z, occ) in self.occupancy.iter_mut().enumerate() {
                let n = self.tracks.values().filter(|st| st.zones[z].inside).count() as u32;
                occ.frames += 1;
                occ.occupied_frames += u32::from(n > 0);
                occ.sum += u64::from(n);
                occ.max = occ.max.max(n);
            }
        }
        self.update_congestion(r.t_s, r.wall_ms, &mut out);
        if r.end_of_stream
            && let Some(start) = self.interval_start_ms
        {
            self.flush_counts(start, r.wall_ms, &mut out);
            self.interval_start_ms = None;
        }
        self.attach_snapshot_budget(r.t_s, &mut out);
        out
    }

    fn object(id: u64, st: &TrackState) -> ObjectRef {
        ObjectRef { track_id: id, label: st.label.clone(), score: st.score, bbox: st.bbox }
    }

    fn event(&self, observed_at_ms: i64, kind: EventKind, bbox: Option<[f32; 4]>) -> AnalyzedEvent {
        let wants = self.spec.snapshot_kinds.iter().any(|k| k == kind.name());
        AnalyzedEvent {
            event: NewEvent { camera: self.camera.clone(), observed_at_ms, kind },
            snapshot: wants.then_some(SnapshotAsk { bbox }),
        }
    }

    fn update_track(&mut self, seen: Seen, sample: Sample, wall_at: &dyn Fn(f64) -> i64, out: &mut Vec<AnalyzedEvent>) {
        let (n_lines, n_zones) = (self.spec.lines.len(), self.spec.zones.len());
        let Seen { id, label, score, bbox, bbox_px, first } = seen;
        let new_track = !self.tracks.contains_key(&id);
        let mut st = self.tracks.remove(&id).unwrap_or_else(|| TrackState {
            label: label.clone(),
            score,
            bbox,
            bbox_px,
            samples: VecDeque::new(),
            lines: vec![LineState::default(); n_lines],
            zones: vec![ZoneState::default(); n_zones],
            speed_kmh: None,
            velocity: None,
            moving_speeds: Vec::new(),
            still: None,
            zone_time: vec![0.0; n_zones],
            pending: Vec::new(),
        });
        let dt = st.samples.back().map_or(0.0, |s| (sample.t - s.t).max(0.0));
        st.label = label;
        st.score = score;
        st.bbox = bbox;
        st.bbox_px = bbox_px;
        st.samples.push_back(sample.clone());
        let keep = HISTORY_S.max(self.spec.speed.window_s);
        while st.samples.front().is_some_and(|s| sample.t - s.t > keep) {
            st.samples.pop_front();
        }
        self.update_speed(&mut st);

        // Count lines.
        let diag = self.spec.image_size.map_or(1000.0, |(w, h)| ((w * w + h * h) as f64).sqrt());
        for (i, line) in self.spec.lines.iter().enumerate() {
            if !line.classes.is_empty() && !line.classes.contains(&st.label) {
                continue;
            }
            let ls = &mut st.lines[i];
            if new_track && first.1 < sample.t && line_side(line, first.0) != 0 {
                ls.last = Some(first);
            }
            let side = line_side(line, sample.img);
            if side == 0 {
                continue;
            }
            if let Some((prev, t0)) = ls.last
                && let Some(c) = polyline_crossing(&line.points, prev, sample.img)
            {
                let direction = dir_of(line.in_left, c.sign);
                let at = [prev[0] + (sample.img[0] - prev[0]) * c.t, prev[1] + (sample.img[1] - prev[1]) * c.t];
                let counts = match ls.counted {
                    None => true,
                    Some((d, p)) => d != direction && distance(p, at) >= 0.02 * diag,
                };
                if counts {
                    ls.counted = Some((direction, at));
                    *self.counts[i].entry((st.label.clone(), direction)).or_insert(0) += 1;
                    let t_cross = t0 + (sample.t - t0) * c.t;
                    // Reported once the speed around the crossing is known (half a window later).
                    st.pending.push(PendingCrossing {
                        line: line.name.clone(),
                        direction,
                        t: t_cross,
                        at_ms: wall_at(t_cross),
                        object: ObjectRef { track_id: id, label: st.label.clone(), score, bbox },
                        bbox_px,
                    });
                }
            }
            st.lines[i].last = Some((sample.img, sample.t));
        }

        self.report_crossings(&mut st, false, out);

        // Zones.
        let calibrated = self.spec.calibration.is_some();
        for (z, zone) in self.spec.zones.iter().enumerate() {
            if !zone.classes.is_empty() && !zone.classes.contains(&st.label) {
                continue;
            }
            let inside_now = polygon_contains(&zone.polygon, sample.img);
            let object = ObjectRef { track_id: id, label: st.label.clone(), score, bbox };
            let zs = &mut st.zones[z];
            if inside_now {
                zs.outside_since = None;
                if !zs.inside {
                    *zs = ZoneState { inside: true, entered_t: sample.t, ..ZoneState::default() };
                    self.occupancy[z].entered += 1;
                    out.push(self.event(
                        wall_at(sample.t),
                        EventKind::ZoneEnter { zone: zone.name.clone(), object: object.clone() },
                        Some(bbox_px),
                    ));
                }
            } else if zs.inside {
                let left = *zs.outside_since.get_or_insert(sample.t);
                if sample.t - left >= EXIT_AFTER_S {
                    zs.inside = false;
                    let dwell_s = (left - zs.entered_t) as f32;
                    out.push(self.event(
                        wall_at(left),
                        EventKind::ZoneExit { zone: zone.name.clone(), object: object.clone(), dwell_s },
                        Some(bbox_px),
                    ));
                }
            }
            let zs = &mut st.zones[z];
            if !zs.inside {
                continue;
            }
            st.zone_time[z] += dt;
            if zone.dwell_s > 0.0 && !zs.dwell_reported && sample.t - zs.entered_t >= zone.dwell_s {
                zs.dwell_reported = true;
                let dwell_s = (sample.t - zs.entered_t) as f32;
                out.push(self.event(
                    wall_at(sample.t),
                    EventKind::ZoneDwell { zone: zone.name.clone(), object: object.clone(), dwell_s },
                    Some(bbox_px),
                ));
            }
            // Wrong-way.
            if let Some(dir) = zone_direction(zone, &self.spec)
                && !zs.wrong_way_reported
            {
                // Progress along the lane from the median position of the last half second (a box
                // shrinking behind a passing vehicle is not a movement), counted only while the
                // fitted velocity also points against the lane.
                let pos = median_position(&st.samples, WRONG_WAY_SMOOTHING_S, calibrated);
                let against = st.velocity.is_none_or(|v| v[0] * dir[0] + v[1] * dir[1] < 0.0);
                if let Some(pos) = pos
                    && !sample.cut
                {
                    let along = pos[0] * dir[0] + pos[1] * dir[1];
                    let best = zs.best_along.map_or(along, |b: f64| b.max(along));
                    zs.best_along = Some(best);
                    let min = if calibrated { zone.wrong_way_min_m } else { zone.wrong_way_min_px };
                    if best - along >= min && against {
                        zs.wrong_way_reported = true;
                        let kind = EventKind::WrongWay {
                            zone: zone.name.clone(),
                            object: object.clone(),
                            distance_m: if calibrated { (best - along) as f32 } else { 0.0 },
                            speed_kmh: st.speed_kmh.map(|v| v as f32),
                        };
                        out.push(self.event(wall_at(sample.t), kind, Some(bbox_px)));
                    }
                }
            }
        }

        // Stopped vehicle.
        if self.update_still(&mut st) {
            // It moved: a later stop is a new one.
            for zs in &mut st.zones {
                zs.stop_reported = false;
            }
        }
        if let Some((since, pos)) = st.still {
            let suppress_r = if calibrated { SUPPRESS_RADIUS_M } else { SUPPRESS_RADIUS_PX };
            for (z, zone) in self.spec.zones.iter().enumerate() {
                let zs = &mut st.zones[z];
                if zone.stopped_after_s <= 0.0 || !zs.inside || zs.stop_reported {
                    continue;
                }
                let stopped_s = sample.t - since;
                if stopped_s < zone.stopped_after_s {
                    continue;
                }
                zs.stop_reported = true;
                let recent = &mut self.reported_stops[z];
                recent.retain(|(_, t)| sample.t - t < zone.stopped_suppress_s);
                if recent.iter().any(|(p, _)| distance(*p, pos) <= suppress_r) {
                    continue;
                }
                recent.push((pos, sample.t));
                let object = ObjectRef { track_id: id, label: st.label.clone(), score, bbox };
                let kind = EventKind::StoppedVehicle { zone: zone.name.clone(), object, stopped_s: stopped_s as f32 };
                out.push(self.event(wall_at(sample.t), kind, Some(bbox_px)));
            }
        }
        self.tracks.insert(id, st);
    }

    fn update_speed(&self, st: &mut TrackState) {
        let Some(last) = st.samples.back() else { return };
        let t_end = last.t;
        let window: Vec<GroundSample> = st
            .samples
            .iter()
            .filter(|s| t_end - s.t <= self.spec.speed.window_s + 1e-6 && !s.cut)
            .filter_map(|s| s.ground.map(|p| GroundSample { t: s.t, p }))
            .collect();
        let span = match (window.first(), window.last()) {
            (Some(a), Some(b)) => b.t - a.t,
            _ => 0.0,
        };
        // Half a window of positions at least: fewer is not a measurement.
        let fit = if span >= self.spec.speed.window_s * 0.5 {
            robust_velocity(&window).filter(|v| v.kmh() <= self.spec.speed.max_kmh)
        } else {
            None
        };
        st.speed_kmh = fit.map(|v| v.kmh());
        st.velocity = fit.map(|v| v.v);
        if let Some(k) = st.speed_kmh
            && k >= MOVING_KMH
        {
            st.moving_speeds.push((t_end, k as f32));
        }
    }

    /// Follows where the road user stands; `true` when it moved away from where it stood.
    fn update_still(&self, st: &mut TrackState) -> bool {
        let calibrated = self.spec.calibration.is_some();
        let Some(now) = st.samples.back().map(|s| s.t) else { return false };
        let recent: Vec<Point> = st
            .samples
            .iter()
            .filter(|s| now - s.t <= STILL_WINDOW_S)
            .filter_map(|s| if calibrated { s.ground } else { Some(s.img) })
            .collect();
        if recent.is_empty() {
            return false;
        }
        let median = |k: usize| {
            let mut v: Vec<f64> = recent.iter().map(|p| p[k]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mean = [median(0), median(1)];
        let radius = if calibrated { STILL_RADIUS_M } else { STILL_RADIUS_PX };
        let (still, moved) = match st.still {
            Some((since, anchor)) if distance(anchor, mean) <= radius => ((since, anchor), false),
            _ => {
                // A new place: it has stood there since the earliest position around it, going
                // back until three in a row are elsewhere (the median lags behind a stop).
                let mut since = now;
                let mut away = 0;
                for s in st.samples.iter().rev() {
                    let p = if calibrated { s.ground } else { Some(s.img) };
                    if p.is_some_and(|p| distance(p, mean) <= radius) {
                        since = s.t;
                        away = 0;
                    } else {
                        away += 1;
                        if away >= 3 {
                            break;
                        }
                    }
                }
                ((since, mean), true)
            }
        };
        st.still = Some(still);
        moved
    }

    fn end_track(&mut self, id: u64, at_ms: i64, out: &mut Vec<AnalyzedEvent>) {
        let Some(mut st) = self.tracks.remove(&id) else { return };
        self.report_crossings(&mut st, true, out);
        let object = Self::object(id, &st);
        for (z, zone) in self.spec.zones.iter().enumerate() {
            let zs = &st.zones[z];
            if zs.inside {
                let last_t = st.samples.back().map_or(zs.entered_t, |s| s.t);
                let kind = EventKind::ZoneExit {
                    zone: zone.name.clone(),
                    object: object.clone(),
                    dwell_s: (last_t - zs.entered_t) as f32,
                };
                out.push(self.event(at_ms, kind, Some(st.bbox_px)));
            }
        }
        if let Some(speed_kmh) = self.track_speed(&st) {
            let zone = st
                .zone_time
                .iter()
                .enumerate()
                .filter(|(_, t)| **t > 0.0)
                .max_by(|a, b| a.1.total_cmp(b.1))
                .and_then(|(z, _)| self.spec.zones.get(z))
                .map(|z| z.name.clone());
            out.push(self.event(at_ms, EventKind::SpeedMeasurement { object, speed_kmh, zone }, Some(st.bbox_px)));
        }
    }

    /// Reports the crossings whose surrounding speed window has passed (or all, at the track's
    /// end), with the speed fitted over the positions around the crossing: centred, so it is the
    /// speed at the line, not the speed before it. When the box is cut by the picture edge on
    /// one side of the line (a line near the edge), a window twice as wide around it is used; a
    /// crossing is reported at most one window after it happened.
    fn report_crossings(&self, st: &mut TrackState, ending: bool, out: &mut Vec<AnalyzedEvent>) {
        if st.pending.is_empty() {
            return;
        }
        let now = st.samples.back().map_or(f64::MIN, |s| s.t);
        let w = self.spec.speed.window_s;
        let mut waiting = Vec::new();
        for p in std::mem::take(&mut st.pending) {
            let centred = if ending || now - p.t >= w / 2.0 {
                self.speed_between(st, p.t - w / 2.0, p.t + w / 2.0, ending)
            } else {
                None
            };
            let wide = || self.speed_between(st, p.t - w, p.t + w, ending);
            let speed_kmh = match centred {
                Some(v) => Some(v),
                None if ending || now - p.t >= w => wide(),
                None => {
                    waiting.push(p);
                    continue;
                }
            };
            let kind = EventKind::LineCrossing {
                line: p.line,
                object: p.object,
                direction: p.direction,
                speed_kmh: speed_kmh.map(|v| v as f32),
            };
            out.push(self.event(p.at_ms, kind, Some(p.bbox_px)));
        }
        st.pending = waiting;
    }

    /// Speed (km/h) fitted over the positions between `t0` and `t1`; they must span half the
    /// window (a third when the track ended early and no more positions will come).
    fn speed_between(&self, st: &TrackState, t0: f64, t1: f64, ending: bool) -> Option<f64> {
        let window: Vec<GroundSample> = st
            .samples
            .iter()
            .filter(|s| s.t >= t0 - 1e-6 && s.t <= t1 + 1e-6 && !s.cut)
            .filter_map(|s| s.ground.map(|p| GroundSample { t: s.t, p }))
            .collect();
        let span = match (window.first(), window.last()) {
            (Some(a), Some(b)) => b.t - a.t,
            _ => 0.0,
        };
        let need = self.spec.speed.window_s * if ending { 1.0 / 3.0 } else { 0.5 };
        if span < need {
            return None;
        }
        robust_velocity(&window).map(|v| v.kmh()).filter(|&k| k <= self.spec.speed.max_kmh)
    }

    /// The track's speed: the median of its speeds while it moved, if it moved long and far
    /// enough to be measured.
    fn track_speed(&self, st: &TrackState) -> Option<f32> {
        let s = &self.spec.speed;
        let (first, last) = (st.moving_speeds.first()?, st.moving_speeds.last()?);
        if st.moving_speeds.len() < 3 {
            return None;
        }
        let mut v: Vec<f32> = st.moving_speeds.iter().map(|&(_, k)| k).collect();
        v.sort_by(f32::total_cmp);
        let median = v[v.len() / 2];
        // Each speed rests on a window of positions before it.
        let span = last.0 - first.0 + s.window_s;
        let distance_m = f64::from(median) / 3.6 * span;
        (span >= s.min_track_s && distance_m >= s.min_distance_m).then_some(median)
    }

    fn update_congestion(&mut self, t: f64, wall_ms: i64, out: &mut Vec<AnalyzedEvent>) {
        let calibrated = self.spec.calibration.is_some();
        for (z, zone) in self.spec.zones.iter().enumerate() {
            let Some(c) = &zone.congestion else { continue };
            let members: Vec<&TrackState> = self.tracks.values().filter(|st| st.zones[z].inside).collect();
            let occupancy = members.len() as u32;
            let speeds: Vec<f64> = members.iter().filter_map(|st| st.speed_kmh).collect();
            let mean_speed = (!speeds.is_empty()).then(|| speeds.iter().sum::<f64>() / speeds.len() as f64);
            let slow = !calibrated || mean_speed.is_none_or(|v| v <= c.max_mean_speed_kmh);
            let cond = occupancy >= c.min_occupancy && slow;
            let queue_length_m = calibrated.then(|| queue_length(&members, zone_direction(zone, &self.spec))).flatten();
            let cs = &mut self.congestion[z];
            let mut phase = None;
            if cond {
                cs.clear_since = None;
                let since = *cs.cond_since.get_or_insert(t);
                if !cs.active && t - since >= c.sustain {
                    cs.active = true;
                    cs.last_report = t;
                    phase = Some(Phase::Started);
                }
            } else {
                cs.cond_since = None;
                if cs.active {
                    let since = *cs.clear_since.get_or_insert(t);
                    if t - since >= c.clear {
                        cs.active = false;
                        cs.clear_since = None;
                        phase = Some(Phase::Cleared);
                    }
                }
            }
            if phase.is_none() && cs.active && c.report_every > 0.0 && t - cs.last_report >= c.report_every {
                cs.last_report = t;
                phase = Some(Phase::Ongoing);
            }
            if let Some(phase) = phase {
                let kind = EventKind::Congestion {
                    zone: zone.name.clone(),
                    phase,
                    occupancy,
                    mean_speed_kmh: mean_speed.map(|v| v as f32),
                    queue_length_m: queue_length_m.map(|v| v as f32),
                };
                out.push(self.event(wall_ms, kind, None));
            }
        }
    }

    /// Starts the first interval, and reports the counts of every interval that ended.
    fn roll_interval(&mut self, wall_ms: i64, out: &mut Vec<AnalyzedEvent>) {
        let len = self.spec.counts_interval.as_millis().max(1) as i64;
        let Some(start) = self.interval_start_ms else {
            self.interval_start_ms = Some(wall_ms - wall_ms.rem_euclid(len));
            return;
        };
        if wall_ms >= start + len {
            let end = start + len;
            self.flush_counts(start, end, out);
            // Skip intervals the camera did not see at all (stream down): no report for them.
            self.interval_start_ms = Some(wall_ms - wall_ms.rem_euclid(len));
        }
    }

    fn flush_counts(&mut self, start_ms: i64, end_ms: i64, out: &mut Vec<AnalyzedEvent>) {
        let interval_s = ((end_ms - start_ms).max(0) as f64 / 1000.0).round() as u32;
        for (i, line) in self.spec.lines.iter().enumerate() {
            let counts = std::mem::take(&mut self.counts[i])
                .into_iter()
                .map(|((label, direction), count)| ClassCount { label, direction, count })
                .collect();
            let kind = EventKind::Counts { line: line.name.clone(), interval_s, counts };
            out.push(self.event(end_ms, kind, None));
        }
        for (z, zone) in self.spec.zones.iter().enumerate() {
            let o = std::mem::take(&mut self.occupancy[z]);
            let frames = o.frames.max(1) as f32;
            let kind = EventKind::ZoneOccupancy {
                zone: zone.name.clone(),
                interval_s,
                mean: o.sum as f32 / frames,
                max: o.max,
                occupied: o.occupied_frames as f32 / frames,
                entered: o.entered,
            };
            out.push(self.event(end_ms, kind, None));
        }
    }

    /// Keeps at most `snapshots_per_minute` pictures in any minute; the rest go without.
    fn attach_snapshot_budget(&mut self, t: f64, out: &mut [AnalyzedEvent]) {
        while self.snapshots.front().is_some_and(|s| t - s >= 60.0) {
            self.snapshots.pop_front();
        }
        for e in out.iter_mut().filter(|e| e.snapshot.is_some()) {
            if self.snapshots.len() >= self.spec.snapshots_per_minute as usize {
                e.snapshot = None;
            } else {
                self.snapshots.push_back(t);
            }
        }
    }
}

/// Component-wise median of the positions of the last `window` seconds (ground or picture).
fn median_position(samples: &VecDeque<Sample>, window: f64, ground: bool) -> Option<Point> {
    let now = samples.back()?.t;
    let pts: Vec<Point> = samples
        .iter()
        .filter(|s| now - s.t <= window && !s.cut)
        .filter_map(|s| if ground { s.ground } else { Some(s.img) })
        .collect();
    if pts.is_empty() {
        return None;
    }
    let median = |k: usize| {
        let mut v: Vec<f64> = pts.iter().map(|p| p[k]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Some([median(0), median(1)])
}

/// Side of `p` relative to the nearest segment of the line: -1, 0 or 1.
fn line_side(line: &LineSpec, p: Point) -> i8 {
    let mut best: Option<(f64, f64)> = None;
    for s in line.points.windows(2) {
        let (a, b) = (s[0], s[1]);
        let d = segment_distance(a, b, p);
        let side = its_shared::geometry::side(a, b, p);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, side));
        }
    }
    match best {
        Some((_, s)) if s > 0.0 => 1,
        Some((_, s)) if s < 0.0 => -1,
        _ => 0,
    }
}

fn segment_distance(a: Point, b: Point, p: Point) -> f64 {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let len2 = dx * dx + dy * dy;
    let k = if len2 > 0.0 { (((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
    distance(p, [a[0] + k * dx, a[1] + k * dy])
}

/// The zone's permitted direction as a unit vector, on the ground with a calibration (the arrow
/// mapped to metres) or on the picture without.
fn zone_direction(zone: &ZoneSpec, spec: &SceneSpec) -> Option<Point> {
    let [a, b] = zone.direction?;
    let (a, b) = match &spec.calibration {
        Some(c) => (c.to_ground(a)?, c.to_ground(b)?),
        None => (a, b),
    };
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    let n = (dx * dx + dy * dy).sqrt();
    (n > 1e-9).then(|| [dx / n, dy / n])
}

/// Length of a queue: from the first to the last member along the zone direction (or the
/// furthest pair without one), plus one car length (4.5 m) for the vehicle at the end.
fn queue_length(members: &[&TrackState], dir: Option<Point>) -> Option<f64> {
    let pts: Vec<Point> = members.iter().filter_map(|st| st.samples.back().and_then(|s| s.ground)).collect();
    if pts.is_empty() {
        return None;
    }
    let spread = match dir {
        Some(d) => {
            let along: Vec<f64> = pts.iter().map(|p| p[0] * d[0] + p[1] * d[1]).collect();
            let (lo, hi) = along.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            hi - lo
        }
        None => pts.iter().flat_map(|a| pts.iter().map(move |b| distance(*a, *b))).fold(0.0, f64::max),
    };
    Some(spread + 4.5)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::analyze::config::RawScene;
    use crate::detect::{DetectTimings, ModelManifest};
    use crate::track::{EndedTrack, TrackedObject};
    use its_shared::config::ConfigErrors;

    const CAR: usize = 2; // COCO "car" in the bundled model's labels

    fn manifest() -> Arc<ModelManifest> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ssd-mobilenet-v2-coco/model.toml");
        Arc::new(ModelManifest::load(&p).expect("manifest"))
    }

    /// A 640x480 picture of a flat road seen from straight above at 0.1 m per pixel.
    fn scene(extra: &str) -> SceneSpec {
        let text = format!(
            r#"
            image_size = [640, 480]
            calibration = [
                {{ image = [0.0, 0.0], ground = [0.0, 0.0] }},
                {{ image = [640.0, 0.0], ground = [64.0, 0.0] }},
                {{ image = [640.0, 480.0], ground = [64.0, 48.0] }},
                {{ image = [0.0, 480.0], ground = [0.0, 48.0] }},
            ]
            snapshot_kinds = ["stopped_vehicle", "wrong_way"]
            {extra}
            "#
        );
        let raw: RawScene = toml::from_str(&text).expect("parses");
        raw.validate("scene", &[], &mut ConfigErrors::new("test")).expect("valid")
    }

    struct Clip {
        manifest: Arc<ModelManifest>,
        t0_ms: i64,
    }

    impl Clip {
        fn new() -> Self {
            Self { manifest: manifest(), t0_ms: 1_800_000_000_000 }
        }

        /// A frame at `t` seconds with boxes `(id, [x1, y1, x2, y2])` and tracks that ended.
        fn frame(&self, t: f64, boxes: &[(u64, [f32; 4])], ended: &[u64]) -> FrameResult {
            let tracks = boxes
                .iter()
                .map(|&(id, bbox)| TrackedObject {
                    id,
                    bbox,
                    score: 0.8,
                    class_id: CAR,
                    first_seen_s: t,
                    first_bbox: bbox,
                    hits: 10,
                })
                .collect();
            let ended = ended
                .iter()
                .map(|&id| EndedTrack {
                    id,
                    class_id: CAR,
                    first_seen_s: 0.0,
                    last_seen_s: t,
                    hits: 10,
                    first_bbox: [0.0; 4],
                    last_bbox: [0.0; 4],
                    mean_score: 0.8,
                    path: Vec::new(),
                })
                .collect();
            FrameResult {
                camera: 0,
                camera_id: Arc::from("cam"),
                size: (640, 480),
                t_s: t,
                wall_ms: self.t0_ms + (t * 1000.0).round() as i64,
                detections: Vec::new(),
                tracks,
                started: Vec::new(),
                ended,
                lag: Duration::ZERO,
                timings: DetectTimings::default(),
                inferences: 0,
                track_time: Duration::ZERO,
                manifest: self.manifest.clone(),
                discontinuity: false,
                end_of_stream: false,
                frame: None,
            }
        }

        fn end(&self, t: f64) -> FrameResult {
            FrameResult { end_of_stream: true, ..self.frame(t, &[], &[]) }
        }
    }

    /// A 40x20 px car whose bottom-centre is at `(x, y)`.
    fn car_at(x: f32, y: f32) -> [f32; 4] {
        [x - 20.0, y - 20.0, x + 20.0, y]
    }

    fn kinds(events: &[AnalyzedEvent]) -> Vec<&'static str> {
        events.iter().map(|e| e.event.kind.name()).collect()
    }

    #[test]
    fn crossings_count_once_with_the_direction_seen_on_the_picture() {
        // A line across the picture; "in" is the upper side (left of the line walked left to right).
        let spec = scene(
            r#"
            [[lines]]
            name = "bar"
            points = [[0.0, 300.0], [640.0, 300.0]]
            in_side = "left"
            "#,
        );
        let clip = Clip::new();
        let mut a = SceneAnalyzer::new("cam", spec);
        let mut events = Vec::new();
        // Car 1 drives up the picture (onto the "in" side), car 2 down, at 10 fps.
        for i in 0..30 {
            let t = i as f64 * 0.1;
            let up = 400.0 - 8.0 * i as f32;
            let down = 200.0 + 8.0 * i as f32;
            events.extend(a.process(&clip.frame(t, &[(1, car_at(200.0, up)), (2, car_at(400.0, down))], &[])));
        }
        // Car 3 stands on the line, its box jittering across it by two pixels.
        for i in 30..60 {
            let y = if i % 2 == 0 { 298.0 } else { 302.0 };
            events.extend(a.process(&clip.frame(i as f64 * 0.1, &[(3, car_at(300.0, y))], &[])));
        }
        events.extend(a.process(&clip.end(6.0)));
        let crossings: Vec<(u64, Direction)> = events
            .iter()
            .filter_map(|e| match &e.event.kind {
                EventKind::LineCrossing { object, direction, .. } => Some((object.track_id, *direction)),
                _ => None,
            })
            .collect();
        // Car 3 first stood on the "in" side (y 298), so its jitter counts once, as "out".
        assert_eq!(crossings, vec![(1, Direction::In), (2, Direction::Out), (3, Direction::Out)]);
        let counts = events
            .iter()
            .find_map(|e| match &e.event.kind {
                EventKind::Counts { line, counts, .. } if line == "bar" => Some(counts.clone()),
                _ => None,
            })
            .expect("counts at the end of the stream");
        let get = |d: Direction| counts.iter().find(|c| c.direction == d && c.label == "car").map_or(0, |c| c.count);
        assert_eq!((get(Direction::In), get(Direction::Out)), (1, 2));
    }

    #[test]
    fn speed_is_measured_in_km_h_on_the_ground_and_never_absurd() {
        let spec = scene(
            r#"
            [[lines]]
            name = "bar"
            points = [[320.0, 0.0], [320.0, 480.0]]
            in_side = "left"
            "#,
        );
        let clip = Clip::new();
        let mut a = SceneAnalyzer::new("cam", spec);
        let mut events = Vec::new();
        // 10 px per frame at 10 fps = 1 m per 0.1 s = 36 km/h; one box in ten is thrown 40 px off.
        for i in 0..50 {
            let t = i as f64 * 0.1;
            let wild = if i % 10 == 5 { 40.0 } else { 0.0 };
            events.extend(a.process(&clip.frame(t, &[(7, car_at(60.0 + 10.0 * i as f32 + wild, 240.0))], &[])));
        }
        events.extend(a.process(&clip.frame(5.0, &[], &[7])));
        let crossing = events.iter().find_map(|e| match &e.event.kind {
            EventKind::LineCrossing { speed_kmh, .. } => Some(speed_kmh.expect("calibrated: a speed")),
            _ => None,
        });
        let measured = events.iter().find_map(|e| match &e.event.kind {
            EventKind::SpeedMeasurement { speed_kmh, .. } => Some(*speed_kmh),
            _ => None,
        });
        let crossing = crossing.expect("crossed");
        let measured = measured.expect("measured when the track ended");
        assert!((crossing - 36.0).abs() < 2.0, "speed at the line {crossing}");
        assert!((measured - 36.0).abs() < 1.0, "track speed {measured}");
    }

    #[test]
    fn a_stopped_vehicle_is_reported_once_and_a_parked_one_not_again() {
        let spec = scene(
            r#"
            [[zones]]
            name = "hard-shoulder"
            polygon = [[0.0, 200.0], [640.0, 200.0], [640.0, 300.0], [0.0, 300.0]]
            stopped_after_s = 5
            "#,
        );
        let clip = Clip::new();
        let mut a = SceneAnalyzer::new("cam", spec);
        let mut stops = Vec::new();
        // Drives in at 36 km/h for 2 s, stops at x=300 for 30 s (boxes jittering by a pixel).
        for i in 0..320 {
            let t = i as f64 * 0.1;
            let x = if i < 20 { 100.0 + 10.0 * i as f32 } else { 300.0 + (i % 2) as f32 };
            for e in a.process(&clip.frame(t, &[(1, car_at(x, 250.0))], &[])) {
                if let EventKind::StoppedVehicle { stopped_s, .. } = e.event.kind {
                    stops.push((t, stopped_s, e.snapshot.is_some()));
                }
            }
        }
        assert_eq!(stops.len(), 1, "one report for one stop: {stops:?}");
        let (t, stopped_s, snap) = stops[0];
        assert!((6.5..=7.5).contains(&t), "reported 5 s after it stopped at 2 s: at {t}");
        assert!(stopped_s >= 5.0);
        assert!(snap, "stopped vehicles come with a picture");
        // The track is lost and found again under a new id: the same parked car, no new report.
        a.process(&clip.frame(32.0, &[], &[1]));
        for i in 0..100 {
            let t = 33.0 + i as f64 * 0.1;
            for e in a.process(&clip.frame(t, &[(2, car_at(301.0, 250.0))], &[])) {
                assert_ne!(e.event.kind.name(), "stopped_vehicle", "suppressed at {t}");
            }
        }
    }

    #[test]
    fn wrong_way_is_reported_after_the_minimum_distance_against_the_zone_direction() {
        let spec = scene(
            r#"
            [[zones]]
            name = "lane-east"
            polygon = [[0.0, 200.0], [640.0, 200.0], [640.0, 300.0], [0.0, 300.0]]
            direction = [[100.0, 250.0], [500.0, 250.0]]
            wrong_way_min_m = 10
            "#,
        );
        let clip = Clip::new();
        let mut a = SceneAnalyzer::new("cam", spec);
        let mut wrong = Vec::new();
        for i in 0..50 {
            let t = i as f64 * 0.1;
            // Car 1 eastwards (right way), car 2 westwards at 1 m per frame.
            let boxes = [(1, car_at(50.0 + 10.0 * i as f32, 240.0)), (2, car_at(600.0 - 10.0 * i as f32, 260.0))];
            for e in a.process(&clip.frame(t, &boxes, &[])) {
                if let EventKind::WrongWay { object, distance_m, .. } = &e.event.kind {
                    wrong.push((object.track_id, t, *distance_m));
                }
            }
        }
        assert_eq!(wrong.len(), 1, "{wrong:?}");
        let (id, t, d) = wrong[0];
        assert_eq!(id, 2);
        // 10 m at 1 m per 0.1 s is 1.0 s; measured on the median of the last half second, a
        // quarter of a second later.
        assert!((1.15..=1.4).contains(&t), "10 m at 1 m per 0.1 s, seen through the median: at {t}");
        assert!(d >= 10.0);
    }

    #[test]
    fn congestion_starts_when_sustained_and_clears() {
        let spec = scene(
            r#"
            [[zones]]
            name = "queue"
            polygon = [[0.0, 200.0], [640.0, 200.0], [640.0, 300.0], [0.0, 300.0]]
            direction = [[600.0, 250.0], [100.0, 250.0]]
            congestion = { min_occupancy = 4, max_mean_speed_kmh = 10, sustain_s = 3, clear_s = 2 }
            "#,
        );
        let clip = Clip::new();
        let mut a = SceneAnalyzer::new("cam", spec);
        let mut phases = Vec::new();
        for i in 0..100 {
            let t = i as f64 * 0.1;
            // Five cars queue still for 6 s, then leave the zone.
            let boxes: Vec<(u64, [f32; 4])> = if t < 6.0 {
                (0..5).map(|k| (k + 1, car_at(100.0 + 60.0 * k as f32, 250.0))).collect()
            } else {
                (0..5).map(|k| (k + 1, car_at(100.0 + 60.0 * k as f32, 400.0))).collect()
            };
            for e in a.process(&clip.frame(t, &boxes, &[])) {
                if let EventKind::Congestion { phase, occupancy, queue_length_m, .. } = e.event.kind {
                    phases.push((phase, t, occupancy, queue_length_m));
                }
            }
        }
        assert_eq!(phases.len(), 2, "{phases:?}");
        assert_eq!(phases[0].0, Phase::Started);
        assert!((2.5..=3.6).contains(&phases[0].1), "{phases:?}");
        assert_eq!(phases[0].2, 5);
        let q = phases[0].3.expect("queue length");
        assert!((q - (24.0 + 4.5)).abs() < 0.5, "first to last car 24 m, plus one car: {q}");
        assert_eq!(phases[1].0, Phase::Cleared);
        assert!(phases[1].1 >= 8.0);
        let occ = a
            .process(&clip.end(10.0))
            .into_iter()
            .find_map(|e| match e.event.kind {
                EventKind::ZoneOccupancy { mean, max, occupied, entered, .. } => Some((mean, max, occupied, entered)),
                _ => None,
            })
            .expect("occupancy reported with the counts");
        // Five cars in the zone for the first 7 s of 10 s (they leave at 6 s and count as inside
        // for a second more), none after.
        assert_eq!((occ.1, occ.3), (5, 5));
        assert!((occ.2 - 0.7).abs() < 0.02, "occupied fraction {}", occ.2);
        assert!((occ.0 - 3.5).abs() < 0.1, "mean occupancy {}", occ.0);
    }

    #[test]
    fn zones_report_enter_exit_and_dwell_without_flapping_at_the_edge() {
        let spec = scene(
            r#"
            [[zones]]
            name = "box"
            polygon = [[100.0, 100.0], [300.0, 100.0], [300.0, 300.0], [100.0, 300.0]]
            dwell_s = 2
            "#,
        );
        let clip = Clip::new();
        let mut a = SceneAnalyzer::new("cam", spec);
        let mut seen = Vec::new();
        for i in 0..50 {
            let t = i as f64 * 0.1;
            // On the edge, jittering in and out, then well inside, then out (for over a second).
            let x = if i < 10 {
                if i % 2 == 0 { 99.0 } else { 101.0 }
            } else if i < 35 {
                200.0
            } else {
                400.0
            };
            seen.extend(kinds(&a.process(&clip.frame(t, &[(1, car_at(x, 200.0))], &[]))));
        }
        assert_eq!(seen, vec!["zone_enter", "zone_dwell", "zone_exit"]);
    }
}
