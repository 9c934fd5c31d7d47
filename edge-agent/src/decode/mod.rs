//! Decode stage: H.264 access units in, pictures out.
//!
//! [`VideoDecoder`] is the seam for hardware decoders (NVDEC/V4L2 on Jetson); the software
//! decoder is [`openh264::SoftwareDecoder`]. Pictures stay in I420 (YUV 4:2:0): the detector's
//! pre-processing converts only the pixels the model sees, never the whole frame.
//!
//! - [`openh264`]: the software decoder;
//! - [`recording`]: whole recordings decoded in one go.
//!
//! May depend on: `source` (its access units and Annex-B parsing).

pub mod openh264;
pub mod recording;

pub use openh264::SoftwareDecoder;
pub use recording::decode_recording;

/// A decoded picture in I420: full-resolution Y, half-resolution U and V, tightly packed
/// (strides = width, width/2 rounded up).
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({}x{})", self.width, self.height)
    }
}

impl Frame {
    /// A black frame (Y 16, neutral chroma).
    pub fn blank(width: u32, height: u32) -> Self {
        let (cw, ch) = (width.div_ceil(2) as usize, height.div_ceil(2) as usize);
        Self {
            width,
            height,
            y: vec![16; width as usize * height as usize],
            u: vec![128; cw * ch],
            v: vec![128; cw * ch],
        }
    }

    /// Copies planes with arbitrary strides into a tightly packed frame.
    pub fn from_planes(
        width: u32,
        height: u32,
        (y, u, v): (&[u8], &[u8], &[u8]),
        (ys, us, vs): (usize, usize, usize),
    ) -> Result<Self, DecodeError> {
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let short = |plane: &[u8], stride: usize, pw: usize, ph: usize| {
            stride < pw || ph == 0 || plane.len() < stride * (ph - 1) + pw
        };
        if w == 0 || h == 0 || short(y, ys, w, h) || short(u, us, cw, ch) || short(v, vs, cw, ch) {
            return Err(DecodeError::Malformed(format!("decoder returned planes too small for {width}x{height}")));
        }
        let pack = |plane: &[u8], stride: usize, pw: usize, ph: usize| {
            let mut out = Vec::with_capacity(pw * ph);
            for row in 0..ph {
                out.extend_from_slice(&plane[row * stride..row * stride + pw]);
            }
            out
        };
        Ok(Self { width, height, y: pack(y, ys, w, h), u: pack(u, us, cw, ch), v: pack(v, vs, cw, ch) })
    }

    /// Interleaved RGB (BT.601 limited range), for snapshots and tests.
    pub fn to_rgb(&self) -> Vec<u8> {
        let (w, h) = (self.width as usize, self.height as usize);
        let cw = w.div_ceil(2);
        let mut out = vec![0u8; w * h * 3];
        for yy in 0..h {
            for xx in 0..w {
                let c = (yy / 2) * cw + xx / 2;
                let rgb = yuv_to_rgb(self.y[yy * w + xx], self.u[c], self.v[c]);
                out[(yy * w + xx) * 3..(yy * w + xx) * 3 + 3].copy_from_slice(&rgb);
            }
        }
        out
    }

    /// I420 from interleaved RGB (BT.601 limited range; chroma averaged over 2x2 blocks).
    pub fn from_rgb(width: u32, height: u32, rgb: &[u8]) -> Self {
        let (w, h) = (width as usize, height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let mut f = Frame::blank(width, height);
        let px = |x: usize, y: usize| {
            let i = (y.min(h - 1) * w + x.min(w - 1)) * 3;
            [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
        };
        for y in 0..h {
            for x in 0..w {
                let [r, g, b] = px(x, y);
                f.y[y * w + x] = (16.0 + 0.256_788 * r + 0.504_129 * g + 0.097_906 * b).round().clamp(0.0, 255.0) as u8;
            }
        }
        for cy in 0..ch {
            for cx in 0..cw {
                let mut acc = [0.0f32; 3];
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let p = px(cx * 2 + dx, cy * 2 + dy);
                    (0..3).for_each(|k| acc[k] += p[k] / 4.0);
                }
                let [r, g, b] = acc;
                f.u[cy * cw + cx] =
                    (128.0 - 0.148_223 * r - 0.290_993 * g + 0.439_216 * b).round().clamp(0.0, 255.0) as u8;
                f.v[cy * cw + cx] =
                    (128.0 + 0.439_216 * r - 0.367_788 * g - 0.071_427 * b).round().clamp(0.0, 255.0) as u8;
            }
        }
        f
    }
}

fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as f32 - 16.0) * 1.164_383;
    let (d, e) = (u as f32 - 128.0, v as f32 - 128.0);
    let q = |x: f32| (x + 0.5).clamp(0.0, 255.0) as u8;
    [q(c + 1.596_027 * e), q(c - 0.391_762 * d - 0.812_968 * e), q(c + 2.017_232 * d)]
}

/// A picture to run detection on: a decoded frame, or an RGB image (photos, tests).
#[derive(Debug, Clone, Copy)]
pub enum Picture<'a> {
    I420(&'a Frame),
    Rgb { width: u32, height: u32, data: &'a [u8] },
}

impl Picture<'_> {
    pub fn size(&self) -> (u32, u32) {
        match self {
            Picture::I420(f) => (f.width, f.height),
            Picture::Rgb { width, height, .. } => (*width, *height),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bitstream could not be decoded (corrupt or truncated data); the decoder waits for the
    /// next keyframe.
    #[error("corrupt H.264 data: {0}")]
    Corrupt(String),
    /// The decoder produced something unusable.
    #[error("malformed decoder output: {0}")]
    Malformed(String),
    /// A picture larger than the configured limit (a hostile or misconfigured stream).
    #[error("picture {width}x{height} exceeds the limit of {max_pixels} pixels")]
    TooLarge { width: u32, height: u32, max_pixels: u64 },
}

/// Decodes H.264 access units (Annex-B, parameter sets in-band).
pub trait VideoDecoder: Send {
    /// Decodes one access unit presented at `pts_s`; returns a picture when one is ready, with
    /// its presentation time (streams with B-frames come out in presentation order, later than
    /// they went in).
    fn decode(&mut self, access_unit: &[u8], pts_s: f64) -> Result<Option<(Frame, f64)>, DecodeError>;
    /// Forgets all state, e.g. after the stream's parameters changed; the next picture comes from
    /// the next keyframe.
    fn reset(&mut self) -> Result<(), DecodeError>;
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_round_trips_through_i420_within_chroma_subsampling_error() {
        let (w, h) = (6u32, 4u32);
        // Constant over each 2x2 block, as 4:2:0 can carry exactly.
        let rgb: Vec<u8> = (0..w * h).flat_map(|i| [200u8, 60, (((i % w) / 2 + (i / w) / 2 * 3) * 40) as u8]).collect();
        let back = Frame::from_rgb(w, h, &rgb).to_rgb();
        for (a, b) in rgb.iter().zip(&back) {
            assert!((*a as i32 - *b as i32).abs() <= 8, "{a} vs {b}");
        }
    }

    #[test]
    fn planes_with_padding_are_packed_and_short_planes_refused() {
        let y: Vec<u8> = (0..8 * 2).map(|i| i as u8).collect(); // stride 8, width 4
        let uv = vec![1u8; 4];
        let f = Frame::from_planes(4, 2, (&y, &uv, &uv), (8, 4, 4)).expect("ok");
        assert_eq!(f.y, vec![0, 1, 2, 3, 8, 9, 10, 11]);
        assert!(Frame::from_planes(4, 2, (&y[..10], &uv, &uv), (8, 4, 4)).is_err());
    }
}
