//! The HTTP API over TLS: served with the configured certificate (HTTP/2 and HTTP/1.1), plain
//! HTTP refused on the TLS port, a renewed certificate picked up without a restart, slow
//! handshakes cut off, and the peer address reaching handlers in both modes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::HeaderMap;
use axum::routing::get;
use its_aggregator::http::client_addr::{IpNet, client_addr};
use its_aggregator::http::transport::{self, HANDSHAKE_TIMEOUT, ReloadingCert, TlsFiles};
use its_aggregator::server::Server;
use its_testkit::server::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// A self-signed certificate for `localhost` and 127.0.0.1: `(certificate PEM, key PEM)`.
fn self_signed() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("rcgen");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// Replaces `path` the way certificate tools do: a new file renamed over the old one.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A client trusting only `cert_pem`; a fresh one makes a fresh handshake.
fn client(cert_pem: &str, http1_only: bool) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("certificate");
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .timeout(Duration::from_secs(5));
    if http1_only {
        b = b.http1_only();
    }
    b.build().expect("client")
}

struct Fixture {
    _dir: tempfile::TempDir,
    files: TlsFiles,
    cert_pem: String,
    server: Server,
    stop: watch::Sender<bool>,
}

async fn start_https() -> Fixture {
    let (cert_pem, key_pem) = self_signed();
    let mut tls = None;
    let t = TestServer::start_with(|root, cfg| {
        let files = TlsFiles { cert: root.join("api.pem"), key: root.join("api.key") };
        std::fs::write(&files.cert, &cert_pem).expect("write cert");
        std::fs::write(&files.key, &key_pem).expect("write key");
        cfg.http_tls = Some(files.clone());
        tls = Some(files);
    })
    .await
    .expect("server");
    let files = tls.expect("TLS files written");
    Fixture { _dir: t.dir, files, cert_pem, server: t.server, stop: t.stop }
}

async fn healthz(client: &reqwest::Client, http: SocketAddr) -> Result<(reqwest::Version, serde_json::Value), String> {
    let resp =
        client.get(format!("https://localhost:{}/healthz", http.port())).send().await.map_err(|e| format!("{e:?}"))?;
    let version = resp.version();
    if resp.status() != reqwest::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    Ok((version, resp.json().await.map_err(|e| e.to_string())?))
}

#[tokio::test]
async fn https_serves_the_api_and_plain_http_is_refused() {
    let f = start_https().await;
    let http = f.server.addrs.http;

    // ALPN picks HTTP/2 when the client offers it, HTTP/1.1 otherwise.
    let (version, body) = healthz(&client(&f.cert_pem, false), http).await.expect("https h2");
    assert_eq!(version, reqwest::Version::HTTP_2);
    assert_eq!(body["status"], "ok");
    let (version, body) = healthz(&client(&f.cert_pem, true), http).await.expect("https http/1.1");
    assert_eq!(version, reqwest::Version::HTTP_11);
    assert_eq!(body["status"], "ok");
    // By IP address too (the certificate names 127.0.0.1).
    let resp = client(&f.cert_pem, false).get(format!("https://{http}/healthz")).send().await.expect("by IP");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);

    // A client that does not trust the certificate is refused.
    let (other, _) = self_signed();
    assert!(healthz(&client(&other, false), http).await.is_err(), "an untrusted certificate must fail");

    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let r = plain.get(format!("http://{http}/healthz")).send().await;
    assert!(r.is_err(), "plain HTTP must fail on the TLS port: {r:?}");
    let mut tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await.expect("closed");
    assert!(!buf.starts_with(b"HTTP/"), "an HTTP answer over plain TCP: {:?}", String::from_utf8_lossy(&buf));

    // Graceful shutdown as with plain HTTP.
    f.stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(20), f.server.wait()).await.expect("stops in time").expect("clean stop");
}

#[tokio::test]
async fn renewed_certificate_is_served_without_a_restart() {
    let f = start_https().await;
    let http = f.server.addrs.http;
    healthz(&client(&f.cert_pem, false), http).await.expect("first certificate");

    let (new_cert, new_key) = self_signed();
    replace(&f.files.key, &new_key);
    replace(&f.files.cert, &new_cert);
    let deadline = Instant::now() + transport::RELOAD_INTERVAL * 4;
    loop {
        match healthz(&client(&new_cert, false), http).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => panic!("the renewed certificate was not picked up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    assert!(healthz(&client(&f.cert_pem, false), http).await.is_err(), "the old certificate is gone");

    // A broken renewal keeps the certificate being served.
    replace(&f.files.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    tokio::time::sleep(transport::RELOAD_INTERVAL + Duration::from_secs(1)).await;
    healthz(&client(&new_cert, false), http).await.expect("still the last good certificate");
}

#[test]
fn reload_keeps_the_old_certificate_on_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = self_signed();
    let files = TlsFiles { cert: dir.path().join("api.pem"), key: dir.path().join("api.key") };
    std::fs::write(&files.cert, &cert_pem).expect("write");
    std::fs::write(&files.key, &key_pem).expect("write");
    let cert = ReloadingCert::load(files.clone()).expect("load");
    let first = cert.current();
    assert_eq!(cert.reload_if_changed(), Ok(false), "nothing changed");

    // A new certificate with the old key: refused, the old pair stays.
    let (new_cert, new_key) = self_signed();
    replace(&files.cert, &new_cert);
    let err = cert.reload_if_changed().expect_err("mismatched pair");
    assert!(err.contains("does not belong"), "{err}");
    assert!(Arc::ptr_eq(&first, &cert.current()));
    // Reported once, not at every check.
    assert_eq!(cert.reload_if_changed(), Ok(false));
    // The key arrives: the new pair is served.
    replace(&files.key, &new_key);
    assert_eq!(cert.reload_if_changed(), Ok(true));
    assert_eq!(cert.current().cert[0].as_ref(), pem_der(&new_cert).as_slice());

    // A file removed: an error naming it, the certificate stays.
    std::fs::remove_file(&files.key).expect("remove");
    let err = cert.reload_if_changed().expect_err("missing key");
    assert!(err.contains(&files.key.display().to_string()), "{err}");
    assert_eq!(cert.current().cert[0].as_ref(), pem_der(&new_cert).as_slice());

    // At start an unusable file is an error naming it.
    let missing = TlsFiles { cert: files.cert.clone(), key: dir.path().join("nope.key") };
    let err = ReloadingCert::load(missing).expect_err("missing key").to_string();
    assert!(err.contains("nope.key"), "{err}");
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem").to_vec()
}

#[tokio::test]
async fn slow_handshakes_are_cut_off() {
    let f = start_https().await;
    let mut tcp = tokio::net::TcpStream::connect(f.server.addrs.http).await.expect("connect");
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT + Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the server closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    assert!(start.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(500), "{:?}", start.elapsed());
    // Others are served meanwhile and after.
    healthz(&client(&f.cert_pem, false), f.server.addrs.http).await.expect("served");
}

/// A router answering `<peer> <client>` (the client behind a trusted proxy on 127.0.0.1).
fn whoami() -> Router {
    let trusted: Arc<Vec<IpNet>> = Arc::new(vec!["127.0.0.1".parse().expect("net")]);
    Router::new().route(
        "/whoami",
        get(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap| async move {
            format!("{peer} {}", client_addr(peer, &headers, &trusted))
        }),
    )
}

async fn check_whoami(client: &reqwest::Client, url: &str) {
    let body = client.get(url).send().await.expect("GET").text().await.expect("body");
    let (peer, me) = body.split_once(' ').expect("two words");
    let peer: SocketAddr = peer.parse().expect("peer address");
    assert_eq!(peer.ip().to_string(), "127.0.0.1");
    assert_eq!(me, "127.0.0.1");
    let body = client
        .get(url)
        .header("X-Forwarded-For", "1.2.3.4, 198.51.100.7")
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert!(body.ends_with(" 198.51.100.7"), "{body}");
}

#[tokio::test]
async fn handlers_get_the_peer_address_over_http_and_https() {
    let (_stop, rx) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(transport::serve(listener, whoami(), None, transport::Limits::default(), rx.clone()));
    check_whoami(&reqwest::Client::new(), &format!("http://{addr}/whoami")).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = self_signed();
    let files = TlsFiles { cert: dir.path().join("api.pem"), key: dir.path().join("api.key") };
    std::fs::write(&files.cert, &cert_pem).expect("write");
    std::fs::write(&files.key, &key_pem).expect("write");
    let tls = transport::server_config(ReloadingCert::load(files).expect("load")).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(transport::serve(listener, whoami(), Some(tls), transport::Limits::default(), rx));
    for http1_only in [false, true] {
        check_whoami(&client(&cert_pem, http1_only), &format!("https://localhost:{}/whoami", addr.port())).await;
    }
}
