//! Synthetic road footage with known ground truth, for measuring the pipeline. (Not a "scene" in
//! the agent's sense, a camera's lines, zones and calibration: a clip with the truth of every frame.)
//!
//! Real pictures, known motion: real road users (crops of the photos and of the street clip in
//! `media/`) move along known trajectories over a real background (the street clip with its
//! passers-by removed by a per-pixel median over time). Every frame comes with the true box of
//! every road user and how much of it is visible. [`encode_footage`] writes the footage as H.264
//! (OpenH264's encoder), so measurements run through the same decode, detection and tracking as
//! a camera.
//!
//! An actor moves either along [`Leg`]s (its sprite's top-left corner, at the sprite's own size)
//! or by per-frame [`Placement`]s (position, size and drawing order of every frame, the sprite
//! scaled to each: how [`traffic`] draws vehicles seen in perspective).
//!
//! Occlusion: actors are drawn in order of `z`; a box less than half visible is not required of
//! the tracker (scored as "don't care", as MOT benchmarks do with heavily occluded objects).
//!
//! Inside: this file (actors, rendering, H.264 encoding, also frame by frame for long clips),
//! [`library`] (the clips built from `media/`), [`traffic`] (calibrated traffic clips in
//! perspective, with the truth of counts and speeds), [`far`] (harder traffic clips: four lanes
//! at 1280x720 and 960x540 with small far-lane vehicles, dusk, rain, heavy compression and a
//! shaking camera, a ten-minute run, and the truth as count and pass tables). May use: `its-agent` (decoding a clip back), `image`, `openh264`, and the kit's
//! [`crate::mot`] (scoring a tracker on a clip).

pub mod far;
pub mod library;
pub mod traffic;

use std::path::Path;

use image::{RgbImage, imageops};

/// A real road user's picture, with a soft-edged alpha mask so it blends into the background.
#[derive(Debug, Clone)]
pub struct Sprite {
    pub label: &'static str,
    pub image: RgbImage,
    /// Opacity per pixel, 0..=255.
    pub alpha: Vec<u8>,
}

impl Sprite {
    /// `image` scaled to `width` x `height`, edges feathered over `feather` pixels.
    pub fn new(label: &'static str, image: &RgbImage, width: u32, height: u32, feather: u32) -> Self {
        let image = imageops::resize(image, width.max(1), height.max(1), imageops::FilterType::Triangle);
        let (w, h) = image.dimensions();
        let mut alpha = vec![255u8; (w * h) as usize];
        if feather > 0 {
            for y in 0..h {
                for x in 0..w {
                    let d = x.min(y).min(w - 1 - x).min(h - 1 - y);
                    if d < feather {
                        alpha[(y * w + x) as usize] = ((d + 1) * 255 / (feather + 1)) as u8;
                    }
                }
            }
        }
        Self { label, image, alpha }
    }

    /// `image` with its own opacity `mask` (same size, 0..=255), scaled to `width` x `height`.
    pub fn with_mask(label: &'static str, image: &RgbImage, mask: &image::GrayImage, width: u32, height: u32) -> Self {
        let filter = imageops::FilterType::Triangle;
        let image = imageops::resize(image, width.max(1), height.max(1), filter);
        let alpha = imageops::resize(mask, width.max(1), height.max(1), filter).into_raw();
        Self { label, image, alpha }
    }

    pub fn size(&self) -> (u32, u32) {
        self.image.dimensions()
    }

    /// The sprite (picture and opacity) resized to `width` x `height`.
    pub fn scaled(&self, width: u32, height: u32) -> Self {
        let (w, h) = (width.max(1), height.max(1));
        if (w, h) == self.size() {
            return self.clone();
        }
        let filter = imageops::FilterType::Triangle;
        let image = imageops::resize(&self.image, w, h, filter);
        let alpha = image::GrayImage::from_raw(self.image.width(), self.image.height(), self.alpha.clone())
            .map(|m| imageops::resize(&m, w, h, filter).into_raw())
            .unwrap_or_else(|| vec![255; (w * h) as usize]);
        Self { label: self.label, image, alpha }
    }
}

/// Straight-line motion between two points (top-left corner of the sprite), in pixels and
/// seconds; the actor exists only between `t0` and `t1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Leg {
    pub t0: f64,
    pub t1: f64,
    pub from: [f64; 2],
    pub to: [f64; 2],
}

/// Where an actor is drawn in one frame: the sprite scaled to `width` x `height` with its
/// top-left corner at `(x, y)` (pixels), drawn in order of `z` (higher is nearer the camera).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub frame: usize,
    pub x: i64,
    pub y: i64,
    pub width: u32,
    pub height: u32,
    pub z: i32,
}

impl Placement {
    /// `[x1, y1, x2, y2]` in pixels, not clipped.
    pub fn bbox(&self) -> [f32; 4] {
        [self.x as f32, self.y as f32, (self.x + self.width as i64) as f32, (self.y + self.height as i64) as f32]
    }
}

/// One road user (or a static occluder, `id` 0, not scored).
#[derive(Debug, Clone)]
pub struct Actor {
    /// Ground-truth id (unique in the footage); 0 for scenery that is not scored.
    pub id: u64,
    pub sprite: Sprite,
    /// Consecutive legs; between legs the actor waits at the last point.
    pub legs: Vec<Leg>,
    /// Per-frame placements, in frame order; when there are any they replace `legs` and `z`: the
    /// actor is in exactly the frames listed, scaled to each placement's size.
    pub placements: Vec<Placement>,
    /// Drawing order: higher is nearer the camera.
    pub z: i32,
}

impl Actor {
    /// An actor moving along `legs` at its sprite's size.
    pub fn on_legs(id: u64, sprite: Sprite, z: i32, legs: Vec<Leg>) -> Self {
        Self { id, sprite, legs, placements: Vec::new(), z }
    }

    /// An actor drawn at per-frame `placements` (in frame order).
    pub fn with_placements(id: u64, sprite: Sprite, placements: Vec<Placement>) -> Self {
        Self { id, sprite, legs: Vec::new(), placements, z: 0 }
    }

    /// Where and how large the actor is in frame `i` (at `fps`), if it is in the footage then.
    pub fn placement(&self, i: usize, fps: f64) -> Option<Placement> {
        if !self.placements.is_empty() {
            return self.placements.binary_search_by_key(&i, |p| p.frame).ok().map(|k| self.placements[k]);
        }
        let p = self.position(i as f64 / fps)?;
        let (width, height) = self.sprite.size();
        Some(Placement { frame: i, x: p[0].round() as i64, y: p[1].round() as i64, width, height, z: self.z })
    }

    /// Top-left position at time `t`, if the actor is in the footage then.
    pub fn position(&self, t: f64) -> Option<[f64; 2]> {
        let first = self.legs.first()?;
        let last = self.legs.last()?;
        if t < first.t0 || t > last.t1 {
            return None;
        }
        let mut pos = first.from;
        for leg in &self.legs {
            if t < leg.t0 {
                break;
            }
            let span = (leg.t1 - leg.t0).max(1e-9);
            let k = ((t - leg.t0) / span).clamp(0.0, 1.0);
            pos = [leg.from[0] + (leg.to[0] - leg.from[0]) * k, leg.from[1] + (leg.to[1] - leg.from[1]) * k];
        }
        Some(pos)
    }
}

/// A ground-truth box in one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TruthBox {
    pub id: u64,
    pub label: &'static str,
    /// `[x1, y1, x2, y2]` in pixels, clipped to the frame.
    pub bbox: [f32; 4],
    /// Fraction of the box not hidden by nearer actors or the frame edge.
    pub visible: f32,
}

/// A synthetic clip: background, actors, frame rate and length.
#[derive(Debug, Clone)]
pub struct Footage {
    pub name: &'static str,
    pub background: RgbImage,
    pub actors: Vec<Actor>,
    pub fps: f64,
    pub frames: usize,
}

impl Footage {
    pub fn size(&self) -> (u32, u32) {
        self.background.dimensions()
    }

    /// The actors in frame `i` with their placements, in drawing order (farthest first).
    fn placed(&self, i: usize) -> Vec<(&Actor, Placement)> {
        let mut v: Vec<(&Actor, Placement)> =
            self.actors.iter().filter_map(|a| a.placement(i, self.fps).map(|p| (a, p))).collect();
        v.sort_by_key(|(_, p)| p.z);
        v
    }

    /// Frame `i` as RGB.
    pub fn render(&self, i: usize) -> RgbImage {
        self.render_over(i, &self.background)
    }

    /// Frame `i` drawn over `background` (same size as the footage's) instead of its own: a
    /// background that changes from frame to frame (a shaking camera).
    pub fn render_over(&self, i: usize, background: &RgbImage) -> RgbImage {
        let (fw, fh) = (i64::from(background.width()), i64::from(background.height()));
        let stride = fw as usize * 3;
        let mut img = background.clone().into_raw();
        for (a, p) in self.placed(i) {
            // The sprite is drawn at (at least 1x1 px) the placement's size; only its part inside
            // the frame is drawn, and a sprite wholly outside is not scaled at all.
            let (w, h) = (i64::from(p.width.max(1)), i64::from(p.height.max(1)));
            let (x0, x1) = (p.x.max(0), (p.x + w).min(fw));
            let (y0, y1) = (p.y.max(0), (p.y + h).min(fh));
            if x0 >= x1 || y0 >= y1 {
                continue;
            }
            let scaled;
            let sprite = if (p.width, p.height) == a.sprite.size() {
                &a.sprite
            } else {
                scaled = a.sprite.scaled(p.width, p.height);
                &scaled
            };
            let (sw, sh) = sprite.size();
            let (x1, y1) = (x1.min(p.x + i64::from(sw)), y1.min(p.y + i64::from(sh)));
            if x0 >= x1 || y0 >= y1 {
                continue;
            }
            let (sw, sx0, n) = (sw as usize, (x0 - p.x) as usize, (x1 - x0) as usize);
            let src = sprite.image.as_raw();
            for y in y0..y1 {
                let start = (y - p.y) as usize * sw + sx0;
                let colour = &src[start * 3..(start + n) * 3];
                let alpha = &sprite.alpha[start..start + n];
                let at = y as usize * stride + x0 as usize * 3;
                let dst = &mut img[at..at + n * 3];
                for ((d, s), &al) in dst.chunks_exact_mut(3).zip(colour.chunks_exact(3)).zip(alpha) {
                    match al {
                        0 => {}
                        255 => d.copy_from_slice(s),
                        _ => {
                            let al = u32::from(al);
                            for (d, &s) in d.iter_mut().zip(s) {
                                *d = ((u32::from(s) * al + u32::from(*d) * (255 - al)) / 255) as u8;
                            }
                        }
                    }
                }
            }
        }
        RgbImage::from_raw(fw as u32, fh as u32, img).unwrap_or_else(|| background.clone())
    }

    /// The true boxes of the scored actors in frame `i`, with their visibility.
    pub fn truth(&self, i: usize) -> Vec<TruthBox> {
        let placed = self.placed(i);
        let (fw, fh) = self.size();
        let mut out = Vec::new();
        for (k, (a, p)) in placed.iter().enumerate() {
            if a.id == 0 {
                continue;
            }
            let full = p.bbox();
            let clipped = [full[0].max(0.0), full[1].max(0.0), full[2].min(fw as f32), full[3].min(fh as f32)];
            if clipped[2] <= clipped[0] || clipped[3] <= clipped[1] {
                continue;
            }
            // Visible pixels: inside the frame and not under a nearer actor (sampled on a grid).
            let nearer: Vec<[f32; 4]> = placed[k + 1..].iter().map(|(_, q)| q.bbox()).collect();
            let (mut seen, mut total) = (0u32, 0u32);
            for gy in 0..16 {
                for gx in 0..16 {
                    let px = full[0] + (gx as f32 + 0.5) / 16.0 * (full[2] - full[0]);
                    let py = full[1] + (gy as f32 + 0.5) / 16.0 * (full[3] - full[1]);
                    total += 1;
                    let inside = px >= 0.0 && py >= 0.0 && px < fw as f32 && py < fh as f32;
                    let covered = nearer.iter().any(|r| px >= r[0] && px < r[2] && py >= r[1] && py < r[3]);
                    if inside && !covered {
                        seen += 1;
                    }
                }
            }
            out.push(TruthBox { id: a.id, label: a.sprite.label, bbox: clipped, visible: seen as f32 / total as f32 });
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FootageError {
    #[error("encoding: {0}")]
    Encode(String),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Encodes the footage as an Annex-B H.264 file: a keyframe every `gop` frames, constant quality
/// at quantiser `qp` (H.264's 0..=51; 26 looks like a typical camera stream), every frame kept.
pub fn encode_footage(footage: &Footage, path: &Path, qp: u8, gop: u32) -> Result<(), FootageError> {
    encode_frames(path, footage.size(), footage.fps, footage.frames, qp, gop, |i| footage.render(i))
}

/// Encodes `frames` pictures of `size`, made one at a time by `frame(i)`, as an Annex-B H.264
/// file (as [`encode_footage`]). Each picture is encoded and its bits written out before the next
/// is made, so a long clip never has more than one picture in memory.
pub fn encode_frames(
    path: &Path,
    size: (u32, u32),
    fps: f64,
    frames: usize,
    qp: u8,
    gop: u32,
    mut frame: impl FnMut(usize) -> RgbImage,
) -> Result<(), FootageError> {
    use std::io::Write;

    use openh264::OpenH264API;
    use openh264::encoder::{Encoder, EncoderConfig, FrameRate, IntraFramePeriod, QpRange, RateControlMode};
    use openh264::formats::{RgbSliceU8, YUVBuffer};
    let qp = qp.min(51);
    let cfg = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(qp, qp))
        .intra_frame_period(IntraFramePeriod::from_num_frames(gop))
        .skip_frames(false);
    let mut enc =
        Encoder::with_api_config(OpenH264API::from_source(), cfg).map_err(|e| FootageError::Encode(e.to_string()))?;
    let write_err = |source| FootageError::Write { path: path.display().to_string(), source };
    let file = std::fs::File::create(path).map_err(write_err)?;
    let mut out = std::io::BufWriter::new(file);
    let (w, h) = size;
    let mut bits_buf = Vec::new();
    for i in 0..frames {
        let img = frame(i);
        if img.dimensions() != size {
            return Err(FootageError::Encode(format!("frame {i} is {:?}, not {size:?}", img.dimensions())));
        }
        let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(img.as_raw(), (w as usize, h as usize)));
        let bits = enc.encode(&yuv).map_err(|e| FootageError::Encode(e.to_string()))?;
        bits_buf.clear();
        bits.write_vec(&mut bits_buf);
        out.write_all(&bits_buf).map_err(write_err)?;
    }
    out.flush().map_err(write_err)
}

/// Encodes `footage` to H.264 and replays it through the real pipeline (see [`replay_file`]).
pub fn replay_footage(
    footage: &Footage,
    detection: its_agent::detect::regions::DetectionSpec,
    detectors: Vec<Box<dyn its_agent::detect::Detector>>,
    settings: its_agent::pipeline::VisionSettings,
    dir: &Path,
    each: impl FnMut(its_agent::pipeline::FrameResult),
) -> anyhow::Result<()> {
    let path = dir.join(format!("{}.264", footage.name));
    encode_footage(footage, &path, 26, 30)?;
    replay_file(&path, footage.name, footage.fps, detection, detectors, settings, each)
}

/// Replays an H.264 recording through the real pipeline (file source, decode, detection on
/// every frame where `detection` says, tracking), handing every frame result to `each` in order.
pub fn replay_file(
    path: &Path,
    name: &str,
    fps: f64,
    detection: its_agent::detect::regions::DetectionSpec,
    detectors: Vec<Box<dyn its_agent::detect::Detector>>,
    settings: its_agent::pipeline::VisionSettings,
    mut each: impl FnMut(its_agent::pipeline::FrameResult),
) -> anyhow::Result<()> {
    use its_agent::pipeline::{CameraSpec, VisionPipeline};
    use its_agent::source::{FileSpec, VideoSource};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let camera = CameraSpec {
        id: name.to_string(),
        source: VideoSource::File(FileSpec { path: path.to_path_buf(), looped: false, realtime: false, fps }),
        detect_fps: 0.0,
        queue_frames: 2,
        detection,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let pipeline = VisionPipeline::start(vec![camera], detectors, settings, tx, rt.handle().clone())?;
    while let Some(r) = rx.blocking_recv() {
        each(r);
    }
    pipeline.join();
    Ok(())
}

/// Runs `footage` through the real pipeline (see [`replay_footage`]) and returns the confirmed
/// tracks of each frame, in frame order.
pub fn run_through_pipeline(
    footage: &Footage,
    detectors: Vec<Box<dyn its_agent::detect::Detector>>,
    settings: its_agent::pipeline::VisionSettings,
    dir: &Path,
) -> anyhow::Result<Vec<library::FrameTracks>> {
    let mut out: Vec<library::FrameTracks> = vec![Vec::new(); footage.frames];
    let mut t0 = None;
    let full = its_agent::detect::regions::DetectionSpec::full();
    replay_footage(footage, full, detectors, settings, dir, |r| {
        if r.end_of_stream {
            return;
        }
        let t0 = *t0.get_or_insert(r.t_s);
        let i = ((r.t_s - t0) * footage.fps).round() as usize;
        if let Some(slot) = out.get_mut(i) {
            *slot = r.tracks.iter().map(|t| (t.id, t.bbox)).collect();
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    #[test]
    fn actors_move_on_their_legs_and_hide_each_other() {
        let near = Actor {
            id: 1,
            sprite: Sprite::new("car", &solid(10, 10, 200), 20, 10, 0),
            legs: vec![Leg { t0: 0.0, t1: 1.0, from: [0.0, 0.0], to: [100.0, 0.0] }],
            placements: Vec::new(),
            z: 1,
        };
        let far = Actor {
            id: 2,
            sprite: Sprite::new("person", &solid(10, 10, 50), 10, 10, 0),
            legs: vec![Leg { t0: 0.0, t1: 1.0, from: [50.0, 0.0], to: [50.0, 0.0] }],
            placements: Vec::new(),
            z: 0,
        };
        let footage =
            Footage { name: "t", background: solid(120, 40, 0), actors: vec![near, far], fps: 10.0, frames: 11 };
        let truth = footage.truth(5);
        let car = truth.iter().find(|b| b.id == 1).expect("car");
        assert_eq!(car.bbox, [50.0, 0.0, 70.0, 10.0]);
        let person = truth.iter().find(|b| b.id == 2).expect("person");
        assert!(person.visible < 0.01, "the car covers the person: {}", person.visible);
        assert!(footage.truth(0).iter().find(|b| b.id == 2).expect("person").visible > 0.99);
        let img = footage.render(5);
        assert_eq!(img.get_pixel(55, 5).0, [200, 200, 200], "the nearer actor is drawn on top");
        assert_eq!(img.get_pixel(5, 30).0, [0, 0, 0], "background elsewhere");
        assert!(footage.truth(12).is_empty(), "after its last leg an actor is gone");
    }

    #[test]
    fn placed_actors_are_drawn_scaled_in_their_boxes_and_depth_order() {
        let place = |frame, x, y, width, height, z| Placement { frame, x, y, width, height, z };
        // A 10x10 sprite drawn 20x10 in frame 0 and 40x20 in frame 1; a second one on top of it in frame 1.
        let grows = Actor::with_placements(
            1,
            Sprite::new("car", &solid(10, 10, 200), 10, 10, 0),
            vec![place(0, 5, 5, 20, 10, 0), place(1, 10, 10, 40, 20, 5)],
        );
        let front = Actor::with_placements(
            2,
            Sprite::new("car", &solid(10, 10, 100), 10, 10, 0),
            vec![place(1, 30, 10, 20, 20, 6)],
        );
        let footage =
            Footage { name: "t", background: solid(80, 40, 0), actors: vec![front, grows], fps: 10.0, frames: 3 };
        let t0 = footage.truth(0);
        assert_eq!(t0.len(), 1);
        assert_eq!(t0[0].bbox, [5.0, 5.0, 25.0, 15.0]);
        let img = footage.render(0);
        assert_eq!(img.get_pixel(24, 14).0, [200, 200, 200]);
        assert_eq!(img.get_pixel(25, 14).0, [0, 0, 0]);
        let t1 = footage.truth(1);
        let grown = t1.iter().find(|b| b.id == 1).expect("grown");
        assert_eq!(grown.bbox, [10.0, 10.0, 50.0, 30.0]);
        assert!((grown.visible - 0.5).abs() < 0.01, "half under the nearer actor: {}", grown.visible);
        let img = footage.render(1);
        assert_eq!(img.get_pixel(12, 28).0, [200, 200, 200]);
        assert_eq!(img.get_pixel(35, 20).0, [100, 100, 100], "higher z on top");
        assert!(footage.truth(2).is_empty(), "only in the frames placed");
    }

    #[test]
    fn an_encoded_scene_decodes_to_what_was_rendered() {
        use its_agent::decode::{SoftwareDecoder, VideoDecoder};
        use its_agent::source::annexb::AccessUnitSplitter;
        let mut bg = RgbImage::new(64, 48);
        for (x, y, p) in bg.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]);
        }
        let a = Actor {
            id: 1,
            sprite: Sprite::new("car", &solid(8, 8, 250), 16, 12, 2),
            legs: vec![Leg { t0: 0.0, t1: 1.0, from: [0.0, 10.0], to: [40.0, 10.0] }],
            placements: Vec::new(),
            z: 0,
        };
        let footage = Footage { name: "t", background: bg, actors: vec![a], fps: 10.0, frames: 10 };
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.264");
        encode_footage(&footage, &p, 24, 30).expect("encode");
        let bytes = std::fs::read(&p).expect("read");
        let mut split = AccessUnitSplitter::new();
        let mut aus = Vec::new();
        split.push(&bytes, &mut aus);
        split.finish(&mut aus);
        assert_eq!(aus.len(), 10);
        let mut dec = SoftwareDecoder::new().expect("decoder");
        let mut frames = Vec::new();
        for (i, au) in aus.iter().enumerate() {
            frames.extend(dec.decode(au, i as f64 / 10.0).expect("decode"));
        }
        assert_eq!(frames.len(), 10, "every frame decodes");
        let (frame, _) = &frames[5];
        let rgb = frame.to_rgb();
        let want = footage.render(5);
        let err: f64 =
            rgb.iter().zip(want.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / rgb.len() as f64;
        assert!(err < 12.0, "mean absolute error {err}");
    }
}
