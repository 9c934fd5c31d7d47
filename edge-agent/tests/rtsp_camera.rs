//! The vision pipeline against a real RTSP server (GStreamer's gst-rtsp-server through
//! `scripts/rtsp-server`) streaming the real street clip in real time: detections arrive; the
//! server is killed and the camera goes to `reconnecting` while another camera (a file) keeps
//! going; the server comes back on the same port and the camera recovers by itself, with the
//! reconnects counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use its_agent::detect::regions::DetectionSpec;
use its_agent::detect::{BackendKind, BackendOptions, ModelManifest, load_detectors};
use its_agent::pipeline::{CameraSpec, FrameResult, VisionPipeline, VisionSettings};
use its_agent::source::{FileSpec, RtspSpec, RtspTransport, VideoSource};
use its_agent::track::TrackerConfig;
use tokio::sync::mpsc;

use its_testkit::rtsp::{RtspServer, free_tcp_port, project_root as root};

fn rtsp(url: String, transport: RtspTransport, connect_ms: u64, stall_ms: u64, cap_ms: u64) -> VideoSource {
    VideoSource::Rtsp(RtspSpec {
        url: url::Url::parse(&url).expect("url"),
        username: None,
        password: None,
        transport,
        connect_timeout: Duration::from_millis(connect_ms),
        stall_timeout: Duration::from_millis(stall_ms),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_millis(cap_ms),
        jitter: false,
    })
}

/// Starts the pipeline on `cameras` with `workers` tract detectors of the shipped model.
fn start(cameras: Vec<CameraSpec>, workers: usize) -> (VisionPipeline, mpsc::Receiver<FrameResult>) {
    let manifest =
        Arc::new(ModelManifest::load(&root().join("models/ssd-mobilenet-v2-coco/model.toml")).expect("manifest"));
    let detectors =
        load_detectors(&manifest, &[BackendKind::Tract], &BackendOptions::default(), workers).expect("detector");
    let (tx, rx) = mpsc::channel(64);
    let settings = VisionSettings { tracker: TrackerConfig::default(), merged_classes: vec![vec![2, 5, 7]] };
    let pipeline =
        VisionPipeline::start(cameras, detectors, settings, tx, tokio::runtime::Handle::current()).expect("start");
    (pipeline, rx)
}

fn camera(id: &str, source: VideoSource) -> CameraSpec {
    CameraSpec { id: id.into(), source, detect_fps: 5.0, queue_frames: 2, detection: DetectionSpec::full() }
}

/// Waits up to `secs` for a result matching `pred` from camera `cam`.
async fn wait_for(
    rx: &mut mpsc::Receiver<FrameResult>,
    cam: usize,
    secs: u64,
    pred: impl Fn(&FrameResult) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if r.camera == cam && pred(&r) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtsp_camera_streams_detections_and_recovers_after_the_server_restarts() {
    let port = free_tcp_port();
    let mut server = RtspServer::start(port);
    let rtsp_cam =
        camera("rtsp-cam", rtsp(format!("rtsp://127.0.0.1:{port}/street"), RtspTransport::Tcp, 5000, 3000, 1000));
    let file = VideoSource::File(FileSpec {
        path: root().join("media/bikes-street-640x272-25fps.mp4"),
        looped: true,
        realtime: true,
        fps: 25.0,
    });
    let file_cam = CameraSpec { detect_fps: 2.0, ..camera("file-cam", file) };
    let (pipeline, mut rx) = start(vec![rtsp_cam, file_cam], 2);
    let rtsp_stats = pipeline.stats()[0].clone();

    // Real people in the real clip, through RTSP, decode, detection and tracking.
    assert!(
        wait_for(&mut rx, 0, 30, |r| r.detections.iter().any(|d| &*d.label == "person") && !r.tracks.is_empty()).await,
        "no tracked person from the RTSP camera"
    );
    assert_eq!(rtsp_stats.source.state(), "streaming");
    assert_eq!(rtsp_stats.source.reconnects.load(Ordering::Relaxed), 0);
    assert_eq!(rtsp_stats.decode_errors.load(Ordering::Relaxed), 0);

    // The server dies: the camera notices (connection closed or stall) and keeps trying.
    server.kill9();
    let t0 = Instant::now();
    while rtsp_stats.source.reconnects.load(Ordering::Relaxed) < 1
        || rtsp_stats.source.connect_failures.load(Ordering::Relaxed) < 2
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "no reconnect attempts after the server died");
        // Drain results meanwhile; the file camera must keep producing.
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
    }
    assert_eq!(rtsp_stats.source.state(), "reconnecting");
    assert!(rtsp_stats.source.last_error.lock().map(|e| e.is_some()).unwrap_or(false));
    assert!(wait_for(&mut rx, 1, 10, |r| r.size == (640, 272)).await, "the file camera stalled with the RTSP one");

    // It comes back on the same port: the camera recovers by itself.
    let _server = RtspServer::start(port);
    let before = rtsp_stats.frames_detected.load(Ordering::Relaxed);
    assert!(
        wait_for(&mut rx, 0, 30, |r| r.discontinuity || !r.detections.is_empty()).await,
        "the RTSP camera did not recover after the server came back"
    );
    assert!(
        wait_for(&mut rx, 0, 20, |r| r.detections.iter().any(|d| &*d.label == "person")).await,
        "no person from the RTSP camera after it recovered"
    );
    assert!(rtsp_stats.frames_detected.load(Ordering::Relaxed) > before);
    assert_eq!(rtsp_stats.source.state(), "streaming");
    let reconnects = rtsp_stats.source.reconnects.load(Ordering::Relaxed);
    assert_eq!(reconnects, 1, "one loss of the stream, counted once");
    drop(rx);
    tokio::task::spawn_blocking(move || pipeline.stop()).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_that_never_answers_is_reported_and_retried_without_blocking_others() {
    // A TCP port that accepts and never speaks RTSP: DESCRIBE times out, the camera retries.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let dead = match rtsp(format!("rtsp://127.0.0.1:{port}/x"), RtspTransport::Udp, 500, 1000, 300) {
        VideoSource::Rtsp(r) => {
            VideoSource::Rtsp(RtspSpec { username: Some("admin".into()), password: Some("secret".into()), ..r })
        }
        other => other,
    };
    let file = VideoSource::File(FileSpec {
        path: root().join("media/vtest-street-768x576-10fps.264"),
        looped: false,
        realtime: false,
        fps: 10.0,
    });
    let (pipeline, mut rx) =
        start(vec![camera("dead", dead), CameraSpec { detect_fps: 0.0, ..camera("file", file) }], 1);
    assert!(wait_for(&mut rx, 1, 30, |r| r.detections.iter().any(|d| &*d.label == "person")).await);
    let stats = pipeline.stats()[0].clone();
    let t0 = Instant::now();
    while stats.source.connect_failures.load(Ordering::Relaxed) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the dead camera is not retried");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
    }
    assert_eq!(stats.source.reconnects.load(Ordering::Relaxed), 0, "never connected, so never lost");
    assert_eq!(stats.source.state(), "connecting");
    let err = stats.source.last_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
    assert!(err.contains("DESCRIBE timed out"), "{err}");
    assert!(!err.contains("secret"), "credentials must not leak into errors: {err}");
    drop(rx);
    drop(silent);
    tokio::task::spawn_blocking(move || pipeline.stop()).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_camera_is_declared_stalled_and_picked_up_again() {
    let port = free_tcp_port();
    let server = RtspServer::start(port);
    let source = rtsp(format!("rtsp://127.0.0.1:{port}/street"), RtspTransport::Tcp, 1000, 1500, 500);
    let (pipeline, mut rx) = start(vec![camera("frozen", source)], 1);
    let stats = pipeline.stats()[0].clone();
    assert!(wait_for(&mut rx, 0, 30, |r| !r.detections.is_empty()).await, "no detections before the freeze");

    // The server process stops: its TCP connection stays open, but no frame comes.
    server.freeze();
    let t0 = Instant::now();
    while stats.source.reconnects.load(Ordering::Relaxed) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(15), "the stall was not detected");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
    }
    let err = stats.source.last_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
    assert!(err.contains("stalled"), "{err}");

    // It wakes up: the camera is picked up again without help.
    server.thaw();
    let before = stats.frames_detected.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while stats.frames_detected.load(Ordering::Relaxed) <= before + 3 || stats.source.state() != "streaming" {
        assert!(t0.elapsed() < Duration::from_secs(30), "the camera did not come back after the stall");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
    }
    drop(rx);
    tokio::task::spawn_blocking(move || pipeline.stop()).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtsp_camera_over_udp_streams_detections() {
    let port = free_tcp_port();
    let _server = RtspServer::start(port);
    let source = rtsp(format!("rtsp://127.0.0.1:{port}/street"), RtspTransport::Udp, 5000, 3000, 1000);
    let (pipeline, mut rx) = start(vec![camera("udp", source)], 1);
    assert!(
        wait_for(&mut rx, 0, 30, |r| r.detections.iter().any(|d| &*d.label == "person") && r.size == (768, 576)).await,
        "no person over RTP/UDP"
    );
    assert_eq!(pipeline.stats()[0].source.state(), "streaming");
    drop(rx);
    tokio::task::spawn_blocking(move || pipeline.stop()).await.expect("stop");
}

/// A camera reconfigured to another picture size mid-stream: the agent reconnects (a fresh
/// DESCRIBE) and says why. The stream: H.264 at 640x480 for 5 s, then 320x240 (encoded here,
/// put in MPEG-TS by GStreamer's mpegtsmux, served by the real RTSP server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_size_change_reconnects_the_camera() {
    use its_testkit::footage::{Footage, encode_footage};
    let dir = tempfile::tempdir().expect("tempdir");
    let photo = image::open(root().join("media/dog.jpg")).expect("photo").into_rgb8();
    let mut stream = Vec::new();
    for (k, (w, h, frames)) in [(640u32, 480u32, 50usize), (320, 240, 300)].into_iter().enumerate() {
        let background = image::imageops::resize(&photo, w, h, image::imageops::FilterType::Triangle);
        let footage = Footage { name: "size", background, actors: Vec::new(), fps: 10.0, frames };
        let part = dir.path().join(format!("part{k}.264"));
        encode_footage(&footage, &part, 26, 30).expect("encode");
        stream.extend(std::fs::read(&part).expect("read"));
    }
    let es = dir.path().join("two-sizes.264");
    std::fs::write(&es, &stream).expect("write");
    let ts = dir.path().join("two-sizes.ts");
    let status = std::process::Command::new("gst-launch-1.0")
        .args(["-q", "filesrc"])
        .arg(format!("location={}", es.display()))
        .args([
            "!",
            "video/x-h264,stream-format=byte-stream,framerate=10/1",
            "!",
            "h264parse",
            "!",
            "mpegtsmux",
            "!",
            "filesink",
        ])
        .arg(format!("location={}", ts.display()))
        .status()
        .expect("gst-launch-1.0 (gstreamer1.0-tools)");
    assert!(status.success() && std::fs::metadata(&ts).map(|m| m.len()).unwrap_or(0) > 0, "muxing failed");

    let port = free_tcp_port();
    let _server = RtspServer::serve(port, &ts);
    let source = rtsp(format!("rtsp://127.0.0.1:{port}/street"), RtspTransport::Tcp, 5000, 3000, 500);
    let (pipeline, mut rx) = start(vec![camera("reconfigured", source)], 1);
    assert!(wait_for(&mut rx, 0, 30, |r| r.size == (640, 480)).await, "no 640x480 frames first");
    let stats = pipeline.stats()[0].clone();
    let t0 = Instant::now();
    while stats.source.reconnects.load(Ordering::Relaxed) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the size change did not reconnect the camera");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
    }
    let err = stats.source.last_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
    assert!(err.contains("picture size changed from 640x480 to 320x240"), "{err}");
    drop(rx);
    tokio::task::spawn_blocking(move || pipeline.stop()).await.expect("stop");
}
