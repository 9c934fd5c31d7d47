//! Mutual TLS on the QUIC listener: a device with a certificate from the fleet CA is served and
//! identified by that certificate; unknown, expired and revoked certificates are refused.

use std::sync::Arc;
use std::time::Duration;

use its_agent::uplink::tls::{DeviceBundle, client_config};
use its_aggregator::ingest::IngestConfig;
use its_aggregator::pki::Pki;
use its_aggregator::server::Server;
use its_shared::wire::{self, Frame, FrameDecoder, Hello};
use its_testkit::server::TestServer;
use time::OffsetDateTime;

fn hello() -> Hello {
    Hello {
        agent_version: "test".into(),
        model: "none".into(),
        cameras: vec!["c1".into()],
        last_acked_seq: 0,
        last_assigned_seq: 0,
    }
}

/// Connects with `bundle`, sends Hello, and returns the welcome ack, or the error text.
/// A QUIC client endpoint presenting the device bundle's certificate.
fn client_endpoint(bundle: &DeviceBundle) -> Result<quinn::Endpoint, String> {
    let tls = client_config(bundle).map_err(|e| e.to_string())?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut ep = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).map_err(|e| e.to_string())?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    Ok(ep)
}

async fn try_session(addr: std::net::SocketAddr, bundle: &DeviceBundle) -> Result<u64, String> {
    let ep = client_endpoint(bundle)?;
    let fut = async {
        let conn = ep.connect(addr, "its-aggregator").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&wire::encode(&Frame::Hello(hello())).map_err(|e| e.to_string())?)
            .await
            .map_err(|e| e.to_string())?;
        let mut dec = FrameDecoder::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = recv.read(&mut buf).await.map_err(|e| e.to_string())?.ok_or("stream closed")?;
            dec.extend(&buf[..n]);
            if let Some(f) = dec.next_frame().map_err(|e| e.to_string())? {
                return match f {
                    Frame::Ack(a) => Ok(a.up_to),
                    other => Err(format!("unexpected {other:?}")),
                };
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| "timed out".to_string())?
}

struct Fixture {
    _dir: tempfile::TempDir,
    pki: Pki,
    server: Server,
    root: std::path::PathBuf,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn fixture() -> Fixture {
    fixture_with(IngestConfig::default()).await
}

/// A fixture whose QUIC listener has `limits`' connection limits.
async fn fixture_with(limits: IngestConfig) -> Fixture {
    let t = TestServer::start_with(|_, cfg| {
        cfg.ingest =
            IngestConfig { listen: ([127, 0, 0, 1], 0).into(), idle_timeout: Duration::from_secs(5), ..limits };
    })
    .await
    .expect("server");
    Fixture { _dir: t.dir, pki: t.pki, server: t.server, root: t.root, _stop: t.stop }
}

#[tokio::test]
async fn enrolled_device_is_served_and_identified_by_its_certificate() {
    let f = fixture().await;
    let bundle_dir = f.root.join("box-7");
    f.pki.enroll("box-7", &bundle_dir, 30).expect("enroll");
    let ack = try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&bundle_dir)).await.expect("served");
    assert_eq!(ack, 0);
    let devices = f.server.store.list_devices().await.expect("devices");
    assert_eq!(devices.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), vec!["box-7"]);
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let f = fixture().await;
    let rogue = Pki::new(f.root.join("rogue-pki"));
    rogue.init(&[]).expect("rogue init");
    let rogue_bundle = f.root.join("rogue");
    rogue.enroll("box-7", &rogue_bundle, 30).expect("enroll");
    // Trust the real server, present the rogue certificate.
    std::fs::copy(f.pki.ca_cert_path(), rogue_bundle.join("ca.pem")).expect("copy ca");
    let r = try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&rogue_bundle)).await;
    assert!(r.is_err(), "unknown CA accepted: {r:?}");
    assert!(f.server.store.list_devices().await.expect("devices").is_empty());
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let f = fixture().await;
    let now = OffsetDateTime::now_utc();
    let dir = f.root.join("old");
    f.pki
        .enroll_with_validity("box-old", &dir, now - time::Duration::days(30), now - time::Duration::days(1))
        .expect("enroll");
    let r = try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&dir)).await;
    assert!(r.is_err(), "expired certificate accepted: {r:?}");
    // A certificate not yet valid is refused as well.
    let dir = f.root.join("future");
    f.pki
        .enroll_with_validity("box-future", &dir, now + time::Duration::days(1), now + time::Duration::days(30))
        .expect("enroll");
    assert!(try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&dir)).await.is_err());
    assert!(f.server.store.list_devices().await.expect("devices").is_empty());
}

#[tokio::test]
async fn revoked_certificate_is_refused_without_a_restart() {
    let f = fixture().await;
    let dir = f.root.join("box-r");
    f.pki.enroll("box-r", &dir, 30).expect("enroll");
    let bundle = DeviceBundle::in_dir(&dir);
    try_session(f.server.addrs.quic, &bundle).await.expect("served before revocation");
    assert_eq!(f.pki.revoke("box-r").expect("revoke"), 1);
    // The server checks the CRL's modification time every second.
    let mut refused = false;
    for _ in 0..40 {
        if try_session(f.server.addrs.quic, &bundle).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refused, "revoked certificate still accepted");
    // Another device is unaffected.
    let other = f.root.join("box-ok");
    f.pki.enroll("box-ok", &other, 30).expect("enroll");
    try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&other)).await.expect("other device served");
}

#[test]
fn device_ids_are_validated_before_issuing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path().join("pki"));
    pki.init(&[]).expect("init");
    for bad in ["", "a b", "../etc", "x".repeat(65).as_str(), "dev\u{e9}"] {
        assert!(pki.enroll(bad, &dir.path().join("b"), 1).is_err(), "{bad:?} accepted");
    }
    assert!(pki.init(&[]).is_err(), "second init must not overwrite the CA");
    assert!(pki.revoke("never-enrolled").is_err());
}

/// Why the aggregator ended the session on `recv` (waiting up to 5 s): the reason of its `Refuse`
/// frame, or of the connection's close when the stream ends first (the close frame carries the
/// reason too, and may cut the `Refuse` frame off).
async fn refusal(conn: &quinn::Connection, recv: &mut quinn::RecvStream) -> String {
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ended = match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    dec.extend(&buf[..n]);
                    if let Ok(Some(Frame::Refuse { reason })) = dec.next_frame() {
                        return reason;
                    }
                    continue;
                }
                Err(e) => e.to_string(),
                Ok(None) => "stream finished".to_owned(),
            };
            return conn.close_reason().map_or(ended, |r| r.to_string());
        }
    })
    .await
    .expect("the session ended in time")
}

/// A device that reconnects while its old connection is still open gets the new session; the old
/// one is told it was superseded and closed (one live session per device, so a welcome never
/// races a commit of the old connection).
#[tokio::test]
async fn a_reconnect_supersedes_the_old_connection_of_the_same_device() {
    let f = fixture().await;
    let dir = f.root.join("box-twice");
    f.pki.enroll("box-twice", &dir, 30).expect("enroll");
    let bundle = DeviceBundle::in_dir(&dir);
    let (_ep, old, _send, mut recv) = welcomed(f.server.addrs.quic, &bundle).await;

    // Second connection, same certificate.
    assert_eq!(try_session(f.server.addrs.quic, &bundle).await, Ok(0));
    // The old one is refused and closed.
    let ended = refusal(&old, &mut recv).await;
    assert!(ended.contains("superseded"), "{ended}");
}

/// A disabled device's valid certificate is refused ("device disabled"), its live connection is
/// closed when it is disabled, and it is served again once enabled; other devices are unaffected.
#[tokio::test]
async fn a_disabled_device_is_refused_and_its_live_connection_closed() {
    use its_aggregator::store::{DevicePatch, Fleet};
    let f = fixture().await;
    let fleet = Fleet::new(f.server.store.db());
    let dir = f.root.join("box-d");
    f.pki.enroll("box-d", &dir, 30).expect("enroll");
    let bundle = DeviceBundle::in_dir(&dir);
    try_session(f.server.addrs.quic, &bundle).await.expect("served while enabled");

    // A live connection, welcomed.
    let (_ep, live, _send, _recv) = welcomed(f.server.addrs.quic, &bundle).await;

    let disable = |on: bool| DevicePatch { disabled: Some(on), ..DevicePatch::default() };
    fleet
        .update_device("box-d", &disable(true), &its_aggregator::store::Scope::All, its_aggregator::unix_ms())
        .await
        .expect("disable");
    // Closed within a few seconds (the server checks every second).
    let closed = tokio::time::timeout(Duration::from_secs(5), live.closed()).await.expect("live connection closed");
    assert!(closed.to_string().contains("device disabled"), "{closed}");

    // New connections are refused, with the reason.
    let refused = try_session(f.server.addrs.quic, &bundle).await.expect_err("disabled device served");
    assert!(refused.contains("device disabled"), "{refused}");

    // Another device is served meanwhile.
    let other = f.root.join("box-ok");
    f.pki.enroll("box-ok", &other, 30).expect("enroll");
    try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&other)).await.expect("other device served");

    fleet
        .update_device("box-d", &disable(false), &its_aggregator::store::Scope::All, its_aggregator::unix_ms())
        .await
        .expect("enable");
    try_session(f.server.addrs.quic, &bundle).await.expect("served again once enabled");
}

/// A connection of `bundle` with its session welcomed (the control stream kept open).
async fn welcomed(
    addr: std::net::SocketAddr,
    bundle: &DeviceBundle,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let ep = client_endpoint(bundle).expect("endpoint");
    let conn = ep.connect(addr, "its-aggregator").expect("connect").await.expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&wire::encode(&Frame::Hello(hello())).expect("encode")).await.expect("hello");
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    let n = recv.read(&mut buf).await.expect("read").expect("welcome");
    dec.extend(&buf[..n]);
    assert!(matches!(dec.next_frame(), Ok(Some(Frame::Ack(_)))), "welcomed");
    (ep, conn, send, recv)
}

/// `device revoke` promises "refused within a second": the live connection of the revoked
/// certificate is closed too, not only new handshakes refused.
#[tokio::test]
async fn revoking_a_certificate_closes_its_live_connection() {
    let f = fixture().await;
    for d in ["box-rl", "box-stays"] {
        f.pki.enroll(d, &f.root.join(d), 30).expect("enroll");
    }
    let (_ep, live, _s, _r) = welcomed(f.server.addrs.quic, &DeviceBundle::in_dir(&f.root.join("box-rl"))).await;
    let (_ep2, other, _s2, _r2) = welcomed(f.server.addrs.quic, &DeviceBundle::in_dir(&f.root.join("box-stays"))).await;
    let start = std::time::Instant::now();
    assert_eq!(f.pki.revoke("box-rl").expect("revoke"), 1);
    let closed = tokio::time::timeout(Duration::from_secs(5), live.closed()).await.expect("live connection closed");
    let took = start.elapsed();
    assert!(closed.to_string().contains("certificate revoked"), "{closed}");
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    println!("revoked certificate's live connection closed after {} ms", took.as_millis());
    assert!(other.close_reason().is_none(), "another device's connection stays open");
}

/// One certificate cannot hold more than `max_connections_per_device` connections: the oldest
/// is closed (here connections that never started a session, which nothing else would close
/// before the idle timeout).
#[tokio::test]
async fn a_device_holds_at_most_its_connection_limit() {
    let f = fixture_with(IngestConfig { max_connections_per_device: 2, ..IngestConfig::default() }).await;
    let dir = f.root.join("box-many");
    f.pki.enroll("box-many", &dir, 30).expect("enroll");
    let ep = client_endpoint(&DeviceBundle::in_dir(&dir)).expect("endpoint");
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(ep.connect(f.server.addrs.quic, "its-aggregator").expect("connect").await.expect("handshake"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for old in &conns[..2] {
        let why = tokio::time::timeout(Duration::from_secs(5), old.closed()).await.expect("oldest closed");
        assert!(why.to_string().contains("too many connections"), "{why}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(conns[2].close_reason().is_none() && conns[3].close_reason().is_none(), "the newest stay");
}

/// Beyond `max_connections` in all, handshakes are refused until one ends.
#[tokio::test]
async fn the_total_connection_limit_refuses_handshakes() {
    let f = fixture_with(IngestConfig { max_connections: 2, ..IngestConfig::default() }).await;
    let mut held = Vec::new();
    for d in ["box-t1", "box-t2", "box-t3"] {
        f.pki.enroll(d, &f.root.join(d), 30).expect("enroll");
    }
    for d in ["box-t1", "box-t2"] {
        let ep = client_endpoint(&DeviceBundle::in_dir(&f.root.join(d))).expect("endpoint");
        let c = ep.connect(f.server.addrs.quic, "its-aggregator").expect("connect").await.expect("handshake");
        held.push((ep, c));
    }
    let third = client_endpoint(&DeviceBundle::in_dir(&f.root.join("box-t3"))).expect("endpoint");
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        third.connect(f.server.addrs.quic, "its-aggregator").expect("connect"),
    )
    .await
    .expect("answered");
    assert!(refused.is_err(), "a third connection was accepted");
    let (_, first) = held.remove(0);
    first.close(0u32.into(), b"done");
    let mut served = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if try_session(f.server.addrs.quic, &DeviceBundle::in_dir(&f.root.join("box-t3"))).await.is_ok() {
            served = true;
            break;
        }
    }
    assert!(served, "served again once a connection ended");
}

/// No snapshot stream before the session's Hello was accepted: the stream credit comes with it.
#[tokio::test]
async fn snapshot_streams_wait_for_the_hello() {
    let f = fixture().await;
    let dir = f.root.join("box-s");
    f.pki.enroll("box-s", &dir, 30).expect("enroll");
    let ep = client_endpoint(&DeviceBundle::in_dir(&dir)).expect("endpoint");
    let conn = ep.connect(f.server.addrs.quic, "its-aggregator").expect("connect").await.expect("handshake");
    let early = tokio::time::timeout(Duration::from_secs(1), conn.open_uni()).await;
    assert!(early.is_err(), "a snapshot stream opened before any Hello");
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&wire::encode(&Frame::Hello(hello())).expect("encode")).await.expect("hello");
    let mut buf = vec![0u8; 4096];
    recv.read(&mut buf).await.expect("read").expect("welcome");
    let late = tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await;
    assert!(matches!(late, Ok(Ok(_))), "no snapshot stream after the welcome: {late:?}");
}

/// A Hello beyond the limits is refused with the reason (a certificate cannot make the
/// aggregator record thousands of cameras).
#[tokio::test]
async fn an_oversized_hello_is_refused() {
    let f = fixture().await;
    let dir = f.root.join("box-h");
    f.pki.enroll("box-h", &dir, 30).expect("enroll");
    let ep = client_endpoint(&DeviceBundle::in_dir(&dir)).expect("endpoint");
    let conn = ep.connect(f.server.addrs.quic, "its-aggregator").expect("connect").await.expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let big = Hello { cameras: (0..5000).map(|i| format!("cam-{i}")).collect(), ..hello() };
    send.write_all(&wire::encode(&Frame::Hello(big)).expect("encode")).await.expect("hello");
    let reason = refusal(&conn, &mut recv).await;
    assert!(reason.contains("cameras"), "{reason}");
    let cams = its_aggregator::store::Fleet::new(f.server.store.db())
        .list_cameras(&its_aggregator::store::Scope::All, Some("box-h"), None)
        .await
        .expect("cameras");
    assert!(cams.is_empty(), "nothing of it recorded");
}
