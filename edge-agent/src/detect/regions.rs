//! Where in a camera's picture to run the detector, and how the boxes of several regions become
//! one set.
//!
//! A detector sees its input at a fixed size (300 x 300 for the shipped SSD): a 1280 x 720 frame
//! squeezed into it shrinks a 150 px vehicle to 35 px, too small to be found. So, per camera, the
//! detector runs on **tiles**: rectangles of the frame read at their own resolution.
//!
//! - [`RegionMode::Full`]: the whole frame, one inference (a camera without a scene).
//! - [`RegionMode::Fixed`]: rectangles the operator drew.
//! - [`RegionMode::Auto`]: tiles planned from the camera's scene ([`RoadModel`]: its zones and
//!   lines are where the road is; its calibration says how large a vehicle is at each point of
//!   the picture). Far away, where vehicles are small, tiles are small (read at full resolution,
//!   or enlarged); near the camera they are large. Every point of the road is covered by a tile
//!   that holds a whole vehicle standing there at at least [`DetectionSpec::min_vehicle_px`] of
//!   the model's input ([`plan_tiles`]), so neighbouring tiles overlap by about a vehicle.
//!
//! Cost: with [`DetectionSpec::motion`], a tile is only run when something moved in it since the
//! last detected frame, or a track is in it, and all tiles every [`DetectionSpec::refresh_s`]
//! ([`MotionGate`]), the way a person watching a wall of monitors looks where things happen.
//!
//! Seams: a vehicle across a tile's inner edge is seen cut in that tile and whole in its
//! neighbour; [`merge_tiles`] keeps the whole box (or joins two cut halves) and drops boxes of one
//! vehicle found in two overlapping tiles, so nothing is counted twice.

use std::sync::Arc;

use its_shared::geometry::{Calibration, Point, polygon_contains};

use crate::decode::Frame;
use crate::detect::Detection;
use crate::detect::preprocess::Rect;

/// Length and width (metres) of the vehicle the tiles are sized for: a small car, the smallest
/// vehicle that must be counted on every lane.
pub const REFERENCE_VEHICLE_M: [f64; 2] = [4.2, 1.7];

/// The road as the camera's scene describes it, in the scene's picture coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct RoadModel {
    /// Size of the picture the coordinates refer to; `None`: the frame's own.
    pub image_size: Option<(u32, u32)>,
    /// Polygons of the road (the scene's zones), each with its direction of travel as an arrow
    /// in the picture, when known.
    pub areas: Vec<(Vec<Point>, Option<[Point; 2]>)>,
    /// Polylines on the road (the scene's count lines).
    pub lines: Vec<Vec<Point>>,
    pub calibration: Option<Calibration>,
}

impl RoadModel {
    pub fn is_empty(&self) -> bool {
        self.areas.is_empty() && self.lines.is_empty()
    }
}

/// Which parts of the picture the detector runs on.
#[derive(Debug, Clone, PartialEq)]
pub enum RegionMode {
    /// The whole frame.
    Full,
    /// Tiles over the road of the camera's scene (see [`plan_tiles`]).
    Auto(Arc<RoadModel>),
    /// These rectangles, in the pixels of `image_size` (the frame's own when `None`).
    Fixed { image_size: Option<(u32, u32)>, rects: Vec<Rect> },
}

/// How a camera's frames are detected: where, and how cheaply.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionSpec {
    pub mode: RegionMode,
    /// Width of the reference vehicle in the model's input, at the far end of the road (pixels):
    /// tiles are sized so that no vehicle on the road appears smaller.
    pub min_vehicle_px: f32,
    /// Most tiles a frame may have; a plan needing more is made with smaller vehicles.
    pub max_tiles: usize,
    /// Run a tile only when something moved in it or a track is in it.
    pub motion: bool,
    /// ...and every tile at least this often (seconds of stream time).
    pub refresh_s: f64,
}

impl Default for DetectionSpec {
    fn default() -> Self {
        Self { mode: RegionMode::Full, min_vehicle_px: 64.0, max_tiles: 8, motion: true, refresh_s: 1.0 }
    }
}

impl DetectionSpec {
    /// The whole frame, every frame: what a camera without a scene gets.
    pub fn full() -> Self {
        Self { mode: RegionMode::Full, motion: false, ..Self::default() }
    }
}

/// One tile of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tile {
    pub rect: Rect,
    /// Edges (left, top, right, bottom) inside the frame: a box touching one may be a cut vehicle.
    pub inner: [bool; 4],
}

/// The tiles of one frame size.
#[derive(Debug, Clone, PartialEq)]
pub struct TilePlan {
    pub frame: (u32, u32),
    pub tiles: Vec<Tile>,
    /// The reference vehicle's width in the model's input that the plan achieves everywhere on
    /// the road (`None` without a calibration: tiles of a fixed size).
    pub vehicle_px: Option<f32>,
}

impl TilePlan {
    fn of_rects(frame: (u32, u32), rects: impl IntoIterator<Item = Rect>, vehicle_px: Option<f32>) -> Self {
        let (w, h) = frame;
        let tiles = rects
            .into_iter()
            .filter_map(|r| r.fitted(w, h))
            .map(|r| Tile { rect: r, inner: [r.x > 0, r.y > 0, r.right() < w, r.bottom() < h] })
            .collect::<Vec<_>>();
        let tiles = if tiles.is_empty() { vec![Tile { rect: Rect::full(w, h), inner: [false; 4] }] } else { tiles };
        Self { frame, tiles, vehicle_px }
    }
}

/// The model's input, as far as tiles are concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInput {
    pub width: u32,
    pub height: u32,
    /// The model stretches its input (aspect ratio not kept, as SSDs are trained): tiles may then
    /// be up to 4:3 wider than the input, as most of its training pictures were, which fits
    /// roads running across the picture with fewer tiles.
    pub stretch: bool,
}

impl ModelInput {
    /// The input of a model's manifest.
    pub fn of(spec: &crate::detect::manifest::InputSpec) -> Self {
        let stretch = spec.resize == crate::detect::manifest::ResizeMode::Stretch;
        Self { width: spec.width, height: spec.height, stretch }
    }

    fn dims(&self) -> (f64, f64) {
        (self.width.max(1) as f64, self.height.max(1) as f64)
    }

    /// Tile height over tile width.
    fn tile_aspect(&self) -> f64 {
        let (iw, ih) = self.dims();
        if self.stretch { ih / iw * 0.75 } else { ih / iw }
    }
}

/// The tiles for a `frame`-sized picture and a model with `input`.
pub fn plan_tiles(spec: &DetectionSpec, frame: (u32, u32), input: ModelInput) -> TilePlan {
    match &spec.mode {
        RegionMode::Full => TilePlan::of_rects(frame, [Rect::full(frame.0, frame.1)], None),
        RegionMode::Fixed { image_size, rects } => {
            let (fx, fy) = scale_of(*image_size, frame);
            let scaled = rects.iter().map(|r| {
                let x = (r.x as f64 * fx).round() as u32;
                let y = (r.y as f64 * fy).round() as u32;
                Rect::new(x, y, (r.width as f64 * fx).round() as u32, (r.height as f64 * fy).round() as u32)
            });
            TilePlan::of_rects(frame, scaled, None)
        }
        RegionMode::Auto(road) if road.is_empty() => TilePlan::of_rects(frame, [Rect::full(frame.0, frame.1)], None),
        RegionMode::Auto(road) => plan_road(spec, road, frame, input),
    }
}

fn scale_of(image_size: Option<(u32, u32)>, frame: (u32, u32)) -> (f64, f64) {
    match image_size {
        Some((w, h)) if w > 0 && h > 0 => (frame.0 as f64 / w as f64, frame.1 as f64 / h as f64),
        _ => (1.0, 1.0),
    }
}

/// Step of the grid of road points the plan covers (frame pixels).
const GRID_PX: f64 = 8.0;

/// A point of the road and the width (pixels) of the reference vehicle standing there.
#[derive(Debug, Clone, Copy)]
struct RoadCell {
    p: Point,
    width: f64,
}

impl RoadCell {
    /// The box of the reference vehicle standing here (its bottom-centre on the point), with
    /// room for a taller one (a van, a bus seen from the front) above; the part of it inside the
    /// `frame` (a vehicle at the picture's edge is only seen in part anyway).
    fn vehicle_box(&self, frame: (u32, u32)) -> [f64; 4] {
        let w = self.width;
        let (fw, fh) = (frame.0 as f64, frame.1 as f64);
        [
            (self.p[0] - 0.6 * w).max(0.0),
            (self.p[1] - 1.1 * w).max(0.0),
            (self.p[0] + 0.6 * w).min(fw),
            (self.p[1] + 0.15 * w).min(fh),
        ]
    }
}

fn inside(b: [f64; 4], r: &Rect) -> bool {
    b[0] >= r.x as f64 && b[1] >= r.y as f64 && b[2] <= r.right() as f64 && b[3] <= r.bottom() as f64
}

/// Road points on a grid over the zones and along the lines, in frame pixels.
fn road_cells(road: &RoadModel, frame: (u32, u32)) -> Vec<(Point, Option<[Point; 2]>)> {
    let (fx, fy) = scale_of(road.image_size, frame);
    let to_frame = |p: Point| [p[0] * fx, p[1] * fy];
    let (w, h) = (frame.0 as f64, frame.1 as f64);
    let on_frame = |p: Point| p[0] >= 0.0 && p[1] >= 0.0 && p[0] < w && p[1] < h;
    let mut cells = Vec::new();
    for (poly, arrow) in &road.areas {
        let poly: Vec<Point> = poly.iter().map(|&p| to_frame(p)).collect();
        let arrow = arrow.map(|a| [to_frame(a[0]), to_frame(a[1])]);
        let (x0, x1) = poly.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p[0]), a.1.max(p[0])));
        let (y0, y1) = poly.iter().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p[1]), a.1.max(p[1])));
        let mut y = (y0 / GRID_PX).floor() * GRID_PX + GRID_PX / 2.0;
        while y <= y1 {
            let mut x = (x0 / GRID_PX).floor() * GRID_PX + GRID_PX / 2.0;
            while x <= x1 {
                if on_frame([x, y]) && polygon_contains(&poly, [x, y]) {
                    cells.push(([x, y], arrow));
                }
                x += GRID_PX;
            }
            y += GRID_PX;
        }
    }
    for line in &road.lines {
        for seg in line.windows(2) {
            let (a, b) = (to_frame(seg[0]), to_frame(seg[1]));
            let n = ((b[0] - a[0]).hypot(b[1] - a[1]) / GRID_PX).ceil().max(1.0) as usize;
            for k in 0..=n {
                let t = k as f64 / n as f64;
                let p = [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t];
                if on_frame(p) {
                    cells.push((p, None));
                }
            }
        }
    }
    cells
}

/// Width in frame pixels of the reference vehicle standing at frame point `p`, driving along
/// `arrow` (along the ground's `x` axis without one): the width of the box around the image of
/// its footprint.
fn vehicle_width(cal: &Calibration, p: Point, arrow: Option<[Point; 2]>, scale: (f64, f64)) -> Option<f64> {
    let (fx, fy) = scale;
    let scene = |q: Point| [q[0] / fx, q[1] / fy];
    let g = cal.to_ground(scene(p))?;
    let along = match arrow {
        Some([a, b]) => {
            let (ga, gb) = (cal.to_ground(scene(a))?, cal.to_ground(scene(b))?);
            let d = [gb[0] - ga[0], gb[1] - ga[1]];
            let n = d[0].hypot(d[1]);
            if n > 1e-9 { [d[0] / n, d[1] / n] } else { [1.0, 0.0] }
        }
        None => [1.0, 0.0],
    };
    let across = [-along[1], along[0]];
    let [l, w] = REFERENCE_VEHICLE_M;
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    for sl in [-0.5, 0.5] {
        for sw in [-0.5, 0.5] {
            let q = [g[0] + along[0] * l * sl + across[0] * w * sw, g[1] + along[1] * l * sl + across[1] * w * sw];
            let i = cal.to_image(q)?;
            x0 = x0.min(i[0] * fx);
            x1 = x1.max(i[0] * fx);
        }
    }
    let width = x1 - x0;
    (width.is_finite() && width > 0.5).then_some(width)
}

/// Tiles over the road: see the module documentation.
fn plan_road(spec: &DetectionSpec, road: &RoadModel, frame: (u32, u32), input: ModelInput) -> TilePlan {
    let (fw, fh) = frame;
    let scale = scale_of(road.image_size, frame);
    let points = road_cells(road, frame);
    if points.is_empty() {
        return TilePlan::of_rects(frame, [Rect::full(fw, fh)], None);
    }
    let Some(cal) = &road.calibration else {
        // No calibration, no vehicle sizes: squares of half the frame's height (at least the
        // model's input) over the road and a vehicle's height above it.
        return uniform_tiles(&points, frame, input);
    };
    let mut cells: Vec<RoadCell> = points
        .iter()
        .filter_map(|&(p, arrow)| vehicle_width(cal, p, arrow, scale).map(|width| RoadCell { p, width }))
        .collect();
    if cells.is_empty() {
        return uniform_tiles(&points, frame, input);
    }
    // Farthest (smallest) first.
    cells.sort_by(|a, b| a.width.total_cmp(&b.width));
    let mut target = spec.min_vehicle_px.max(8.0) as f64;
    loop {
        let rects = cover(&cells, frame, input, target);
        tracing::debug!(target_px = target, tiles = rects.len(), "detection tiles planned");
        if rects.len() <= spec.max_tiles.max(1) || target <= 16.0 {
            let achieved = target as f32;
            return TilePlan::of_rects(frame, rects, Some(achieved));
        }
        target *= 0.9;
    }
}

/// Greedy cover of the road cells (sorted farthest first) with tiles of [`ModelInput::tile_aspect`],
/// each as large as keeps the farthest uncovered vehicle at `target` px of the model's input.
fn cover(cells: &[RoadCell], frame: (u32, u32), input: ModelInput, target: f64) -> Vec<Rect> {
    let (fw, fh) = (frame.0 as f64, frame.1 as f64);
    let (iw, _) = input.dims();
    let aspect = input.tile_aspect();
    let mut covered = vec![false; cells.len()];
    let mut rects: Vec<Rect> = Vec::new();
    while let Some(c) = covered.iter().position(|&v| !v) {
        let cell = cells[c];
        // Never enlarge more than twice: a tile is at least half the model's input.
        let mut tw = (iw * cell.width / target).max(iw / 2.0).min(fw);
        let mut th = tw * aspect;
        if th > fh {
            th = fh;
            tw = (th / aspect).min(fw);
        }
        let b = cell.vehicle_box(frame);
        // Candidate placements: the vehicle at a corner, an edge's middle or the centre of the
        // tile, or the tile following an existing one (overlapping it by this vehicle). The one
        // holding the most road not yet covered wins; of equals, the one overlapping least.
        let reach = b[2] - b[0] + 4.0;
        let mut xs = vec![b[0] - 2.0, (b[0] + b[2] - tw) / 2.0, b[2] + 2.0 - tw];
        let mut ys = vec![b[1] - 2.0, (b[1] + b[3] - th) / 2.0, b[3] + 2.0 - th];
        for r in &rects {
            xs.extend([r.right() as f64 - reach, r.x as f64 + reach - tw]);
            ys.extend([r.bottom() as f64 - (b[3] - b[1] + 4.0), r.y as f64 + (b[3] - b[1] + 4.0) - th]);
        }
        let mut best: Option<(usize, f64, Rect)> = None;
        for &x in &xs {
            for &y in &ys {
                let x = x.clamp(0.0, (fw - tw).max(0.0));
                let y = y.clamp(0.0, (fh - th).max(0.0));
                let r = Rect::new(x.floor() as u32, y.floor() as u32, tw.ceil() as u32, th.ceil() as u32);
                let Some(r) = r.fitted(frame.0, frame.1) else { continue };
                // It must hold the vehicle it is made for (when a tile can).
                if !inside(b, &r) && tw < fw && th < fh {
                    continue;
                }
                let gain =
                    cells.iter().zip(&covered).filter(|(q, done)| !**done && inside(q.vehicle_box(frame), &r)).count();
                let overlap: f64 = rects.iter().map(|o| rect_overlap(o, &r)).sum();
                if best.is_none_or(|(g, o, _)| gain > g || (gain == g && overlap < o)) {
                    best = Some((gain, overlap, r));
                }
            }
        }
        let rect = best.map_or(Rect::full(frame.0, frame.1), |(_, _, r)| r);
        covered[c] = true;
        for (k, q) in cells.iter().enumerate() {
            if !covered[k] && inside(q.vehicle_box(frame), &rect) {
                covered[k] = true;
            }
        }
        // A vehicle too large for any tile: the largest tile there covers the road under it.
        if !inside(b, &rect) {
            for (k, q) in cells.iter().enumerate() {
                let p = q.p;
                if !covered[k] && inside([p[0], p[1], p[0], p[1]], &rect) && q.width >= cell.width {
                    covered[k] = true;
                }
            }
        }
        rects.push(rect);
    }
    rects
}

/// Area (pixels) two rectangles share.
fn rect_overlap(a: &Rect, b: &Rect) -> f64 {
    let w = (a.right().min(b.right()) as f64 - a.x.max(b.x) as f64).max(0.0);
    let h = (a.bottom().min(b.bottom()) as f64 - a.y.max(b.y) as f64).max(0.0);
    w * h
}

/// Squares of half the frame's height (at least the model's input size) along the road, with a
/// quarter of a tile of overlap, reaching half a tile above the road.
fn uniform_tiles(points: &[(Point, Option<[Point; 2]>)], frame: (u32, u32), input: ModelInput) -> TilePlan {
    let (fw, fh) = (frame.0 as f64, frame.1 as f64);
    let side = (fh / 2.0).max(input.width.max(input.height) as f64).min(fw.min(fh));
    let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    for (p, _) in points {
        (x0, y0, x1, y1) = (x0.min(p[0]), y0.min(p[1]), x1.max(p[0]), y1.max(p[1]));
    }
    let (x0, x1) = ((x0 - side / 4.0).max(0.0), (x1 + side / 4.0).min(fw));
    let (y0, y1) = ((y0 - side / 2.0).max(0.0), (y1 + side / 8.0).min(fh));
    let step = side * 0.75;
    let count = |from: f64, to: f64| (((to - from - side) / step).ceil().max(0.0) as usize) + 1;
    let (nx, ny) = (count(x0, x1), count(y0, y1));
    let mut rects = Vec::new();
    for j in 0..ny {
        for i in 0..nx {
            // Spread evenly so the last tile ends at the far edge.
            let x = if nx > 1 { x0 + (x1 - x0 - side).max(0.0) * i as f64 / (nx - 1) as f64 } else { x0 };
            let y = if ny > 1 { y0 + (y1 - y0 - side).max(0.0) * j as f64 / (ny - 1) as f64 } else { y0 };
            rects.push(Rect::new(x as u32, y as u32, side.ceil() as u32, side.ceil() as u32));
        }
    }
    TilePlan::of_rects(frame, rects, None)
}

// ---------------------------------------------------------------------------------------------
// Merging

/// A box this close (pixels) to a tile's inner edge may belong to a vehicle cut by the edge.
const EDGE_PX: f32 = 3.0;
/// Boxes of different tiles overlapping this much (intersection over union) are one object.
const SAME_IOU: f32 = 0.5;
/// A cut box this much inside another box (intersection over the smaller) is part of it.
const SAME_IOS: f32 = 0.6;

fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

fn intersection(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    w * h
}

/// Overlap of two boxes' extents along `y` (intersection over union of the intervals): two pieces
/// of a vehicle cut by a vertical seam line up in `y`.
fn axis_iou_y(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    interval_iou(a[1], a[3], b[1], b[3])
}

/// The same along `x` (a horizontal seam).
fn axis_iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    interval_iou(a[0], a[2], b[0], b[2])
}

fn interval_iou(a0: f32, a1: f32, b0: f32, b1: f32) -> f32 {
    let inter = (a1.min(b1) - a0.max(b0)).max(0.0);
    let union = (a1.max(b1) - a0.min(b0)).max(1e-6);
    inter / union
}

/// Whether box `b` touches an inner edge of `tile`.
fn is_cut(b: &[f32; 4], tile: &Tile) -> bool {
    let r = tile.rect;
    let [l, t, rt, bt] = tile.inner;
    (l && b[0] <= r.x as f32 + EDGE_PX)
        || (t && b[1] <= r.y as f32 + EDGE_PX)
        || (rt && b[2] >= r.right() as f32 - EDGE_PX)
        || (bt && b[3] >= r.bottom() as f32 - EDGE_PX)
}

/// One set of boxes from the boxes of each tile (`per_tile[i]` found in `tiles[i]`, NMS already
/// applied within each tile). Across tiles, whatever the class (one vehicle may be a "car" in one
/// tile and a "truck" in the next): two boxes overlapping by [`SAME_IOU`] are one object (the
/// higher score kept); a box cut by a tile's inner edge lying mostly ([`SAME_IOS`]) inside a box of
/// another tile is part of it: a whole box wins over a cut one, two cut ones are joined.
pub fn merge_tiles(tiles: &[Tile], per_tile: Vec<Vec<Detection>>) -> Vec<Detection> {
    if per_tile.len() <= 1 {
        return per_tile.into_iter().next().unwrap_or_default();
    }
    let mut all: Vec<(usize, bool, Detection)> = Vec::new();
    for (i, dets) in per_tile.into_iter().enumerate() {
        for d in dets {
            let cut = tiles.get(i).is_some_and(|t| is_cut(&d.bbox, t));
            all.push((i, cut, d));
        }
    }
    all.sort_by(|a, b| b.2.score.total_cmp(&a.2.score));
    // Kept: (tiles it was seen in, cut, detection).
    let mut kept: Vec<(Vec<usize>, bool, Detection)> = Vec::new();
    for (tile, cut, d) in all {
        let same = kept.iter().position(|(seen, kcut, k)| {
            if seen.contains(&tile) {
                return false;
            }
            let inter = intersection(&d.bbox, &k.bbox);
            let union = area(&d.bbox) + area(&k.bbox) - inter;
            let iou = if union > 0.0 { inter / union } else { 0.0 };
            let smaller = area(&d.bbox).min(area(&k.bbox));
            let ios = if smaller > 0.0 { inter / smaller } else { 0.0 };
            // Two pieces of one vehicle, each cut by its tile's edge: they overlap only where
            // the tiles do, but line up across the seam.
            let lined_up =
                cut && *kcut && inter > 0.0 && axis_iou(&d.bbox, &k.bbox).max(axis_iou_y(&d.bbox, &k.bbox)) >= 0.7;
            iou >= SAME_IOU || ((cut || *kcut) && ios >= SAME_IOS) || lined_up
        });
        match same {
            None => kept.push((vec![tile], cut, d)),
            Some(k) => {
                let (seen, kcut, kd) = &mut kept[k];
                seen.push(tile);
                if *kcut && !cut {
                    // The whole vehicle replaces the cut one (keeping the better score).
                    let score = kd.score.max(d.score);
                    *kd = Detection { score, ..d };
                    *kcut = false;
                } else if *kcut && cut {
                    let b = &mut kd.bbox;
                    *b = [b[0].min(d.bbox[0]), b[1].min(d.bbox[1]), b[2].max(d.bbox[2]), b[3].max(d.bbox[3])];
                }
            }
        }
    }
    kept.into_iter().map(|(_, _, d)| d).collect()
}

// ---------------------------------------------------------------------------------------------
// Motion

/// Side of the cells motion is measured on (frame pixels).
const MOTION_CELL: u32 = 16;
/// A cell whose mean brightness changed by more than this (of 255) since the last detected frame
/// moved. Sensor noise and compression average out over a cell; a vehicle does not.
const MOTION_LEVEL: u32 = 6;

/// Decides which tiles of a frame to run: those where something moved since the last detected
/// frame or a track is, and all of them every `refresh_s`.
#[derive(Debug, Clone, Default)]
pub struct MotionGate {
    /// Mean brightness per cell of the last frame seen (x 16 for precision).
    cells: Vec<u32>,
    size: (u32, u32),
    last_full_s: Option<f64>,
}

impl MotionGate {
    /// Mean brightness of each cell of `frame`'s luma, x 16.
    fn cell_means(frame: &Frame) -> (Vec<u32>, (u32, u32)) {
        let (w, h) = (frame.width, frame.height);
        let (cw, ch) = (w.div_ceil(MOTION_CELL), h.div_ceil(MOTION_CELL));
        let mut sums = vec![0u32; (cw * ch) as usize];
        let mut counts = vec![0u32; (cw * ch) as usize];
        let stride = w as usize;
        // Every other row and column: plenty for a 16 px cell, half the memory traffic.
        for y in (0..h).step_by(2) {
            let row = &frame.y[y as usize * stride..(y as usize * stride + stride).min(frame.y.len())];
            let base = ((y / MOTION_CELL) * cw) as usize;
            for x in (0..row.len()).step_by(2) {
                let k = base + x / MOTION_CELL as usize;
                sums[k] += row[x] as u32;
                counts[k] += 1;
            }
        }
        let means = sums.iter().zip(&counts).map(|(&s, &n)| (s * 16).checked_div(n).unwrap_or(0)).collect();
        (means, (cw, ch))
    }

    /// Which of `plan`'s tiles to run on `frame` at stream time `t_s`, with the boxes of the
    /// camera's current tracks.
    pub fn select(
        &mut self,
        plan: &TilePlan,
        frame: &Frame,
        t_s: f64,
        tracks: &[[f32; 4]],
        spec: &DetectionSpec,
    ) -> Vec<bool> {
        let n = plan.tiles.len();
        if n <= 1 || !spec.motion {
            return vec![true; n];
        }
        let (means, grid) = Self::cell_means(frame);
        let fresh = grid != self.size || self.cells.len() != means.len();
        let refresh = fresh || self.last_full_s.is_none_or(|last| t_s - last >= spec.refresh_s || t_s < last);
        let previous = std::mem::replace(&mut self.cells, means);
        self.size = grid;
        if refresh {
            self.last_full_s = Some(t_s);
            return vec![true; n];
        }
        let mut run = vec![false; n];
        let (cw, _) = grid;
        for (k, (&now, &before)) in self.cells.iter().zip(&previous).enumerate() {
            if now.abs_diff(before) <= MOTION_LEVEL * 16 {
                continue;
            }
            let (cx, cy) = ((k as u32 % cw) * MOTION_CELL, (k as u32 / cw) * MOTION_CELL);
            let cell = [cx as f32, cy as f32, (cx + MOTION_CELL) as f32, (cy + MOTION_CELL) as f32];
            for (i, t) in plan.tiles.iter().enumerate() {
                if !run[i] && overlaps(&cell, &t.rect) {
                    run[i] = true;
                }
            }
        }
        for b in tracks {
            // Where the vehicle may be by now: its box grown by half its size.
            let (gw, gh) = ((b[2] - b[0]) / 2.0, (b[3] - b[1]) / 2.0);
            let grown = [b[0] - gw, b[1] - gh, b[2] + gw, b[3] + gh];
            for (i, t) in plan.tiles.iter().enumerate() {
                if !run[i] && overlaps(&grown, &t.rect) {
                    run[i] = true;
                }
            }
        }
        run
    }
}

fn overlaps(b: &[f32; 4], r: &Rect) -> bool {
    b[0] < r.right() as f32 && b[2] > r.x as f32 && b[1] < r.bottom() as f32 && b[3] > r.y as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSD: ModelInput = ModelInput { width: 300, height: 300, stretch: true };

    fn det(bbox: [f32; 4], score: f32, class_id: usize) -> Detection {
        Detection { class_id, label: Arc::from("car"), score, bbox }
    }

    /// A road crossing a 1280 x 720 picture: ground x along the road, y across it; the far edge
    /// (y = -7) near the top, the near edge (y = 7) near the bottom, vehicles shrinking with
    /// distance (a real perspective homography).
    fn road() -> RoadModel {
        // Ground -> image: a pinhole looking down the road's side.
        let image = [[100.0, 300.0], [1180.0, 300.0], [1260.0, 640.0], [20.0, 640.0], [640.0, 300.0], [640.0, 640.0]];
        let ground = [[-40.0, -7.0], [40.0, -7.0], [25.0, 7.0], [-25.0, 7.0], [0.0, -7.0], [0.0, 7.0]];
        let cal = Calibration::fit(&image, &ground).expect("calibration");
        let lanes = (0..4)
            .map(|k| {
                let (y0, y1) = (-7.0 + 3.5 * k as f64, -3.5 + 3.5 * k as f64);
                let corners = [[-30.0, y0], [30.0, y0], [30.0, y1], [-30.0, y1]];
                let poly: Vec<Point> = corners.iter().filter_map(|&g| cal.to_image(g)).collect();
                (poly, None)
            })
            .collect();
        RoadModel { image_size: Some((1280, 720)), areas: lanes, lines: Vec::new(), calibration: Some(cal) }
    }

    #[test]
    fn full_and_fixed_modes_give_their_rectangles_scaled_to_the_frame() {
        let full = plan_tiles(&DetectionSpec::full(), (1280, 720), SSD);
        assert_eq!(full.tiles, vec![Tile { rect: Rect::full(1280, 720), inner: [false; 4] }]);
        let spec = DetectionSpec {
            mode: RegionMode::Fixed {
                image_size: Some((640, 360)),
                rects: vec![Rect::new(0, 100, 320, 200), Rect::new(300, 100, 340, 200)],
            },
            ..DetectionSpec::default()
        };
        let plan = plan_tiles(&spec, (1280, 720), SSD);
        assert_eq!(plan.tiles[0].rect, Rect::new(0, 200, 640, 400));
        assert_eq!(plan.tiles[0].inner, [false, true, true, true]);
        assert_eq!(plan.tiles[1].rect, Rect::new(600, 200, 680, 400));
        assert_eq!(plan.tiles[1].inner, [true, true, false, true]);
    }

    #[test]
    fn auto_tiles_cover_every_road_point_with_a_whole_vehicle_big_enough() {
        let road = road();
        let spec = DetectionSpec { mode: RegionMode::Auto(Arc::new(road.clone())), ..DetectionSpec::default() };
        let plan = plan_tiles(&spec, (1280, 720), SSD);
        for t in &plan.tiles {
            println!("{:?}", t.rect);
        }
        println!("{:?}", plan.vehicle_px);
        assert!(plan.tiles.len() > 1 && plan.tiles.len() <= spec.max_tiles, "{:?}", plan.tiles);
        let achieved = plan.vehicle_px.expect("calibrated") as f64;
        let cal = road.calibration.as_ref().expect("cal");
        // Far tiles are smaller than near ones.
        let sizes: Vec<u32> = plan.tiles.iter().map(|t| t.rect.width).collect();
        assert!(sizes.iter().min() < sizes.iter().max(), "{sizes:?}");
        let mut checked = 0;
        for (p, arrow) in road_cells(&road, (1280, 720)) {
            let width = vehicle_width(cal, p, arrow, (1.0, 1.0)).expect("on the ground");
            let cell = RoadCell { p, width };
            let holds = plan.tiles.iter().any(|t| {
                let in_input = width * 300.0 / t.rect.width as f64;
                inside(cell.vehicle_box((1280, 720)), &t.rect) && in_input >= achieved - 0.5
            });
            // Vehicles larger than the largest tile can hold are covered by one at least.
            let b = cell.vehicle_box((1280, 720));
            let large = b[3] - b[1] > 720.0 * 0.9;
            assert!(holds || large, "road point {p:?} (vehicle {width:.0} px) not held whole by any tile");
            checked += 1;
        }
        assert!(checked > 100);
        // Whole frame, 1:1 area: more pixels of the far road reach the model than with one
        // squeezed frame.
        let far = plan.tiles.iter().map(|t| t.rect.width).min().expect("tiles");
        assert!(far < 600, "{far}");
    }

    #[test]
    fn a_plan_needing_too_many_tiles_settles_for_smaller_vehicles() {
        let road = Arc::new(road());
        let generous = DetectionSpec {
            mode: RegionMode::Auto(road.clone()),
            min_vehicle_px: 120.0,
            max_tiles: 4,
            ..DetectionSpec::default()
        };
        let plan = plan_tiles(&generous, (1280, 720), SSD);
        assert!(plan.tiles.len() <= 4);
        assert!(plan.vehicle_px.expect("calibrated") < 120.0);
    }

    #[test]
    fn uncalibrated_scene_gets_uniform_tiles_over_its_road() {
        let mut road = road();
        road.calibration = None;
        let spec = DetectionSpec { mode: RegionMode::Auto(Arc::new(road)), ..DetectionSpec::default() };
        let plan = plan_tiles(&spec, (1280, 720), SSD);
        assert!(plan.tiles.len() >= 2 && plan.vehicle_px.is_none());
        assert!(plan.tiles.iter().all(|t| t.rect.width == 360 && t.rect.height == 360));
    }

    #[test]
    fn seams_keep_the_whole_box_and_join_two_cut_halves() {
        let tiles = [
            Tile { rect: Rect::new(0, 0, 400, 300), inner: [false, false, true, false] },
            Tile { rect: Rect::new(300, 0, 400, 300), inner: [true, false, false, false] },
        ];
        // A vehicle at x 340..420: cut at tile 0's right edge, whole in tile 1.
        let cut = det([340.0, 100.0, 399.0, 150.0], 0.9, 2);
        let whole = det([341.0, 101.0, 420.0, 151.0], 0.7, 7);
        let merged = merge_tiles(&tiles, vec![vec![cut], vec![whole.clone()]]);
        assert_eq!(merged.len(), 1, "{merged:?}");
        assert_eq!(merged[0].bbox, whole.bbox);
        assert_eq!(merged[0].score, 0.9);
        // The same vehicle found whole in both tiles: one box.
        let a = det([320.0, 100.0, 380.0, 150.0], 0.8, 2);
        let b = det([321.0, 99.0, 381.0, 151.0], 0.85, 2);
        assert_eq!(merge_tiles(&tiles, vec![vec![a], vec![b]]).len(), 1);
        // A long vehicle cut by both tiles' edges: joined.
        let left = det([200.0, 100.0, 399.0, 160.0], 0.6, 5);
        let right = det([301.0, 100.0, 560.0, 160.0], 0.6, 5);
        let merged = merge_tiles(&tiles, vec![vec![left], vec![right]]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].bbox, [200.0, 100.0, 560.0, 160.0]);
        // Two vehicles side by side in the overlap, neither cut: both kept.
        let c1 = det([310.0, 100.0, 350.0, 130.0], 0.8, 2);
        let c2 = det([352.0, 100.0, 392.0, 130.0], 0.8, 2);
        assert_eq!(merge_tiles(&tiles, vec![vec![c1.clone()], vec![c2.clone()]]).len(), 2);
        // Boxes of one tile are never merged here (NMS did that).
        let same_tile = merge_tiles(&tiles, vec![vec![c1.clone(), det([311.0, 100.0, 351.0, 130.0], 0.7, 2)], vec![]]);
        assert_eq!(same_tile.len(), 2);
    }

    #[test]
    fn motion_gate_runs_moving_and_tracked_tiles_and_all_on_refresh() {
        let tiles = [Rect::new(0, 0, 64, 64), Rect::new(64, 0, 64, 64), Rect::new(128, 0, 64, 64)];
        let plan = TilePlan::of_rects((192, 64), tiles, None);
        let spec = DetectionSpec { refresh_s: 1.0, ..DetectionSpec::default() };
        let mut gate = MotionGate::default();
        let mut f = Frame::blank(192, 64);
        f.y.fill(100);
        assert_eq!(gate.select(&plan, &f, 0.0, &[], &spec), vec![true; 3], "first frame: all");
        assert_eq!(gate.select(&plan, &f, 0.1, &[], &spec), vec![false; 3], "nothing moved");
        // Something bright appears in the middle tile.
        for y in 10..40 {
            for x in 80..110 {
                f.y[y * 192 + x] = 230;
            }
        }
        assert_eq!(gate.select(&plan, &f, 0.2, &[], &spec), vec![false, true, false]);
        // Standing still now, but tracked in the last tile.
        assert_eq!(gate.select(&plan, &f, 0.3, &[[150.0, 10.0, 180.0, 40.0]], &spec), vec![false, false, true]);
        assert_eq!(gate.select(&plan, &f, 1.05, &[], &spec), vec![true; 3], "refresh");
        // Motion off: always all.
        let off = DetectionSpec { motion: false, ..spec };
        assert_eq!(gate.select(&plan, &f, 1.1, &[], &off), vec![true; 3]);
    }
}
