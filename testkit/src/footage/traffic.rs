//! Traffic footage: vehicles on a two-lane road seen through a known camera, with the truth of
//! the traffic analytics (counts per line and direction, speeds, wrong-way drivers, stopped
//! vehicles, queues).
//!
//! # Geometry
//!
//! The road lies on a ground plane in metres: `x` along the road (growing to the right of the
//! picture, "east"), `y` across it, growing towards the camera. The far lane (`y` in `[-3.5, 0]`)
//! is `westbound`, the near lane (`y` in `[0, 3.5]`) `eastbound`. A pinhole [`Camera`] 50 m off
//! the road and 16 m up looks at it obliquely, so that the road crosses the street picture of
//! [`Library::background`] from left (far: smaller vehicles) to right (near); ground and image
//! are related by a real perspective homography ([`Camera::homography`]).
//!
//! # Vehicles
//!
//! Each vehicle drives along its lane with a speed profile (speed knots, linear in between:
//! cruise, brake, stand, accelerate), sampled at each frame. It is drawn as a sprite whose
//! bottom-centre is the image of its ground reference point (the middle of its footprint) and
//! whose size is the size of the image of the real vehicle (the bounding box of its projected
//! length x width x height cuboid; sprites seen from behind keep their proportions at that
//! height). Nearer vehicles are drawn over farther ones. The pickup seen from the side (flipped
//! for westbound traffic) is the vehicle the detector finds reliably from about 170 px wide,
//! which is what fixes the zoom of the camera: a whole pickup is 210-265 px wide (the van, kept
//! in proportion, 155-180 px).
//!
//! # Truth
//!
//! Derived from the ground motion, never by hand: line crossings (time the reference point
//! crosses the line, by bisection on the continuous motion), standstills inside no-stopping zones,
//! wrong-way travel (10 m against a zone's direction inside it), congestion (a zone holding at
//! least [`CONGESTION_MIN_VEHICLES`] vehicles with mean speed at most
//! [`CONGESTION_MAX_MEAN_KMH`], frame by frame).

use image::{GrayImage, RgbImage, imageops};

use super::library::Library;
use super::{Actor, Footage, Placement, Sprite};

/// Frame rate of all traffic footage.
pub const TRAFFIC_FPS: f64 = 10.0;
/// Width of one lane (metres).
pub const LANE_WIDTH_M: f64 = 3.5;
/// A zone is congested with at least this many vehicles in it...
pub const CONGESTION_MIN_VEHICLES: usize = 4;
/// ...moving at this mean speed or slower (km/h).
pub const CONGESTION_MAX_MEAN_KMH: f64 = 10.0;
/// Movement against a zone's direction that makes a vehicle a wrong-way driver (metres).
pub const WRONG_WAY_M: f64 = 10.0;

/// Traffic footage: the frames, the calibrated road layout and the truth.
#[derive(Debug, Clone)]
pub struct TrafficFootage {
    pub footage: Footage,
    pub layout: RoadLayout,
    pub truth: TrafficTruth,
    /// true for the clean clips (exact counts and no false alarms expected)
    pub clean: bool,
}

/// What a site survey gives the analytics: calibration points, count lines, zones.
#[derive(Debug, Clone, PartialEq)]
pub struct RoadLayout {
    pub image_size: (u32, u32),
    /// At least 6 reference points (image pixel, ground metres) as a surveyor would take them
    /// (lane-marking corners); image points exact projections of the ground points, rounded to
    /// 0.1 px
    pub calibration: Vec<([f64; 2], [f64; 2])>,
    pub lines: Vec<LayoutLine>,
    pub zones: Vec<LayoutZone>,
    /// The exact homography ground (metres, homogeneous `[x, y, 1]`) -> image pixels the footage
    /// was rendered with (row-major), to check a calibration fitted from `calibration` against.
    pub ground_to_image: [[f64; 3]; 3],
}

/// A count line.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutLine {
    pub name: String,
    /// polyline in image pixels (>= 2 points), across the road
    pub image: Vec<[f64; 2]>,
    /// the same line on the ground (metres)
    pub ground: Vec<[f64; 2]>,
    /// which side of the line (walking its points in order, as seen on the picture; image x
    /// right, y DOWN) is "in": "left" means the side where cross(B-A, P-A) < 0 in image
    /// coordinates. Here "in" is always the east side: eastbound vehicles cross "in".
    pub in_side: &'static str,
}

/// A zone: one lane over the visible stretch of road.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutZone {
    pub name: String,
    /// polygon in image pixels (one lane over a stretch of road)
    pub image: Vec<[f64; 2]>,
    /// the same polygon on the ground (metres)
    pub ground: Vec<[f64; 2]>,
    /// permitted direction of travel as an arrow in image pixels [from, to] (None: no direction)
    pub direction: Option<[[f64; 2]; 2]>,
    /// stopping here is abnormal (a stopped vehicle must raise an event)
    pub no_stopping: bool,
}

/// Ground truth of the traffic analytics.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficTruth {
    pub fps: f64,
    pub frames: usize,
    pub vehicles: Vec<VehicleTruth>,
    /// In time order.
    pub crossings: Vec<TruthCrossing>,
    pub stops: Vec<TruthStop>,
    pub wrong_way: Vec<TruthWrongWay>,
    pub congestion: Vec<TruthCongestion>,
}

/// One vehicle's true motion.
#[derive(Debug, Clone, PartialEq)]
pub struct VehicleTruth {
    /// = the actor id (the id of its [`super::TruthBox`]es)
    pub id: u64,
    pub label: &'static str,
    /// Name of the lane (and of its zone) it drives in.
    pub lane: String,
    /// Drives against its lane's direction.
    pub wrong_way: bool,
    /// (t_s, ground point) per frame where visible (its box is at least partly in the picture)
    pub path: Vec<(f64, [f64; 2])>,
    /// true speed in km/h at each of those frames
    pub speed_kmh: Vec<f64>,
}

impl VehicleTruth {
    /// The true speed at `t` (km/h), interpolated between the frames around it.
    pub fn speed_at(&self, t: f64) -> Option<f64> {
        let i = self.path.iter().position(|(ti, _)| *ti >= t)?;
        if i == 0 {
            return self.speed_kmh.first().copied();
        }
        let (t0, t1) = (self.path[i - 1].0, self.path[i].0);
        let (s0, s1) = (*self.speed_kmh.get(i - 1)?, *self.speed_kmh.get(i)?);
        let k = if t1 > t0 { (t - t0) / (t1 - t0) } else { 0.0 };
        Some(s0 + (s1 - s0) * k)
    }
}

/// A vehicle's reference point crossing a count line.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthCrossing {
    pub line: String,
    pub vehicle: u64,
    pub t_s: f64,
    /// "in" or "out"
    pub direction: &'static str,
}

/// A vehicle standing still (speed exactly 0) inside a no-stopping zone.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthStop {
    pub vehicle: u64,
    pub zone: String,
    pub t_start_s: f64,
    /// When it moves off again (the end of the clip if it never does).
    pub t_end_s: f64,
}

/// A vehicle driving against a zone's direction.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthWrongWay {
    pub vehicle: u64,
    pub zone: String,
    /// when the vehicle has moved 10 m against the zone direction inside the zone
    pub t_s: f64,
}

/// A zone congested (see [`CONGESTION_MIN_VEHICLES`], [`CONGESTION_MAX_MEAN_KMH`]) in every frame
/// from `t_start_s` to `t_end_s` (both frame times).
#[derive(Debug, Clone, PartialEq)]
pub struct TruthCongestion {
    pub zone: String,
    pub t_start_s: f64,
    pub t_end_s: f64,
}

// ---------------------------------------------------------------------------------------------
// Camera

/// A pinhole camera above the ground plane (no lens distortion, square pixels, principal point
/// at the picture centre). Ground frame: `x` along the road, `y` across it towards the camera,
/// `z` up, metres.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Camera {
    pub position: [f64; 3],
    /// The point at the centre of the picture.
    pub target: [f64; 3],
    pub focal_px: f64,
    pub image_size: (u32, u32),
}

/// A 3x3 matrix, row-major.
pub type Mat3 = [[f64; 3]; 3];

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross3(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn normalise(a: [f64; 3]) -> [f64; 3] {
    let n = dot(a, a).sqrt();
    [a[0] / n, a[1] / n, a[2] / n]
}

/// `h` applied to `p` (homogeneous), `None` on or behind the horizon.
pub fn apply_homography(h: &Mat3, p: [f64; 2]) -> Option<[f64; 2]> {
    let w = h[2][0] * p[0] + h[2][1] * p[1] + h[2][2];
    if w.abs() < 1e-12 {
        return None;
    }
    Some([(h[0][0] * p[0] + h[0][1] * p[1] + h[0][2]) / w, (h[1][0] * p[0] + h[1][1] * p[1] + h[1][2]) / w])
}

/// The inverse of a 3x3 matrix (adjugate over determinant); `None` when singular.
pub fn invert(m: &Mat3) -> Option<Mat3> {
    let c = |r: usize, k: usize| {
        let (r1, r2) = ((r + 1) % 3, (r + 2) % 3);
        let (k1, k2) = ((k + 1) % 3, (k + 2) % 3);
        m[r1][k1] * m[r2][k2] - m[r1][k2] * m[r2][k1]
    };
    let det = m[0][0] * c(0, 0) + m[0][1] * c(0, 1) + m[0][2] * c(0, 2);
    if det.abs() < 1e-300 {
        return None;
    }
    let mut inv = [[0.0; 3]; 3];
    for (r, row) in inv.iter_mut().enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = c(k, r) / det;
        }
    }
    Some(inv)
}

impl Camera {
    /// The camera of the traffic footage: 16 m up, 50 m off the road centre and 30 m east of the
    /// middle of the view, looking at the road centre line with a 2600 px focal length (17°
    /// across the 768 px picture).
    pub fn street() -> Self {
        Self { position: [30.0, 50.0, 16.0], target: [0.0, 0.0, 0.0], focal_px: 2600.0, image_size: (768, 576) }
    }

    /// Right, down and forward unit vectors in a right-handed world frame `(x, -y, z)`.
    fn axes(&self) -> [[f64; 3]; 3] {
        let c = self.world(self.position);
        let t = self.world(self.target);
        let forward = normalise([t[0] - c[0], t[1] - c[1], t[2] - c[2]]);
        let right = normalise(cross3(forward, [0.0, 0.0, 1.0]));
        let down = cross3(forward, right);
        [right, down, forward]
    }

    /// Ground frame (`y` towards the camera) to the right-handed world frame.
    fn world(&self, p: [f64; 3]) -> [f64; 3] {
        [p[0], -p[1], p[2]]
    }

    fn principal(&self) -> [f64; 2] {
        [self.image_size.0 as f64 / 2.0, self.image_size.1 as f64 / 2.0]
    }

    /// Distance of `p` in front of the camera along its optical axis (metres).
    pub fn depth(&self, p: [f64; 3]) -> f64 {
        let [_, _, f] = self.axes();
        let (w, c) = (self.world(p), self.world(self.position));
        dot(f, [w[0] - c[0], w[1] - c[1], w[2] - c[2]])
    }

    /// Image of a point (pixels); `None` less than a metre in front of the camera.
    pub fn project(&self, p: [f64; 3]) -> Option<[f64; 2]> {
        let [r, d, f] = self.axes();
        let (w, c) = (self.world(p), self.world(self.position));
        let v = [w[0] - c[0], w[1] - c[1], w[2] - c[2]];
        let z = dot(f, v);
        if z < 1.0 {
            return None;
        }
        let pp = self.principal();
        Some([pp[0] + self.focal_px * dot(r, v) / z, pp[1] + self.focal_px * dot(d, v) / z])
    }

    /// The homography ground `[x, y, 1]` -> image pixels (homogeneous).
    pub fn homography(&self) -> Mat3 {
        let axes = self.axes();
        let c = self.world(self.position);
        // Camera coordinates of the ground point (x, y, 0), i.e. world (x, -y, 0): linear in (x, y, 1).
        let rows = axes.map(|a| [a[0], -a[1], -dot(a, c)]);
        let pp = self.principal();
        let f = self.focal_px;
        let [r, d, fw] = rows;
        [
            [f * r[0] + pp[0] * fw[0], f * r[1] + pp[0] * fw[1], f * r[2] + pp[0] * fw[2]],
            [f * d[0] + pp[1] * fw[0], f * d[1] + pp[1] * fw[1], f * d[2] + pp[1] * fw[2]],
            fw,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Road

/// A lane: its centre line, its permitted direction of travel along `x` and its zone.
#[derive(Debug, Clone, Copy)]
struct Lane {
    name: &'static str,
    /// `y` of the lane centre.
    y: f64,
    /// `+1` eastbound (growing `x`), `-1` westbound.
    dir: f64,
}

const LANES: [Lane; 2] = [
    Lane { name: "westbound", y: -LANE_WIDTH_M / 2.0, dir: -1.0 },
    Lane { name: "eastbound", y: LANE_WIDTH_M / 2.0, dir: 1.0 },
];
const WESTBOUND: usize = 0;
const EASTBOUND: usize = 1;

/// Count lines across both lanes (ground `x`).
const LINES: [(&str, f64); 2] = [("west", -5.0), ("east", 3.5)];

/// The stretch of each lane covered by its zone (ground `x`), chosen so that the zone's corners
/// are in the picture.
fn zone_span(camera: &Camera, lane: usize) -> [f64; 2] {
    let (y0, y1) = lane_edges(lane);
    let (w, _) = camera.image_size;
    let inside = |x: f64| {
        [y0, y1].iter().all(|&y| camera.project([x, y, 0.0]).is_some_and(|p| p[0] >= 2.0 && p[0] <= w as f64 - 2.0))
    };
    // From the middle of the view (x = 0) outwards, to the last decimetre inside.
    let mut lo = 0.0;
    while inside(lo - 0.1) {
        lo -= 0.1;
    }
    let mut hi = 0.0;
    while inside(hi + 0.1) {
        hi += 0.1;
    }
    [(lo * 10.0).round() / 10.0, (hi * 10.0).round() / 10.0]
}

fn lane_edges(lane: usize) -> (f64, f64) {
    if lane == WESTBOUND { (-LANE_WIDTH_M, 0.0) } else { (0.0, LANE_WIDTH_M) }
}

pub(crate) fn round01(p: [f64; 2]) -> [f64; 2] {
    [(p[0] * 10.0).round() / 10.0, (p[1] * 10.0).round() / 10.0]
}

/// A zone on the ground: lane `lane` between `span[0]` and `span[1]`.
#[derive(Debug, Clone)]
struct GroundZone {
    name: &'static str,
    lane: usize,
    span: [f64; 2],
}

impl GroundZone {
    fn contains(&self, p: [f64; 2]) -> bool {
        let (y0, y1) = lane_edges(self.lane);
        p[0] >= self.span[0] && p[0] <= self.span[1] && p[1] >= y0 && p[1] <= y1
    }
}

fn ground_zones(camera: &Camera) -> Vec<GroundZone> {
    (0..LANES.len()).map(|lane| GroundZone { name: LANES[lane].name, lane, span: zone_span(camera, lane) }).collect()
}

fn layout(camera: &Camera) -> RoadLayout {
    let h = camera.homography();
    let img = |p: [f64; 2]| apply_homography(&h, p).map(round01).unwrap_or([f64::NAN, f64::NAN]);
    // Surveyed points: both ends of the centre line's dashes and points on the edge lines.
    let mut calibration = Vec::new();
    for x in CENTRE_DASH_ENDS {
        calibration.push((img([x, 0.0]), [x, 0.0]));
    }
    for x in [-6.0, 0.0, 6.0] {
        for y in [-EDGE_LINE_Y, EDGE_LINE_Y] {
            calibration.push((img([x, y]), [x, y]));
        }
    }
    let lines = LINES
        .iter()
        .map(|&(name, x)| {
            let ground = vec![[x, -LANE_WIDTH_M], [x, LANE_WIDTH_M]];
            let image: Vec<[f64; 2]> = ground.iter().map(|&g| img(g)).collect();
            // "in" is the east side: where a point a metre east of the line lies.
            let east = img([x + 1.0, 0.0]);
            let side = cross2(sub2(image[1], image[0]), sub2(east, image[0]));
            LayoutLine { name: name.to_string(), image, ground, in_side: if side < 0.0 { "left" } else { "right" } }
        })
        .collect();
    let zones = ground_zones(camera)
        .iter()
        .map(|z| {
            let (y0, y1) = lane_edges(z.lane);
            let [x0, x1] = z.span;
            let ground = vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
            let lane = LANES[z.lane];
            let yc = lane.y;
            let (from, to) = if lane.dir > 0.0 { (x0 + 1.0, x1 - 1.0) } else { (x1 - 1.0, x0 + 1.0) };
            LayoutZone {
                name: z.name.to_string(),
                image: ground.iter().map(|&g| img(g)).collect(),
                ground,
                direction: Some([img([from, yc]), img([to, yc])]),
                no_stopping: true,
            }
        })
        .collect();
    RoadLayout { image_size: camera.image_size, calibration, lines, zones, ground_to_image: h }
}

pub(crate) fn sub2(a: [f64; 2], b: [f64; 2]) -> [f64; 2] {
    [a[0] - b[0], a[1] - b[1]]
}

pub(crate) fn cross2(a: [f64; 2], b: [f64; 2]) -> f64 {
    a[0] * b[1] - a[1] * b[0]
}

/// A patch of plain asphalt in the street picture (the road at the left): `[x, y, width, height]`.
pub(crate) const ASPHALT: [u32; 4] = [20, 205, 100, 28];

/// Ends of the dashes of the centre line (ground `x`); dashes 3 m long every 6 m.
const CENTRE_DASH_ENDS: [f64; 4] = [-4.5, -1.5, 1.5, 4.5];
/// The edge lines run along the road edges, 0.1 m inside (ground `|y|` of their centre).
const EDGE_LINE_Y: f64 = LANE_WIDTH_M - 0.1;

/// The street picture with the road's markings painted on: white edge lines and a dashed centre
/// line, 0.15 m wide (anti-aliased, 4x4 samples a pixel).
fn paint_road(background: &RgbImage, camera: &Camera) -> RgbImage {
    let mut out = background.clone();
    let hm = camera.homography();
    let Some(to_ground) = invert(&hm) else { return out };
    let marking = |g: [f64; 2]| {
        let half = 0.075;
        if (g[1].abs() - EDGE_LINE_Y).abs() <= half {
            return true;
        }
        // Dashes [-10.5, -7.5], [-4.5, -1.5], [1.5, 4.5], [7.5, 10.5], ...
        g[1].abs() <= half && (g[0] + 10.5).rem_euclid(6.0) <= 3.0
    };
    let (w, h) = out.dimensions();
    // Ground point of an image point, if it is on the road in front of the camera.
    let on_road = |p: [f64; 2]| {
        let g = apply_homography(&to_ground, p)?;
        // The homography's last row is the depth in front of the camera.
        let in_front = hm[2][0] * g[0] + hm[2][1] * g[1] + hm[2][2] > 1.0;
        (in_front && g[1].abs() < LANE_WIDTH_M + 0.5).then_some(g)
    };
    // Asphalt where the road runs over grass: mirrored tiles of the road at the left.
    let patch = imageops::crop_imm(background, ASPHALT[0], ASPHALT[1], ASPHALT[2], ASPHALT[3]).to_image();
    let (pw, ph) = patch.dimensions();
    let mirror = |v: u32, n: u32| if (v / n).is_multiple_of(2) { v % n } else { n - 1 - v % n };
    for y in 0..h {
        for x in 0..w {
            let Some(g) = on_road([x as f64 + 0.5, y as f64 + 0.5]) else { continue };
            if g[1].abs() <= LANE_WIDTH_M + 0.3 {
                let [r, gr, b] = out.get_pixel(x, y).0.map(i32::from);
                if gr > r + 8 && gr > b + 8 {
                    let src = *patch.get_pixel(mirror(x, pw), mirror(y, ph));
                    out.put_pixel(x, y, src);
                }
            }
            paint_marking(&mut out, x, y, |p| on_road(p).is_some_and(marking));
        }
    }
    out
}

/// Paints the white of a road marking over pixel `(x, y)` of `out`, anti-aliased: 85% white where
/// all of the pixel's 4x4 samples are on the marking (`on_marking`), less where fewer are.
pub(crate) fn paint_marking(out: &mut RgbImage, x: u32, y: u32, on_marking: impl Fn([f64; 2]) -> bool) {
    let mut hits = 0u32;
    for sy in 0..4 {
        for sx in 0..4 {
            if on_marking([x as f64 + (sx as f64 + 0.5) / 4.0, y as f64 + (sy as f64 + 0.5) / 4.0]) {
                hits += 1;
            }
        }
    }
    if hits > 0 {
        let a = hits as f64 / 16.0 * 0.85;
        let px = out.get_pixel_mut(x, y);
        for c in px.0.iter_mut() {
            *c = (*c as f64 * (1.0 - a) + 235.0 * a).round() as u8;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vehicles

/// The kinds of vehicle the clips use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VehicleKind {
    /// The pickup from the side (dog.jpg), facing its direction of travel.
    Pickup,
    /// The white van from behind and its left (street clip, flipped): only for vehicles driving
    /// away (westbound).
    Van,
}

impl VehicleKind {
    /// Length, width and height (metres) of the vehicle's box (the pickup with its canopy).
    pub fn dimensions(self) -> [f64; 3] {
        match self {
            Self::Pickup => [5.2, 1.9, 1.9],
            Self::Van => [5.0, 2.0, 2.4],
        }
    }

    pub fn label(self) -> &'static str {
        "car"
    }
}

/// The pictures the vehicles are made of: the street, the pickup (side view, with its
/// silhouette as opacity) and the van.
#[derive(Debug, Clone)]
struct Pictures {
    background: RgbImage,
    /// Faces right (eastbound).
    pickup_east: Sprite,
    pickup_west: Sprite,
    van: Sprite,
}

/// The silhouette of the pickup in its crop (230 x 92 px of dog.jpg), traced by hand.
pub(crate) const PICKUP_OUTLINE: [[f64; 2]; 18] = [
    [4.0, 2.0],
    [120.0, 0.0],
    [140.0, 8.0],
    [165.0, 22.0],
    [205.0, 34.0],
    [222.0, 40.0],
    [228.0, 55.0],
    [228.0, 75.0],
    [215.0, 82.0],
    [200.0, 90.0],
    [170.0, 90.0],
    [160.0, 80.0],
    [80.0, 80.0],
    [70.0, 90.0],
    [40.0, 90.0],
    [30.0, 80.0],
    [5.0, 75.0],
    [2.0, 40.0],
];

pub(crate) fn polygon_mask(w: u32, h: u32, outline: &[[f64; 2]]) -> GrayImage {
    let (sx, sy) = (w as f64 / 230.0, h as f64 / 92.0);
    let inside = |x: f64, y: f64| {
        let mut c = false;
        for (i, a) in outline.iter().enumerate() {
            let b = outline[(i + 1) % outline.len()];
            let (ay, by) = (a[1] * sy, b[1] * sy);
            let (ax, bx) = (a[0] * sx, b[0] * sx);
            if (ay > y) != (by > y) && x < ax + (y - ay) / (by - ay) * (bx - ax) {
                c = !c;
            }
        }
        c
    };
    let hard =
        GrayImage::from_fn(w, h, |x, y| image::Luma([if inside(x as f64 + 0.5, y as f64 + 0.5) { 255 } else { 0 }]));
    imageops::blur(&hard, 1.0)
}

impl Pictures {
    fn new(background: &RgbImage, pickup: &RgbImage, van: &RgbImage, camera: &Camera) -> Self {
        let (pw, ph) = pickup.dimensions();
        let mask = polygon_mask(pw, ph, &PICKUP_OUTLINE);
        let pickup_east = Sprite::with_mask("car", pickup, &mask, pw, ph);
        let pickup_west =
            Sprite::with_mask("car", &imageops::flip_horizontal(pickup), &imageops::flip_horizontal(&mask), pw, ph);
        // The van without the wall beside it, flipped so that it drives away to the left.
        let (vw, vh) = van.dimensions();
        let van = imageops::flip_horizontal(
            &imageops::crop_imm(van, 8, 4, vw.saturating_sub(8), vh.saturating_sub(4)).to_image(),
        );
        let van = Sprite::new("car", &van, van.width(), van.height(), 2);
        Self { background: paint_road(background, camera), pickup_east, pickup_west, van }
    }

    fn sprite(&self, kind: VehicleKind, heading: f64) -> Sprite {
        match kind {
            VehicleKind::Pickup if heading > 0.0 => self.pickup_east.clone(),
            VehicleKind::Pickup => self.pickup_west.clone(),
            VehicleKind::Van => self.van.clone(),
        }
    }
}

/// The box `[x1, y1, x2, y2]` (pixels, not rounded) of a vehicle whose reference point is at `p`:
/// bottom-centre at the image of `p`, as wide and high as the image of the vehicle's cuboid
/// (`aspect`: width / height of a sprite that keeps its proportions instead).
fn vehicle_box(camera: &Camera, kind: VehicleKind, p: [f64; 2], aspect: Option<f64>) -> Option<[f64; 4]> {
    let [l, w, h] = kind.dimensions();
    let (mut u0, mut u1, mut v0, mut v1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for dx in [-l / 2.0, l / 2.0] {
        for dy in [-w / 2.0, w / 2.0] {
            for z in [0.0, h] {
                let q = camera.project([p[0] + dx, p[1] + dy, z])?;
                (u0, u1, v0, v1) = (u0.min(q[0]), u1.max(q[0]), v0.min(q[1]), v1.max(q[1]));
            }
        }
    }
    let b = camera.project([p[0], p[1], 0.0])?;
    let height = v1 - v0;
    let width = aspect.map_or(u1 - u0, |a| height * a);
    Some([b[0] - width / 2.0, b[1] - height, b[0] + width / 2.0, b[1]])
}

/// Rounds a box to whole pixels keeping its bottom-centre within half a pixel.
pub(crate) fn placement(frame: usize, b: [f64; 4], z: i32) -> Placement {
    let (left, right, bottom) = (b[0].round() as i64, b[2].round() as i64, b[3].round() as i64);
    let height = (b[3] - b[1]).round().max(1.0) as i64;
    Placement { frame, x: left, y: bottom - height, width: (right - left).max(1) as u32, height: height as u32, z }
}

/// How a vehicle drives: along its lane (or against it), with speed knots `(t_s, m/s)`, linear
/// in between; it appears at the first knot at `x0` and keeps the last knot's speed.
#[derive(Debug, Clone)]
struct Drive {
    id: u64,
    kind: VehicleKind,
    lane: usize,
    against: bool,
    x0: f64,
    knots: Vec<(f64, f64)>,
}

/// Where vehicles appear: out of sight, before the picture's edge (ground `x`).
const ENTRY_EAST_X: f64 = -25.0;
const ENTRY_WEST_X: f64 = 19.0;

fn kmh(v: f64) -> f64 {
    v / 3.6
}

impl Drive {
    /// `+1` when moving towards growing `x`.
    fn heading(&self) -> f64 {
        if self.against { -LANES[self.lane].dir } else { LANES[self.lane].dir }
    }

    fn t0(&self) -> f64 {
        self.knots.first().map_or(0.0, |k| k.0)
    }

    /// Speed (m/s) at `t`.
    fn speed(&self, t: f64) -> f64 {
        let (Some(first), Some(last)) = (self.knots.first(), self.knots.last()) else { return 0.0 };
        if t <= first.0 {
            return first.1;
        }
        for w in self.knots.windows(2) {
            let ((ta, va), (tb, vb)) = (w[0], w[1]);
            if t <= tb {
                return if tb > ta { va + (vb - va) * (t - ta) / (tb - ta) } else { vb };
            }
        }
        last.1
    }

    /// Distance driven (metres) from the first knot to `t`.
    fn distance(&self, t: f64) -> f64 {
        let (Some(first), Some(last)) = (self.knots.first(), self.knots.last()) else { return 0.0 };
        if t <= first.0 {
            return 0.0;
        }
        let mut d = 0.0;
        for w in self.knots.windows(2) {
            let ((ta, va), (tb, _)) = (w[0], w[1]);
            if t <= ta {
                return d;
            }
            let te = t.min(tb);
            d += (va + self.speed(te)) / 2.0 * (te - ta);
        }
        if t > last.0 {
            d += last.1 * (t - last.0);
        }
        d
    }

    /// Ground reference point at `t` (also before the first knot: where it will appear).
    fn ground(&self, t: f64) -> [f64; 2] {
        [self.x0 + self.heading() * self.distance(t), LANES[self.lane].y]
    }

    /// A vehicle driving at constant `speed_kmh` from out of sight, appearing at `t0`.
    fn cruise(id: u64, kind: VehicleKind, lane: usize, against: bool, t0: f64, speed_kmh: f64) -> Self {
        let mut d = Self { id, kind, lane, against, x0: 0.0, knots: vec![(t0, kmh(speed_kmh))] };
        d.x0 = if d.heading() > 0.0 { ENTRY_EAST_X } else { ENTRY_WEST_X };
        d
    }

    /// A vehicle arriving from out of sight at `speed_kmh` that brakes (at `brake` m/s²) to
    /// stand with its reference point at `x_stop` from `t_stop`, moves off at `t_go` and
    /// accelerates (at `accel` m/s²) back to `speed_kmh`.
    #[allow(clippy::too_many_arguments)]
    fn stopping(
        id: u64,
        kind: VehicleKind,
        lane: usize,
        speed_kmh: f64,
        brake: f64,
        x_stop: f64,
        t_stop: f64,
        t_go: f64,
        accel: f64,
    ) -> Self {
        let v = kmh(speed_kmh);
        let dir = LANES[lane].dir;
        let t_brake = v / brake;
        let braking = v * t_brake / 2.0;
        // Out of sight, or further back when braking takes longer than the way from there.
        let entry = if dir > 0.0 { ENTRY_EAST_X } else { ENTRY_WEST_X };
        let run = ((x_stop - entry) * dir).max(braking + 2.0);
        let x0 = x_stop - dir * run;
        let tb = t_stop - t_brake;
        let t0 = tb - (run - braking) / v;
        assert!(t0 >= 0.0 && t_go > t_stop, "vehicle {id}: appears at {t0}, stops {t_stop}..{t_go}");
        let knots = vec![(t0, v), (tb, v), (t_stop, 0.0), (t_go, 0.0), (t_go + v / accel, v)];
        Self { id, kind, lane, against: false, x0, knots }
    }
}

/// The clip being put together: the drives, then [`Builder::finish`] renders placements and
/// derives the truth.
struct Builder {
    camera: Camera,
    drives: Vec<Drive>,
}

impl Builder {
    fn new() -> Self {
        Self { camera: Camera::street(), drives: Vec::new() }
    }

    fn next_id(&self) -> u64 {
        self.drives.len() as u64 + 1
    }

    fn aspect(&self, pictures: &Pictures, kind: VehicleKind) -> Option<f64> {
        match kind {
            VehicleKind::Pickup => None,
            VehicleKind::Van => {
                let (w, h) = pictures.van.size();
                Some(w as f64 / h as f64)
            }
        }
    }

    /// The box of drive `d` at time `t`, if any of it is in the picture.
    fn box_at(&self, d: &Drive, t: f64, aspect: Option<f64>) -> Option<[f64; 4]> {
        if t < d.t0() - 1e-9 {
            return None;
        }
        let b = vehicle_box(&self.camera, d.kind, d.ground(t), aspect)?;
        let (w, h) = self.camera.image_size;
        let rounded = placement(0, b, 0);
        let clipped_w = (rounded.x + rounded.width as i64).min(w as i64) - rounded.x.max(0);
        let clipped_h = (rounded.y + rounded.height as i64).min(h as i64) - rounded.y.max(0);
        (clipped_w > 0 && clipped_h > 0).then_some(b)
    }

    /// The last time (on a 10 ms grid) drive `d` is in the picture, from its appearance on.
    fn gone_after(&self, d: &Drive, aspect: Option<f64>) -> f64 {
        let mut t = d.t0();
        let mut seen = false;
        let mut last = t;
        loop {
            let here = self.box_at(d, t, aspect).is_some();
            if here {
                seen = true;
                last = t;
            } else if seen {
                return last;
            }
            t += 0.01;
            if t > d.t0() + 600.0 {
                return last;
            }
        }
    }

    /// Adds vehicles one after the other: each appears when the previous one has left the
    /// picture `gap_s` ago (so that no two are in the picture together). Returns the time the
    /// last one has gone.
    fn one_at_a_time(
        &mut self,
        pictures: &Pictures,
        start: f64,
        gap_s: f64,
        plan: &[(VehicleKind, usize, bool, f64)],
    ) -> f64 {
        let mut t = start;
        for &(kind, lane, against, speed) in plan {
            let mut d = Drive::cruise(self.next_id(), kind, lane, against, t, speed);
            // Appear just out of sight, so the vehicle comes in at once.
            let aspect = self.aspect(pictures, kind);
            let mut lead = 0.0;
            while self.box_at(&d, t + lead + 0.1, aspect).is_none() && lead < 10.0 {
                lead += 0.1;
            }
            d.x0 += d.heading() * kmh(speed) * lead;
            let gone = self.gone_after(&d, aspect);
            self.drives.push(d);
            t = gone + gap_s;
        }
        t
    }

    fn finish(self, name: &'static str, pictures: &Pictures, frames: usize, clean: bool) -> TrafficFootage {
        let fps = TRAFFIC_FPS;
        let cam = self.camera;
        let mut actors = Vec::new();
        let mut vehicles = Vec::new();
        for d in &self.drives {
            let aspect = self.aspect(pictures, d.kind);
            let mut placements = Vec::new();
            let mut path = Vec::new();
            let mut speed_kmh = Vec::new();
            // From its appearance until it has gone (later it could only come back in
            // projected from behind the camera).
            let gone = self.gone_after(d, aspect);
            for i in 0..frames {
                let t = i as f64 / fps;
                if t > gone + 1e-9 {
                    break;
                }
                let Some(b) = self.box_at(d, t, aspect) else { continue };
                let g = d.ground(t);
                // Nearer (smaller depth) is drawn later: z grows towards the camera, in centimetres.
                let z = -(cam.depth([g[0], g[1], 0.0]) * 100.0).round() as i32;
                placements.push(placement(i, b, z));
                path.push((t, g));
                speed_kmh.push(d.speed(t) * 3.6);
            }
            actors.push(Actor::with_placements(d.id, pictures.sprite(d.kind, d.heading()), placements));
            vehicles.push(VehicleTruth {
                id: d.id,
                label: d.kind.label(),
                lane: LANES[d.lane].name.to_string(),
                wrong_way: d.against,
                path,
                speed_kmh,
            });
        }
        let footage = Footage { name, background: pictures.background.clone(), actors, fps, frames };
        let truth = derive_truth(&cam, &self.drives, &vehicles, frames);
        TrafficFootage { footage, layout: layout(&cam), truth, clean }
    }
}

// ---------------------------------------------------------------------------------------------
// Truth

/// First time in `[a, b]` where `f` becomes true, `f(a)` false and `f(b)` true (bisection to 1 µs;
/// the result is at most that much late).
pub(crate) fn first_true(mut a: f64, mut b: f64, f: impl Fn(f64) -> bool) -> f64 {
    while b - a > 1e-6 {
        let m = (a + b) / 2.0;
        if f(m) { b = m } else { a = m }
    }
    b
}

fn derive_truth(camera: &Camera, drives: &[Drive], vehicles: &[VehicleTruth], frames: usize) -> TrafficTruth {
    let fps = TRAFFIC_FPS;
    let end = (frames.saturating_sub(1)) as f64 / fps;
    let zones = ground_zones(camera);
    let mut crossings = Vec::new();
    let mut stops = Vec::new();
    let mut wrong_way = Vec::new();
    for d in drives {
        let t0 = d.t0();
        if t0 > end {
            continue;
        }
        // Line crossings: the motion is monotone along x, so at most one per line.
        for &(name, x) in &LINES {
            let side = |t: f64| (d.ground(t)[0] - x) * d.heading();
            if side(t0) < 0.0 && side(end) > 0.0 {
                let t = first_true(t0, end, |t| side(t) > 0.0);
                // "in" is the east side of every line.
                let direction = if d.heading() > 0.0 { "in" } else { "out" };
                crossings.push(TruthCrossing { line: name.to_string(), vehicle: d.id, t_s: t, direction });
            }
        }
        // Standstills: knots at speed 0.
        for w in d.knots.windows(2) {
            let ((ta, va), (tb, vb)) = (w[0], w[1]);
            if va == 0.0 && vb == 0.0 && tb > ta && ta <= end {
                let p = d.ground(ta);
                for z in zones.iter().filter(|z| z.contains(p)) {
                    stops.push(TruthStop {
                        vehicle: d.id,
                        zone: z.name.to_string(),
                        t_start_s: ta,
                        t_end_s: tb.min(end),
                    });
                }
            }
        }
        if let Some(&(tl, 0.0)) = d.knots.last()
            && tl <= end
        {
            let p = d.ground(tl);
            for z in zones.iter().filter(|z| z.contains(p)) {
                stops.push(TruthStop { vehicle: d.id, zone: z.name.to_string(), t_start_s: tl, t_end_s: end });
            }
        }
        // Wrong way: movement against the zone's direction since entering it.
        for z in &zones {
            let zdir = LANES[z.lane].dir;
            if d.heading() * zdir > 0.0 {
                continue;
            }
            let inside = |t: f64| z.contains(d.ground(t));
            // Entry: first time inside (10 ms grid, then bisection).
            let mut t = t0;
            let mut entry = None;
            while t <= end {
                if inside(t) {
                    entry = Some(if t > t0 { first_true(t - 0.01, t, inside) } else { t });
                    break;
                }
                t += 0.01;
            }
            let Some(entry) = entry else { continue };
            let start = d.ground(entry)[0];
            let against = |t: f64| (start - d.ground(t)[0]) * zdir >= WRONG_WAY_M && inside(t);
            let mut t = entry;
            while t <= end && inside(t) {
                if against(t) {
                    wrong_way.push(TruthWrongWay {
                        vehicle: d.id,
                        zone: z.name.to_string(),
                        t_s: first_true(t - 0.01, t, against),
                    });
                    break;
                }
                t += 0.01;
            }
        }
    }
    crossings.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    // Congestion, frame by frame.
    let mut congestion = Vec::new();
    for z in &zones {
        let mut run: Option<(f64, f64)> = None;
        for i in 0..frames {
            let t = i as f64 / fps;
            let speeds: Vec<f64> = vehicles
                .iter()
                .filter_map(|v| {
                    let k = v.path.iter().position(|(tp, _)| (tp - t).abs() < 1e-9)?;
                    z.contains(v.path[k].1).then_some(v.speed_kmh[k])
                })
                .collect();
            let jammed = speeds.len() >= CONGESTION_MIN_VEHICLES
                && speeds.iter().sum::<f64>() / speeds.len() as f64 <= CONGESTION_MAX_MEAN_KMH;
            match (jammed, run) {
                (true, None) => run = Some((t, t)),
                (true, Some((s, _))) => run = Some((s, t)),
                (false, Some((s, e))) => {
                    congestion.push(TruthCongestion { zone: z.name.to_string(), t_start_s: s, t_end_s: e });
                    run = None;
                }
                (false, None) => {}
            }
        }
        if let Some((s, e)) = run {
            congestion.push(TruthCongestion { zone: z.name.to_string(), t_start_s: s, t_end_s: e });
        }
    }
    TrafficTruth { fps, frames, vehicles: vehicles.to_vec(), crossings, stops, wrong_way, congestion }
}

// ---------------------------------------------------------------------------------------------
// Clips

fn frames_for(seconds: f64) -> usize {
    (seconds * TRAFFIC_FPS).ceil() as usize
}

fn free_flow(p: &Pictures) -> TrafficFootage {
    let mut b = Builder::new();
    let (e, w) = (EASTBOUND, WESTBOUND);
    let pk = VehicleKind::Pickup;
    let end = b.one_at_a_time(
        p,
        0.5,
        1.8,
        &[
            (pk, e, false, 40.0),
            (pk, w, false, 30.0),
            (pk, e, false, 55.0),
            (pk, w, false, 35.0),
            (pk, e, false, 90.0),
            (pk, w, false, 45.0),
            (pk, e, false, 30.0),
            (pk, w, false, 70.0),
            (pk, e, false, 35.0),
            (pk, w, false, 50.0),
        ],
    );
    b.finish("traffic-free-flow", p, frames_for(end), true)
}

fn wrong_way(p: &Pictures) -> TrafficFootage {
    let mut b = Builder::new();
    let (e, w) = (EASTBOUND, WESTBOUND);
    let pk = VehicleKind::Pickup;
    let end = b.one_at_a_time(
        p,
        0.5,
        1.5,
        &[(pk, e, false, 45.0), (pk, w, false, 35.0), (pk, e, true, 40.0), (pk, e, false, 35.0), (pk, w, false, 50.0)],
    );
    b.finish("traffic-wrong-way", p, frames_for(end), true)
}

/// A car stops in the westbound lane for 30 s; eastbound traffic passes in front of it.
fn stopped(p: &Pictures) -> TrafficFootage {
    let mut b = Builder::new();
    let pk = VehicleKind::Pickup;
    let (t_stop, t_go) = (7.0, 37.0);
    b.drives.push(Drive::stopping(b.next_id(), pk, WESTBOUND, 50.0, 2.5, -1.0, t_stop, t_go, 2.0));
    for (t0, speed) in [(10.0, 45.0), (17.0, 35.0), (24.0, 50.0), (31.0, 40.0)] {
        let d = Drive::cruise(b.next_id(), pk, EASTBOUND, false, t0, speed);
        b.drives.push(d);
    }
    let aspect = None;
    let gone = b.gone_after(&b.drives[0], aspect);
    let end = b.one_at_a_time(p, gone + 1.5, 1.5, &[(pk, EASTBOUND, false, 40.0)]);
    b.finish("traffic-stopped", p, frames_for(end), true)
}

/// Six westbound vehicles queue behind a stop point at the left of the picture for about 20 s
/// and move off one after the other; eastbound traffic passes in front.
fn queue(p: &Pictures) -> TrafficFootage {
    let mut b = Builder::new();
    let kinds = [
        VehicleKind::Pickup,
        VehicleKind::Pickup,
        VehicleKind::Pickup,
        VehicleKind::Pickup,
        VehicleKind::Van,
        VehicleKind::Pickup,
    ];
    let (x_front, gap) = (-9.8, 0.5);
    let mut x = x_front;
    let first_arrival = 8.0;
    let last_arrival = first_arrival + 2.2 * (kinds.len() - 1) as f64;
    let first_go = last_arrival + 20.0;
    for (k, &kind) in kinds.iter().enumerate() {
        if k > 0 {
            x += (kind.dimensions()[0] + kinds[k - 1].dimensions()[0]) / 2.0 + gap;
        }
        let t_stop = first_arrival + 2.2 * k as f64;
        let t_go = first_go + 1.5 * k as f64;
        b.drives.push(Drive::stopping(b.next_id(), kind, WESTBOUND, 40.0, 2.0, x, t_stop, t_go, 2.0));
    }
    for (t0, speed) in [(8.0, 40.0), (24.0, 50.0), (40.0, 35.0)] {
        let d = Drive::cruise(b.next_id(), VehicleKind::Pickup, EASTBOUND, false, t0, speed);
        b.drives.push(d);
    }
    let end = b.drives.iter().take(kinds.len()).map(|d| b.gone_after(d, b.aspect(p, d.kind))).fold(0.0, f64::max);
    b.finish("traffic-queue", p, frames_for(end + 1.0), false)
}

/// Westbound vehicles pass behind eastbound ones, in pairs meeting in the middle of the picture.
fn occlusion(p: &Pictures) -> TrafficFootage {
    let mut b = Builder::new();
    let pk = VehicleKind::Pickup;
    let pairs = [
        (pk, 40.0, pk, 40.0),
        (pk, 55.0, VehicleKind::Van, 35.0),
        (pk, 35.0, pk, 60.0),
        (pk, 50.0, pk, 50.0),
        (pk, 45.0, VehicleKind::Van, 45.0),
    ];
    let mut t = 0.5;
    let mut end: f64 = 0.0;
    for (ek, es, wk, ws) in pairs {
        let east = Drive::cruise(b.next_id(), ek, EASTBOUND, false, 0.0, es);
        let mut west = Drive::cruise(b.next_id() + 1, wk, WESTBOUND, false, 0.0, ws);
        // Both reach x = -1 (the middle of the picture) at the same time `meet`.
        let time_to = |d: &Drive, x: f64| (x - d.x0).abs() / d.speed(0.0);
        let meet = t + time_to(&east, -1.0).max(time_to(&west, -1.0));
        let east = Drive { knots: vec![(meet - time_to(&east, -1.0), east.speed(0.0))], ..east };
        west.knots = vec![(meet - time_to(&west, -1.0), west.speed(0.0))];
        let (ae, aw) = (b.aspect(p, east.kind), b.aspect(p, west.kind));
        let gone = b.gone_after(&east, ae).max(b.gone_after(&west, aw));
        b.drives.push(east);
        b.drives.push(west);
        end = end.max(gone);
        t = gone + 1.0;
    }
    b.finish("traffic-occlusion", p, frames_for(end + 0.5), false)
}

impl Library {
    fn traffic_pictures(&self) -> Pictures {
        Pictures::new(&self.background, &self.pickup, &self.van, &Camera::street())
    }

    /// Two lanes in opposite directions, nine vehicles one at a time at constant speeds of
    /// 30-90 km/h (clean).
    pub fn traffic_free_flow(&self) -> TrafficFootage {
        free_flow(&self.traffic_pictures())
    }

    /// Normal traffic and a car driving west in the eastbound lane (clean).
    pub fn traffic_wrong_way(&self) -> TrafficFootage {
        wrong_way(&self.traffic_pictures())
    }

    /// A car stands 30 s in the westbound lane while eastbound traffic passes (clean).
    pub fn traffic_stopped(&self) -> TrafficFootage {
        stopped(&self.traffic_pictures())
    }

    /// A queue of six vehicles in the westbound lane, standing bumper to bumper (hard).
    pub fn traffic_queue(&self) -> TrafficFootage {
        queue(&self.traffic_pictures())
    }

    /// Westbound vehicles passing behind eastbound ones (hard).
    pub fn traffic_occlusion(&self) -> TrafficFootage {
        occlusion(&self.traffic_pictures())
    }

    /// All traffic clips, the clean ones first.
    pub fn traffic_footage(&self) -> Vec<TrafficFootage> {
        let p = self.traffic_pictures();
        vec![free_flow(&p), wrong_way(&p), stopped(&p), queue(&p), occlusion(&p)]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::footage::TruthBox;

    /// The clips over plain pictures of the real pictures' sizes (no media needed: the truth does
    /// not depend on the pixels).
    fn all() -> &'static [TrafficFootage] {
        static ALL: OnceLock<Vec<TrafficFootage>> = OnceLock::new();
        ALL.get_or_init(|| {
            let background = RgbImage::from_pixel(768, 576, image::Rgb([90, 140, 80]));
            let pickup = RgbImage::from_pixel(230, 92, image::Rgb([240, 240, 240]));
            let van = RgbImage::from_pixel(75, 60, image::Rgb([230, 230, 235]));
            let p = Pictures::new(&background, &pickup, &van, &Camera::street());
            vec![free_flow(&p), wrong_way(&p), stopped(&p), queue(&p), occlusion(&p)]
        })
    }

    fn by_name(name: &str) -> &'static TrafficFootage {
        all().iter().find(|s| s.footage.name == name).expect("footage")
    }

    fn frame_of(t: f64) -> usize {
        (t * TRAFFIC_FPS).round() as usize
    }

    fn truth_box(s: &TrafficFootage, id: u64, frame: usize) -> Option<TruthBox> {
        s.footage.truth(frame).into_iter().find(|b| b.id == id)
    }

    fn whole(b: &TruthBox) -> bool {
        b.bbox[0] > 0.0 && b.bbox[1] > 0.0 && b.bbox[2] < 768.0 && b.bbox[3] < 576.0
    }

    fn bottom_centre(b: &TruthBox) -> [f64; 2] {
        [(b.bbox[0] as f64 + b.bbox[2] as f64) / 2.0, b.bbox[3] as f64]
    }

    fn dist(a: [f64; 2], b: [f64; 2]) -> f64 {
        ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
    }

    /// Which side of the line's first segment an image point is on, "left" or "right" (as in_side).
    fn image_side(line: &LayoutLine, p: [f64; 2]) -> &'static str {
        let (a, b) = (line.image[0], line.image[1]);
        if cross2(sub2(b, a), sub2(p, a)) < 0.0 { "left" } else { "right" }
    }

    #[test]
    fn scenes_have_the_promised_shape() {
        let names: Vec<&str> = all().iter().map(|s| s.footage.name).collect();
        assert_eq!(
            names,
            ["traffic-free-flow", "traffic-wrong-way", "traffic-stopped", "traffic-queue", "traffic-occlusion"]
        );
        for s in all() {
            let name = s.footage.name;
            assert_eq!(s.footage.fps, 10.0);
            assert_eq!(s.footage.size(), (768, 576));
            assert_eq!((s.truth.fps, s.truth.frames), (s.footage.fps, s.footage.frames));
            assert!(s.footage.frames as f64 / s.footage.fps <= 60.0, "{name} too long");
            assert_eq!(s.layout.lines.len(), 2);
            assert_eq!(s.layout.zones.len(), 2);
            assert!(s.layout.zones.iter().all(|z| z.no_stopping && z.direction.is_some()));
            assert_eq!(s.clean, matches!(name, "traffic-free-flow" | "traffic-wrong-way" | "traffic-stopped"));
            for v in &s.truth.vehicles {
                assert!(!v.path.is_empty(), "{name}: vehicle {} never seen", v.id);
                // Seen in consecutive frames only.
                for w in v.path.windows(2) {
                    assert_eq!(frame_of(w[1].0), frame_of(w[0].0) + 1, "{name}: vehicle {} comes back", v.id);
                }
                // Big enough for the detector wherever it is whole.
                for &(t, _) in &v.path {
                    let b = truth_box(s, v.id, frame_of(t)).expect("box");
                    let (w, h) = (b.bbox[2] - b.bbox[0], b.bbox[3] - b.bbox[1]);
                    // Pickups from the side; the van from behind keeps its proportions.
                    let least = if w / h > 1.5 { 170.0 } else { 130.0 };
                    if whole(&b) {
                        assert!(w >= least, "{name}: vehicle {} small at {t}: {:?}", v.id, b.bbox);
                    }
                }
            }
        }
        let free = by_name("traffic-free-flow");
        assert!((8..=10).contains(&free.truth.vehicles.len()));
        assert!((35.0..=45.0).contains(&(free.footage.frames as f64 / 10.0)));
        for v in &free.truth.vehicles {
            let v0 = v.speed_kmh[0];
            assert!((30.0..=90.0).contains(&v0) && v.speed_kmh.iter().all(|&k| (k - v0).abs() < 1e-9));
        }
    }

    #[test]
    fn calibration_points_are_exact_projections() {
        let s = &all()[0];
        let l = &s.layout;
        let h = Camera::street().homography();
        assert_eq!(l.ground_to_image, h);
        assert!(l.calibration.len() >= 6);
        for (img, g) in &l.calibration {
            let p = apply_homography(&h, *g).expect("in front");
            assert!(
                (p[0] - img[0]).abs() <= 0.05 + 1e-9 && (p[1] - img[1]).abs() <= 0.05 + 1e-9,
                "{g:?}: {p:?} vs {img:?}"
            );
            assert!(img[0] > 0.0 && img[0] < 768.0 && img[1] > 0.0 && img[1] < 576.0, "{img:?} off the picture");
        }
        // Not all on one line, on the ground and on the picture.
        let g: Vec<[f64; 2]> = l.calibration.iter().map(|c| c.1).collect();
        assert!(g.iter().any(|p| p[1] != g[0][1]) && g.iter().any(|p| p[0] != g[0][0]));
        for line in &l.lines {
            for (i, gp) in line.image.iter().zip(&line.ground) {
                assert!(dist(apply_homography(&h, *gp).expect("in front"), *i) <= 0.08);
            }
        }
        for z in &l.zones {
            for (i, gp) in z.image.iter().zip(&z.ground) {
                assert!(dist(apply_homography(&h, *gp).expect("in front"), *i) <= 0.08);
                assert!(i[0] >= 0.0 && i[0] <= 768.0 && i[1] >= 0.0 && i[1] <= 576.0);
            }
        }
        // A real perspective: parallel road edges meet in the picture, and the same length of
        // road is longer near the camera.
        let inv = invert(&h).expect("invertible");
        assert!(h[2][0].abs() > 1e-4 && h[2][1].abs() > 1e-4, "affine: {h:?}");
        let len = |x: f64| {
            let a = apply_homography(&h, [x, 0.0]).expect("a");
            let b = apply_homography(&h, [x + 1.0, 0.0]).expect("b");
            dist(a, b)
        };
        assert!(len(5.0) > 1.2 * len(-10.0), "{} {}", len(5.0), len(-10.0));
        let back = apply_homography(&inv, apply_homography(&h, [3.0, 1.0]).expect("p")).expect("q");
        assert!(dist(back, [3.0, 1.0]) < 1e-9);
    }

    #[test]
    fn truth_boxes_stand_on_the_ground_path() {
        let h = Camera::street().homography();
        for s in all() {
            for i in 0..s.footage.frames {
                let boxes = s.footage.truth(i);
                let t = i as f64 / TRAFFIC_FPS;
                for v in &s.truth.vehicles {
                    let at = v.path.iter().find(|(tp, _)| frame_of(*tp) == i);
                    let b = boxes.iter().find(|b| b.id == v.id);
                    assert_eq!(at.is_some(), b.is_some(), "{} frame {i}: vehicle {}", s.footage.name, v.id);
                    let (Some(&(tp, g)), Some(b)) = (at, b) else { continue };
                    assert!((tp - t).abs() < 1e-9);
                    if whole(b) {
                        let want = apply_homography(&h, g).expect("in front");
                        let got = bottom_centre(b);
                        assert!(
                            dist(want, got) <= 1.0,
                            "{} frame {i}: vehicle {} {got:?} vs {want:?}",
                            s.footage.name,
                            v.id
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn crossings_agree_with_the_paths() {
        for s in all() {
            let name = s.footage.name;
            for line in &s.layout.lines {
                let x = line.ground[0][0];
                for v in &s.truth.vehicles {
                    // Crossings seen in the sampled path.
                    let sides: Vec<(f64, bool)> = v.path.iter().map(|&(t, g)| (t, g[0] > x)).collect();
                    let flips: Vec<(f64, f64, bool)> =
                        sides.windows(2).filter(|w| w[0].1 != w[1].1).map(|w| (w[0].0, w[1].0, w[1].1)).collect();
                    let truth: Vec<&TruthCrossing> =
                        s.truth.crossings.iter().filter(|c| c.line == line.name && c.vehicle == v.id).collect();
                    assert_eq!(flips.len(), truth.len(), "{name} {} vehicle {}", line.name, v.id);
                    for ((t0, t1, east_after), c) in flips.iter().zip(&truth) {
                        // (the truth is at most 1 µs late)
                        assert!(
                            *t0 < c.t_s && c.t_s <= *t1 + 1e-6,
                            "{name} {}: {} not in {t0}..{t1}",
                            line.name,
                            c.t_s
                        );
                        assert_eq!(c.direction, if *east_after { "in" } else { "out" });
                        // The box's bottom-centre after the crossing (clear of the line) is on the
                        // "in" side iff "in".
                        let after = v.path.iter().find(|(t, _)| *t >= c.t_s + 0.05).expect("seen after");
                        let b = truth_box(s, v.id, frame_of(after.0)).expect("box after");
                        let side = image_side(line, bottom_centre(&b));
                        assert_eq!(side == line.in_side, c.direction == "in", "{name} {}: {c:?}", line.name);
                    }
                }
            }
            let times: Vec<f64> = s.truth.crossings.iter().map(|c| c.t_s).collect();
            assert!(times.windows(2).all(|w| w[0] <= w[1]), "{name}: crossings in time order");
        }
        // Every vehicle of the free-flow clip crosses both lines once, in its direction.
        let free = by_name("traffic-free-flow");
        assert_eq!(free.truth.crossings.len(), 2 * free.truth.vehicles.len());
        for c in &free.truth.crossings {
            let v = free.truth.vehicles.iter().find(|v| v.id == c.vehicle).expect("vehicle");
            assert_eq!(c.direction, if v.lane == "eastbound" { "in" } else { "out" });
        }
    }

    #[test]
    fn the_stopped_vehicle_stands_still_for_30_s() {
        let s = by_name("traffic-stopped");
        assert_eq!(s.truth.stops.len(), 1, "{:?}", s.truth.stops);
        let stop = &s.truth.stops[0];
        assert_eq!(stop.zone, "westbound");
        assert!((stop.t_end_s - stop.t_start_s - 30.0).abs() < 1e-6, "{stop:?}");
        let v = s.truth.vehicles.iter().find(|v| v.id == stop.vehicle).expect("vehicle");
        let still: Vec<usize> =
            (0..v.path.len()).filter(|&k| v.path[k].0 >= stop.t_start_s && v.path[k].0 <= stop.t_end_s).collect();
        assert_eq!(still.len(), 301);
        let at = v.path[still[0]].1;
        let first = truth_box(s, v.id, frame_of(v.path[still[0]].0)).expect("box").bbox;
        for &k in &still {
            assert_eq!(v.path[k].1, at);
            assert_eq!(v.speed_kmh[k], 0.0);
            assert_eq!(truth_box(s, v.id, frame_of(v.path[k].0)).expect("box").bbox, first);
        }
        // It arrives and leaves moving, and stands inside its lane's zone.
        assert!(v.speed_kmh[0] > 20.0 && v.speed_kmh[v.speed_kmh.len() - 1] > 20.0);
        let zone = s.layout.zones.iter().find(|z| z.name == "westbound").expect("zone");
        assert!(
            GroundZone { name: "westbound", lane: WESTBOUND, span: [zone.ground[0][0], zone.ground[1][0]] }
                .contains(at)
        );
        // Nothing else stands; the other clips' only standstills are the queue's.
        for other in all() {
            if !matches!(other.footage.name, "traffic-stopped" | "traffic-queue") {
                assert!(other.truth.stops.is_empty(), "{}", other.footage.name);
            }
        }
    }

    #[test]
    fn the_wrong_way_vehicle_drives_against_its_lane_arrow() {
        let s = by_name("traffic-wrong-way");
        let wrong: Vec<&VehicleTruth> = s.truth.vehicles.iter().filter(|v| v.wrong_way).collect();
        assert_eq!(wrong.len(), 1);
        let v = wrong[0];
        assert_eq!(v.lane, "eastbound");
        let zone = s.layout.zones.iter().find(|z| z.name == v.lane).expect("zone");
        let [from, to] = zone.direction.expect("arrow");
        // Its boxes move against the arrow on the picture.
        let first = truth_box(s, v.id, frame_of(v.path[0].0)).expect("first");
        let last = truth_box(s, v.id, frame_of(v.path[v.path.len() - 1].0)).expect("last");
        let moved = sub2(bottom_centre(&last), bottom_centre(&first));
        let arrow = sub2(to, from);
        assert!(moved[0] * arrow[0] + moved[1] * arrow[1] < 0.0);
        assert_eq!(s.truth.wrong_way.len(), 1);
        let ww = &s.truth.wrong_way[0];
        assert_eq!((ww.vehicle, ww.zone.as_str()), (v.id, "eastbound"));
        // 10 m from where it came into the zone (its east end).
        let speed = v.speed_kmh[0] / 3.6;
        let entered = v.path.iter().find(|(_, g)| g[0] <= zone.ground[1][0]).expect("in the zone");
        let x_at = entered.1[0] - speed * (ww.t_s - entered.0);
        assert!((zone.ground[1][0] - x_at - WRONG_WAY_M).abs() < 0.01, "{x_at}");
        for other in all() {
            if other.footage.name != "traffic-wrong-way" {
                assert!(other.truth.wrong_way.is_empty() && other.truth.vehicles.iter().all(|v| !v.wrong_way));
            }
        }
    }

    #[test]
    fn speeds_match_distance_over_time() {
        for s in all() {
            for v in &s.truth.vehicles {
                for k in 1..v.path.len() {
                    let ((ta, ga), (tb, gb)) = (v.path[k - 1], v.path[k]);
                    let measured = dist(ga, gb) / (tb - ta) * 3.6;
                    let mean = (v.speed_kmh[k - 1] + v.speed_kmh[k]) / 2.0;
                    assert!(
                        (measured - mean).abs() < 0.1,
                        "{} vehicle {} at {tb}: {measured} vs {mean}",
                        s.footage.name,
                        v.id
                    );
                    assert!(ga[1] == gb[1], "stays in its lane");
                }
            }
        }
    }

    #[test]
    fn the_queue_stands_bumper_to_bumper_and_congests_its_lane() {
        let s = by_name("traffic-queue");
        assert!(!s.clean);
        // Five or more vehicles stand at once for about 20 s.
        let standing = |i: usize| {
            let t = i as f64 / TRAFFIC_FPS;
            s.truth
                .vehicles
                .iter()
                .filter(|v| v.lane == "westbound")
                .filter(|v| v.path.iter().zip(&v.speed_kmh).any(|((tp, _), &k)| (tp - t).abs() < 1e-9 && k == 0.0))
                .count()
        };
        let all_four = (0..s.footage.frames).filter(|&i| standing(i) >= 4).count();
        assert!(all_four as f64 / TRAFFIC_FPS >= 20.0, "{all_four} frames");
        assert_eq!(s.truth.congestion.len(), 1, "{:?}", s.truth.congestion);
        let c = &s.truth.congestion[0];
        assert_eq!(c.zone, "westbound");
        assert!(c.t_end_s - c.t_start_s >= 20.0, "{c:?}");
        // Queued vehicles partly hide each other.
        let mid = s.footage.truth(frame_of((c.t_start_s + c.t_end_s) / 2.0));
        let overlapping = mid.windows(2).filter(|w| w[0].bbox[2] > w[1].bbox[0] && w[1].bbox[2] > w[0].bbox[0]).count();
        assert!(overlapping >= 3, "{mid:?}");
        assert!(s.truth.stops.len() >= 4);
    }

    #[test]
    fn far_lane_vehicles_pass_behind_near_ones() {
        let s = by_name("traffic-occlusion");
        let mut hidden = std::collections::BTreeSet::new();
        for i in 0..s.footage.frames {
            for b in s.footage.truth(i) {
                let v = s.truth.vehicles.iter().find(|v| v.id == b.id).expect("vehicle");
                if whole(&b) && b.visible < 0.5 {
                    assert_eq!(v.lane, "westbound", "only far vehicles are hidden");
                    hidden.insert(b.id);
                }
            }
        }
        assert!(hidden.len() >= 4, "{hidden:?}");
        // The clean clips keep vehicles apart, apart from the eastbound traffic passing in front of
        // the stopped car.
        for name in ["traffic-free-flow", "traffic-wrong-way"] {
            let s = by_name(name);
            for i in 0..s.footage.frames {
                assert!(s.footage.truth(i).len() <= 1, "{name} frame {i}");
            }
        }
    }
}
