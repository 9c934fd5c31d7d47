//! Whole recordings decoded in one go: a [`FileSource`] played once, as fast as possible, through
//! the software decoder (photos of a clip for `its-agent detect`, benchmarks, evaluation).

use std::sync::atomic::AtomicBool;

use super::{Frame, SoftwareDecoder, VideoDecoder};
use crate::source::file::FileSource;
use crate::source::{FileSpec, SourceError, SourceItem};

/// Decodes a recording (played once, as fast as possible) and calls `each` with every picture
/// and its presentation time, until the file ends or `each` returns false. Undecodable access
/// units are skipped (decoding resumes at the next keyframe). Returns the pictures handed out.
pub fn decode_recording(
    path: &std::path::Path,
    fps: f64,
    mut each: impl FnMut(Frame, f64) -> bool,
) -> Result<usize, SourceError> {
    let spec = FileSpec { path: path.to_path_buf(), looped: false, realtime: false, fps };
    let mut src = FileSource::open(spec.clone())?;
    let mut decoder = SoftwareDecoder::new()
        .map_err(|e| SourceError::File { path: spec.path.display().to_string(), message: e.to_string() })?;
    let stop = AtomicBool::new(false);
    let mut n = 0;
    while let Some(item) = src.next(&stop)? {
        match item {
            SourceItem::Unit(u) => {
                if let Ok(Some((frame, pts))) = decoder.decode(&u.data, u.pts_s) {
                    n += 1;
                    if !each(frame, pts) {
                        break;
                    }
                }
            }
            SourceItem::Ended => break,
            SourceItem::Started { .. } => {}
        }
    }
    Ok(n)
}
