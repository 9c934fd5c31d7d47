//! RTSP cameras through retina: DESCRIBE/SETUP/PLAY of the first H.264 video stream, frames as
//! Annex-B with parameter sets before every keyframe.
//!
//! The session is reconnected, with capped exponential backoff, when the server goes away, the
//! stream ends or errors, no video frame arrives for `stall_timeout` (RTCP reports do not count:
//! a camera whose encoder froze still sends them), or the stream's parameters change to another
//! picture size (a reconfigured camera: a fresh DESCRIBE gets the new SDP). Every loss of a
//! playing stream is counted as a reconnect in [`SourceStats`] and so in the device's health.
//!
//! Access units go to the camera's decode thread through a bounded channel; when it is full the
//! unit is dropped (counted) and so is everything up to the next keyframe, since later frames
//! would not decode without it.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use its_shared::session::Backoff;
use retina::client::{
    Credentials, PlayOptions, Session, SessionOptions, SetupOptions, TcpTransportOptions, TeardownPolicy, Transport,
    UdpTransportOptions,
};
use retina::codec::{CodecItem, FrameFormat, ParametersRef};
use tokio::sync::{mpsc, watch};

use super::{AccessUnit, RtspSpec, RtspTransport, SourceItem};

/// Counters and state of one source, read by the health report.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Playing streams lost (server gone, stall, error, parameter change), each followed by
    /// reconnection attempts.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed (DESCRIBE/SETUP/PLAY refused or timed out).
    pub connect_failures: AtomicU64,
    /// Access units dropped because the decoder was behind (including those up to the next keyframe).
    pub units_dropped: AtomicU64,
    /// RTP packets the server sent that never arrived (UDP), as retina reports them.
    pub packets_lost: AtomicU64,
    /// `connecting`, `streaming`, `reconnecting`, `stopped`.
    pub state: Mutex<&'static str>,
    /// The last reason the stream was lost, for operators.
    pub last_error: Mutex<Option<String>>,
}

impl SourceStats {
    pub fn set_state(&self, s: &'static str) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
    }

    pub fn state(&self) -> &'static str {
        self.state.lock().map(|g| *g).unwrap_or("unknown")
    }

    fn set_error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }
}

/// Why a playing session ended.
#[derive(Debug)]
enum Lost {
    Shutdown,
    Receiver,
    Reason(String),
}

async fn connect(spec: &RtspSpec) -> Result<retina::client::Demuxed, String> {
    let creds = spec
        .username
        .as_ref()
        .map(|u| Credentials { username: u.clone(), password: spec.password.clone().unwrap_or_default() });
    let opts = SessionOptions::default()
        .creds(creds)
        .user_agent(format!("its-agent/{}", env!("CARGO_PKG_VERSION")))
        .teardown(TeardownPolicy::Auto);
    let t = spec.connect_timeout;
    let timed = |what: &'static str| move |_| format!("{what} timed out after {t:?}");
    let mut session = tokio::time::timeout(t, Session::describe(spec.url.clone(), opts))
        .await
        .map_err(timed("DESCRIBE"))?
        .map_err(|e| format!("DESCRIBE: {e}"))?;
    let stream =
        session.streams().iter().position(|s| s.media() == "video" && s.encoding_name() == "h264").ok_or_else(
            || {
                let found: Vec<String> =
                    session.streams().iter().map(|s| format!("{}/{}", s.media(), s.encoding_name())).collect();
                format!("no H.264 video stream (the server offers {})", found.join(", "))
            },
        )?;
    let transport = match spec.transport {
        RtspTransport::Tcp => Transport::Tcp(TcpTransportOptions::default()),
        RtspTransport::Udp => Transport::Udp(UdpTransportOptions::default()),
    };
    tokio::time::timeout(
        t,
        session.setup(stream, SetupOptions::default().transport(transport).frame_format(FrameFormat::SIMPLE)),
    )
    .await
    .map_err(timed("SETUP"))?
    .map_err(|e| format!("SETUP: {e}"))?;
    let playing = tokio::time::timeout(t, session.play(PlayOptions::default()))
        .await
        .map_err(timed("PLAY"))?
        .map_err(|e| format!("PLAY: {e}"))?;
    playing.demuxed().map_err(|e| format!("starting the demuxer: {e}"))
}

fn video_size(d: &retina::client::Demuxed, stream: usize) -> Option<(u32, u32)> {
    match d.streams().get(stream)?.parameters()? {
        ParametersRef::Video(v) => Some(v.pixel_dimensions()),
        _ => None,
    }
}

/// Streams from one session until it is lost.
async fn play(
    mut demuxed: retina::client::Demuxed,
    spec: &RtspSpec,
    tx: &mpsc::Sender<SourceItem>,
    stats: &SourceStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Lost {
    let mut size: Option<(u32, u32)> = None;
    let mut skip_to_keyframe = false;
    // The stall deadline runs from the last video frame, whatever else arrives meanwhile.
    let mut deadline = tokio::time::Instant::now() + spec.stall_timeout;
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout_at(deadline, demuxed.next()) => r,
            _ = shutdown.changed() => return Lost::Shutdown,
        };
        let frame = match next {
            Err(_) => return Lost::Reason(format!("stalled: no frame for {:?}", spec.stall_timeout)),
            Ok(None) => return Lost::Reason("the server ended the stream".into()),
            Ok(Some(Err(e))) => return Lost::Reason(e.to_string()),
            Ok(Some(Ok(CodecItem::VideoFrame(f)))) => f,
            Ok(Some(Ok(_))) => continue,
        };
        deadline = tokio::time::Instant::now() + spec.stall_timeout;
        stats.packets_lost.fetch_add(frame.loss() as u64, Ordering::Relaxed);
        if frame.has_new_parameters() || size.is_none() {
            let now = video_size(&demuxed, frame.stream_id());
            if let (Some(before), Some(after)) = (size, now)
                && before != after
            {
                return Lost::Reason(format!(
                    "picture size changed from {}x{} to {}x{}",
                    before.0, before.1, after.0, after.1
                ));
            }
            size = now.or(size);
        }
        let keyframe = frame.is_random_access_point();
        if skip_to_keyframe && !keyframe {
            stats.units_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        skip_to_keyframe = false;
        let pts_s = frame.timestamp().elapsed_secs();
        let unit = SourceItem::Unit(AccessUnit { data: frame.into_data(), pts_s });
        match tx.try_send(unit) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.units_dropped.fetch_add(1, Ordering::Relaxed);
                skip_to_keyframe = true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Lost::Receiver,
        }
    }
}

/// Runs one RTSP camera until `shutdown` or until the receiver goes away.
pub async fn run_rtsp(
    spec: RtspSpec,
    tx: mpsc::Sender<SourceItem>,
    stats: Arc<SourceStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let url = spec.display_url();
    let mut backoff = Backoff::new(spec.backoff_base, spec.backoff_cap, if spec.jitter { 0.5 } else { 0.0 });
    stats.set_state("connecting");
    loop {
        if *shutdown.borrow() {
            break;
        }
        let attempt = tokio::select! {
            r = connect(&spec) => r,
            _ = shutdown.changed() => break,
        };
        match attempt {
            Ok(demuxed) => {
                backoff.reset();
                tracing::info!(%url, transport = ?spec.transport, "camera stream playing");
                stats.set_state("streaming");
                let description = format!("rtsp {url} over {:?}", spec.transport);
                if tx.send(SourceItem::Started { description }).await.is_err() {
                    break;
                }
                match play(demuxed, &spec, &tx, &stats, &mut shutdown).await {
                    Lost::Shutdown | Lost::Receiver => break,
                    Lost::Reason(why) => {
                        tracing::warn!(%url, reason = %why, "camera stream lost; reconnecting");
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        stats.set_error(why);
                        stats.set_state("reconnecting");
                    }
                }
            }
            Err(why) => {
                tracing::warn!(%url, reason = %why, "camera connection failed");
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                stats.set_error(why);
            }
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    stats.set_state("stopped");
}

/// The spec's URL without credentials, and the credentials it carried (percent-decoded: a
/// password with `@` or `:` is written `%40`, `%3A` in a URL).
pub fn split_credentials(mut url: url::Url) -> (url::Url, Option<String>, Option<String>) {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let user = (!url.username().is_empty()).then(|| decode(url.username()));
    let pass = url.password().map(decode);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    (url, user, pass)
}

/// Default channel depth between an RTSP source and its decoder: about 2 s of 30 fps video.
pub const CHANNEL_UNITS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_the_url() {
        let u = url::Url::parse("rtsp://admin:s3cret%40home%3A1@10.0.0.5:554/stream1").expect("url");
        let (clean, user, pass) = split_credentials(u);
        assert_eq!(clean.as_str(), "rtsp://10.0.0.5:554/stream1");
        assert_eq!(user.as_deref(), Some("admin"));
        assert_eq!(pass.as_deref(), Some("s3cret@home:1"), "percent-encoded characters are decoded");
    }
}
