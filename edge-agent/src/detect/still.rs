//! Detection on still pictures: photos (JPEG/PNG) and single frames of recordings, for checking a
//! model on site (`its-agent detect`), for tests against hand-checked boxes, and for drawing
//! boxes on pictures.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::decode::decode_recording;
use crate::detect::Detection;

/// An RGB picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbPicture {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbPicture {
    pub fn as_picture(&self) -> crate::decode::Picture<'_> {
        crate::decode::Picture::Rgb { width: self.width, height: self.height, data: &self.data }
    }
}

/// Loads a JPEG or PNG (at most 8192 x 8192), or frame `frame` (0-based) of a video file.
pub fn load_picture(path: &Path, frame: usize) -> anyhow::Result<RgbPicture> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    if matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
        let mut reader = image::ImageReader::open(path)?.with_guessed_format()?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(8192);
        limits.max_image_height = Some(8192);
        reader.limits(limits);
        let img = reader.decode()?.into_rgb8();
        let (width, height) = img.dimensions();
        return Ok(RgbPicture { width, height, data: img.into_raw() });
    }
    let (mut seen, mut picture) = (0usize, None);
    let n = decode_recording(path, 10.0, |f, _| {
        if seen == frame {
            picture = Some(RgbPicture { width: f.width, height: f.height, data: f.to_rgb() });
            return false;
        }
        seen += 1;
        true
    })?;
    if let Some(p) = picture {
        return Ok(p);
    }
    anyhow::bail!("{} has {n} decodable frames; frame {frame} does not exist", path.display())
}

/// Colour of a box by class, stable across runs.
fn colour(class_id: usize) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 6] =
        [[255, 64, 64], [64, 200, 64], [64, 128, 255], [255, 200, 0], [200, 64, 255], [0, 220, 220]];
    Rgb(PALETTE[class_id % PALETTE.len()])
}

/// Draws a rectangle outline `thickness` pixels wide, clipped to the image.
pub fn draw_box(img: &mut RgbImage, b: [f32; 4], thickness: u32, c: Rgb<u8>) {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return;
    }
    let clamp = |v: f32, max: u32| (v.max(0.0) as u32).min(max - 1);
    let (x1, y1, x2, y2) = (clamp(b[0], w), clamp(b[1], h), clamp(b[2], w), clamp(b[3], h));
    for t in 0..thickness {
        for x in x1..=x2 {
            for y in [y1.saturating_add(t).min(h - 1), y2.saturating_sub(t)] {
                img.put_pixel(x, y, c);
            }
        }
        for y in y1..=y2 {
            for x in [x1.saturating_add(t).min(w - 1), x2.saturating_sub(t)] {
                img.put_pixel(x, y, c);
            }
        }
    }
}

/// The picture with every detection's box drawn on it.
pub fn annotate(p: &RgbPicture, detections: &[Detection]) -> Option<RgbImage> {
    let mut img = RgbImage::from_raw(p.width, p.height, p.data.clone())?;
    for d in detections {
        draw_box(&mut img, d.bbox, 3, colour(d.class_id));
    }
    Some(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_drawn_and_clipped() {
        let mut img = RgbImage::new(20, 10);
        draw_box(&mut img, [2.0, 2.0, 30.0, 8.0], 1, Rgb([255, 0, 0]));
        assert_eq!(img.get_pixel(2, 5), &Rgb([255, 0, 0]), "left edge");
        assert_eq!(img.get_pixel(19, 5), &Rgb([255, 0, 0]), "right edge clipped to the image");
        assert_eq!(img.get_pixel(10, 5), &Rgb([0, 0, 0]), "inside stays");
    }

    #[test]
    fn a_frame_of_a_recording_loads_and_a_missing_one_is_an_error() {
        let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media/bikes-street-640x272-25fps.mp4");
        let p = load_picture(&clip, 5).expect("frame 5");
        assert_eq!((p.width, p.height), (640, 272));
        assert_eq!(p.data.len(), 640 * 272 * 3);
        let err = load_picture(&clip, 5000).expect_err("no such frame");
        assert!(err.to_string().contains("frame 5000"), "{err}");
    }
}
