//! Harder traffic footage: a four-lane road with small vehicles in the far lanes, at 1280x720
//! and 960x540, under several conditions, and a ten-minute run; with the truth of counts and
//! speeds per lane, also written as the tables a person would count by hand.
//!
//! # Geometry
//!
//! The ground frame is [`super::traffic`]'s: `x` along the road (east, to the right of the
//! picture), `y` across it towards the camera, metres. The road has four lanes of
//! [`LANE_WIDTH_M`], two per direction; "far" and "near" say how far a lane is from the camera:
//!
//! | lane | `y` | direction |
//! |---|---|---|
//! | `wb-far` | `[-7, -3.5]` | westbound (`-x`) |
//! | `wb-near` | `[-3.5, 0]` | westbound |
//! | `eb-far` | `[0, 3.5]` | eastbound (`+x`) |
//! | `eb-near` | `[3.5, 7]` | eastbound |
//!
//! A pinhole [`Camera`] 12 m up, 42 m from the road's centre line and 15 m east of the middle of
//! the view looks at the road obliquely ([`camera`]); its focal length is 1000 px at 1280x720 and
//! scales with the picture, so both sizes show the same view. A whole vehicle in the far lane
//! is 74-151 px wide at 1280x720 (55-113 px at 960x540); in the near lane up to 300 px (a box
//! truck). The background is the street of [`Library::background`] cut to 16:9, scaled to the
//! picture, with the carriageway painted on through the homography (asphalt from the street's
//! own road, white edge lines, dashed lane lines, a double centre line).
//!
//! # Vehicles
//!
//! Pictures cut from the real media: the pickup from the side (dog.jpg, flipped for westbound
//! traffic), and, only for westbound traffic (driving away, seen from behind), the saloon's rear
//! (licenseplate_motion.jpg) and the van from the street clip. A box truck is the van's picture
//! stretched to the box of an 8.5 m truck (labelled "truck"; only in the eastbound lanes, so
//! the far lanes keep to the car sizes). Every picture comes in [`PAINTS`]: its bright body
//! pixels are repainted (windows, tyres and shadows, the dark pixels, stay). A vehicle is drawn
//! at the box of its cuboid (length x width x height) seen by the camera, bottom-centre on the
//! image of its reference point (the middle of its footprint), as in [`super::traffic`].
//!
//! Every vehicle keeps its lane at one constant speed (30-100 km/h), so every pass is a test
//! pass of known speed. Vehicles in a lane keep at least [`MIN_HEADWAY_S`] between them over the
//! whole stretch they are drawn on (a faster one entering behind a slower one waits), so none
//! drives through another; side by side in adjacent lanes is allowed, and nearer vehicles hide
//! farther ones.
//!
//! # Truth
//!
//! As in [`super::traffic`], from the motion: each lane has its own count line across that lane
//! only (at `x` = [`LINE_X`], named after the lane; "in" is the east side, so eastbound
//! vehicles cross "in"), crossed at the time found by bisection on the motion; speeds are the
//! vehicles' speeds. No vehicle stops, drives the wrong way or queues, so those truths are empty.
//! [`counts_csv`] and [`passes_csv`] write the truth as tables.
//!
//! # Conditions
//!
//! A [`Condition`] is applied to each frame as it is rendered; the truth is the same for every
//! condition except [`Condition::Shake`], whose boxes move with the picture.

use std::path::Path;

use image::{Rgb, RgbImage, imageops};

use super::library::Library;
use super::traffic::{
    ASPHALT, Camera, LANE_WIDTH_M, LayoutLine, LayoutZone, PICKUP_OUTLINE, RoadLayout, TRAFFIC_FPS, TrafficFootage,
    TrafficTruth, TruthCrossing, VehicleTruth, apply_homography, cross2, first_true, invert, paint_marking, placement,
    polygon_mask, round01, sub2,
};
use super::{Actor, Footage, FootageError, Placement, Sprite, TruthBox};

/// The two picture sizes, the same view.
pub const SIZES: [(u32, u32); 2] = [(1280, 720), (960, 540)];
/// Least time between two vehicles of a lane, at every point of their way (seconds).
pub const MIN_HEADWAY_S: f64 = 1.5;
/// Where each lane's count line crosses it (ground `x`, metres).
pub const LINE_X: f64 = -8.0;
/// Quantiser of the clips' H.264 (a typical camera stream) and of the compressed variant.
pub const QP_NORMAL: u8 = 26;
pub const QP_COMPRESSED: u8 = 42;
/// Length of the ten-minute run (frames at 10 fps).
pub const LONG_RUN_FRAMES: usize = 6000;

/// Half the width of the carriageway (four lanes).
const ROAD_HALF_M: f64 = 2.0 * LANE_WIDTH_M;
/// The edge lines' centres, 0.1 m inside the road edges.
const EDGE_LINE_Y: f64 = ROAD_HALF_M - 0.1;

/// A lane: name, `y` of its centre, `+1` eastbound or `-1` westbound.
#[derive(Debug, Clone, Copy)]
struct Lane {
    name: &'static str,
    y: f64,
    dir: f64,
}

const LANES: [Lane; 4] = [
    Lane { name: "wb-far", y: -1.5 * LANE_WIDTH_M, dir: -1.0 },
    Lane { name: "wb-near", y: -0.5 * LANE_WIDTH_M, dir: -1.0 },
    Lane { name: "eb-far", y: 0.5 * LANE_WIDTH_M, dir: 1.0 },
    Lane { name: "eb-near", y: 1.5 * LANE_WIDTH_M, dir: 1.0 },
];
const WB_FAR: usize = 0;
const WB_NEAR: usize = 1;
const EB_FAR: usize = 2;
const EB_NEAR: usize = 3;

/// The camera of the four-lane footage at picture size `size` (16:9): 12 m up, 42 m off the
/// road's centre line, 15 m east of the middle of the view, looking at `(-2, 0)` on the road,
/// focal length 1000 px at 1280 px across (65° across the picture).
pub fn camera(size: (u32, u32)) -> Camera {
    Camera {
        position: [15.0, 42.0, 12.0],
        target: [-2.0, 0.0, 0.0],
        focal_px: 1000.0 * size.0 as f64 / 1280.0,
        image_size: size,
    }
}

// ---------------------------------------------------------------------------------------------
// Conditions

/// How a clip looks: applied to every frame as it is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Daylight, as rendered.
    Clear,
    /// Low light: darker, bluish, a steeper gamma; headlights (soft bright spots with a glow at
    /// the front corners, where the front faces the camera) and red tail lights at the back.
    Dusk,
    /// Rain: random bright streaks, sensor noise and a slight blur (seeded, the same every time).
    Rain,
    /// Encoded at a high quantiser ([`QP_COMPRESSED`]): blocky, smeared detail.
    Compressed,
    /// The picture moves by a few pixels from frame to frame (a smooth seeded random walk within
    /// ±[`SHAKE_MAX_PX`] px): the truth boxes move with it, the calibration is the nominal one.
    Shake,
}

/// Largest shake (pixels, at both sizes).
pub const SHAKE_MAX_PX: f64 = 3.5;

impl Condition {
    pub const ALL: [Condition; 5] = [Self::Clear, Self::Dusk, Self::Rain, Self::Compressed, Self::Shake];

    pub fn name(self) -> &'static str {
        match self {
            Self::Clear => "clear",
            Self::Dusk => "dusk",
            Self::Rain => "rain",
            Self::Compressed => "qp42",
            Self::Shake => "shake",
        }
    }

    /// The H.264 quantiser the clip is encoded at.
    pub fn qp(self) -> u8 {
        if self == Self::Compressed { QP_COMPRESSED } else { QP_NORMAL }
    }
}

/// A small deterministic random generator (SplitMix64): the clips are the same on every machine.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn pick(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

// ---------------------------------------------------------------------------------------------
// Vehicles

/// The kinds of vehicle of the four-lane footage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FarKind {
    /// The pickup from the side (dog.jpg), facing its direction of travel.
    Pickup,
    /// The saloon from behind (licenseplate_motion.jpg): westbound only.
    Saloon,
    /// The white van from behind and its side (street clip): westbound only.
    Van,
    /// A box truck: the van's picture stretched to an 8.5 m truck; eastbound only.
    BoxTruck,
}

impl FarKind {
    /// Length, width and height (metres).
    pub fn dimensions(self) -> [f64; 3] {
        match self {
            Self::Pickup => [5.2, 1.9, 1.9],
            Self::Saloon => [4.5, 1.8, 1.5],
            Self::Van => [5.0, 2.0, 2.4],
            Self::BoxTruck => [8.5, 2.5, 3.2],
        }
    }

    /// The class the detector reports for it.
    pub fn label(self) -> &'static str {
        match self {
            Self::BoxTruck => "truck",
            _ => "car",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Pickup => 0,
            Self::Saloon => 1,
            Self::Van => 2,
            Self::BoxTruck => 3,
        }
    }
}

/// Body colours: `None` keeps the picture's own, otherwise the bright pixels take this colour
/// (shaded by their brightness).
pub const PAINTS: [Option<[u8; 3]>; 7] = [
    None,
    Some([175, 30, 35]),
    Some([40, 75, 165]),
    Some([70, 72, 78]),
    Some([150, 152, 158]),
    Some([45, 115, 65]),
    Some([205, 170, 45]),
];

/// `img` with its body repainted `paint`: pixels brighter than the windows and tyres (luma above
/// 70, fully from 110) take the paint, keeping their shading.
fn repaint(img: &RgbImage, paint: [u8; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let [r, g, b] = p.0.map(f64::from);
        let luma = 0.299 * r + 0.587 * g + 0.114 * b;
        let w = ((luma - 70.0) / 40.0).clamp(0.0, 1.0);
        if w == 0.0 {
            continue;
        }
        let shade = (luma / 210.0).min(1.2);
        for (c, &t) in p.0.iter_mut().zip(&paint) {
            let target = (f64::from(t) * shade).min(255.0);
            *c = (f64::from(*c) * (1.0 - w) + target * w).round() as u8;
        }
    }
    out
}

/// The pictures of the four-lane footage at one picture size: the painted road, and every
/// vehicle picture in every paint, facing each way.
#[derive(Debug, Clone)]
struct FarPictures {
    background: RgbImage,
    /// `[kind][paint][0: eastbound, 1: westbound]`
    sprites: Vec<Vec<[Sprite; 2]>>,
}

/// Pictures larger than this (pixels across) are scaled down first: no vehicle is drawn larger,
/// and hundreds of vehicles each hold their picture.
const SPRITE_MAX_W: u32 = 320;

fn shrink(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    if w <= SPRITE_MAX_W {
        return img.clone();
    }
    let nh = (h as f64 * SPRITE_MAX_W as f64 / w as f64).round().max(1.0) as u32;
    imageops::resize(img, SPRITE_MAX_W, nh, imageops::FilterType::Triangle)
}

impl FarPictures {
    fn new(street: &RgbImage, pickup: &RgbImage, saloon: &RgbImage, van: &RgbImage, camera: &Camera) -> Self {
        let (pw, ph) = pickup.dimensions();
        let pickup_mask = polygon_mask(pw, ph, &PICKUP_OUTLINE);
        let saloon = shrink(saloon);
        // The van without the wall beside it; flipped it drives away to the left (westbound).
        let (vw, vh) = van.dimensions();
        let van = imageops::crop_imm(van, 8, 4, vw.saturating_sub(8), vh.saturating_sub(4)).to_image();
        let mut sprites = Vec::new();
        for kind in [FarKind::Pickup, FarKind::Saloon, FarKind::Van, FarKind::BoxTruck] {
            let mut per_paint = Vec::new();
            for paint in PAINTS {
                let colour = |img: &RgbImage| paint.map_or_else(|| img.clone(), |p| repaint(img, p));
                let label = kind.label();
                let pair = match kind {
                    FarKind::Pickup => {
                        let east = colour(pickup);
                        let west = imageops::flip_horizontal(&east);
                        [
                            Sprite::with_mask(label, &east, &pickup_mask, pw, ph),
                            Sprite::with_mask(label, &west, &imageops::flip_horizontal(&pickup_mask), pw, ph),
                        ]
                    }
                    FarKind::Saloon => {
                        let s = Sprite::new(label, &colour(&saloon), saloon.width(), saloon.height(), 2);
                        [s.clone(), s]
                    }
                    FarKind::Van | FarKind::BoxTruck => {
                        let east = colour(&van);
                        let west = imageops::flip_horizontal(&east);
                        [
                            Sprite::new(label, &east, east.width(), east.height(), 2),
                            Sprite::new(label, &west, west.width(), west.height(), 2),
                        ]
                    }
                };
                per_paint.push(pair);
            }
            sprites.push(per_paint);
        }
        Self { background: paint_road(street, camera), sprites }
    }

    fn sprite(&self, kind: FarKind, paint: usize, heading: f64) -> Sprite {
        self.sprites[kind.index()][paint % PAINTS.len()][if heading > 0.0 { 0 } else { 1 }].clone()
    }
}

/// The street picture cut to 16:9 (its middle rows) and scaled to `size`.
fn street_16_9(street: &RgbImage, size: (u32, u32)) -> RgbImage {
    let (w, h) = street.dimensions();
    let ch = (w as u64 * 9 / 16).min(h as u64) as u32;
    let cut = imageops::crop_imm(street, 0, (h - ch) / 2, w, ch).to_image();
    imageops::resize(&cut, size.0, size.1, imageops::FilterType::Triangle)
}

/// The street picture (768x576) cut to 16:9 at the camera's size with the carriageway painted
/// on: mirrored tiles of the street's own asphalt, 0.15 m white markings (anti-aliased, 4x4
/// samples a pixel): edge lines, lane lines dashed 3 m every 9 m, a double centre line.
fn paint_road(street: &RgbImage, camera: &Camera) -> RgbImage {
    let mut out = street_16_9(street, camera.image_size);
    let hm = camera.homography();
    let Some(to_ground) = invert(&hm) else { return out };
    let half = 0.075;
    let marking = |g: [f64; 2]| {
        let y = g[1].abs();
        if (y - EDGE_LINE_Y).abs() <= half || (y - 0.15).abs() <= half {
            return true;
        }
        (y - LANE_WIDTH_M).abs() <= half && (g[0] + 1.5).rem_euclid(9.0) <= 3.0
    };
    let on_road = |p: [f64; 2]| {
        let g = apply_homography(&to_ground, p)?;
        let in_front = hm[2][0] * g[0] + hm[2][1] * g[1] + hm[2][2] > 1.0;
        (in_front && g[1].abs() <= ROAD_HALF_M + 0.3).then_some(g)
    };
    let [ax, ay, aw, ah] = ASPHALT;
    let patch = if street.width() >= ax + aw && street.height() >= ay + ah {
        imageops::crop_imm(street, ax, ay, aw, ah).to_image()
    } else {
        RgbImage::from_pixel(1, 1, Rgb([95, 95, 98]))
    };
    let (pw, ph) = patch.dimensions();
    let mirror = |v: u32, n: u32| if (v / n).is_multiple_of(2) { v % n } else { n - 1 - v % n };
    let (w, h) = out.dimensions();
    for y in 0..h {
        for x in 0..w {
            if on_road([x as f64 + 0.5, y as f64 + 0.5]).is_none() {
                continue;
            }
            out.put_pixel(x, y, *patch.get_pixel(mirror(x, pw), mirror(y, ph)));
            paint_marking(&mut out, x, y, |p| on_road(p).is_some_and(marking));
        }
    }
    out
}

/// The box `[x1, y1, x2, y2]` (pixels, not rounded) of the cuboid `dims` standing with the
/// middle of its footprint at `p`, bottom-centre at the image of `p`; `None` unless the whole
/// cuboid is in front of the camera and its image (the extent of its projected corners) overlaps
/// the picture.
///
/// (Beside the camera, out of its field of view, a cuboid can be just in front of it: its corners
/// then project thousands of pixels off the picture, and the box centred on its bottom-centre, as
/// wide as that extent, would cover the whole picture.)
fn cuboid_box(camera: &Camera, dims: [f64; 3], p: [f64; 2]) -> Option<[f64; 4]> {
    let [l, w, h] = dims;
    let (mut u0, mut u1, mut v0, mut v1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for dx in [-l / 2.0, l / 2.0] {
        for dy in [-w / 2.0, w / 2.0] {
            for z in [0.0, h] {
                let q = camera.project([p[0] + dx, p[1] + dy, z])?;
                (u0, u1, v0, v1) = (u0.min(q[0]), u1.max(q[0]), v0.min(q[1]), v1.max(q[1]));
            }
        }
    }
    let (fw, fh) = (f64::from(camera.image_size.0), f64::from(camera.image_size.1));
    if u1 <= 0.0 || u0 >= fw || v1 <= 0.0 || v0 >= fh {
        return None;
    }
    let b = camera.project([p[0], p[1], 0.0])?;
    let width = u1 - u0;
    Some([b[0] - width / 2.0, b[1] - (v1 - v0), b[0] + width / 2.0, b[1]])
}

/// Any part of rounded box `b` is in a picture of `size`.
fn in_picture(b: [f64; 4], size: (u32, u32)) -> bool {
    let p = placement(0, b, 0);
    let cw = (p.x + p.width as i64).min(size.0 as i64) - p.x.max(0);
    let ch = (p.y + p.height as i64).min(size.1 as i64) - p.y.max(0);
    cw > 0 && ch > 0
}

/// One vehicle: constant speed along its lane, at `x0` at time `t0`, gone at `t1` (both just out
/// of sight).
#[derive(Debug, Clone)]
struct FarDrive {
    id: u64,
    kind: FarKind,
    paint: usize,
    lane: usize,
    /// m/s
    speed: f64,
    t0: f64,
    x0: f64,
    t1: f64,
}

impl FarDrive {
    fn heading(&self) -> f64 {
        LANES[self.lane].dir
    }

    fn ground(&self, t: f64) -> [f64; 2] {
        [self.x0 + self.heading() * self.speed * (t - self.t0), LANES[self.lane].y]
    }

    /// When the reference point is at `x`.
    fn time_at(&self, x: f64) -> f64 {
        self.t0 + (x - self.x0) * self.heading() / self.speed
    }
}

/// The stretch of a lane a vehicle is drawn on: `[entry, exit]` ground `x` in its direction of
/// travel, just out of sight at both ends for the largest kind (so that vehicles of a lane share
/// it and headways can be kept over all of it).
fn lane_stretch(camera: &Camera, lane: usize) -> [f64; 2] {
    let seen = |x: f64| {
        [FarKind::Pickup, FarKind::Saloon, FarKind::Van, FarKind::BoxTruck].iter().any(|k| {
            cuboid_box(camera, k.dimensions(), [x, LANES[lane].y]).is_some_and(|b| in_picture(b, camera.image_size))
        })
    };
    let (mut lo, mut hi) = (-300.0f64, 300.0f64);
    while lo < 300.0 && !seen(lo) {
        lo += 0.1;
    }
    while hi > lo && !seen(hi) {
        hi -= 0.1;
    }
    let (lo, hi) = (lo - 0.5, hi + 0.5);
    if LANES[lane].dir > 0.0 { [lo, hi] } else { [hi, lo] }
}

/// A request for a vehicle: it should cross [`LINE_X`] at `t_line` (later if its lane's
/// headway needs it).
#[derive(Debug, Clone, Copy)]
struct Want {
    kind: FarKind,
    paint: usize,
    lane: usize,
    kmh: f64,
    t_line: f64,
}

/// The vehicles of a clip being put together, lane by lane in time order.
struct Schedule {
    camera: Camera,
    stretch: [[f64; 2]; 4],
    drives: Vec<FarDrive>,
}

impl Schedule {
    fn new(camera: Camera) -> Self {
        let stretch = [0, 1, 2, 3].map(|l| lane_stretch(&camera, l));
        Self { camera, stretch, drives: Vec::new() }
    }

    fn drive(&self, w: &Want, t_line: f64) -> FarDrive {
        let [entry, exit] = self.stretch[w.lane];
        let speed = w.kmh / 3.6;
        let t0 = t_line - (LINE_X - entry).abs() / speed;
        FarDrive {
            id: 0,
            kind: w.kind,
            paint: w.paint,
            lane: w.lane,
            speed,
            t0,
            x0: entry,
            t1: t0 + (exit - entry).abs() / speed,
        }
    }

    /// How much later than asked `w` must cross the line to keep [`MIN_HEADWAY_S`] behind the
    /// last vehicle of its lane at the entry and at the exit (time headway varies linearly along
    /// the way at constant speeds, so it is at least that everywhere between).
    fn delay(&self, w: &Want) -> f64 {
        let d = self.drive(w, w.t_line);
        let Some(prev) = self.drives.iter().rev().find(|p| p.lane == w.lane) else { return 0.0 };
        let [entry, exit] = self.stretch[w.lane];
        let need_entry = prev.time_at(entry) + MIN_HEADWAY_S - d.time_at(entry);
        let need_exit = prev.time_at(exit) + MIN_HEADWAY_S - d.time_at(exit);
        need_entry.max(need_exit).max(0.0)
    }

    /// Adds the vehicles of `group` together (side by side when they cross the line at the same
    /// time), all delayed as much as the most delayed one needs; returns the delay.
    fn add(&mut self, group: &[Want]) -> f64 {
        let delay = group.iter().map(|w| self.delay(w)).fold(0.0, f64::max);
        for w in group {
            let mut d = self.drive(w, w.t_line + delay);
            d.id = self.drives.len() as u64 + 1;
            self.drives.push(d);
        }
        delay
    }
}

// ---------------------------------------------------------------------------------------------
// Clips

/// A four-lane clip: footage (with its truth boxes), layout and truth, and how it looks.
#[derive(Debug, Clone)]
pub struct FarClip {
    /// Frames (the actors), layout (nominal calibration) and truth; under [`Condition::Shake`]
    /// the actors' placements include each frame's shake.
    pub traffic: TrafficFootage,
    pub condition: Condition,
    /// The quantiser to encode it at.
    pub qp: u8,
    /// Per frame: the picture's shift `[dx, dy]` in pixels (all zero unless shaking).
    pub shake: Vec<[i32; 2]>,
    camera: Camera,
    drives: Vec<FarDrive>,
    seed: u64,
}

/// The "far-lanes" clips' length limit: groups of vehicles start until then.
const FAR_LANES_GROUPS_UNTIL_S: f64 = 62.0;

/// ~75 s of mixed traffic on all four lanes, in groups every 4.5-6.5 s: side-by-side pairs in
/// the two westbound lanes, side-by-side pairs in the two eastbound lanes, one vehicle in every
/// lane, vehicles meeting in the two far lanes.
fn far_lanes_plan(s: &mut Schedule, rng: &mut Rng) {
    let mut t = 4.0;
    let mut k = 0usize;
    while t < FAR_LANES_GROUPS_UNTIL_S {
        let want = |lane: usize, kmh: f64, t_line: f64, rng: &mut Rng| Want {
            kind: kind_for(lane, rng),
            paint: rng.pick(PAINTS.len()),
            lane,
            kmh,
            t_line,
        };
        let group: Vec<Want> = match k % 4 {
            0 => {
                let v = rng.range(45.0, 80.0);
                vec![want(WB_FAR, v, t, rng), want(WB_NEAR, v, t, rng)]
            }
            1 => {
                let v = rng.range(45.0, 90.0);
                vec![want(EB_FAR, v, t, rng), want(EB_NEAR, v, t, rng)]
            }
            2 => (0..4).map(|l| want(l, rng.range(30.0, 100.0), t + rng.range(0.0, 1.5), rng)).collect(),
            _ => vec![want(WB_FAR, rng.range(30.0, 70.0), t, rng), want(EB_FAR, rng.range(40.0, 90.0), t, rng)],
        };
        t += s.add(&group) + rng.range(4.5, 6.5);
        k += 1;
    }
}

/// Which kind drives in `lane`: the pictures seen from behind only drive away (westbound), the
/// truck only in the near (eastbound) carriageway.
fn kind_for(lane: usize, rng: &mut Rng) -> FarKind {
    let u = rng.unit();
    if LANES[lane].dir < 0.0 {
        if u < 0.45 {
            FarKind::Pickup
        } else if u < 0.75 {
            FarKind::Saloon
        } else {
            FarKind::Van
        }
    } else if u < 0.55 {
        FarKind::Pickup
    } else if u < 0.8 {
        FarKind::Van
    } else {
        FarKind::BoxTruck
    }
}

/// Ten minutes of traffic: on each lane, arrivals with a headway of [`MIN_HEADWAY_S`] plus a
/// random (exponential) gap, speeds uniform in the lane's range (the lanes by the centre line
/// faster: 50-100 km/h, the outer ones 30-80 km/h).
fn long_run_plan(s: &mut Schedule, rng: &mut Rng, seconds: f64) {
    let mean_gap = [7.0, 4.5, 4.5, 6.0];
    let speeds = [(30.0, 80.0), (50.0, 100.0), (50.0, 100.0), (30.0, 80.0)];
    let mut next: [f64; 4] = [0.0, 1.0, 0.5, 2.0].map(|t: f64| t + 3.0);
    // The lane whose next vehicle is due first, so the schedule is in time order.
    while let Some(lane) = (0..4).filter(|&l| next[l] < seconds).min_by(|&a, &b| next[a].total_cmp(&next[b])) {
        let (lo, hi) = speeds[lane];
        let w = Want {
            kind: kind_for(lane, rng),
            paint: rng.pick(PAINTS.len()),
            lane,
            kmh: rng.range(lo, hi),
            t_line: next[lane],
        };
        let delay = s.add(&[w]);
        let gap = -mean_gap[lane] * (1.0 - rng.unit()).ln();
        next[lane] += delay + MIN_HEADWAY_S + gap;
    }
}

/// A smooth random walk within ±`max` px: a velocity that wanders, pulled back towards the centre.
fn shake_walk(frames: usize, max: f64, seed: u64) -> Vec<[i32; 2]> {
    let mut rng = Rng::new(seed);
    let (mut p, mut v) = ([0.0f64; 2], [0.0f64; 2]);
    (0..frames)
        .map(|_| {
            for (pk, vk) in p.iter_mut().zip(v.iter_mut()) {
                *vk = 0.8 * *vk + rng.range(-0.6, 0.6) * max / 3.5 - 0.08 * *pk;
                *pk = (*pk + *vk).clamp(-max, max);
            }
            [p[0].round() as i32, p[1].round() as i32]
        })
        .collect()
}

impl FarClip {
    /// Renders the drives of `schedule` into a clip of `frames` frames.
    fn finish(
        name: &'static str,
        schedule: Schedule,
        pictures: &FarPictures,
        frames: usize,
        condition: Condition,
        seed: u64,
    ) -> Self {
        let fps = TRAFFIC_FPS;
        let cam = schedule.camera;
        let size = cam.image_size;
        let shake = if condition == Condition::Shake {
            shake_walk(frames, SHAKE_MAX_PX, seed ^ 0x0053_4841_4b45)
        } else {
            vec![[0, 0]; frames]
        };
        let mut actors = Vec::new();
        let mut vehicles = Vec::new();
        for d in &schedule.drives {
            let dims = d.kind.dimensions();
            let mut placements = Vec::new();
            let mut path = Vec::new();
            let first = (d.t0 * fps).ceil().max(0.0) as usize;
            for (i, &[dx, dy]) in shake.iter().enumerate().skip(first) {
                let t = i as f64 / fps;
                if t > d.t1 {
                    break;
                }
                let g = d.ground(t);
                let Some(b) = cuboid_box(&cam, dims, g) else { continue };
                if !in_picture(b, size) {
                    continue;
                }
                let z = -(cam.depth([g[0], g[1], 0.0]) * 100.0).round() as i32;
                let mut p = placement(i, b, z);
                p.x += dx as i64;
                p.y += dy as i64;
                placements.push(p);
                path.push((t, g));
            }
            if path.is_empty() {
                continue;
            }
            let speed_kmh = vec![d.speed * 3.6; path.len()];
            actors.push(Actor::with_placements(d.id, pictures.sprite(d.kind, d.paint, d.heading()), placements));
            vehicles.push(VehicleTruth {
                id: d.id,
                label: d.kind.label(),
                lane: LANES[d.lane].name.to_string(),
                wrong_way: false,
                path,
                speed_kmh,
            });
        }
        let footage = Footage { name, background: pictures.background.clone(), actors, fps, frames };
        let truth = derive_truth(&schedule.drives, vehicles, frames);
        let traffic = TrafficFootage { footage, layout: layout(&cam), truth, clean: condition == Condition::Clear };
        Self { traffic, condition, qp: condition.qp(), shake, camera: cam, drives: schedule.drives, seed }
    }

    pub fn name(&self) -> &'static str {
        self.traffic.footage.name
    }

    pub fn frames(&self) -> usize {
        self.traffic.footage.frames
    }

    pub fn size(&self) -> (u32, u32) {
        self.camera.image_size
    }

    /// The true boxes of frame `i` (moved with the picture under [`Condition::Shake`]).
    pub fn truth(&self, i: usize) -> Vec<TruthBox> {
        self.traffic.footage.truth(i)
    }

    /// Frame `i` as it looks under the clip's condition.
    pub fn render(&self, i: usize) -> RgbImage {
        let f = &self.traffic.footage;
        match self.condition {
            Condition::Clear | Condition::Compressed => f.render(i),
            Condition::Shake => {
                let [dx, dy] = self.shake.get(i).copied().unwrap_or([0, 0]);
                f.render_over(i, &shifted(&f.background, dx, dy))
            }
            Condition::Dusk => {
                let mut img = f.render(i);
                dusk(&mut img);
                self.lights(i, &mut img);
                img
            }
            Condition::Rain => {
                let mut img = f.render(i);
                rain(&mut img, self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                img
            }
        }
    }

    /// Encodes the clip to Annex-B H.264 at its quantiser, frame by frame (a keyframe every 30).
    pub fn encode(&self, path: &Path) -> Result<(), FootageError> {
        let f = &self.traffic.footage;
        super::encode_frames(path, f.size(), f.fps, f.frames, self.qp, 30, |i| self.render(i))
    }

    /// Head and tail lights of the vehicles in frame `i`: at the corners of the front and back
    /// faces that face the camera, 0.7 m up; a light is not drawn where a nearer vehicle's box
    /// covers it.
    fn lights(&self, i: usize, img: &mut RgbImage) {
        let t = i as f64 / self.traffic.footage.fps;
        // The actors are in the order of the drives, so in the order of their ids.
        let actors = &self.traffic.footage.actors;
        let actor = |id: u64| actors.binary_search_by_key(&id, |a| a.id).ok().map(|k| &actors[k]);
        let placed: Vec<(&FarDrive, Placement)> = self
            .drives
            .iter()
            .filter(|d| t >= d.t0 && t <= d.t1)
            .filter_map(|d| {
                let a = actor(d.id)?;
                Some((d, a.placement(i, self.traffic.footage.fps)?))
            })
            .collect();
        let cam_xy = [self.camera.position[0], self.camera.position[1]];
        let [sx, sy] = self.shake.get(i).copied().unwrap_or([0, 0]);
        for (d, p) in &placed {
            let [l, w, _] = d.kind.dimensions();
            let g = d.ground(t);
            let radius = (p.width as f64 * 0.03).max(1.2);
            for (end, colour, strength) in [(1.0, [255.0, 248.0, 225.0], 1.0), (-1.0, [235.0, 25.0, 20.0], 0.8)] {
                let face = [g[0] + end * d.heading() * l / 2.0, g[1]];
                // The face's outward normal is `end * heading` along x: seen when the camera is
                // on that side.
                if (cam_xy[0] - face[0]) * end * d.heading() <= 0.0 {
                    continue;
                }
                for side in [-1.0, 1.0] {
                    let Some(q) = self.camera.project([face[0], face[1] + side * (w / 2.0 - 0.3), 0.7]) else {
                        continue;
                    };
                    let q = [q[0] + sx as f64, q[1] + sy as f64];
                    let hidden = placed.iter().any(|(_, o)| {
                        o.z > p.z
                            && q[0] >= o.x as f64
                            && q[0] < (o.x + o.width as i64) as f64
                            && q[1] >= o.y as f64
                            && q[1] < (o.y + o.height as i64) as f64
                    });
                    if !hidden {
                        glow(img, q, radius, colour, strength);
                    }
                }
            }
        }
    }
}

/// `img` moved by `(dx, dy)` pixels, the edge pixels repeated into the uncovered border.
fn shifted(img: &RgbImage, dx: i32, dy: i32) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let mut out = img.clone();
    if w == 0 || h == 0 {
        return out;
    }
    let row = w as usize * 3;
    // The source column of every column (the same for every row).
    let cols: Vec<usize> = (0..w).map(|x| (x - i64::from(dx)).clamp(0, w - 1) as usize * 3).collect();
    let src = img.as_raw();
    for (y, out_row) in out.chunks_exact_mut(row).enumerate() {
        let sy = (y as i64 - i64::from(dy)).clamp(0, h - 1) as usize;
        let src_row = &src[sy * row..(sy + 1) * row];
        for (d, &sx) in out_row.chunks_exact_mut(3).zip(&cols) {
            d.copy_from_slice(&src_row[sx..sx + 3]);
        }
    }
    out
}

/// Low light: gamma 1.8, 45% of the brightness, blue kept more than red.
fn dusk(img: &mut RgbImage) {
    let lut: Vec<[u8; 3]> = (0..256)
        .map(|v| {
            let l = (v as f64 / 255.0).powf(1.8) * 0.45 * 255.0;
            [(l * 0.85).round() as u8, (l * 0.95).round() as u8, (l * 1.25 + 6.0).min(255.0).round() as u8]
        })
        .collect();
    for p in img.pixels_mut() {
        for (c, v) in p.0.iter_mut().enumerate() {
            *v = lut[*v as usize][c];
        }
    }
}

/// A light at `q`: a core of `radius` px in the lamp's own `colour` (a lit lamp shows its colour
/// whatever is around it: a red tail light is red on a white van too), and a glow of up to
/// `strength` x 55% towards that colour, fading over four times the radius (light only adds: a
/// channel already brighter stays).
fn glow(img: &mut RgbImage, q: [f64; 2], radius: f64, colour: [f64; 3], strength: f64) {
    let (w, h) = img.dimensions();
    let reach = radius * 4.0;
    let (x0, x1) = ((q[0] - reach).floor().max(0.0) as u32, (q[0] + reach).ceil().min(w as f64 - 1.0));
    let (y0, y1) = ((q[1] - reach).floor().max(0.0) as u32, (q[1] + reach).ceil().min(h as f64 - 1.0));
    if x1 < 0.0 || y1 < 0.0 {
        return;
    }
    for y in y0..=y1 as u32 {
        for x in x0..=x1 as u32 {
            let d = ((x as f64 + 0.5 - q[0]).powi(2) + (y as f64 + 0.5 - q[1]).powi(2)).sqrt();
            let px = img.get_pixel_mut(x, y);
            if d <= radius {
                px.0 = colour.map(|k| k.round().clamp(0.0, 255.0) as u8);
                continue;
            }
            let a = 0.55 * (-((d - radius) / radius).powi(2) / 1.5).exp() * strength;
            if a < 0.01 {
                continue;
            }
            for (c, &k) in px.0.iter_mut().zip(&colour) {
                *c = (f64::from(*c) + (k - f64::from(*c)).max(0.0) * a.min(1.0)).round() as u8;
            }
        }
    }
}

/// Rain: streaks (falling slanted, 0.5-1.5% of the picture's height long, a quarter to a third
/// towards light grey), noise of up to ±10 per channel, then a [1 2 1] blur; all drawn from `seed`.
fn rain(img: &mut RgbImage, seed: u64) {
    let mut rng = Rng::new(seed);
    let (w, h) = img.dimensions();
    let scale = h as f64 / 720.0;
    let streaks = (w as usize * h as usize) / 4000;
    for _ in 0..streaks {
        let (x, y) = (rng.range(0.0, w as f64), rng.range(0.0, h as f64));
        let len = rng.range(14.0, 30.0) * scale;
        let a = rng.range(0.25, 0.35);
        let steps = len.ceil() as usize;
        for s in 0..steps {
            let k = s as f64 / steps as f64;
            let (px, py) = (x + 0.22 * len * k, y + len * k);
            if px < 0.0 || py < 0.0 || px >= w as f64 || py >= h as f64 {
                continue;
            }
            let p = img.get_pixel_mut(px as u32, py as u32);
            for (c, t) in p.0.iter_mut().zip([200.0, 205.0, 215.0]) {
                *c = (f64::from(*c) * (1.0 - a) + t * a).round() as u8;
            }
        }
    }
    // Whole steps of -10..=10 (near enough uniform), eight channels from each draw, in the
    // picture's order: integer work, no rounding or branches per channel.
    for chunk in img.chunks_mut(8) {
        let bits = rng.next_u64().to_le_bytes();
        for (c, b) in chunk.iter_mut().zip(bits) {
            let n = ((i32::from(b) * 21) >> 8) - 10;
            *c = (i32::from(*c) + n).clamp(0, 255) as u8;
        }
    }
    let blurred = blur121(img);
    *img = blurred;
}

/// A separable [1 2 1] / 4 blur (edges repeated), rounded after each pass.
fn blur121(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let row = w * 3;
    let mix = |a: u8, b: u8, c: u8| ((u32::from(a) + 2 * u32::from(b) + u32::from(c) + 2) / 4) as u8;
    // Along the rows: the neighbours are a pixel (3 bytes) to either side.
    let mut across = img.clone();
    for (src, dst) in img.chunks_exact(row).zip(across.chunks_exact_mut(row)) {
        for x in 0..w {
            let (l, r) = (x.saturating_sub(1) * 3, (x + 1).min(w - 1) * 3);
            for k in 0..3 {
                dst[x * 3 + k] = mix(src[l + k], src[x * 3 + k], src[r + k]);
            }
        }
    }
    // Down the columns: the neighbours are the rows above and below.
    let mut out = img.clone();
    let src = across.as_raw();
    for (y, dst) in out.chunks_exact_mut(row).enumerate() {
        let (up, down) = (y.saturating_sub(1), (y + 1).min(h - 1));
        let (a, b, c) = (&src[up * row..][..row], &src[y * row..][..row], &src[down * row..][..row]);
        for (i, d) in dst.iter_mut().enumerate() {
            *d = mix(a[i], b[i], c[i]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Layout and truth

fn lane_edges(lane: usize) -> (f64, f64) {
    let y = LANES[lane].y;
    (y - LANE_WIDTH_M / 2.0, y + LANE_WIDTH_M / 2.0)
}

/// The stretch of each lane covered by its zone (ground `x`): the zone's corners are in the
/// picture, at least 2 px inside.
fn zone_span(camera: &Camera, lane: usize) -> [f64; 2] {
    let (y0, y1) = lane_edges(lane);
    let (w, h) = camera.image_size;
    let inside = |x: f64| {
        [y0, y1].iter().all(|&y| {
            camera
                .project([x, y, 0.0])
                .is_some_and(|p| p[0] >= 2.0 && p[0] <= w as f64 - 2.0 && p[1] >= 2.0 && p[1] <= h as f64 - 2.0)
        })
    };
    let (mut lo, mut hi) = (LINE_X, LINE_X);
    while inside(lo - 0.1) {
        lo -= 0.1;
    }
    while inside(hi + 0.1) {
        hi += 0.1;
    }
    [(lo * 10.0).ceil() / 10.0, (hi * 10.0).floor() / 10.0]
}

fn layout(camera: &Camera) -> RoadLayout {
    let h = camera.homography();
    let img = |p: [f64; 2]| apply_homography(&h, p).map(round01).unwrap_or([f64::NAN, f64::NAN]);
    // Surveyed points: on the edge lines, the lane lines and the centre line, at three places.
    let mut calibration = Vec::new();
    for x in [-20.0, -8.0, 4.0] {
        for y in [-EDGE_LINE_Y, -LANE_WIDTH_M, 0.0, LANE_WIDTH_M, EDGE_LINE_Y] {
            calibration.push((img([x, y]), [x, y]));
        }
    }
    let lines = (0..LANES.len())
        .map(|lane| {
            let (y0, y1) = lane_edges(lane);
            // Across this lane only, 0.1 m short of its edges.
            let ground = vec![[LINE_X, y0 + 0.1], [LINE_X, y1 - 0.1]];
            let image: Vec<[f64; 2]> = ground.iter().map(|&g| img(g)).collect();
            let east = img([LINE_X + 1.0, LANES[lane].y]);
            let side = cross2(sub2(image[1], image[0]), sub2(east, image[0]));
            LayoutLine {
                name: LANES[lane].name.to_string(),
                image,
                ground,
                in_side: if side < 0.0 { "left" } else { "right" },
            }
        })
        .collect();
    let zones = (0..LANES.len())
        .map(|lane| {
            let (y0, y1) = lane_edges(lane);
            let [x0, x1] = zone_span(camera, lane);
            let ground = vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
            let yc = LANES[lane].y;
            let (from, to) = if LANES[lane].dir > 0.0 { (x0 + 1.0, x1 - 1.0) } else { (x1 - 1.0, x0 + 1.0) };
            LayoutZone {
                name: LANES[lane].name.to_string(),
                image: ground.iter().map(|&g| img(g)).collect(),
                ground,
                direction: Some([img([from, yc]), img([to, yc])]),
                no_stopping: true,
            }
        })
        .collect();
    RoadLayout { image_size: camera.image_size, calibration, lines, zones, ground_to_image: h }
}

/// Crossings of each lane's line by the vehicles of that lane (by bisection on the motion),
/// within the clip; no stops, wrong-way drivers or queues (constant speeds of 30 km/h and more,
/// every vehicle in its lane's direction).
fn derive_truth(drives: &[FarDrive], vehicles: Vec<VehicleTruth>, frames: usize) -> TrafficTruth {
    let fps = TRAFFIC_FPS;
    let end = frames.saturating_sub(1) as f64 / fps;
    let mut crossings = Vec::new();
    for d in drives {
        let (a, b) = (d.t0.max(0.0), d.t1.min(end));
        if a >= b {
            continue;
        }
        let side = |t: f64| (d.ground(t)[0] - LINE_X) * d.heading();
        if side(a) < 0.0 && side(b) > 0.0 {
            let t = first_true(a, b, |t| side(t) > 0.0);
            let direction = if d.heading() > 0.0 { "in" } else { "out" };
            crossings.push(TruthCrossing { line: LANES[d.lane].name.to_string(), vehicle: d.id, t_s: t, direction });
        }
    }
    crossings.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    TrafficTruth { fps, frames, vehicles, crossings, stops: Vec::new(), wrong_way: Vec::new(), congestion: Vec::new() }
}

// ---------------------------------------------------------------------------------------------
// Truth tables

/// `HH:MM:SS` of whole seconds.
fn hms(s: u64) -> String {
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `HH:MM:SS.s` of `t` seconds, rounded to the tenth.
fn hms_tenths(t: f64) -> String {
    let tenths = (t * 10.0).round().max(0.0) as u64;
    format!("{}.{}", hms(tenths / 10), tenths % 10)
}

/// The true counts as a table: `start,end,line,direction,class,count`, one row per interval of
/// `interval_s` seconds from the start of the recording, per line (in the layout's order), per
/// direction (`in`, then `out`), class `*` (every vehicle); rows of 0 included. Times are offsets
/// from the start (`HH:MM:SS`); the last interval ends with the recording (its length rounded up
/// to the second). A crossing at exactly an interval's end counts in the next one.
pub fn counts_csv(clip: &TrafficFootage, interval_s: u32) -> String {
    let interval = u64::from(interval_s.max(1));
    let f = &clip.footage;
    let length = (f.frames as f64 / f.fps).ceil() as u64;
    let mut out = String::from("start,end,line,direction,class,count\n");
    let mut start = 0u64;
    while start < length.max(1) {
        let end = (start + interval).min(length.max(1));
        for line in &clip.layout.lines {
            for direction in ["in", "out"] {
                let count = clip
                    .truth
                    .crossings
                    .iter()
                    .filter(|c| c.line == line.name && c.direction == direction)
                    .filter(|c| c.t_s >= start as f64 && (c.t_s < end as f64 || end == length.max(1)))
                    .count();
                out.push_str(&format!("{},{},{},{direction},*,{count}\n", hms(start), hms(end), line.name));
            }
        }
        start = end;
    }
    out
}

/// The true passes as a table: `time,line,direction,speed_kmh`, one row per crossing of a line in
/// time order, the time an offset from the start of the recording (`HH:MM:SS.s`), the
/// vehicle's true speed at the crossing (km/h, one decimal).
pub fn passes_csv(clip: &TrafficFootage) -> String {
    let mut out = String::from("time,line,direction,speed_kmh\n");
    for c in &clip.truth.crossings {
        let speed = clip.truth.vehicles.iter().find(|v| v.id == c.vehicle).and_then(|v| v.speed_at(c.t_s));
        let speed = speed.map_or(String::new(), |s| format!("{s:.1}"));
        out.push_str(&format!("{},{},{},{speed}\n", hms_tenths(c.t_s), c.line, c.direction));
    }
    out
}

/// Writes `<stem>.counts.csv` (intervals of `interval_s`) and `<stem>.passes.csv` into `dir`.
pub fn write_truth(clip: &TrafficFootage, dir: &Path, stem: &str, interval_s: u32) -> Result<(), FootageError> {
    for (suffix, text) in [("counts.csv", counts_csv(clip, interval_s)), ("passes.csv", passes_csv(clip))] {
        let path = dir.join(format!("{stem}.{suffix}"));
        std::fs::write(&path, text)
            .map_err(|source| FootageError::Write { path: path.display().to_string(), source })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The clips

/// Seeds of the clips' traffic (the same for every condition and size: the same traffic).
const FAR_LANES_SEED: u64 = 0x4641_524c_414e_4553;
const LONG_RUN_SEED: u64 = 0x004c_4f4e_4752_554e;

/// The pictures the clips are made of, at one picture size.
#[derive(Debug, Clone)]
pub struct FarSet {
    pictures: FarPictures,
    camera: Camera,
}

impl FarSet {
    /// The pictures from the library (street, pickup, saloon, van) at `size` (16:9).
    pub fn new(library: &Library, size: (u32, u32)) -> Self {
        Self::from_pictures(&library.background, &library.pickup, &library.car_rear, &library.van, size)
    }

    fn from_pictures(
        street: &RgbImage,
        pickup: &RgbImage,
        saloon: &RgbImage,
        van: &RgbImage,
        size: (u32, u32),
    ) -> Self {
        let camera = camera(size);
        Self { pictures: FarPictures::new(street, pickup, saloon, van, &camera), camera }
    }

    /// "far-lanes-<condition>": ~75 s of mixed traffic on all four lanes, vehicles side by side.
    pub fn far_lanes(&self, condition: Condition) -> FarClip {
        let mut s = Schedule::new(self.camera);
        let mut rng = Rng::new(FAR_LANES_SEED);
        far_lanes_plan(&mut s, &mut rng);
        let gone = s.drives.iter().map(|d| d.t1).fold(0.0, f64::max);
        let frames = (gone * TRAFFIC_FPS).ceil() as usize + 5;
        let name = match condition {
            Condition::Clear => "far-lanes-clear",
            Condition::Dusk => "far-lanes-dusk",
            Condition::Rain => "far-lanes-rain",
            Condition::Compressed => "far-lanes-qp42",
            Condition::Shake => "far-lanes-shake",
        };
        FarClip::finish(name, s, &self.pictures, frames, condition, FAR_LANES_SEED)
    }

    /// "long-run": ten minutes ([`LONG_RUN_FRAMES`]) of random traffic on all four lanes, clear.
    pub fn long_run(&self) -> FarClip {
        let mut s = Schedule::new(self.camera);
        let mut rng = Rng::new(LONG_RUN_SEED);
        long_run_plan(&mut s, &mut rng, LONG_RUN_FRAMES as f64 / TRAFFIC_FPS);
        FarClip::finish("long-run", s, &self.pictures, LONG_RUN_FRAMES, Condition::Clear, LONG_RUN_SEED)
    }

    /// Every clip: "far-lanes" under each condition, then "long-run".
    pub fn all(&self) -> Vec<FarClip> {
        let mut v: Vec<FarClip> = Condition::ALL.iter().map(|&c| self.far_lanes(c)).collect();
        v.push(self.long_run());
        v
    }

    /// The clip called `name`.
    pub fn by_name(&self, name: &str) -> Option<FarClip> {
        if name == "long-run" {
            return Some(self.long_run());
        }
        Condition::ALL.iter().find(|c| format!("far-lanes-{}", c.name()) == name).map(|&c| self.far_lanes(c))
    }

    /// The names of every clip, in the order of [`FarSet::all`].
    pub fn names() -> Vec<String> {
        let mut v: Vec<String> = Condition::ALL.iter().map(|c| format!("far-lanes-{}", c.name())).collect();
        v.push("long-run".to_string());
        v
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// The pictures as plain pictures of the real ones' sizes (no media needed: the truth does
    /// not depend on the pixels), at both sizes.
    fn set(size: (u32, u32)) -> &'static FarSet {
        static SETS: OnceLock<Vec<FarSet>> = OnceLock::new();
        let sets = SETS.get_or_init(|| {
            let street = RgbImage::from_fn(768, 576, |x, y| Rgb([90, (120 + (x + y) % 40) as u8, 80]));
            let pickup =
                RgbImage::from_fn(230, 92, |x, _| if x % 50 < 5 { Rgb([20, 20, 20]) } else { Rgb([240, 240, 240]) });
            let saloon = RgbImage::from_pixel(596, 438, Rgb([200, 40, 40]));
            let van = RgbImage::from_pixel(75, 60, Rgb([230, 230, 235]));
            SIZES.iter().map(|&s| FarSet::from_pictures(&street, &pickup, &saloon, &van, s)).collect()
        });
        sets.iter().find(|s| s.camera.image_size == size).expect("size")
    }

    fn far_lanes(size: (u32, u32)) -> &'static [FarClip] {
        static CLIPS: OnceLock<Vec<Vec<FarClip>>> = OnceLock::new();
        let all = CLIPS.get_or_init(|| {
            SIZES.iter().map(|&s| Condition::ALL.iter().map(|&c| set(s).far_lanes(c)).collect()).collect()
        });
        &all[SIZES.iter().position(|&s| s == size).expect("size")]
    }

    fn long_run() -> &'static FarClip {
        static LONG: OnceLock<FarClip> = OnceLock::new();
        LONG.get_or_init(|| set(SIZES[0]).long_run())
    }

    fn frame_of(t: f64) -> usize {
        (t * TRAFFIC_FPS).round() as usize
    }

    fn whole(b: &TruthBox, size: (u32, u32)) -> bool {
        b.bbox[0] > 0.0 && b.bbox[1] > 0.0 && b.bbox[2] < size.0 as f32 && b.bbox[3] < size.1 as f32
    }

    fn bottom_centre(b: &TruthBox) -> [f64; 2] {
        [(b.bbox[0] as f64 + b.bbox[2] as f64) / 2.0, b.bbox[3] as f64]
    }

    fn dist(a: [f64; 2], b: [f64; 2]) -> f64 {
        ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
    }

    fn lane_of(c: &FarClip, id: u64) -> &str {
        &c.traffic.truth.vehicles.iter().find(|v| v.id == id).expect("vehicle").lane
    }

    #[test]
    fn far_lanes_and_long_run_have_the_promised_shape() {
        for size in SIZES {
            let clips = far_lanes(size);
            let names: Vec<&str> = clips.iter().map(|c| c.name()).collect();
            assert_eq!(
                names,
                ["far-lanes-clear", "far-lanes-dusk", "far-lanes-rain", "far-lanes-qp42", "far-lanes-shake"]
            );
            for c in clips {
                let secs = c.frames() as f64 / TRAFFIC_FPS;
                assert!((60.0..=90.0).contains(&secs), "{}: {secs} s", c.name());
                assert_eq!(c.traffic.footage.size(), size);
                assert_eq!(c.traffic.layout.image_size, size);
                assert_eq!(c.qp, if c.condition == Condition::Compressed { 42 } else { 26 });
                // The same traffic under every condition.
                assert_eq!(c.traffic.truth, clips[0].traffic.truth);
            }
            let c = &clips[0];
            // Every lane carries traffic, and every vehicle a known constant speed of 30-100 km/h.
            for lane in LANES {
                let n = c.traffic.truth.crossings.iter().filter(|x| x.line == lane.name).count();
                assert!(n >= 4, "{}: {n} crossings", lane.name);
            }
            for v in &c.traffic.truth.vehicles {
                let s = v.speed_kmh[0];
                assert!((30.0..=100.0).contains(&s) && v.speed_kmh.iter().all(|&k| k == s), "{}", v.id);
                if v.lane.starts_with("wb") {
                    assert_eq!(v.label, "car", "no trucks in the far carriageway");
                }
            }
            // Several kinds and paints.
            let kinds: std::collections::BTreeSet<&str> =
                c.traffic.footage.actors.iter().map(|a| a.sprite.label).collect();
            assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["car", "truck"]);
            let paints: std::collections::BTreeSet<usize> = c.drives.iter().map(|d| d.paint).collect();
            assert!(paints.len() >= 5, "{paints:?}");
            // Vehicles side by side in adjacent lanes: boxes of the two lanes of a direction
            // overlapping on the picture in the same frame.
            let side_by_side = (0..c.frames())
                .filter(|&i| {
                    let b = c.truth(i);
                    b.iter().any(|p| {
                        b.iter().any(|q| {
                            let (lp, lq) = (lane_of(c, p.id), lane_of(c, q.id));
                            lp != lq && lp[..2] == lq[..2] && (p.bbox[0].max(q.bbox[0]) < p.bbox[2].min(q.bbox[2]))
                        })
                    })
                })
                .count();
            assert!(side_by_side >= 100, "{side_by_side} frames with vehicles side by side");
        }
    }

    #[test]
    fn lanes_lines_and_zones_cover_one_lane_each() {
        for size in SIZES {
            let l = &far_lanes(size)[0].traffic.layout;
            let h = camera(size).homography();
            assert_eq!(l.ground_to_image, h);
            let names: Vec<&str> = l.lines.iter().map(|x| x.name.as_str()).collect();
            assert_eq!(names, ["wb-far", "wb-near", "eb-far", "eb-near"]);
            assert_eq!(l.zones.iter().map(|z| z.name.as_str()).collect::<Vec<_>>(), names);
            assert!(l.calibration.len() >= 6);
            let (w, hh) = (size.0 as f64, size.1 as f64);
            for (img, g) in &l.calibration {
                let p = apply_homography(&h, *g).expect("in front");
                assert!(dist(p, *img) <= 0.08, "{g:?}");
                assert!(img[0] > 0.0 && img[0] < w && img[1] > 0.0 && img[1] < hh, "{img:?} off the picture");
            }
            for (k, line) in l.lines.iter().enumerate() {
                let (y0, y1) = lane_edges(k);
                assert_eq!(line.image.len(), 2);
                // Across its own lane only.
                for g in &line.ground {
                    assert!(g[1] > y0 && g[1] < y1 && g[0] == LINE_X, "{}: {g:?}", line.name);
                }
                for (i, g) in line.image.iter().zip(&line.ground) {
                    assert!(dist(apply_homography(&h, *g).expect("in front"), *i) <= 0.08);
                }
                // "in" is the side a point east of the line is on.
                let east = apply_homography(&h, [LINE_X + 2.0, LANES[k].y]).expect("east");
                let side = cross2(sub2(line.image[1], line.image[0]), sub2(east, line.image[0]));
                assert_eq!(line.in_side, if side < 0.0 { "left" } else { "right" });
                let zone = &l.zones[k];
                assert!(zone.no_stopping);
                assert!(zone.ground.iter().all(|g| g[1] == y0 || g[1] == y1));
                assert!(zone.ground[1][0] - zone.ground[0][0] >= 30.0, "{}: {:?}", zone.name, zone.ground);
                for p in &zone.image {
                    assert!(p[0] >= 0.0 && p[0] <= w && p[1] >= 0.0 && p[1] <= hh, "{p:?}");
                }
                // The arrow points along the lane's direction of travel on the ground.
                let [from, to] = zone.direction.expect("arrow");
                let inv = invert(&h).expect("invertible");
                let (gf, gt) = (apply_homography(&inv, from).expect("f"), apply_homography(&inv, to).expect("t"));
                assert!((gt[0] - gf[0]) * LANES[k].dir > 20.0, "{}", zone.name);
            }
            // The scene config of the clip validates in the agent.
            let scene = crate::accuracy::scene_config(&far_lanes(size)[0].traffic);
            let mut e = its_shared::config::ConfigErrors::new("test");
            let spec = scene.validate("scene", &[], &mut e);
            assert!(spec.is_some(), "{e:?}");
        }
    }

    #[test]
    fn far_lane_vehicles_are_50_to_160_px_wide_and_near_ones_larger() {
        for size in SIZES {
            let c = &far_lanes(size)[0];
            let mut widths: std::collections::BTreeMap<&str, Vec<f32>> = Default::default();
            for i in 0..c.frames() {
                for b in c.truth(i) {
                    if whole(&b, size) {
                        widths.entry(lane_of(c, b.id)).or_default().push(b.bbox[2] - b.bbox[0]);
                    }
                }
            }
            let range = |lane: &str| {
                let w = &widths[lane];
                (w.iter().copied().fold(f32::MAX, f32::min), w.iter().copied().fold(0.0, f32::max))
            };
            let (lo, hi) = range("wb-far");
            assert!(lo >= 50.0 && hi <= 160.0, "{size:?}: wb-far {lo}..{hi}");
            let mean = |lane: &str| widths[lane].iter().sum::<f32>() / widths[lane].len() as f32;
            assert!(mean("eb-near") > 1.2 * mean("wb-far"), "{size:?}");
            let (near_lo, near_hi) = range("eb-near");
            assert!(near_lo > lo && near_hi > hi, "{size:?}: eb-near {near_lo}..{near_hi}");
        }
    }

    #[test]
    fn truth_boxes_stand_on_their_ground_paths() {
        for size in SIZES {
            let h = camera(size).homography();
            for c in far_lanes(size).iter().filter(|c| matches!(c.condition, Condition::Clear | Condition::Shake)) {
                let mut shaken = 0;
                for i in 0..c.frames() {
                    let boxes = c.truth(i);
                    let [dx, dy] = c.shake[i];
                    if (dx, dy) != (0, 0) {
                        shaken += 1;
                    }
                    for v in &c.traffic.truth.vehicles {
                        let at = v.path.iter().find(|(t, _)| frame_of(*t) == i);
                        let b = boxes.iter().find(|b| b.id == v.id);
                        if c.condition == Condition::Clear {
                            assert_eq!(at.is_some(), b.is_some(), "{} frame {i}: vehicle {}", c.name(), v.id);
                        }
                        let (Some(&(_, g)), Some(b)) = (at, b) else { continue };
                        if whole(b, size) {
                            let p = apply_homography(&h, g).expect("in front");
                            let want = [p[0] + dx as f64, p[1] + dy as f64];
                            let got = bottom_centre(b);
                            assert!(dist(want, got) <= 1.0, "{} frame {i}: {} {got:?} vs {want:?}", c.name(), v.id);
                        }
                    }
                }
                if c.condition == Condition::Shake {
                    assert!(shaken > c.frames() / 2, "{shaken} of {} frames shaken", c.frames());
                    let max = c.shake.iter().flat_map(|s| s.iter().map(|v| v.abs())).max().unwrap_or(0);
                    assert!((2..=4).contains(&max), "shake up to {max} px");
                    // Smooth: at most 2 px from one frame to the next.
                    assert!(
                        c.shake.windows(2).all(|w| (w[1][0] - w[0][0]).abs() <= 2 && (w[1][1] - w[0][1]).abs() <= 2)
                    );
                }
            }
        }
    }

    #[test]
    fn crossings_agree_with_the_paths_and_headways_are_kept() {
        let size = SIZES[0];
        for c in [&far_lanes(size)[0], long_run()] {
            let truth = &c.traffic.truth;
            for v in &truth.vehicles {
                let lane = LANES.iter().find(|l| l.name == v.lane).expect("lane");
                let sides: Vec<(f64, bool)> = v.path.iter().map(|&(t, g)| (t, g[0] > LINE_X)).collect();
                let flips: Vec<(f64, f64)> =
                    sides.windows(2).filter(|w| w[0].1 != w[1].1).map(|w| (w[0].0, w[1].0)).collect();
                let mine: Vec<&TruthCrossing> = truth.crossings.iter().filter(|x| x.vehicle == v.id).collect();
                assert_eq!(flips.len(), mine.len(), "{} vehicle {}", c.name(), v.id);
                for ((t0, t1), x) in flips.iter().zip(&mine) {
                    assert_eq!(x.line, v.lane, "only its own lane's line");
                    assert!(*t0 < x.t_s && x.t_s <= *t1 + 1e-6, "{}: {} not in {t0}..{t1}", v.id, x.t_s);
                    assert_eq!(x.direction, if lane.dir > 0.0 { "in" } else { "out" });
                    // The box after the crossing is on the line's "in" side iff "in".
                    let after = v.path.iter().find(|(t, _)| *t >= x.t_s + 0.05).expect("seen after");
                    let b = c.truth(frame_of(after.0)).into_iter().find(|b| b.id == v.id).expect("box");
                    let line = c.traffic.layout.lines.iter().find(|l| l.name == x.line).expect("line");
                    let (a, bb) = (line.image[0], line.image[1]);
                    let side = if cross2(sub2(bb, a), sub2(bottom_centre(&b), a)) < 0.0 { "left" } else { "right" };
                    assert_eq!(side == line.in_side, x.direction == "in");
                }
                for k in 1..v.path.len() {
                    let ((ta, ga), (tb, gb)) = (v.path[k - 1], v.path[k]);
                    let measured = dist(ga, gb) / (tb - ta) * 3.6;
                    assert!((measured - v.speed_kmh[k]).abs() < 0.01, "{}", v.id);
                }
            }
            assert!(truth.crossings.windows(2).all(|w| w[0].t_s <= w[1].t_s));
            // Within a lane no vehicle comes closer than the headway to the one ahead.
            for lane in 0..LANES.len() {
                let mine: Vec<&FarDrive> = c.drives.iter().filter(|d| d.lane == lane).collect();
                for w in mine.windows(2) {
                    for x in [-40.0, -20.0, LINE_X, 0.0, 15.0] {
                        let gap = w[1].time_at(x) - w[0].time_at(x);
                        assert!(gap >= MIN_HEADWAY_S - 1e-9, "{} lane {lane}: {gap} s at {x}", c.name());
                    }
                }
            }
            assert!(truth.stops.is_empty() && truth.wrong_way.is_empty() && truth.congestion.is_empty());
        }
    }

    #[test]
    fn the_long_run_is_ten_minutes_of_traffic_on_every_lane() {
        let c = long_run();
        assert_eq!(c.name(), "long-run");
        assert!(c.frames() >= 6000);
        assert_eq!(c.condition, Condition::Clear);
        let truth = &c.traffic.truth;
        for lane in LANES {
            let times: Vec<f64> = truth.crossings.iter().filter(|x| x.line == lane.name).map(|x| x.t_s).collect();
            assert!(times.len() >= 50, "{}: {}", lane.name, times.len());
            // Spread over the whole run: some in the first and in the last minute.
            assert!(times[0] < 60.0 && times[times.len() - 1] > 540.0, "{}", lane.name);
        }
        let speeds: Vec<f64> = truth.vehicles.iter().map(|v| v.speed_kmh[0]).collect();
        assert!(speeds.iter().all(|s| (30.0..=100.0).contains(s)));
        assert!(speeds.iter().any(|&s| s < 40.0) && speeds.iter().any(|&s| s > 90.0));
        // Deterministic.
        assert_eq!(set(SIZES[0]).long_run().traffic.truth, *truth);
        // Whole far-lane vehicles are within the size bar here too.
        for i in (0..c.frames()).step_by(7) {
            for b in c.truth(i) {
                if lane_of(c, b.id) == "wb-far" && whole(&b, c.size()) {
                    let w = b.bbox[2] - b.bbox[0];
                    assert!((50.0..=160.0).contains(&w), "frame {i}: {w}");
                }
            }
        }
    }

    #[test]
    fn truth_tables_add_up_to_the_crossings() {
        for c in [&far_lanes(SIZES[1])[0], long_run()] {
            let truth = &c.traffic.truth;
            for interval in [60, 300, 900] {
                let csv = counts_csv(&c.traffic, interval);
                let mut rows = csv.lines();
                assert_eq!(rows.next(), Some("start,end,line,direction,class,count"));
                let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
                let length = (c.frames() as f64 / TRAFFIC_FPS).ceil() as u32;
                let intervals = length.div_ceil(interval) as usize;
                assert_eq!(rows.len(), intervals * 4 * 2, "{} every {interval} s", c.name());
                let total: usize = rows.iter().map(|r| r[5].parse::<usize>().expect("count")).sum();
                assert_eq!(total, truth.crossings.len(), "{} every {interval} s", c.name());
                assert!(rows.iter().all(|r| r.len() == 6 && r[4] == "*" && (r[3] == "in" || r[3] == "out")));
                assert_eq!(rows[0][0], "00:00:00");
                assert_eq!(rows[0][1], hms(u64::from(interval.min(length))));
                // Per line and direction too.
                for line in &c.traffic.layout.lines {
                    for dir in ["in", "out"] {
                        let want = truth.crossings.iter().filter(|x| x.line == line.name && x.direction == dir).count();
                        let got: usize = rows
                            .iter()
                            .filter(|r| r[2] == line.name && r[3] == dir)
                            .map(|r| r[5].parse::<usize>().expect("count"))
                            .sum();
                        assert_eq!(got, want, "{} {}", line.name, dir);
                    }
                }
            }
            let passes = passes_csv(&c.traffic);
            let mut rows = passes.lines();
            assert_eq!(rows.next(), Some("time,line,direction,speed_kmh"));
            let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
            assert_eq!(rows.len(), truth.crossings.len());
            for (r, x) in rows.iter().zip(&truth.crossings) {
                assert_eq!(r[0], hms_tenths(x.t_s));
                assert_eq!((r[1], r[2]), (x.line.as_str(), x.direction));
                let v = truth.vehicles.iter().find(|v| v.id == x.vehicle).expect("vehicle");
                assert_eq!(r[3], format!("{:.1}", v.speed_kmh[0]));
            }
        }
        assert_eq!(hms_tenths(3725.25), "01:02:05.3");
        assert_eq!(hms_tenths(59.96), "00:01:00.0");
    }

    #[test]
    fn the_scene_toml_reads_back_as_the_scene() {
        let c = &far_lanes(SIZES[0])[0];
        let scene = crate::accuracy::scene_config(&c.traffic);
        let text = format!("[[cameras]]\nid = \"far\"\nurl = \"far.264\"\n{}", crate::accuracy::scene_toml(&scene));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        let cfg = its_agent::config::RawConfig::load(Some(&path), Vec::new()).expect("parses");
        assert_eq!(cfg.cameras.len(), 1);
        assert_eq!(cfg.cameras[0].scene, scene);
    }

    #[test]
    fn conditions_are_deterministic_and_change_the_picture() {
        let size = SIZES[1];
        let clips = far_lanes(size);
        // A frame with several vehicles in it (counted from their paths: cheap).
        let fps = clips[0].traffic.footage.fps;
        let on_screen = |c: &FarClip, i: usize| {
            let t = i as f64 / fps;
            c.traffic.truth.vehicles.iter().filter(|v| v.path.iter().any(|(tp, _)| (tp - t).abs() < 1e-6)).count()
        };
        let i = (0..clips[0].frames()).max_by_key(|&i| on_screen(&clips[0], i)).expect("frames");
        assert!(on_screen(&clips[0], i) >= 3);
        let clear = clips[0].render(i);
        assert_ne!(clear, clips[0].traffic.footage.background, "vehicles are drawn");
        let diff = |a: &RgbImage, b: &RgbImage| {
            a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>()
                / a.as_raw().len() as f64
        };
        for c in clips {
            let a = c.render(i);
            assert_eq!(a, c.render(i), "{}: same frame, same pixels", c.name());
            assert_eq!(a.dimensions(), size);
            let d = diff(&a, &clear);
            match c.condition {
                Condition::Clear | Condition::Compressed => assert_eq!(d, 0.0, "{}", c.name()),
                // (the shift is checked below, on a frame that is shaken)
                Condition::Shake => {}
                _ => assert!(d > 1.0, "{}: mean change {d}", c.name()),
            }
        }
        let mean =
            |img: &RgbImage, k: usize| img.pixels().map(|p| p.0[k] as f64).sum::<f64>() / (size.0 * size.1) as f64;
        // Dusk: darker, bluer; lights brighter than anything around them.
        let dark = clips[1].render(i);
        assert!(mean(&dark, 1) < 0.6 * mean(&clear, 1));
        assert!(mean(&dark, 2) > mean(&dark, 0));
        let bright = dark.pixels().filter(|p| p.0[0] > 200 && p.0[1] > 200).count();
        let red = dark.pixels().filter(|p| p.0[0] > 150 && p.0[1] < 90).count();
        assert!(bright >= 10 && red >= 5, "{bright} headlight and {red} tail-light pixels");
        let mut dark_base = clear.clone();
        dusk(&mut dark_base);
        assert!(dark_base.pixels().filter(|p| p.0[0] > 200 && p.0[1] > 200).count() < bright);
        // Rain differs from frame to frame, the background too.
        let rain = &clips[2];
        assert_ne!(rain.render(i), rain.render(i + 1));
        let j = (0..rain.frames()).find(|&j| on_screen(rain, j) == 0).unwrap_or(0);
        assert!(diff(&rain.render(j), &rain.traffic.footage.render(j)) > 1.0);
        // Shake moves the whole picture by its offset.
        let s = &clips[4];
        let k = (0..s.frames()).find(|&k| s.shake[k][0].abs() >= 2).expect("a shaken frame");
        let [dx, dy] = s.shake[k];
        let shaken = s.render(k);
        let bg = &s.traffic.footage.background;
        let (x, y) = (size.0 / 2, 20);
        assert_eq!(shaken.get_pixel(x, y), bg.get_pixel((x as i32 - dx) as u32, (y as i32 - dy) as u32));
    }

    #[test]
    fn paints_recolour_the_body_and_keep_the_dark_parts() {
        let mut img = RgbImage::from_pixel(4, 1, Rgb([235, 235, 235]));
        img.put_pixel(0, 0, Rgb([20, 22, 25]));
        let red = repaint(&img, [175, 30, 35]);
        assert_eq!(red.get_pixel(0, 0), img.get_pixel(0, 0), "dark pixels stay");
        let p = red.get_pixel(2, 0).0;
        assert!(p[0] > 150 && p[1] < 60 && p[2] < 60, "{p:?}");
        let p = set(SIZES[0]).pictures.sprite(FarKind::Pickup, 2, 1.0);
        let q = set(SIZES[0]).pictures.sprite(FarKind::Pickup, 0, 1.0);
        assert_ne!(p.image, q.image);
        assert_eq!(p.alpha, q.alpha);
    }
}
