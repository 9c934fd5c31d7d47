//! The real pictures footage is made of, and the standard clips used to measure tracking.
//!
//! Sprites are cut from the media in `media/` along boxes checked by hand; the background is
//! the street clip with its passers-by removed (per-pixel median of frames spread over 40 s).

use std::path::Path;

use image::RgbImage;

use super::{Actor, Footage, Leg, Sprite};
use crate::mot::{MotMetrics, evaluate};
use its_agent::decode::decode_recording;

/// Real road users and a real street, loaded from `media/`.
#[derive(Debug, Clone)]
pub struct Library {
    pub background: RgbImage,
    /// Side view of a pickup truck (dog.jpg).
    pub pickup: RgbImage,
    /// Rear of a saloon car (licenseplate_motion.jpg).
    pub car_rear: RgbImage,
    /// A parked van (street clip, frame 0).
    pub van: RgbImage,
    /// Pedestrians (street clip, frame 0), with masks cut by difference from the background.
    pub pedestrians: Vec<(RgbImage, image::GrayImage)>,
    /// A person walking (person.jpg).
    pub person: RgbImage,
}

fn crop(img: &RgbImage, b: [u32; 4]) -> RgbImage {
    image::imageops::crop_imm(img, b[0], b[1], b[2] - b[0], b[3] - b[1]).to_image()
}

/// Opacity of `fg` over `bg` (same size): pixels that differ from the empty street by more than a
/// colour distance of 40 are the road user, grown by a pixel and softened at the edge.
fn difference_mask(fg: &RgbImage, bg: &RgbImage) -> image::GrayImage {
    let (w, h) = fg.dimensions();
    let hard = image::GrayImage::from_fn(w, h, |x, y| {
        let (a, b) = (fg.get_pixel(x, y).0, bg.get_pixel(x, y).0);
        let d: i32 = (0..3).map(|c| (a[c] as i32 - b[c] as i32).abs()).sum();
        image::Luma([if d > 40 { 255 } else { 0 }])
    });
    // Grow by one pixel (close small holes), then a 3x3 box blur for a soft edge.
    let grown = image::GrayImage::from_fn(w, h, |x, y| {
        let mut m = 0;
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                if nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64 {
                    m = m.max(hard.get_pixel(nx as u32, ny as u32).0[0]);
                }
            }
        }
        image::Luma([m])
    });
    image::imageops::blur(&grown, 0.8)
}

fn load_rgb(path: &Path) -> anyhow::Result<RgbImage> {
    Ok(image::open(path)?.into_rgb8())
}

/// Decodes frames `0..frames` of the street clip, keeping every `step`th.
fn clip_frames(path: &Path, frames: usize, step: usize) -> anyhow::Result<Vec<RgbImage>> {
    let (mut out, mut n) = (Vec::new(), 0usize);
    decode_recording(path, 10.0, |f, _| {
        if n.is_multiple_of(step)
            && let Some(img) = RgbImage::from_raw(f.width, f.height, f.to_rgb())
        {
            out.push(img);
        }
        n += 1;
        n < frames
    })?;
    Ok(out)
}

/// Per-pixel, per-channel median of same-sized pictures.
fn median(frames: &[RgbImage]) -> Option<RgbImage> {
    let first = frames.first()?;
    let (w, h) = first.dimensions();
    let mut out = RgbImage::new(w, h);
    let mut vals = Vec::with_capacity(frames.len());
    let raw: &mut [u8] = &mut out;
    for (i, px) in raw.iter_mut().enumerate() {
        vals.clear();
        vals.extend(frames.iter().map(|f| f.as_raw()[i]));
        vals.sort_unstable();
        *px = vals[vals.len() / 2];
    }
    Some(out)
}

impl Library {
    /// Loads everything from the `media/` directory.
    pub fn load(media: &Path) -> anyhow::Result<Self> {
        let clip = media.join("vtest-street-768x576-10fps.264");
        let frames = clip_frames(&clip, 400, 10)?;
        let mut background =
            median(&frames).ok_or_else(|| anyhow::anyhow!("no frames decoded from {}", clip.display()))?;
        // The camera tripod standing on the grass is now and then taken for a person by the
        // detector: cover it with the grass beside it (taken along the road edge, so the edge lines
        // up), so clips have only the road users put in.
        let grass = image::imageops::crop_imm(&background, 302, 286, 80, 150).to_image();
        image::imageops::replace(&mut background, &grass, 452, 336);
        let first = frames.first().ok_or_else(|| anyhow::anyhow!("no frames"))?;
        let dog = load_rgb(&media.join("dog.jpg"))?;
        let plate = load_rgb(&media.join("licenseplate_motion.jpg"))?;
        let person = load_rgb(&media.join("person.jpg"))?;
        Ok(Self {
            pickup: crop(&dog, [465, 80, 695, 172]),
            car_rear: crop(&plate, [2, 30, 598, 468]),
            van: crop(first, [645, 40, 720, 100]),
            pedestrians: [[500, 158, 530, 228], [253, 220, 281, 304], [643, 240, 688, 320]]
                .iter()
                .map(|&b| (crop(first, b), difference_mask(&crop(first, b), &crop(&background, b))))
                .collect(),
            person: crop(&person, [182, 104, 268, 378]),
            background,
        })
    }

    fn actor(id: u64, sprite: Sprite, z: i32, legs: &[(f64, f64, [f64; 2], [f64; 2])]) -> Actor {
        Actor::on_legs(id, sprite, z, legs.iter().map(|&(t0, t1, from, to)| Leg { t0, t1, from, to }).collect())
    }

    fn pickup(&self) -> Sprite {
        Sprite::new("car", &self.pickup, 170, 68, 3)
    }

    /// The pickup facing the other way (driving right to left).
    fn pickup_left(&self) -> Sprite {
        Sprite::new("car", &image::imageops::flip_horizontal(&self.pickup), 170, 68, 3)
    }

    fn car_rear(&self) -> Sprite {
        Sprite::new("car", &self.car_rear, 120, 96, 3)
    }

    fn van(&self, w: u32, h: u32) -> Sprite {
        Sprite::new("car", &self.van, w, h, 3)
    }

    fn pedestrian(&self, k: usize) -> Sprite {
        let (p, mask) = &self.pedestrians[k % self.pedestrians.len()];
        let s = 1.3;
        Sprite::with_mask("person", p, mask, (p.width() as f64 * s) as u32, (p.height() as f64 * s) as u32)
    }

    fn walker(&self) -> Sprite {
        Sprite::new("person", &self.person, 44, 140, 2)
    }

    /// Vehicles and pedestrians on straight lines, none hiding another: the clean case.
    pub fn straight(&self) -> Footage {
        let actors = vec![
            Self::actor(1, self.pickup(), 2, &[(0.0, 8.0, [-170.0, 250.0], [768.0, 250.0])]),
            Self::actor(2, self.pickup_left(), 3, &[(4.0, 12.0, [768.0, 345.0], [-170.0, 345.0])]),
            Self::actor(3, self.car_rear(), 1, &[(1.0, 11.0, [-120.0, 125.0], [768.0, 125.0])]),
            Self::actor(4, self.pedestrian(0), 4, &[(0.0, 14.0, [60.0, 440.0], [400.0, 440.0])]),
            Self::actor(5, self.walker(), 5, &[(3.0, 15.0, [740.0, 420.0], [450.0, 420.0])]),
        ];
        Footage { name: "straight", background: self.background.clone(), actors, fps: 10.0, frames: 150 }
    }

    /// Two pedestrians walking into each other, and two vehicles passing in opposite directions
    /// on adjacent lanes: boxes overlap while they pass.
    pub fn crossing(&self) -> Footage {
        let actors = vec![
            Self::actor(1, self.pedestrian(0), 1, &[(0.0, 10.0, [150.0, 300.0], [550.0, 300.0])]),
            Self::actor(2, self.pedestrian(1), 2, &[(0.0, 10.0, [550.0, 318.0], [150.0, 318.0])]),
            Self::actor(3, self.pickup(), 3, &[(0.0, 9.0, [-170.0, 170.0], [768.0, 170.0])]),
            Self::actor(4, self.pickup_left(), 4, &[(0.0, 9.0, [768.0, 200.0], [-170.0, 200.0])]),
            Self::actor(5, self.walker(), 5, &[(1.0, 12.0, [700.0, 410.0], [300.0, 420.0])]),
        ];
        Footage { name: "crossing", background: self.background.clone(), actors, fps: 10.0, frames: 120 }
    }

    /// Short occlusions: a pickup drives behind a parked van, and a pedestrian walks behind
    /// another who stands still (both scenery, not scored); each must keep its identity when it
    /// comes out. A third road user passes in front of everything.
    pub fn occlusion(&self) -> Footage {
        let actors = vec![
            Self::actor(0, self.van(130, 104), 10, &[(0.0, 12.0, [330.0, 215.0], [330.0, 215.0])]),
            Self::actor(0, self.pedestrian(0), 10, &[(0.0, 12.0, [470.0, 380.0], [470.0, 380.0])]),
            Self::actor(1, self.pickup(), 2, &[(0.0, 6.5, [-170.0, 205.0], [768.0, 205.0])]),
            Self::actor(2, self.pedestrian(1), 1, &[(1.0, 11.0, [250.0, 390.0], [700.0, 390.0])]),
            Self::actor(3, self.walker(), 3, &[(2.0, 12.0, [650.0, 430.0], [150.0, 430.0])]),
        ];
        Footage { name: "occlusion", background: self.background.clone(), actors, fps: 10.0, frames: 120 }
    }

    /// The three standard clips.
    pub fn tracking_footage(&self) -> Vec<Footage> {
        vec![self.straight(), self.crossing(), self.occlusion()]
    }
}

/// Tracks per frame, as `(track id, box)`.
pub type FrameTracks = Vec<(u64, [f32; 4])>;

/// Scores tracker output against the footage's truth with CLEAR MOT and IDF1 at IoU 0.5.
///
/// "Don't care" (neither a miss nor a false positive): true boxes less than half visible, and
/// tracks on `ignore` boxes (scenery: the background's parked cars, static occluders). A track
/// on a don't-care box is dropped from the frame before scoring.
pub fn score(footage: &Footage, tracks: &[FrameTracks], ignore: &[[f32; 4]]) -> MotMetrics {
    use its_agent::track::iou;
    let mut gt = Vec::with_capacity(footage.frames);
    let mut hyp = Vec::with_capacity(footage.frames);
    for i in 0..footage.frames {
        let truth = footage.truth(i);
        let (seen, hidden): (Vec<&super::TruthBox>, Vec<&super::TruthBox>) =
            truth.iter().partition(|b| b.visible >= 0.5);
        gt.push(seen.iter().map(|b| (b.id, b.bbox)).collect::<FrameTracks>());
        let mut dont_care: Vec<[f32; 4]> = hidden.iter().map(|b| b.bbox).collect();
        dont_care.extend_from_slice(ignore);
        let frame = tracks.get(i).cloned().unwrap_or_default();
        hyp.push(
            frame
                .into_iter()
                .filter(|(_, b)| {
                    // Keep a track that matches a scored box; drop it when it sits on a don't-care one.
                    seen.iter().any(|s| iou(&s.bbox, b) >= 0.5) || !dont_care.iter().any(|d| iou(d, b) >= 0.5)
                })
                .collect(),
        );
    }
    evaluate(&gt, &hyp, 0.5)
}

/// Boxes of the footage's static scenery (actors with id 0) at frame 0.
pub fn scenery_boxes(footage: &Footage) -> Vec<[f32; 4]> {
    footage
        .actors
        .iter()
        .filter(|a| a.id == 0)
        .filter_map(|a| {
            let p = a.position(0.0)?;
            let (w, h) = a.sprite.size();
            Some([p[0] as f32, p[1] as f32, p[0] as f32 + w as f32, p[1] as f32 + h as f32])
        })
        .collect()
}
