//! Source stage: where video (and, for load tests, synthetic events) comes from.
//!
//! - [`rtsp`]: cameras over RTSP (retina; TCP interleaved by default, UDP selectable), with
//!   reconnection on loss, stall or parameter change, every reconnect counted;
//! - [`file`]: recordings (MP4 or Annex-B `.264`), played in real time or as fast as the pipeline
//!   takes them, once or looped;
//! - [`synthetic`]: a load generator that writes events directly (no video).
//!
//! Video sources produce [`SourceItem`]s: H.264 access units in Annex-B with their presentation
//! time, and markers where the stream starts again (after a reconnect or a loop), so the decoder
//! and tracker know continuity was broken.
//!
//! - [`annexb`] and [`mp4`]: the H.264 bitstream and MP4 parsing the sources share.
//!
//! May depend on: `buffer` and `uplink` (only [`synthetic`], which writes events directly to the
//! outbox and wakes the uplink).

pub mod annexb;
pub mod file;
pub mod mp4;
pub mod rtsp;
pub mod synthetic;

use std::path::PathBuf;
use std::time::Duration;

pub use synthetic::{SyntheticConfig, run_synthetic};

/// One H.264 access unit.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessUnit {
    /// Annex-B with 4-byte start codes; parameter sets in front of keyframes.
    pub data: Vec<u8>,
    /// Presentation time in seconds, increasing within one run of the stream.
    pub pts_s: f64,
}

/// What a video source hands to the decoder.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceItem {
    /// The stream (re)starts: everything before is unrelated to what follows.
    Started {
        description: String,
    },
    Unit(AccessUnit),
    /// A file source reached its end and will not loop.
    Ended,
}

/// RTSP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtspTransport {
    /// RTP interleaved in the RTSP TCP connection: works through NAT and firewalls, no loss.
    Tcp,
    /// RTP over UDP: lower latency on a clean LAN; packets lost are lost.
    Udp,
}

/// Where a camera's video comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum VideoSource {
    Rtsp(RtspSpec),
    File(FileSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RtspSpec {
    /// URL without credentials (retina refuses URLs that carry them).
    pub url: url::Url,
    pub username: Option<String>,
    pub password: Option<String>,
    pub transport: RtspTransport,
    /// DESCRIBE/SETUP/PLAY each must answer within this.
    pub connect_timeout: Duration,
    /// No frame for this long: the stream is declared stalled and reconnected.
    pub stall_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub jitter: bool,
}

impl RtspSpec {
    /// The URL as logged and reported (never with credentials).
    pub fn display_url(&self) -> String {
        self.url.to_string()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileSpec {
    pub path: PathBuf,
    /// Start again at the end (demos, soak tests).
    pub looped: bool,
    /// Play at the recording's own pace; otherwise as fast as the pipeline takes frames, and
    /// none is dropped (replay and evaluation).
    pub realtime: bool,
    /// Frame rate of Annex-B files, which carry no timestamps (MP4 files have their own).
    pub fps: f64,
}

/// Why a source could not produce video.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Mp4(#[from] mp4::Mp4Error),
}
