//! Event snapshots end to end, with real parts: the agent's SQLite outbox, its QUIC uplink with
//! mutual TLS, the aggregator's ingest, its SQLite storage, the local object store and the HTTP
//! API over a socket.
//!
//! - Events and their pictures appended together reach the aggregator; the API serves the exact
//!   bytes (full frame and crop); the agent deletes its copies once the aggregator confirmed them.
//! - A large snapshot (2.5 MiB) on a slow link does not hold back events appended after it: they
//!   are acknowledged while the picture is still on its way (it travels on its own stream, at a
//!   lower priority), and the picture arrives later.

use its_testkit::server as common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use its_agent::buffer::{NewEvent, SnapshotImages};
use its_aggregator::pki::Pki;
use its_aggregator::server::Server;
use its_e2e::agent::{Agent, uplink_config};
use its_shared::event::{EventKind, ObjectRef};
use its_testkit::server::TestServer;
use tokio::sync::watch;

const DEVICE: &str = "snap-box";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    server: Server,
    _stop: watch::Sender<bool>,
}

async fn fixture() -> Fixture {
    // The device is enrolled before the server starts, as before the fixture was shared.
    let t = TestServer::start_with(|root, _| {
        Pki::new(root.join("pki")).enroll(DEVICE, &root.join("bundle"), 30).expect("enroll");
    })
    .await
    .expect("server");
    common::add_admin(t.server.store.db()).await;
    Fixture { _dir: t.dir, root: t.root, server: t.server, _stop: t.stop }
}

/// The agent of the enrolled device (its bundle in `root/bundle`), its outbox in `root`.
fn start_agent(root: &Path, aggregator: std::net::SocketAddr) -> Agent {
    Agent::start(root, uplink_config(aggregator, &root.join("bundle"), &["cam-1"]))
}

fn event(track_id: u64) -> NewEvent {
    NewEvent {
        camera: "cam-1".into(),
        observed_at_ms: its_aggregator::unix_ms(),
        kind: EventKind::StoppedVehicle {
            zone: "shoulder".into(),
            object: ObjectRef { track_id, label: "car".into(), score: 0.8, bbox: [0.2, 0.3, 0.5, 0.6] },
            stopped_s: 42.0,
        },
    }
}

fn media(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A real crop of a real picture, re-encoded as JPEG.
fn crop_of(jpeg: &[u8], x: u32, y: u32, w: u32, h: u32) -> Vec<u8> {
    let img = image::load_from_memory(jpeg).expect("decode").crop_imm(x, y, w, h).to_rgb8();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
    out.into_inner()
}

/// A real JPEG between 2.4 and 2.9 MiB: noise at quality 100 barely compresses.
fn large_jpeg() -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut side = 1000u32;
    loop {
        let img = image::RgbImage::from_fn(side, side, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let b = state.to_le_bytes();
            image::Rgb([b[0], b[1], b[2]])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100).encode_image(&img).expect("encode");
        let mib = out.len() as f64 / (1024.0 * 1024.0);
        if (2.4..=2.9).contains(&mib) {
            return out;
        }
        side = (f64::from(side) * (2.6 / mib).sqrt()) as u32;
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(http: std::net::SocketAddr, path: &str) -> (u16, Option<String>, Vec<u8>) {
    let resp = common::admin_client(http).await.get(format!("http://{http}{path}")).send().await.expect("GET");
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, ctype, resp.bytes().await.expect("body").to_vec())
}

fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error");
    v["error"]["code"].as_str().expect("code").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_travel_from_the_outbox_to_the_api_and_are_deleted_on_the_agent() {
    let f = fixture().await;
    let agent = start_agent(&f.root, f.server.addrs.quic);
    let dog = media("dog.jpg");
    let dog_crop = crop_of(&dog, 100, 80, 200, 160);
    let person = media("person.jpg");
    let snapshots = vec![
        (
            0,
            SnapshotImages {
                taken_at_ms: 1_700_000_000_000,
                full_jpeg: dog.clone(),
                crop_jpeg: Some(dog_crop.clone()),
            },
        ),
        (2, SnapshotImages { taken_at_ms: 1_700_000_000_500, full_jpeg: person.clone(), crop_jpeg: None }),
    ];
    let (first, last) = agent.append((1..=3).map(event).collect(), snapshots).await;
    assert_eq!((first, last), (1, 3));
    assert_eq!(agent.outbox.stats().pending_snapshots, 2);

    let outbox = agent.outbox.clone();
    wait_for("events acknowledged and snapshots confirmed", Duration::from_secs(30), || {
        let s = outbox.stats();
        s.pending_events == 0 && s.pending_snapshots == 0
    })
    .await;
    assert!(agent.outbox.read_snapshots_after(0, 10).expect("read").is_empty(), "the agent deleted its copies");
    assert_eq!(agent.handle.snapshots_stored.load(Ordering::Relaxed), 2);
    assert_eq!(agent.outbox.stats().snapshots_evicted, 0);

    let http = f.server.addrs.http;
    let (status, ctype, body) = get(http, &format!("/api/v1/events/{DEVICE}:1/snapshot")).await;
    assert_eq!((status, ctype.as_deref()), (200, Some("image/jpeg")));
    assert!(body == dog, "full frame of event 1 differs ({} vs {} bytes)", body.len(), dog.len());
    let (status, _, body) = get(http, &format!("/api/v1/events/{DEVICE}:1/snapshot?variant=crop")).await;
    assert_eq!(status, 200);
    assert!(body == dog_crop, "crop of event 1 differs");
    let (status, _, body) = get(http, &format!("/api/v1/events/{DEVICE}:3/snapshot")).await;
    assert_eq!(status, 200);
    assert!(body == person, "full frame of event 3 differs");
    // Event 2 has none; event 3 has no crop; event 4 does not exist.
    let (status, _, body) = get(http, &format!("/api/v1/events/{DEVICE}:2/snapshot")).await;
    assert_eq!((status, error_code(&body).as_str()), (404, "snapshot_not_found"));
    let (status, _, body) = get(http, &format!("/api/v1/events/{DEVICE}:3/snapshot?variant=crop")).await;
    assert_eq!((status, error_code(&body).as_str()), (404, "snapshot_not_found"));
    let (status, _, body) = get(http, &format!("/api/v1/events/{DEVICE}:4/snapshot")).await;
    assert_eq!((status, error_code(&body).as_str()), (404, "event_not_found"));
    let (status, _, body) = get(http, "/api/v1/events/not-an-id/snapshot").await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_parameter"));
    // The listing flags them.
    let (_, _, body) = get(http, &format!("/api/v1/events?device={DEVICE}")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let mut flags: Vec<(u64, bool)> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (e["seq"].as_u64().expect("seq"), e["has_snapshot"].as_bool().expect("flag")))
        .collect();
    flags.sort_unstable();
    assert_eq!(flags, vec![(1, true), (2, false), (3, true)]);
    // The objects are where the configuration says.
    assert!(f.root.join(format!("objects/snapshots/{DEVICE}/1.jpg")).is_file());
    assert!(f.root.join(format!("objects/snapshots/{DEVICE}/1-crop.jpg")).is_file());
    agent.stop().await.expect("uplink ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_on_a_slow_link_does_not_hold_back_later_events() {
    let f = fixture().await;
    // 600 kB/s towards the aggregator: the picture needs more than 4 s, an event batch a few ms.
    let relay = common::ThrottledRelay::start(f.server.addrs.quic, 600_000, 64).await;
    let agent = start_agent(&f.root, relay.addr);
    let (_, warm_up) = agent.append(vec![event(1)], Vec::new()).await;
    let handle = agent.handle.clone();
    wait_for("the session to be up", Duration::from_secs(20), || handle.acked.load(Ordering::Relaxed) >= warm_up).await;

    let big = large_jpeg();
    let (snap_seq, _) = agent
        .append(vec![event(2)], vec![(0, SnapshotImages { taken_at_ms: 1, full_jpeg: big.clone(), crop_jpeg: None })])
        .await;
    wait_for("the upload to start", Duration::from_secs(10), || handle.snapshot_uploads.load(Ordering::Relaxed) >= 1)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let appended_at = Instant::now();
    let (_, last) = agent.append((3..=12).map(event).collect(), Vec::new()).await;
    let outbox = agent.outbox.clone();
    wait_for("the later events to be acknowledged", Duration::from_secs(30), || {
        handle.acked.load(Ordering::Relaxed) >= last
    })
    .await;
    let acked_after = appended_at.elapsed();
    let pending = outbox.stats().pending_snapshots;
    println!("events appended after the picture acknowledged in {acked_after:?}; picture still pending: {pending}");
    assert_eq!(pending, 1, "the picture must still be on its way when the later events are acknowledged");

    wait_for("the picture to be confirmed", Duration::from_secs(90), || outbox.stats().pending_snapshots == 0).await;
    let picture_after = appended_at.elapsed();
    println!("picture ({} bytes) confirmed {picture_after:?} after the later events were appended", big.len());
    assert!(picture_after > acked_after);
    let (status, _, body) = get(f.server.addrs.http, &format!("/api/v1/events/{DEVICE}:{snap_seq}/snapshot")).await;
    assert_eq!(status, 200);
    assert!(body == big, "the large picture arrived changed ({} vs {} bytes)", body.len(), big.len());
    agent.stop().await.expect("uplink ends cleanly");
}
