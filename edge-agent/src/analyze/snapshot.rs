//! JPEG snapshots for events: the whole frame with the road user's box drawn, and a crop of
//! the road user with some of its surroundings.

use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};

use crate::decode::Frame;
use crate::detect::still::draw_box;

/// JPEG quality: 80 keeps a number plate readable at a third of the size of 95.
const QUALITY: u8 = 80;
/// The crop extends the box by this fraction of its size on every side (context: lane, road).
const CROP_MARGIN: f32 = 0.25;
/// Crops are at least this many pixels each way (a far vehicle's box is tiny).
const CROP_MIN_PX: f32 = 64.0;

/// A frame's snapshot: full frame (box drawn) and a crop of the box.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotJpegs {
    pub full: Vec<u8>,
    pub crop: Option<Vec<u8>>,
}

fn jpeg(img: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::with_capacity(64 * 1024);
    JpegEncoder::new_with_quality(&mut out, QUALITY).encode_image(img)?;
    Ok(out)
}

/// Encodes the snapshot of `frame`, with `bbox` (frame pixels) drawn and cropped if given.
pub fn encode_snapshot(frame: &Frame, bbox: Option<[f32; 4]>) -> Result<SnapshotJpegs, image::ImageError> {
    let (w, h) = (frame.width, frame.height);
    let Some(mut img) = RgbImage::from_raw(w, h, frame.to_rgb()) else {
        return Err(image::ImageError::Parameter(image::error::ParameterError::from_kind(
            image::error::ParameterErrorKind::DimensionMismatch,
        )));
    };
    let crop = match bbox {
        Some(b) if b.iter().all(|v| v.is_finite()) && w > 0 && h > 0 => {
            let (bw, bh) = ((b[2] - b[0]).max(1.0), (b[3] - b[1]).max(1.0));
            let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
            let (cw, ch) =
                ((bw * (1.0 + 2.0 * CROP_MARGIN)).max(CROP_MIN_PX), (bh * (1.0 + 2.0 * CROP_MARGIN)).max(CROP_MIN_PX));
            let x0 = (cx - cw / 2.0).clamp(0.0, w as f32 - 1.0) as u32;
            let y0 = (cy - ch / 2.0).clamp(0.0, h as f32 - 1.0) as u32;
            let x1 = ((cx + cw / 2.0).clamp(1.0, w as f32) as u32).max(x0 + 1);
            let y1 = ((cy + ch / 2.0).clamp(1.0, h as f32) as u32).max(y0 + 1);
            // Cropped before the box is drawn: the crop shows the road user unobstructed.
            let c = image::imageops::crop_imm(&img, x0, y0, x1 - x0, y1 - y0).to_image();
            draw_box(&mut img, b, 2.max(w / 400), Rgb([255, 40, 40]));
            Some(jpeg(&c)?)
        }
        _ => None,
    };
    Ok(SnapshotJpegs { full: jpeg(&img)?, crop })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_two_jpegs_with_the_box_drawn_on_the_full_frame_only() {
        let frame = Frame::from_rgb(320, 240, &vec![120u8; 320 * 240 * 3]);
        let s = encode_snapshot(&frame, Some([100.0, 80.0, 180.0, 160.0])).expect("encodes");
        assert_eq!(&s.full[..3], &[0xFF, 0xD8, 0xFF], "JPEG");
        let full = image::load_from_memory(&s.full).expect("decodes").into_rgb8();
        assert_eq!(full.dimensions(), (320, 240));
        let edge = full.get_pixel(100, 120).0;
        assert!(edge[0] > 200 && edge[1] < 100, "box edge is drawn red: {edge:?}");
        let crop = image::load_from_memory(s.crop.as_deref().expect("crop")).expect("decodes").into_rgb8();
        assert_eq!(crop.dimensions(), (120, 120), "box plus a quarter on each side");
        let centre = crop.get_pixel(60, 60).0;
        assert!(centre[0] < 160, "the crop has no box drawn over the road user: {centre:?}");
    }

    #[test]
    fn a_box_off_the_picture_is_clamped_and_no_box_gives_no_crop() {
        let frame = Frame::from_rgb(64, 48, &vec![30u8; 64 * 48 * 3]);
        let s = encode_snapshot(&frame, Some([-50.0, -50.0, 500.0, 400.0])).expect("encodes");
        assert!(s.crop.is_some());
        let s = encode_snapshot(&frame, None).expect("encodes");
        assert!(s.crop.is_none());
        let s = encode_snapshot(&frame, Some([f32::NAN, 0.0, 1.0, 1.0])).expect("encodes");
        assert!(s.crop.is_none(), "a box that is not a box is not cropped");
    }
}
