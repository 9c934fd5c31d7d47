//! A small MP4 (ISO BMFF) demuxer for H.264 video tracks: enough to replay recordings, written
//! for hostile input. Every size and count is checked against its container and the file before
//! it is used; nothing here panics, loops forever, or allocates more than the caps below on a
//! corrupt or malicious file.
//!
//! Supported: progressive (non-fragmented) files with an `avc1` or `avc3` track. Samples come out
//! as Annex-B access units, with the `avcC` parameter sets put in front of every sync sample.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// `moov` larger than this is refused (a day of 30 fps video has a moov of a few MiB).
const MAX_MOOV: u64 = 64 << 20;
/// Samples per track (about 37 hours at 30 fps).
const MAX_SAMPLES: usize = 4_000_000;
/// A single sample larger than this is refused.
const MAX_SAMPLE: u32 = 16 << 20;
/// Box nesting depth.
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mp4Error {
    #[error("reading the file: {0}")]
    Io(String),
    #[error("not a usable MP4 file: {0}")]
    Invalid(String),
    #[error("unsupported MP4: {0}")]
    Unsupported(String),
}

fn invalid(msg: impl Into<String>) -> Mp4Error {
    Mp4Error::Invalid(msg.into())
}

fn io(e: std::io::Error) -> Mp4Error {
    Mp4Error::Io(e.to_string())
}

/// One box: type and payload (header stripped).
#[derive(Debug, Clone, Copy)]
struct Bx<'a> {
    kind: [u8; 4],
    body: &'a [u8],
}

/// Iterates the boxes laid end to end in `data`; a malformed header ends the iteration with an error.
fn children(data: &[u8]) -> impl Iterator<Item = Result<Bx<'_>, Mp4Error>> {
    let mut rest = data;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let r = (|| {
            if rest.len() < 8 {
                return Err(invalid("truncated box header"));
            }
            let size32 = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
            let kind = [rest[4], rest[5], rest[6], rest[7]];
            let (size, header) = match size32 {
                0 => (rest.len() as u64, 8),
                1 => {
                    let b = rest.get(8..16).ok_or_else(|| invalid("truncated 64-bit box size"))?;
                    (u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]), 16)
                }
                s => (s, 8),
            };
            if size < header as u64 || size > rest.len() as u64 {
                return Err(invalid(format!(
                    "box {} of {size} bytes does not fit its container ({} bytes left)",
                    String::from_utf8_lossy(&kind),
                    rest.len()
                )));
            }
            let body = &rest[header..size as usize];
            rest = &rest[size as usize..];
            Ok(Bx { kind, body })
        })();
        failed = r.is_err();
        Some(r)
    })
}

fn find<'a>(data: &'a [u8], kind: &[u8; 4]) -> Result<Option<&'a [u8]>, Mp4Error> {
    for b in children(data) {
        let b = b?;
        if &b.kind == kind {
            return Ok(Some(b.body));
        }
    }
    Ok(None)
}

fn need<'a>(data: &'a [u8], kind: &[u8; 4], within: &str) -> Result<&'a [u8], Mp4Error> {
    find(data, kind)?.ok_or_else(|| invalid(format!("{within} has no {} box", String::from_utf8_lossy(kind))))
}

/// Big-endian reader over a slice with checked reads.
struct Cur<'a> {
    d: &'a [u8],
    what: &'static str,
}

impl<'a> Cur<'a> {
    fn new(d: &'a [u8], what: &'static str) -> Self {
        Self { d, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Mp4Error> {
        if self.d.len() < n {
            return Err(invalid(format!("{} box is truncated", self.what)));
        }
        let (a, b) = self.d.split_at(n);
        self.d = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Mp4Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Mp4Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Mp4Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, Mp4Error> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    /// A full box's version and flags.
    fn version(&mut self) -> Result<u8, Mp4Error> {
        let v = self.u8()?;
        self.take(3)?;
        Ok(v)
    }
    /// An entry count whose entries take `entry_size` bytes each: checked against what remains.
    fn count(&mut self, entry_size: usize) -> Result<usize, Mp4Error> {
        let n = self.u32()? as usize;
        if n.saturating_mul(entry_size) > self.d.len() {
            return Err(invalid(format!("{} box claims {n} entries but is too short", self.what)));
        }
        Ok(n)
    }
}

/// A sample's place in the file and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SampleEntry {
    offset: u64,
    size: u32,
    /// Presentation time in track timescale units.
    pts: i64,
    sync: bool,
}

/// The index of an H.264 track.
#[derive(Debug)]
struct TrackIndex {
    samples: Vec<SampleEntry>,
    timescale: u32,
    nal_length_size: usize,
    /// SPS and PPS as Annex-B, put before sync samples.
    parameter_sets: Vec<u8>,
    width: u32,
    height: u32,
}

/// An H.264 track ready to be read.
#[derive(Debug)]
pub struct Mp4H264 {
    file: File,
    file_len: u64,
    track: TrackIndex,
    next: usize,
}

/// One access unit read from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Mp4Sample {
    /// Annex-B bytes.
    pub data: Vec<u8>,
    /// Presentation time in seconds from the start of the track.
    pub pts_s: f64,
    pub sync: bool,
}

impl Mp4H264 {
    /// Opens `path` and indexes its first H.264 video track.
    pub fn open(path: &Path) -> Result<Self, Mp4Error> {
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let moov = read_moov(&mut file, file_len)?;
        let mut tracks = 0;
        for b in children(&moov) {
            let b = b?;
            if &b.kind == b"mvex" {
                return Err(Mp4Error::Unsupported("fragmented MP4 (moof/mvex); remux it as a progressive file".into()));
            }
            if &b.kind != b"trak" {
                continue;
            }
            tracks += 1;
            if let Some(track) = parse_track(b.body, file_len)? {
                return Ok(Self { file, file_len, track, next: 0 });
            }
        }
        Err(Mp4Error::Unsupported(format!("no H.264 (avc1/avc3) video track among {tracks} track(s)")))
    }

    pub fn sample_count(&self) -> usize {
        self.track.samples.len()
    }

    /// Picture size from the sample description.
    pub fn dimensions(&self) -> (u32, u32) {
        (self.track.width, self.track.height)
    }

    /// Duration of the track in seconds (last presentation time plus one frame).
    pub fn duration_s(&self) -> f64 {
        let t = &self.track;
        let last = t.samples.iter().map(|s| s.pts).max().unwrap_or(0);
        let frame = if t.samples.len() > 1 { last as f64 / (t.samples.len() - 1) as f64 } else { 0.0 };
        (last as f64 + frame) / t.timescale as f64
    }

    /// Back to the first sample.
    pub fn rewind(&mut self) {
        self.next = 0;
    }

    /// The next sample in decode order, or `None` at the end.
    pub fn next_sample(&mut self) -> Result<Option<Mp4Sample>, Mp4Error> {
        let t = &self.track;
        let Some(&e) = t.samples.get(self.next) else { return Ok(None) };
        self.next += 1;
        if e.offset.saturating_add(e.size as u64) > self.file_len {
            return Err(invalid("sample lies beyond the end of the file (truncated file?)"));
        }
        let mut raw = vec![0u8; e.size as usize];
        self.file.seek(SeekFrom::Start(e.offset)).map_err(io)?;
        self.file.read_exact(&mut raw).map_err(io)?;
        let t = &self.track;
        let mut data = Vec::with_capacity(raw.len() + t.parameter_sets.len() + 16);
        if e.sync {
            data.extend_from_slice(&t.parameter_sets);
        }
        length_prefixed_to_annexb(&raw, t.nal_length_size, &mut data)?;
        Ok(Some(Mp4Sample { data, pts_s: e.pts as f64 / t.timescale as f64, sync: e.sync }))
    }
}

/// Converts NAL units with big-endian length prefixes of `n` bytes to Annex-B.
pub fn length_prefixed_to_annexb(mut d: &[u8], n: usize, out: &mut Vec<u8>) -> Result<(), Mp4Error> {
    while !d.is_empty() {
        if d.len() < n {
            return Err(invalid("truncated NAL length in a sample"));
        }
        let len = d[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        d = &d[n..];
        if len > d.len() {
            return Err(invalid(format!("NAL unit of {len} bytes in a sample with {} left", d.len())));
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&d[..len]);
        d = &d[len..];
    }
    Ok(())
}

/// Finds the top-level `moov` by walking box headers on disk and reads it.
fn read_moov(file: &mut File, file_len: u64) -> Result<Vec<u8>, Mp4Error> {
    let mut pos = 0u64;
    let mut seen = 0;
    while pos + 8 <= file_len {
        seen += 1;
        if seen > 100_000 {
            return Err(invalid("too many top-level boxes"));
        }
        file.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut h = [0u8; 16];
        let avail = (file_len - pos).min(16) as usize;
        file.read_exact(&mut h[..avail]).map_err(io)?;
        let size32 = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as u64;
        let kind = [h[4], h[5], h[6], h[7]];
        let (size, header) = match size32 {
            0 => (file_len - pos, 8u64),
            1 if avail >= 16 => (u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]), 16),
            1 => return Err(invalid("truncated 64-bit box size")),
            s => (s, 8),
        };
        if size < header || pos.saturating_add(size) > file_len {
            return Err(invalid(format!(
                "top-level box {} at offset {pos} has size {size}, beyond the file's {file_len} bytes",
                String::from_utf8_lossy(&kind)
            )));
        }
        if &kind == b"moov" {
            let len = size - header;
            if len > MAX_MOOV {
                return Err(invalid(format!("moov of {len} bytes exceeds the {MAX_MOOV}-byte limit")));
            }
            let mut moov = vec![0u8; len as usize];
            file.seek(SeekFrom::Start(pos + header)).map_err(io)?;
            file.read_exact(&mut moov).map_err(io)?;
            check_depth(&moov, 0)?;
            return Ok(moov);
        }
        if &kind == b"moof" {
            return Err(Mp4Error::Unsupported("fragmented MP4 (moof); remux it as a progressive file".into()));
        }
        pos += size;
    }
    Err(invalid("no moov box (not an MP4 file, or truncated before its index)"))
}

/// Refuses absurd nesting of the container boxes we descend into.
fn check_depth(data: &[u8], depth: usize) -> Result<(), Mp4Error> {
    if depth > MAX_DEPTH {
        return Err(invalid("boxes nested too deeply"));
    }
    for b in children(data) {
        let b = b?;
        if matches!(&b.kind, b"trak" | b"mdia" | b"minf" | b"stbl" | b"edts" | b"dinf") {
            check_depth(b.body, depth + 1)?;
        }
    }
    Ok(())
}

/// Parses a `trak`; `Ok(None)` when it is not an H.264 video track.
fn parse_track(trak: &[u8], file_len: u64) -> Result<Option<TrackIndex>, Mp4Error> {
    let mdia = need(trak, b"mdia", "trak")?;
    let hdlr = need(mdia, b"hdlr", "mdia")?;
    let mut c = Cur::new(hdlr, "hdlr");
    c.version()?;
    c.u32()?;
    if c.take(4)? != b"vide" {
        return Ok(None);
    }
    let mut c = Cur::new(need(mdia, b"mdhd", "mdia")?, "mdhd");
    let timescale = match c.version()? {
        1 => {
            c.u64()?;
            c.u64()?;
            c.u32()?
        }
        _ => {
            c.u32()?;
            c.u32()?;
            c.u32()?
        }
    };
    if timescale == 0 {
        return Err(invalid("video track has a timescale of 0"));
    }
    let stbl = need(need(mdia, b"minf", "mdia")?, b"stbl", "minf")?;

    // Sample description: avc1/avc3 with avcC.
    let mut c = Cur::new(need(stbl, b"stsd", "stbl")?, "stsd");
    c.version()?;
    let n = c.u32()?;
    if n == 0 {
        return Err(invalid("stsd has no sample description"));
    }
    let Some(entry) = children(c.d).next().transpose()? else { return Err(invalid("stsd is empty")) };
    match &entry.kind {
        b"avc1" | b"avc3" => {}
        other => {
            return Err(Mp4Error::Unsupported(format!(
                "video codec {} (only H.264 avc1/avc3 is supported)",
                String::from_utf8_lossy(other)
            )));
        }
    }
    // VisualSampleEntry: 6 reserved + 2 index + 16 pre-defined + w/h + 50 more bytes = 78, then boxes.
    let mut v = Cur::new(entry.body, "avc1");
    v.take(24)?;
    let width = v.u16()? as u32;
    let height = v.u16()? as u32;
    v.take(50)?;
    let avcc = need(v.d, b"avcC", "avc1")?;
    let (nal_length_size, parameter_sets) = parse_avcc(avcc)?;

    let sizes = parse_stsz(need(stbl, b"stsz", "stbl")?, file_len)?;
    let chunk_offsets = match find(stbl, b"stco")? {
        Some(b) => {
            let mut c = Cur::new(b, "stco");
            c.version()?;
            let n = c.count(4)?;
            (0..n).map(|_| c.u32().map(u64::from)).collect::<Result<Vec<_>, _>>()?
        }
        None => {
            let mut c = Cur::new(need(stbl, b"co64", "stbl")?, "co64");
            c.version()?;
            let n = c.count(8)?;
            (0..n).map(|_| c.u64()).collect::<Result<Vec<_>, _>>()?
        }
    };
    let offsets = sample_offsets(need(stbl, b"stsc", "stbl")?, &chunk_offsets, &sizes)?;
    let dts = decode_times(need(stbl, b"stts", "stbl")?, sizes.len())?;
    let cts = match find(stbl, b"ctts")? {
        Some(b) => Some(composition_offsets(b, sizes.len())?),
        None => None,
    };
    let sync = match find(stbl, b"stss")? {
        Some(b) => {
            let mut c = Cur::new(b, "stss");
            c.version()?;
            let n = c.count(4)?;
            let mut s = vec![false; sizes.len()];
            for _ in 0..n {
                let i = c.u32()? as usize;
                if i == 0 || i > s.len() {
                    return Err(invalid(format!("stss names sample {i} of {}", s.len())));
                }
                s[i - 1] = true;
            }
            s
        }
        // No stss: every sample is a sync sample.
        None => vec![true; sizes.len()],
    };
    let mut samples = Vec::with_capacity(sizes.len());
    for i in 0..sizes.len() {
        let size = sizes[i];
        if size > MAX_SAMPLE {
            return Err(invalid(format!("sample {} of {size} bytes exceeds the {MAX_SAMPLE}-byte limit", i + 1)));
        }
        if offsets[i].saturating_add(size as u64) > file_len {
            return Err(invalid(format!("sample {} lies beyond the end of the file", i + 1)));
        }
        let pts = dts[i].saturating_add(cts.as_ref().map_or(0, |c| c[i]));
        samples.push(SampleEntry { offset: offsets[i], size, pts, sync: sync[i] });
    }
    Ok(Some(TrackIndex { samples, timescale, nal_length_size, parameter_sets, width, height }))
}

fn parse_avcc(b: &[u8]) -> Result<(usize, Vec<u8>), Mp4Error> {
    let mut c = Cur::new(b, "avcC");
    let _version = c.u8()?;
    c.take(3)?; // profile, compatibility, level
    let nal_length_size = (c.u8()? & 3) as usize + 1;
    if nal_length_size == 3 {
        return Err(invalid("avcC NAL length size of 3 bytes is not allowed"));
    }
    let mut out = Vec::new();
    let n_sps = c.u8()? & 0x1f;
    for _ in 0..n_sps {
        let len = c.u16()? as usize;
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(c.take(len)?);
    }
    let n_pps = c.u8()?;
    for _ in 0..n_pps {
        let len = c.u16()? as usize;
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(c.take(len)?);
    }
    Ok((nal_length_size, out))
}

fn parse_stsz(b: &[u8], file_len: u64) -> Result<Vec<u32>, Mp4Error> {
    let mut c = Cur::new(b, "stsz");
    c.version()?;
    let constant = c.u32()?;
    let n = c.u32()? as usize;
    if n > MAX_SAMPLES {
        return Err(invalid(format!("{n} samples exceed the limit of {MAX_SAMPLES}")));
    }
    if constant != 0 {
        // Checked before anything is allocated for them: the samples must fit in the file.
        if (constant as u64).saturating_mul(n as u64) > file_len {
            return Err(invalid(format!("{n} samples of {constant} bytes do not fit in the file")));
        }
        return Ok(vec![constant; n]);
    }
    if n.saturating_mul(4) > c.d.len() {
        return Err(invalid(format!("stsz claims {n} entries but is too short")));
    }
    (0..n).map(|_| c.u32()).collect()
}

/// Expands `stsc` (samples per chunk) and chunk offsets into one offset per sample.
fn sample_offsets(stsc: &[u8], chunks: &[u64], sizes: &[u32]) -> Result<Vec<u64>, Mp4Error> {
    let mut c = Cur::new(stsc, "stsc");
    c.version()?;
    let n = c.count(12)?;
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let (first_chunk, per_chunk, _desc) = (c.u32()?, c.u32()?, c.u32()?);
        if first_chunk == 0 || per_chunk == 0 {
            return Err(invalid("stsc entry with chunk 0 or 0 samples per chunk"));
        }
        if runs.last().is_some_and(|&(prev, _)| first_chunk <= prev) {
            return Err(invalid("stsc entries are not in increasing chunk order"));
        }
        runs.push((first_chunk, per_chunk));
    }
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut sample = 0usize;
    for (k, &(first, per_chunk)) in runs.iter().enumerate() {
        let end_chunk = runs.get(k + 1).map_or(chunks.len() as u64 + 1, |r| r.0 as u64);
        for chunk in first as u64..end_chunk {
            let Some(&base) = chunks.get(chunk as usize - 1) else {
                return Err(invalid(format!("stsc refers to chunk {chunk} of {}", chunks.len())));
            };
            let mut off = base;
            for _ in 0..per_chunk {
                if sample >= sizes.len() {
                    break;
                }
                offsets.push(off);
                off = off.saturating_add(sizes[sample] as u64);
                sample += 1;
            }
            if sample >= sizes.len() {
                break;
            }
        }
    }
    if offsets.len() != sizes.len() {
        return Err(invalid(format!("chunk tables place {} of {} samples", offsets.len(), sizes.len())));
    }
    Ok(offsets)
}

fn decode_times(stts: &[u8], n: usize) -> Result<Vec<i64>, Mp4Error> {
    let mut c = Cur::new(stts, "stts");
    c.version()?;
    let entries = c.count(8)?;
    let mut out = Vec::with_capacity(n);
    let mut t = 0i64;
    for _ in 0..entries {
        let (count, delta) = (c.u32()?, c.u32()?);
        for _ in 0..count {
            if out.len() == n {
                break;
            }
            out.push(t);
            t = t.saturating_add(delta as i64);
        }
    }
    if out.len() != n {
        return Err(invalid(format!("stts gives times for {} of {n} samples", out.len())));
    }
    Ok(out)
}

fn composition_offsets(ctts: &[u8], n: usize) -> Result<Vec<i64>, Mp4Error> {
    let mut c = Cur::new(ctts, "ctts");
    let version = c.version()?;
    let entries = c.count(8)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..entries {
        let (count, raw) = (c.u32()?, c.u32()?);
        let off = if version == 1 { raw as i32 as i64 } else { raw as i64 };
        for _ in 0..count {
            if out.len() == n {
                break;
            }
            out.push(off);
        }
    }
    out.resize(n, 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn media(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../media").join(name)
    }

    #[test]
    fn indexes_the_real_street_clip() {
        let mut m = Mp4H264::open(&media("vtest-street-768x576-10fps.mp4")).expect("opens");
        assert_eq!(m.dimensions(), (768, 576));
        assert_eq!(m.sample_count(), 795);
        assert!((m.duration_s() - 79.5).abs() < 0.2, "{}", m.duration_s());
        let first = m.next_sample().expect("read").expect("a sample");
        assert!(first.sync);
        // SPS, PPS, then the IDR slice.
        let types: Vec<u8> =
            crate::source::annexb::nal_units(&first.data).map(crate::source::annexb::nal_type).collect();
        assert_eq!(&types[..2], &[7, 8], "{types:?}");
        assert!(types.contains(&5));
        let second = m.next_sample().expect("read").expect("a sample");
        assert!((second.pts_s - first.pts_s - 0.1).abs() < 1e-6);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = std::fs::read(media("bikes-street-640x272-25fps.mp4")).expect("read");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.mp4");
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut opened = 0;
        for round in 0..200 {
            let mut b = bytes.clone();
            if round % 2 == 0 {
                b.truncate((next() % bytes.len() as u64) as usize);
            } else {
                // Corrupt a few bytes, biased to the index at the end of the file.
                for _ in 0..4 {
                    let at = bytes.len() - 1 - (next() % 6000) as usize;
                    b[at] = next() as u8;
                }
            }
            std::fs::write(&p, &b).expect("write");
            if let Ok(mut m) = Mp4H264::open(&p) {
                opened += 1;
                while let Ok(Some(_)) = m.next_sample() {}
            }
        }
        assert!(opened > 0, "some corruptions leave a readable file");
    }

    #[test]
    fn a_non_mp4_file_gets_a_clear_error() {
        let err = Mp4H264::open(&media("dog.jpg")).expect_err("not mp4");
        assert!(err.to_string().contains("not a usable MP4"), "{err}");
    }
}
