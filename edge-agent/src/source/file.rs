//! File sources: MP4 (by its own timestamps) or Annex-B `.264` (at a configured frame rate),
//! played once or looped, in real time or as fast as they are taken. A blocking reader: the
//! camera's decode thread pulls from it.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::annexb::AccessUnitSplitter;
use super::mp4::Mp4H264;
use super::{AccessUnit, FileSpec, SourceError, SourceItem};

enum Reader {
    Mp4(Box<Mp4H264>),
    AnnexB {
        file: File,
        splitter: AccessUnitSplitter,
        pending: std::collections::VecDeque<Vec<u8>>,
        eof: bool,
        index: u64,
    },
}

/// A recording as a stream of access units.
pub struct FileSource {
    spec: FileSpec,
    reader: Reader,
    /// Added to the file's timestamps so they keep increasing across loops.
    loop_offset_s: f64,
    /// Last timestamp handed out (to place the next loop after it).
    last_pts_s: f64,
    frame_s: f64,
    /// Real-time pacing: the instant that corresponds to timestamp `pace_origin_s`.
    pace_start: Option<(Instant, f64)>,
    started: bool,
    ended: bool,
    /// Access units read since the file was (re)opened.
    units_this_pass: u64,
    loops: u64,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource").field("path", &self.spec.path).finish()
    }
}

fn file_err(spec: &FileSpec, e: impl std::fmt::Display) -> SourceError {
    SourceError::File { path: spec.path.display().to_string(), message: e.to_string() }
}

fn is_mp4(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "mp4" | "m4v" | "mov"))
}

impl FileSource {
    /// Opens the file (MP4 by extension `.mp4`/`.m4v`/`.mov`, Annex-B otherwise).
    pub fn open(spec: FileSpec) -> Result<Self, SourceError> {
        let reader = if is_mp4(&spec.path) {
            Reader::Mp4(Box::new(Mp4H264::open(&spec.path).map_err(|e| file_err(&spec, e))?))
        } else {
            let file = File::open(&spec.path).map_err(|e| file_err(&spec, e))?;
            Reader::AnnexB {
                file,
                splitter: AccessUnitSplitter::new(),
                pending: Default::default(),
                eof: false,
                index: 0,
            }
        };
        let frame_s = 1.0 / spec.fps.max(0.001);
        Ok(Self {
            spec,
            reader,
            loop_offset_s: 0.0,
            last_pts_s: 0.0,
            frame_s,
            pace_start: None,
            started: false,
            ended: false,
            units_this_pass: 0,
            loops: 0,
        })
    }

    fn describe(&self) -> String {
        let kind = match &self.reader {
            Reader::Mp4(m) => {
                let (w, h) = m.dimensions();
                format!("MP4 {w}x{h}, {} samples", m.sample_count())
            }
            Reader::AnnexB { .. } => format!("Annex-B at {} fps", self.spec.fps),
        };
        format!(
            "file {} ({kind}{}{})",
            self.spec.path.display(),
            if self.spec.looped { ", looped" } else { "" },
            if self.spec.realtime { ", real time" } else { "" }
        )
    }

    /// The next access unit in file order (no pacing), `None` at the end of the file.
    fn read_unit(&mut self) -> Result<Option<(Vec<u8>, f64)>, SourceError> {
        let frame_s = self.frame_s;
        match &mut self.reader {
            Reader::Mp4(m) => Ok(m.next_sample().map_err(SourceError::Mp4)?.map(|s| (s.data, s.pts_s))),
            Reader::AnnexB { file, splitter, pending, eof, index } => loop {
                if let Some(au) = pending.pop_front() {
                    let pts = *index as f64 * frame_s;
                    *index += 1;
                    return Ok(Some((au, pts)));
                }
                if *eof {
                    return Ok(None);
                }
                let mut buf = [0u8; 64 * 1024];
                let n = file.read(&mut buf).map_err(|e| SourceError::File {
                    path: self.spec.path.display().to_string(),
                    message: e.to_string(),
                })?;
                let mut out = Vec::new();
                if n == 0 {
                    *eof = true;
                    splitter.finish(&mut out);
                } else {
                    splitter.push(&buf[..n], &mut out);
                }
                pending.extend(out);
            },
        }
    }

    fn rewind(&mut self) -> Result<(), SourceError> {
        match &mut self.reader {
            Reader::Mp4(m) => m.rewind(),
            Reader::AnnexB { .. } => {
                let file = File::open(&self.spec.path).map_err(|e| file_err(&self.spec, e))?;
                self.reader = Reader::AnnexB {
                    file,
                    splitter: AccessUnitSplitter::new(),
                    pending: Default::default(),
                    eof: false,
                    index: 0,
                };
            }
        }
        Ok(())
    }

    /// The next item; in real-time mode, blocks until the unit is due. Returns `None` when `stop`
    /// is set while waiting.
    pub fn next(&mut self, stop: &AtomicBool) -> Result<Option<SourceItem>, SourceError> {
        if !self.started {
            self.started = true;
            return Ok(Some(SourceItem::Started { description: self.describe() }));
        }
        if self.ended {
            return Ok(Some(SourceItem::Ended));
        }
        let unit = match self.read_unit() {
            Ok(u) => u,
            // A damaged sample (a file cut short, a corrupt index entry) ends this pass through
            // the file rather than the camera; a file that yields nothing at all is an error.
            Err(e) if self.units_this_pass > 0 => {
                tracing::warn!(file = %self.spec.path.display(), error = %e, "unreadable sample; treating it as the end of the file");
                None
            }
            Err(e) => return Err(e),
        };
        let (data, pts) = match unit {
            Some(u) => u,
            None if self.spec.looped => {
                if self.units_this_pass == 0 {
                    return Err(file_err(&self.spec, "contains no video"));
                }
                self.rewind()?;
                self.units_this_pass = 0;
                self.loops += 1;
                self.loop_offset_s = self.last_pts_s + self.frame_s;
                // The picture jumps back to the start: everything before is unrelated.
                return Ok(Some(SourceItem::Started {
                    description: format!("{} (loop {})", self.describe(), self.loops),
                }));
            }
            None => {
                self.ended = true;
                return Ok(Some(SourceItem::Ended));
            }
        };
        self.units_this_pass += 1;
        let pts_s = pts + self.loop_offset_s;
        self.last_pts_s = self.last_pts_s.max(pts_s);
        if self.spec.realtime {
            let (origin, origin_pts) = *self.pace_start.get_or_insert((Instant::now(), pts_s));
            let due = origin + Duration::from_secs_f64((pts_s - origin_pts).max(0.0));
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let now = Instant::now();
                if now >= due {
                    break;
                }
                // Short naps keep shutdown prompt; this runs on the camera's own thread.
                std::thread::sleep((due - now).min(Duration::from_millis(50)));
            }
        }
        Ok(Some(SourceItem::Unit(AccessUnit { data, pts_s })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::annexb::{nal_type, nal_units};

    fn media(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../media").join(name)
    }

    fn units(spec: FileSpec, max: usize) -> Vec<AccessUnit> {
        let stop = AtomicBool::new(false);
        let mut src = FileSource::open(spec).expect("opens");
        let mut out = Vec::new();
        while out.len() < max {
            match src.next(&stop).expect("reads") {
                Some(SourceItem::Unit(u)) => out.push(u),
                Some(SourceItem::Started { .. }) => {}
                Some(SourceItem::Ended) | None => break,
            }
        }
        out
    }

    #[test]
    fn annexb_and_mp4_of_the_same_clip_give_the_same_access_units() {
        let spec = |name: &str| FileSpec { path: media(name), looped: false, realtime: false, fps: 10.0 };
        let a = units(spec("vtest-street-768x576-10fps.264"), 2000);
        let m = units(spec("vtest-street-768x576-10fps.mp4"), 2000);
        assert_eq!(a.len(), 795);
        assert_eq!(m.len(), 795);
        // Same picture data; the MP4 carries parameter sets per keyframe, so compare the slices.
        let slices = |u: &AccessUnit| -> Vec<Vec<u8>> {
            nal_units(&u.data).filter(|n| matches!(nal_type(n), 1 | 5)).map(|n| n.to_vec()).collect()
        };
        for (x, y) in a.iter().zip(&m).take(100) {
            assert_eq!(slices(x), slices(y));
            assert!((x.pts_s - y.pts_s).abs() < 1e-6);
        }
    }

    #[test]
    fn a_looped_file_keeps_its_timestamps_increasing() {
        // Annex-B at 25 fps: 795 frames, then the loop.
        let spec = FileSpec { path: media("vtest-street-768x576-10fps.264"), looped: true, realtime: false, fps: 25.0 };
        let stop = AtomicBool::new(false);
        let mut src = FileSource::open(spec).expect("opens");
        let (mut u, mut starts) = (Vec::new(), 0);
        while u.len() < 1000 {
            match src.next(&stop).expect("reads") {
                Some(SourceItem::Unit(x)) => u.push(x),
                Some(SourceItem::Started { .. }) => starts += 1,
                _ => break,
            }
        }
        assert_eq!(starts, 2, "the start and the loop are both marked");
        assert!(u.windows(2).all(|w| w[1].pts_s > w[0].pts_s), "timestamps must increase across the loop");
        assert!((u[999].pts_s - 999.0 / 25.0).abs() < 1e-6, "{}", u[999].pts_s);
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let spec = FileSpec { path: "/nonexistent/clip.mp4".into(), looped: false, realtime: false, fps: 10.0 };
        let err = FileSource::open(spec).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/clip.mp4"), "{err}");
    }
}
