//! A camera's scene: calibration, count lines and zones, as configured (`[cameras.scene]`) and
//! as validated ([`SceneSpec`]).
//!
//! Coordinates are pixels of the picture the operator drew them on (`image_size`), with x to the
//! right and y downwards, as every image tool shows them; they are scaled to the stream's actual
//! size at run time, so a camera switched to another resolution keeps its lines where they were.
//! Ground coordinates are metres on the road plane, in any frame the surveyor chose.

use std::time::Duration;

use its_shared::config::ConfigErrors;
use its_shared::geometry::{Calibration, Point, polygon_area, polygon_is_simple};
use serde::Deserialize;

/// `[cameras.scene]`: what the agent measures on one camera's picture. Empty by default: the
/// camera's road users are tracked and reported (`object_track`) but nothing is counted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawScene {
    /// `[width, height]` of the picture the points below were taken on (required as soon as a
    /// line, zone or calibration point is given).
    pub image_size: Option<[u32; 2]>,
    /// Four or more image points with their ground coordinates: speeds and distances are in
    /// real units only with a calibration.
    pub calibration: Vec<RawCalibrationPoint>,
    /// A calibration whose points disagree with the fitted plane by more than this (mean, in
    /// metres) is refused: 0.5 m is a few pixels of a typical survey; worse means a point is wrong.
    pub max_reprojection_error_m: f64,
    /// Periodic counts per line, class and direction, and zone occupancy, every this many
    /// seconds (60: the interval traffic centres count in).
    pub counts_interval_s: u32,
    pub lines: Vec<RawLine>,
    pub zones: Vec<RawZone>,
    pub speed: RawSpeed,
    /// Event kinds that carry a JPEG snapshot (the frame with the box drawn, and a crop). The
    /// rare, actionable events by default: a picture of every crossing would cost more uplink
    /// than the events themselves.
    pub snapshot_kinds: Vec<String>,
    /// At most this many snapshots per minute for the camera (bounds the uplink under a flood
    /// of alarms; events beyond it are still sent, without a picture).
    pub snapshots_per_minute: u32,
}

impl Default for RawScene {
    fn default() -> Self {
        Self {
            image_size: None,
            calibration: Vec::new(),
            max_reprojection_error_m: 0.5,
            counts_interval_s: 60,
            lines: Vec::new(),
            zones: Vec::new(),
            speed: RawSpeed::default(),
            snapshot_kinds: vec!["stopped_vehicle".into(), "wrong_way".into(), "congestion".into()],
            snapshots_per_minute: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCalibrationPoint {
    /// `[x, y]` pixels.
    pub image: [f64; 2],
    /// `[x, y]` metres on the road.
    pub ground: [f64; 2],
}

/// A count line: a polyline drawn across the road.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLine {
    pub name: String,
    /// Two or more `[x, y]` pixel points.
    pub points: Vec<[f64; 2]>,
    /// Which side is "in": `left` or `right` of the line walked from its first point to its
    /// last, as seen on the picture. A road user moving onto that side crosses `in`.
    pub in_side: String,
    /// Labels counted on this line (empty: every road user).
    #[serde(default)]
    pub classes: Vec<String>,
}

/// A zone: a polygon on the picture, evaluated at the bottom-centre of a box (where a vehicle
/// touches the road), as users of other systems expect.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawZone {
    pub name: String,
    /// Three or more `[x, y]` pixel points, not self-intersecting.
    pub polygon: Vec<[f64; 2]>,
    /// Permitted direction of travel, as an arrow `[[x, y], [x, y]]` drawn on the picture
    /// (empty: any direction; no wrong-way detection).
    pub direction: Vec<[f64; 2]>,
    /// Labels this zone cares about (empty: every road user).
    pub classes: Vec<String>,
    /// A road user inside longer than this raises one `zone_dwell` (0: never).
    pub dwell_s: f64,
    /// Stopping here is abnormal: a vehicle standing still this long raises `stopped_vehicle`
    /// (0: stopping is normal here, e.g. at a junction).
    pub stopped_after_s: f64,
    /// After a `stopped_vehicle`, no new one for a vehicle standing within 3 m (or 30 px) of it
    /// for this long: a parked car (or one whose track is lost and found again) is reported once,
    /// not every few seconds. 15 minutes.
    pub stopped_suppress_s: f64,
    /// Wrong-way: movement against `direction` over at least this distance inside the zone
    /// (metres with a calibration; 10 m is two car lengths, beyond any reversing into a space).
    pub wrong_way_min_m: f64,
    /// The same without a calibration, in pixels of `image_size`.
    pub wrong_way_min_px: f64,
    pub congestion: Option<RawCongestion>,
}

impl Default for RawZone {
    fn default() -> Self {
        Self {
            name: String::new(),
            polygon: Vec::new(),
            direction: Vec::new(),
            classes: Vec::new(),
            dwell_s: 0.0,
            stopped_after_s: 0.0,
            stopped_suppress_s: 900.0,
            wrong_way_min_m: 10.0,
            wrong_way_min_px: 80.0,
            congestion: None,
        }
    }
}

/// Congestion / queue: occupancy and mean speed thresholds sustained for a time.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCongestion {
    /// Road users in the zone at once.
    pub min_occupancy: u32,
    /// Their mean speed at most this (km/h; ignored without a calibration).
    pub max_mean_speed_kmh: f64,
    /// Both for this long before `congestion started` (30 s: longer than a red light's queue
    /// draining, shorter than anything a traffic centre would act on).
    pub sustain_s: f64,
    /// Neither for this long before `congestion cleared`.
    pub clear_s: f64,
    /// While it lasts, an `ongoing` report this often (0: none).
    pub report_every_s: f64,
}

impl Default for RawCongestion {
    fn default() -> Self {
        Self { min_occupancy: 4, max_mean_speed_kmh: 10.0, sustain_s: 30.0, clear_s: 15.0, report_every_s: 300.0 }
    }
}

/// Speed measurement settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSpeed {
    /// Speeds are fitted over this much of a track's recent path (1.5 s: 15 positions at
    /// 10 fps, enough to average out a box's jitter, short enough to follow braking).
    pub window_s: f64,
    /// A track shorter than this (seconds) gets no speed.
    pub min_track_s: f64,
    /// Nor one that moved less than this (metres): its speed is noise.
    pub min_distance_m: f64,
    /// Anything faster is a measurement error, never reported (250 km/h: no road vehicle seen
    /// by a roadside camera goes faster).
    pub max_kmh: f64,
}

impl Default for RawSpeed {
    fn default() -> Self {
        Self { window_s: 1.5, min_track_s: 1.0, min_distance_m: 3.0, max_kmh: 250.0 }
    }
}

/// Congestion thresholds, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CongestionSpec {
    pub min_occupancy: u32,
    pub max_mean_speed_kmh: f64,
    pub sustain: f64,
    pub clear: f64,
    pub report_every: f64,
}

/// A validated count line, in configured pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct LineSpec {
    pub name: String,
    pub points: Vec<Point>,
    /// `true`: the left side (as seen on the picture) is "in".
    pub in_left: bool,
    pub classes: Vec<String>,
}

/// A validated zone, in configured pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneSpec {
    pub name: String,
    pub polygon: Vec<Point>,
    pub direction: Option<[Point; 2]>,
    pub classes: Vec<String>,
    pub dwell_s: f64,
    pub stopped_after_s: f64,
    pub stopped_suppress_s: f64,
    pub wrong_way_min_m: f64,
    pub wrong_way_min_px: f64,
    pub congestion: Option<CongestionSpec>,
}

/// Speed settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeedSpec {
    pub window_s: f64,
    pub min_track_s: f64,
    pub min_distance_m: f64,
    pub max_kmh: f64,
}

/// A camera's validated scene.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneSpec {
    /// Size the coordinates refer to (`None`: nothing drawn).
    pub image_size: Option<(u32, u32)>,
    pub calibration: Option<Calibration>,
    pub counts_interval: Duration,
    pub lines: Vec<LineSpec>,
    pub zones: Vec<ZoneSpec>,
    pub speed: SpeedSpec,
    pub snapshot_kinds: Vec<String>,
    pub snapshots_per_minute: u32,
}

impl Default for SceneSpec {
    /// The scene of a camera with none configured: nothing drawn, the default settings.
    fn default() -> Self {
        let raw = RawScene::default();
        SceneSpec {
            image_size: None,
            calibration: None,
            counts_interval: Duration::from_secs(u64::from(raw.counts_interval_s)),
            lines: Vec::new(),
            zones: Vec::new(),
            speed: SpeedSpec::from(&raw.speed),
            snapshot_kinds: raw.snapshot_kinds,
            snapshots_per_minute: raw.snapshots_per_minute,
        }
    }
}

impl From<&RawSpeed> for SpeedSpec {
    fn from(s: &RawSpeed) -> Self {
        Self { window_s: s.window_s, min_track_s: s.min_track_s, min_distance_m: s.min_distance_m, max_kmh: s.max_kmh }
    }
}

/// Road kinds that cannot carry a picture: periodic reports and the tracker's own summaries.
const NO_PICTURE_KINDS: &[&str] = &["counts", "zone_occupancy", "object_track"];

/// Kinds a snapshot can be asked for: those about a road user, and congestion.
pub fn snapshot_kinds() -> impl Iterator<Item = &'static str> {
    its_shared::event::ROAD_KINDS.iter().copied().filter(|k| !NO_PICTURE_KINDS.contains(k))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn finite(p: &[f64; 2]) -> bool {
    p[0].is_finite() && p[1].is_finite()
}

impl RawScene {
    /// Checks the scene (`path` is its key, e.g. `cameras[0].scene`); `labels` are the model's
    /// labels (empty: class names are not checked). Every problem goes to `e`.
    pub fn validate(&self, path: &str, labels: &[&str], e: &mut ConfigErrors) -> Option<SceneSpec> {
        let before = e.issues.len();
        let drawn = !self.calibration.is_empty() || !self.lines.is_empty() || !self.zones.is_empty();
        let size = self.image_size.map(|[w, h]| (w, h));
        match size {
            Some((w, h)) => e.check((16..=16_384).contains(&w) && (16..=16_384).contains(&h), &format!("{path}.image_size"), || {
                format!("{w}x{h} is not a picture size (16..=16384 each way)")
            }),
            None => e.check(!drawn, &format!("{path}.image_size"), || {
                "is required with lines, zones or a calibration: the [width, height] of the picture their points were taken on".into()
            }),
        }
        let (w, h) = size.map_or((f64::MAX, f64::MAX), |(w, h)| (w as f64, h as f64));
        let on_picture = |p: &[f64; 2]| finite(p) && p[0] >= 0.0 && p[1] >= 0.0 && p[0] <= w && p[1] <= h;
        let check_points = |e: &mut ConfigErrors, at: &str, pts: &[[f64; 2]]| {
            for (k, p) in pts.iter().enumerate() {
                e.check(on_picture(p), &format!("{at}[{k}]"), || {
                    format!("[{}, {}] is not a point of the {}x{} picture", p[0], p[1], w, h)
                });
            }
        };
        let check_classes = |e: &mut ConfigErrors, at: &str, classes: &[String]| {
            for (k, c) in classes.iter().enumerate() {
                e.check(labels.is_empty() || labels.contains(&c.as_str()), &format!("{at}[{k}]"), || {
                    format!("{c:?} is not a label of the model")
                });
            }
        };

        // Calibration.
        let mut calibration = None;
        if !self.calibration.is_empty() {
            let at = format!("{path}.calibration");
            e.check(self.calibration.len() >= 4, &at, || {
                format!(
                    "{} point(s) given; a calibration needs at least 4 (image, ground) pairs",
                    self.calibration.len()
                )
            });
            e.check(
                self.max_reprojection_error_m > 0.0 && self.max_reprojection_error_m <= 100.0,
                &format!("{path}.max_reprojection_error_m"),
                || format!("{} is outside (0, 100]", self.max_reprojection_error_m),
            );
            for (k, c) in self.calibration.iter().enumerate() {
                e.check(on_picture(&c.image), &format!("{at}[{k}].image"), || {
                    format!("[{}, {}] is not a point of the {}x{} picture", c.image[0], c.image[1], w, h)
                });
                e.check(finite(&c.ground), &format!("{at}[{k}].ground"), || "must be finite metres".into());
            }
            if self.calibration.len() >= 4 && e.issues.len() == before {
                let img: Vec<Point> = self.calibration.iter().map(|c| c.image).collect();
                let gnd: Vec<Point> = self.calibration.iter().map(|c| c.ground).collect();
                match Calibration::fit(&img, &gnd) {
                    Ok(cal) if cal.reprojection.mean_m > self.max_reprojection_error_m => e.push(
                        at,
                        format!(
                            "too poor: the points disagree with one road plane by {:.2} m on average ({:.2} m at point {}), \
                             more than max_reprojection_error_m = {}; check that point",
                            cal.reprojection.mean_m, cal.reprojection.max_m, cal.reprojection.worst, self.max_reprojection_error_m
                        ),
                    ),
                    Ok(cal) => calibration = Some(cal),
                    Err(err) => e.push(at, format!("refused: {err}")),
                }
            }
        }
        e.check((1..=86_400).contains(&self.counts_interval_s), &format!("{path}.counts_interval_s"), || {
            format!("{} is outside 1..=86400", self.counts_interval_s)
        });

        // Lines.
        let mut lines = Vec::new();
        for (i, l) in self.lines.iter().enumerate() {
            let at = format!("{path}.lines[{i}]");
            e.check(valid_name(&l.name), &format!("{at}.name"), || {
                format!("{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'", l.name)
            });
            if self.lines[..i].iter().any(|o| o.name == l.name) {
                e.push(format!("{at}.name"), format!("{:?} is used by another line", l.name));
            }
            e.check(l.points.len() >= 2, &format!("{at}.points"), || "a line needs at least 2 points".into());
            check_points(e, &format!("{at}.points"), &l.points);
            e.check(l.points.windows(2).all(|s| s[0] != s[1]), &format!("{at}.points"), || {
                "two consecutive points are the same".into()
            });
            let in_left = match l.in_side.as_str() {
                "left" => true,
                "right" => false,
                other => {
                    e.push(format!("{at}.in_side"), format!("{other:?} is not one of left, right"));
                    true
                }
            };
            check_classes(e, &format!("{at}.classes"), &l.classes);
            lines.push(LineSpec {
                name: l.name.clone(),
                points: l.points.clone(),
                in_left,
                classes: l.classes.clone(),
            });
        }

        // Zones.
        let mut zones = Vec::new();
        for (i, z) in self.zones.iter().enumerate() {
            let at = format!("{path}.zones[{i}]");
            e.check(valid_name(&z.name), &format!("{at}.name"), || {
                format!("{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'", z.name)
            });
            if self.zones[..i].iter().any(|o| o.name == z.name) {
                e.push(format!("{at}.name"), format!("{:?} is used by another zone", z.name));
            }
            check_points(e, &format!("{at}.polygon"), &z.polygon);
            if z.polygon.len() < 3 {
                e.push(format!("{at}.polygon"), "a zone needs at least 3 points");
            } else if z.polygon.iter().all(finite) {
                if polygon_area(&z.polygon).abs() < 1.0 {
                    e.push(format!("{at}.polygon"), "has no area (its points are on one line)");
                } else if !polygon_is_simple(&z.polygon) {
                    e.push(format!("{at}.polygon"), "crosses itself; list the corners in order around the zone");
                }
            }
            let direction = match z.direction.as_slice() {
                [] => None,
                [a, b] if a != b => {
                    check_points(e, &format!("{at}.direction"), &z.direction);
                    Some([*a, *b])
                }
                _ => {
                    e.push(format!("{at}.direction"), "must be an arrow of two different points [[x, y], [x, y]]");
                    None
                }
            };
            check_classes(e, &format!("{at}.classes"), &z.classes);
            for (name, v, max) in [
                ("dwell_s", z.dwell_s, 86_400.0),
                ("stopped_after_s", z.stopped_after_s, 86_400.0),
                ("stopped_suppress_s", z.stopped_suppress_s, 86_400.0),
                ("wrong_way_min_m", z.wrong_way_min_m, 10_000.0),
                ("wrong_way_min_px", z.wrong_way_min_px, 100_000.0),
            ] {
                e.check(v.is_finite() && (0.0..=max).contains(&v), &format!("{at}.{name}"), || {
                    format!("{v} is outside 0..={max}")
                });
            }
            let congestion = z.congestion.as_ref().map(|c| {
                let cat = format!("{at}.congestion");
                e.check((1..=1000).contains(&c.min_occupancy), &format!("{cat}.min_occupancy"), || {
                    format!("{} is outside 1..=1000", c.min_occupancy)
                });
                for (name, v) in [
                    ("max_mean_speed_kmh", c.max_mean_speed_kmh),
                    ("sustain_s", c.sustain_s),
                    ("clear_s", c.clear_s),
                    ("report_every_s", c.report_every_s),
                ] {
                    e.check(v.is_finite() && (0.0..=86_400.0).contains(&v), &format!("{cat}.{name}"), || {
                        format!("{v} is outside 0..=86400")
                    });
                }
                CongestionSpec {
                    min_occupancy: c.min_occupancy,
                    max_mean_speed_kmh: c.max_mean_speed_kmh,
                    sustain: c.sustain_s,
                    clear: c.clear_s,
                    report_every: c.report_every_s,
                }
            });
            zones.push(ZoneSpec {
                name: z.name.clone(),
                polygon: z.polygon.clone(),
                direction,
                classes: z.classes.clone(),
                dwell_s: z.dwell_s,
                stopped_after_s: z.stopped_after_s,
                stopped_suppress_s: z.stopped_suppress_s,
                wrong_way_min_m: z.wrong_way_min_m,
                wrong_way_min_px: z.wrong_way_min_px,
                congestion,
            });
        }

        let s = &self.speed;
        for (name, v, lo, hi) in [
            ("window_s", s.window_s, 0.2, 30.0),
            ("min_track_s", s.min_track_s, 0.0, 600.0),
            ("min_distance_m", s.min_distance_m, 0.0, 10_000.0),
            ("max_kmh", s.max_kmh, 1.0, 1000.0),
        ] {
            e.check(v.is_finite() && v >= lo && v <= hi, &format!("{path}.speed.{name}"), || {
                format!("{v} is outside {lo}..={hi}")
            });
        }
        for (k, kind) in self.snapshot_kinds.iter().enumerate() {
            e.check(snapshot_kinds().any(|s| s == kind), &format!("{path}.snapshot_kinds[{k}]"), || {
                format!("{kind:?} is not one of {}", snapshot_kinds().collect::<Vec<_>>().join(", "))
            });
        }
        e.check(self.snapshots_per_minute <= 6000, &format!("{path}.snapshots_per_minute"), || {
            format!("{} is above 6000", self.snapshots_per_minute)
        });
        if e.issues.len() > before {
            return None;
        }
        Some(SceneSpec {
            image_size: size,
            calibration,
            counts_interval: Duration::from_secs(u64::from(self.counts_interval_s)),
            lines,
            zones,
            speed: SpeedSpec::from(s),
            snapshot_kinds: self.snapshot_kinds.clone(),
            snapshots_per_minute: self.snapshots_per_minute,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> RawScene {
        toml::from_str(text).expect("parses")
    }

    const ROAD: &str = r#"
        image_size = [1280, 720]
        calibration = [
            { image = [420.0, 700.0], ground = [0.0, 0.0] },
            { image = [900.0, 700.0], ground = [7.0, 0.0] },
            { image = [560.0, 300.0], ground = [0.0, 40.0] },
            { image = [720.0, 300.0], ground = [7.0, 40.0] },
        ]
        [[lines]]
        name = "stop-bar"
        points = [[300.0, 500.0], [1000.0, 500.0]]
        in_side = "left"
        classes = ["car", "truck"]
        [[zones]]
        name = "lane-1"
        polygon = [[420.0, 700.0], [660.0, 700.0], [640.0, 300.0], [560.0, 300.0]]
        direction = [[600.0, 690.0], [600.0, 320.0]]
        stopped_after_s = 20
        congestion = { min_occupancy = 5 }
    "#;

    #[test]
    fn a_surveyed_road_validates_with_its_calibration() {
        let spec =
            parse(ROAD).validate("cameras[0].scene", &["car", "truck"], &mut ConfigErrors::new("t")).expect("valid");
        let cal = spec.calibration.expect("calibrated");
        assert!(cal.reprojection.mean_m < 1e-6, "four exact points fit exactly: {:?}", cal.reprojection);
        let g = cal.to_ground([420.0, 700.0]).expect("on the plane");
        assert!(g[0].abs() < 1e-6 && g[1].abs() < 1e-6);
        assert!(spec.lines[0].in_left);
        assert_eq!(spec.zones[0].congestion.as_ref().map(|c| c.min_occupancy), Some(5));
        assert_eq!(spec.zones[0].congestion.as_ref().map(|c| c.sustain), Some(30.0), "defaults fill in");
    }

    #[test]
    fn every_scene_problem_is_reported_with_its_path() {
        let text = r#"
            calibration = [
                { image = [0.0, 0.0], ground = [0.0, 0.0] },
                { image = [10.0, 0.0], ground = [1.0, 0.0] },
                { image = [20.0, 0.0], ground = [2.0, nan] },
            ]
            snapshot_kinds = ["selfie"]
            [speed]
            max_kmh = 0
            [[lines]]
            name = "a b"
            points = [[10.0, 10.0]]
            in_side = "up"
            classes = ["tram"]
            [[lines]]
            name = "a b"
            points = [[10.0, 10.0], [10.0, 10.0]]
            in_side = "left"
            [[zones]]
            name = "bowtie"
            polygon = [[0.0, 0.0], [100.0, 100.0], [100.0, 0.0], [0.0, 100.0]]
            direction = [[5.0, 5.0]]
            stopped_after_s = -1
            congestion = { min_occupancy = 0 }
        "#;
        let mut e = ConfigErrors::new("agent.toml");
        assert!(parse(text).validate("cameras[1].scene", &["car"], &mut e).is_none());
        let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "cameras[1].scene.image_size",
            "cameras[1].scene.calibration",
            "cameras[1].scene.calibration[2].ground",
            "cameras[1].scene.snapshot_kinds[0]",
            "cameras[1].scene.speed.max_kmh",
            "cameras[1].scene.lines[0].name",
            "cameras[1].scene.lines[0].points",
            "cameras[1].scene.lines[0].in_side",
            "cameras[1].scene.lines[0].classes[0]",
            "cameras[1].scene.lines[1].name",
            "cameras[1].scene.lines[1].points",
            "cameras[1].scene.zones[0].polygon",
            "cameras[1].scene.zones[0].direction",
            "cameras[1].scene.zones[0].stopped_after_s",
            "cameras[1].scene.zones[0].congestion.min_occupancy",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn a_degenerate_or_poor_calibration_is_refused_with_the_reason() {
        // Four points on one line of the picture: no plane can be fitted.
        let collinear = r#"
            image_size = [1280, 720]
            calibration = [
                { image = [100.0, 100.0], ground = [0.0, 0.0] },
                { image = [200.0, 100.0], ground = [1.0, 0.0] },
                { image = [300.0, 100.0], ground = [2.0, 5.0] },
                { image = [400.0, 100.0], ground = [3.0, 9.0] },
            ]
        "#;
        let mut e = ConfigErrors::new("t");
        assert!(parse(collinear).validate("scene", &[], &mut e).is_none());
        assert_eq!(e.issues[0].path, "scene.calibration");
        assert!(e.issues[0].message.contains("refused"), "{}", e.issues[0].message);

        // Five points, one of them surveyed 4 m off: the fit disagrees and says which point.
        let poor = r#"
            image_size = [1280, 720]
            calibration = [
                { image = [420.0, 700.0], ground = [0.0, 0.0] },
                { image = [900.0, 700.0], ground = [7.0, 0.0] },
                { image = [560.0, 300.0], ground = [0.0, 40.0] },
                { image = [720.0, 300.0], ground = [7.0, 40.0] },
                { image = [640.0, 450.0], ground = [7.5, 20.0] },
            ]
        "#;
        let mut e = ConfigErrors::new("t");
        assert!(parse(poor).validate("scene", &[], &mut e).is_none());
        assert!(e.issues[0].message.contains("too poor"), "{}", e.issues[0].message);
    }

    #[test]
    fn an_empty_scene_needs_no_picture_size() {
        let spec = RawScene::default().validate("scene", &[], &mut ConfigErrors::new("t")).expect("valid");
        assert!(spec.lines.is_empty() && spec.zones.is_empty() && spec.calibration.is_none());
        assert_eq!(spec.counts_interval, Duration::from_secs(60));
    }
}
