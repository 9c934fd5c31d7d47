//! Software H.264 decoding with Cisco's OpenH264 (built from source by the `openh264` crate; with
//! `nasm` installed its x86 assembly is used).
//!
//! Latency: a stream without B-frames (what cameras send) is decoded with a flush after every
//! access unit, so each picture comes out as soon as its data went in. Flushing breaks streams
//! with B-frames (pictures must be reordered), so once a B slice is seen the decoder stops
//! flushing and pictures come out in presentation order, a few access units later. Presentation
//! times are matched to pictures by taking the smallest pending one, which is right in both modes.
//! The switch happens at the first B slice: the access units since the last keyframe (kept
//! while the stream's first GOP shows whether it has B-frames) are decoded again without
//! flushing, and pictures already handed out are not handed out twice.
//!
//! Decoding starts, and restarts after an error or a reset, at a keyframe: an IDR picture or an
//! intra-coded (I) picture, so cameras that recover with I-frames rather than IDRs are followed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use openh264::OpenH264API;
use openh264::decoder::{DecodeOptions, Decoder, DecoderConfig, Flush};
use openh264::formats::YUVSource;

use super::{DecodeError, Frame, VideoDecoder};
use crate::source::annexb::{nal_type, nal_units};

/// Pending presentation times kept at most (a stream reorders a handful of pictures).
const MAX_PENDING: usize = 32;
/// Bytes of access units kept since the last keyframe while the stream's first GOP is checked
/// for B slices.
const MAX_GOP_BYTES: usize = 8 << 20;

/// OpenH264 behind [`VideoDecoder`], with a picture-size limit.
pub struct SoftwareDecoder {
    decoder: Decoder,
    /// Pictures above this many pixels are refused (default: 4096 x 2304, a 4K camera).
    pub max_pixels: u64,
    /// Until a keyframe arrives (at the start, after a reset or an error) access units are skipped.
    waiting_for_idr: bool,
    /// A whole GOP went by without a B slice: the stream has none, stop keeping access units.
    gop_checked: bool,
    keyframes_seen: u32,
    /// The stream has B slices: do not flush after each access unit.
    reordering: bool,
    /// Presentation times of access units whose pictures have not come out yet.
    pending: BinaryHeap<Reverse<OrderedF64>>,
    /// Access units since the last keyframe, while not reordering (to replay on the switch).
    gop: Vec<(Vec<u8>, f64)>,
    gop_bytes: usize,
    /// Presentation time of the last picture handed out.
    last_out: Option<f64>,
    /// After the switch to reordering: pictures up to this time were handed out already.
    skip_until: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedF64(f64);
impl Eq for OrderedF64 {}
impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl std::fmt::Debug for SoftwareDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareDecoder")
            .field("waiting_for_idr", &self.waiting_for_idr)
            .field("reordering", &self.reordering)
            .finish()
    }
}

fn new_decoder() -> Result<Decoder, DecodeError> {
    Decoder::with_api_config(OpenH264API::from_source(), DecoderConfig::new().flush_after_decode(Flush::NoFlush))
        .map_err(|e| DecodeError::Corrupt(e.to_string()))
}

/// Whether the access unit carries an IDR slice (type 5).
pub fn is_idr(access_unit: &[u8]) -> bool {
    nal_units(access_unit).any(|n| nal_type(n) == 5)
}

/// Whether decoding can start at this access unit: an IDR picture, or a picture whose slices are
/// intra-coded (`slice_type` I or SI).
pub fn is_keyframe(access_unit: &[u8]) -> bool {
    is_idr(access_unit)
        || nal_units(access_unit)
            .find(|n| nal_type(n) == 1)
            .and_then(slice_type)
            .is_some_and(|t| matches!(t % 5, 2 | 4))
}

/// Reads an unsigned Exp-Golomb code at `*bit` of `data` (emulation prevention already removed).
fn read_ue(data: &[u8], bit: &mut usize) -> Option<u32> {
    let get = |i: usize| data.get(i / 8).map(|b| (b >> (7 - i % 8)) & 1);
    let mut zeros = 0;
    while get(*bit)? == 0 {
        zeros += 1;
        *bit += 1;
        if zeros > 31 {
            return None;
        }
    }
    *bit += 1;
    let mut v: u32 = 0;
    for _ in 0..zeros {
        v = (v << 1) | get(*bit)? as u32;
        *bit += 1;
    }
    Some((1u32 << zeros) - 1 + v)
}

/// `slice_type` of a slice NAL unit (0 P, 1 B, 2 I, 3 SP, 4 SI; +5 when all slices share it).
fn slice_type(nal: &[u8]) -> Option<u32> {
    // The slice header's first bytes, emulation prevention bytes removed.
    let mut rbsp = Vec::with_capacity(16);
    let mut zeros = 0;
    for &b in nal.iter().skip(1).take(16) {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        rbsp.push(b);
    }
    let mut bit = 0;
    let _first_mb = read_ue(&rbsp, &mut bit)?;
    read_ue(&rbsp, &mut bit)
}

/// Whether any slice of the access unit is a B slice (`slice_type` 1 or 6).
pub fn has_b_slice(access_unit: &[u8]) -> bool {
    nal_units(access_unit).filter(|n| matches!(nal_type(n), 1 | 5)).any(|nal| matches!(slice_type(nal), Some(1 | 6)))
}

impl SoftwareDecoder {
    pub fn new() -> Result<Self, DecodeError> {
        Ok(Self {
            decoder: new_decoder()?,
            max_pixels: 4096 * 2304,
            waiting_for_idr: true,
            gop_checked: false,
            keyframes_seen: 0,
            reordering: false,
            pending: BinaryHeap::new(),
            gop: Vec::new(),
            gop_bytes: 0,
            last_out: None,
            skip_until: None,
        })
    }

    /// Switches to reordering: decodes the kept access units again without flushing.
    /// Returns whether the current access unit can be decoded now (false: the kept units did
    /// not cover the GOP, so decoding resumes at the next keyframe).
    fn switch_to_reordering(&mut self) -> Result<bool, DecodeError> {
        self.reordering = true;
        self.skip_until = self.last_out;
        self.decoder = new_decoder()?;
        self.pending.clear();
        let gop = std::mem::take(&mut self.gop);
        self.gop_bytes = 0;
        if gop.is_empty() {
            self.waiting_for_idr = true;
            return Ok(false);
        }
        for (au, pts) in gop {
            // Pictures of these units were handed out already (or are older): only rebuild state.
            let _ = self.decode_one(&au, pts)?;
        }
        Ok(true)
    }

    /// Feeds one unit to OpenH264 and returns the picture it produced, with its time.
    fn decode_one(&mut self, access_unit: &[u8], pts_s: f64) -> Result<Option<(Frame, f64)>, DecodeError> {
        self.pending.push(Reverse(OrderedF64(pts_s)));
        if self.pending.len() > MAX_PENDING {
            // Access units that never produced a picture: forget the oldest.
            self.pending.pop();
        }
        let flush = if self.reordering { Flush::NoFlush } else { Flush::Flush };
        let decoded =
            match self.decoder.decode_with_options(access_unit, DecodeOptions::new().flush_after_decode(flush)) {
                Ok(Some(yuv)) => {
                    let (w, h) = yuv.dimensions();
                    if (w as u64) * (h as u64) > self.max_pixels {
                        return Err(DecodeError::TooLarge {
                            width: w as u32,
                            height: h as u32,
                            max_pixels: self.max_pixels,
                        });
                    }
                    Frame::from_planes(w as u32, h as u32, (yuv.y(), yuv.u(), yuv.v()), yuv.strides())?
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(DecodeError::Corrupt(e.to_string())),
            };
        let pts = if self.reordering {
            self.pending.pop().map_or(pts_s, |Reverse(OrderedF64(t))| t)
        } else {
            // Flushed after every unit: the picture is this unit's.
            self.pending.clear();
            pts_s
        };
        Ok(Some((decoded, pts)))
    }

    /// Whether the stream turned out to have B-frames.
    pub fn reordering(&self) -> bool {
        self.reordering
    }
}

impl VideoDecoder for SoftwareDecoder {
    fn decode(&mut self, access_unit: &[u8], pts_s: f64) -> Result<Option<(Frame, f64)>, DecodeError> {
        let keyframe = is_keyframe(access_unit);
        if self.waiting_for_idr {
            if !keyframe {
                return Ok(None);
            }
            // Start clean on the keyframe: OpenH264 keeps broken references otherwise.
            self.decoder = new_decoder()?;
            self.pending.clear();
            self.gop.clear();
            self.gop_bytes = 0;
            self.waiting_for_idr = false;
        }
        let result = if !self.reordering && has_b_slice(access_unit) {
            match self.switch_to_reordering() {
                Ok(true) => self.decode_one(access_unit, pts_s),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            if !self.reordering && !self.gop_checked {
                if keyframe {
                    self.keyframes_seen += 1;
                    // A whole GOP without a B slice: this stream has none.
                    if self.keyframes_seen >= 2 {
                        self.gop_checked = true;
                    }
                    self.gop.clear();
                    self.gop_bytes = 0;
                }
                if !self.gop_checked && self.gop_bytes + access_unit.len() <= MAX_GOP_BYTES {
                    self.gop_bytes += access_unit.len();
                    self.gop.push((access_unit.to_vec(), pts_s));
                } else {
                    self.gop.clear();
                    self.gop_bytes = 0;
                }
            }
            self.decode_one(access_unit, pts_s)
        };
        match result {
            Ok(Some((frame, pts))) => {
                if let Some(skip) = self.skip_until {
                    if pts <= skip {
                        return Ok(None);
                    }
                    self.skip_until = None;
                }
                self.last_out = Some(pts);
                Ok(Some((frame, pts)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.waiting_for_idr = true;
                Err(e)
            }
        }
    }

    fn reset(&mut self) -> Result<(), DecodeError> {
        self.decoder = new_decoder()?;
        self.waiting_for_idr = true;
        self.gop_checked = false;
        self.keyframes_seen = 0;
        self.reordering = false;
        self.pending.clear();
        self.gop.clear();
        self.gop_bytes = 0;
        self.last_out = None;
        self.skip_until = None;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "openh264"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::FileSource;
    use crate::source::{FileSpec, SourceItem};
    use std::sync::atomic::AtomicBool;

    fn decode_file(name: &str, fps: f64) -> (Vec<(Frame, f64)>, SoftwareDecoder, u64) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../media").join(name);
        let mut src = FileSource::open(FileSpec { path, looped: false, realtime: false, fps }).expect("open");
        let mut dec = SoftwareDecoder::new().expect("decoder");
        let stop = AtomicBool::new(false);
        let (mut out, mut errors) = (Vec::new(), 0);
        while let Ok(Some(item)) = src.next(&stop) {
            match item {
                SourceItem::Unit(u) => match dec.decode(&u.data, u.pts_s) {
                    Ok(Some(f)) => out.push(f),
                    Ok(None) => {}
                    Err(_) => errors += 1,
                },
                SourceItem::Ended => break,
                SourceItem::Started { .. } => {}
            }
        }
        (out, dec, errors)
    }

    #[test]
    fn a_camera_stream_decodes_every_frame_without_delay() {
        let (frames, dec, errors) = decode_file("vtest-street-768x576-10fps.264", 10.0);
        assert_eq!(errors, 0);
        assert!(!dec.reordering());
        assert_eq!(frames.len(), 795, "every access unit gives its picture at once");
        assert_eq!((frames[0].0.width, frames[0].0.height), (768, 576));
        assert!(frames.windows(2).all(|w| (w[1].1 - w[0].1 - 0.1).abs() < 1e-9));
    }

    #[test]
    fn a_stream_with_b_frames_comes_out_in_presentation_order() {
        let (frames, dec, errors) = decode_file("bikes-street-640x272-25fps.mp4", 25.0);
        assert_eq!(errors, 0);
        assert!(dec.reordering(), "the clip has B-frames");
        assert!(frames.len() >= 245, "{} of 250 frames", frames.len());
        assert!(frames.windows(2).all(|w| w[1].1 > w[0].1), "presentation times increase");
        // Consecutive pictures of a continuous scene are alike; a misordered pair would not be
        // more alike than its neighbours. Check mean luma changes smoothly.
        let luma: Vec<f64> =
            frames.iter().map(|(f, _)| f.y.iter().map(|&v| v as f64).sum::<f64>() / f.y.len() as f64).collect();
        let jumps = luma
            .windows(3)
            .filter(|w| (w[1] - w[0]).signum() != (w[2] - w[1]).signum() && (w[1] - w[0]).abs() > 1.0)
            .count();
        assert!(jumps < 10, "{jumps} zig-zags in mean luma");
    }

    #[test]
    fn corrupt_data_is_an_error_and_decoding_resumes_at_the_next_keyframe() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../media/vtest-street-768x576-10fps.264");
        let mut src = FileSource::open(FileSpec { path, looped: false, realtime: false, fps: 10.0 }).expect("open");
        let mut dec = SoftwareDecoder::new().expect("decoder");
        let stop = AtomicBool::new(false);
        let (mut ok_after, mut errors, mut n) = (0, 0, 0);
        while let Ok(Some(item)) = src.next(&stop) {
            let SourceItem::Unit(mut u) = item else { continue };
            n += 1;
            if n > 120 {
                break;
            }
            if (10..14).contains(&n) {
                // Garble the slice data (keep the start codes and NAL headers).
                let len = u.data.len();
                for b in u.data[len / 3..len - 4].iter_mut() {
                    *b = b.wrapping_mul(31).wrapping_add(7);
                }
            }
            match dec.decode(&u.data, u.pts_s) {
                Ok(Some(_)) if n > 40 => ok_after += 1,
                Ok(_) => {}
                Err(_) => errors += 1,
            }
        }
        assert!(errors >= 1, "garbled slices are reported");
        assert_eq!(ok_after, 80, "every frame after the next keyframe (GOP 30) decodes");
    }

    #[test]
    fn b_slices_are_recognised_from_the_slice_header() {
        // NAL header (non-IDR slice), first_mb_in_slice = 0 ("1"), slice_type = 1 ("010") → B.
        assert!(has_b_slice(&[0, 0, 0, 1, 0x01, 0b1010_0000]));
        // slice_type = 0 ("1") → P.
        assert!(!has_b_slice(&[0, 0, 0, 1, 0x41, 0b1100_0000]));
        // slice_type = 6 ("00111") → B (all slices B).
        assert!(has_b_slice(&[0, 0, 0, 1, 0x01, 0b1001_1100]));
        // slice_type = 7 ("0001000") → I: a keyframe although not IDR.
        assert!(is_keyframe(&[0, 0, 0, 1, 0x41, 0b1000_1000, 0]));
        assert!(!is_keyframe(&[0, 0, 0, 1, 0x41, 0b1100_0000]), "P is not");
        assert!(is_keyframe(&[0, 0, 0, 1, 0x65, 0b1000_0000]), "IDR is");
    }
}
