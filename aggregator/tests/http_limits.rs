//! The HTTP API listeners' limits, against real sockets and the real server: request heads that
//! never end (plain HTTP and HTTPS), bodies that stop half-way, idle keep-alive connections and
//! silent HTTP/2 connections are closed within their timeouts; `max_connections` caps what is
//! open at once; responses (event streams) are not cut by any of it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use its_aggregator::http::transport::{self, H2_MAX_CONCURRENT_STREAMS, Limits, TlsFiles};
use its_aggregator::server::Server;
use its_testkit::server::TestServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The small header timeout the tests run with.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The small body timeout the tests run with.
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// What a loaded test machine may add to a timeout before the close is seen.
const MARGIN: Duration = Duration::from_secs(5);
/// A timer never fires early; this only absorbs rounding in the measurement.
const EARLY: Duration = Duration::from_millis(100);
/// How many half-sent requests each flood test holds open at once.
const FLOOD: usize = 200;

/// The process-wide recorder (installed once; tests may share a process), so the listeners'
/// counters can be read back.
fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("install recorder")
        })
        .clone()
}

/// The value of a counter in the exposition (0 when absent). `series` is the name with its
/// labels as rendered, e.g. `its_http_timeouts_total{phase="body"}`.
fn counter(series: &str) -> f64 {
    metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn limits(header_timeout: Duration, body_timeout: Duration, max_connections: usize) -> Limits {
    Limits { header_timeout, body_timeout, max_connections }
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    /// The HTTPS certificate (PEM), when serving HTTPS.
    cert_pem: Option<String>,
    _stop: watch::Sender<bool>,
}

impl Fixture {
    fn http(&self) -> SocketAddr {
        self.server.addrs.http
    }
}

/// The real server on loopback with `limits`, over HTTPS with a self-signed certificate when
/// `tls`.
async fn start(limits: Limits, tls: bool) -> Fixture {
    let mut cert_pem = None;
    let t = TestServer::start_with_metrics(metrics(), |root, cfg| {
        if tls {
            let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
            let files = TlsFiles { cert: root.join("api.pem"), key: root.join("api.key") };
            std::fs::write(&files.cert, c.cert.pem()).expect("write cert");
            std::fs::write(&files.key, c.signing_key.serialize_pem()).expect("write key");
            cfg.http_tls = Some(files);
            cert_pem = Some(c.cert.pem());
        }
        cfg.http_limits = limits;
    })
    .await
    .expect("server");
    Fixture { _dir: t.dir, server: t.server, cert_pem, _stop: t.stop }
}

/// A TLS client trusting only `cert_pem`, offering `alpn`.
fn tls_connector(cert_pem: &str, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem")).expect("root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Reads until the server closes the connection (end of stream or reset) or `limit` passes:
/// what arrived, or `Err` when it was still open.
async fn until_closed(mut stream: impl AsyncRead + Unpin, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(got),
        Err(_) => Err(got),
    }
}

/// One complete `GET /healthz` on `stream`, keeping the connection open; the answer's head.
async fn healthz_keep_alive(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is small and has a Content-Length: read until its body is in.
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok());
        len.is_some_and(|len| body.len() >= len)
    };
    while !complete(&got) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before answering: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// What a half-sent request looks like: a request line and some headers, never the blank line.
fn half_head(i: usize) -> Vec<u8> {
    format!("GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow/{i}\r\nX-Pad: ").into_bytes()
}

/// Checks the close times (from when each was open) of a flood: every connection closed, none
/// before the header timeout, all within it plus [`MARGIN`].
fn check_flood(what: &str, closed_after: &[Result<Duration, String>]) {
    let times: Vec<Duration> = closed_after
        .iter()
        .enumerate()
        .map(|(i, r)| r.clone().unwrap_or_else(|e| panic!("{what}: connection {i}: {e}")))
        .collect();
    let (min, max) = (times.iter().min().copied(), times.iter().max().copied());
    eprintln!("{what}: {} connections closed between {min:?} and {max:?} after they were open", times.len());
    assert_eq!(times.len(), FLOOD);
    for t in &times {
        assert!(*t >= HEADER_TIMEOUT - EARLY, "{what}: closed after {t:?}, before the header timeout");
    }
}

/// Connects, sends part of a head (or, for some, nothing, or the start of the HTTP/2 preface,
/// which hyper reads before it knows the protocol) and waits: the time from connecting until the
/// server closed the connection.
async fn half_sent_http(addr: SocketAddr, i: usize) -> Result<Duration, String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    // The server's timer starts when it accepts, after this.
    let start = Instant::now();
    let sent = match i % 10 {
        0 => Ok(()),
        1 => tcp.write_all(b"PRI * HTTP/2.0\r\n").await,
        _ => tcp.write_all(&half_head(i)).await,
    };
    sent.map_err(|e| format!("write: {e}"))?;
    match until_closed(&mut tcp, HEADER_TIMEOUT + MARGIN).await {
        Ok(got) if got.starts_with(b"HTTP/1.1 2") => Err("answered".to_string()),
        Ok(_) => Ok(start.elapsed()),
        Err(_) => Err(format!("still open after {:?}", start.elapsed())),
    }
}

/// The same over TLS (some send nothing after the handshake): the time from the end of the
/// handshake, when the header timeout starts, until the server closed the connection.
async fn half_sent_https(
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    i: usize,
) -> Result<Duration, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    let start = Instant::now();
    if !i.is_multiple_of(10) {
        tls.write_all(&half_head(i)).await.map_err(|e| format!("write: {e}"))?;
        tls.flush().await.map_err(|e| format!("flush: {e}"))?;
    }
    match until_closed(&mut tls, HEADER_TIMEOUT + MARGIN).await {
        Ok(got) if got.starts_with(b"HTTP/1.1 2") => Err("answered".to_string()),
        Ok(_) => Ok(start.elapsed()),
        Err(_) => Err(format!("still open after {:?}", start.elapsed())),
    }
}

/// Waits (a little: a connection's task counts after it closed the socket) until the counter
/// has grown by `by` from `before`; how much it grew.
async fn counter_grew(series: &str, before: f64, by: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let grew = counter(series) - before;
        if grew >= by || Instant::now() > deadline {
            return grew;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn half_sent_requests_over_http_are_closed_within_the_header_timeout() {
    let f = start(limits(HEADER_TIMEOUT, Duration::from_secs(60), 1024), false).await;
    let addr = f.http();
    let before = counter("its_http_timeouts_total{phase=\"header\"}");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        tasks.spawn(half_sent_http(addr, i));
    }
    let closed: Vec<_> = tasks.join_all().await;
    check_flood("plain HTTP", &closed);
    let series = "its_http_timeouts_total{phase=\"header\"}";
    let timeouts = counter_grew(series, before, FLOOD as f64).await;
    assert!(timeouts >= FLOOD as f64, "{timeouts} header timeouts counted");

    // The listener still serves.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    assert!(healthz_keep_alive(&mut tcp).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn half_sent_requests_over_https_are_closed_within_the_header_timeout() {
    let f = start(limits(HEADER_TIMEOUT, Duration::from_secs(60), 1024), true).await;
    let addr = f.http();
    let connector = tls_connector(f.cert_pem.as_deref().expect("https"), b"http/1.1");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        tasks.spawn(half_sent_https(addr, connector.clone(), i));
    }
    let closed: Vec<_> = tasks.join_all().await;
    check_flood("HTTPS", &closed);

    // The listener still serves.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.expect("write");
    let got = until_closed(&mut tls, Duration::from_secs(10)).await.expect("answered and closed");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn a_body_that_stops_half_way_is_answered_408_and_the_connection_closed() {
    let f = start(limits(Duration::from_secs(30), BODY_TIMEOUT, 1024), false).await;
    let before = counter("its_http_timeouts_total{phase=\"body\"}");
    let mut tcp = TcpStream::connect(f.http()).await.expect("connect");
    let body = br#"{"username":"alice","password":"correct horse battery staple"}"#;
    let head = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&body[..body.len() / 2]).await.expect("half the body");
    let start = Instant::now();
    let got = until_closed(&mut tcp, BODY_TIMEOUT + MARGIN).await.expect("closed in time");
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    eprintln!("half a body: answered and closed after {took:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.contains(r#""code":"body_timeout""#), "{text}");
    assert!(took >= BODY_TIMEOUT - EARLY, "answered after {took:?}, before the body timeout");
    let timeouts = counter("its_http_timeouts_total{phase=\"body\"}") - before;
    assert!(timeouts >= 1.0, "{timeouts} body timeouts counted");

    // A body that arrives whole is read as before (a wrong password: 401, not 408).
    let mut tcp = TcpStream::connect(f.http()).await.expect("connect");
    tcp.write_all(head.replace("HTTP/1.1\r\n", "HTTP/1.1\r\nConnection: close\r\n").as_bytes()).await.expect("head");
    tcp.write_all(body).await.expect("body");
    let got = until_closed(&mut tcp, Duration::from_secs(10)).await.expect("answered");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not() {
    let f = start(limits(HEADER_TIMEOUT, BODY_TIMEOUT, 1024), false).await;
    let mut idle = TcpStream::connect(f.http()).await.expect("connect");
    let mut busy = TcpStream::connect(f.http()).await.expect("connect");
    assert!(healthz_keep_alive(&mut idle).await.starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();
    let idle_closed = tokio::spawn(async move {
        let r = until_closed(&mut idle, HEADER_TIMEOUT + MARGIN).await;
        (r, idle_since.elapsed())
    });
    // The other one sends a request every half header timeout, for three header timeouts.
    let busy_until = Instant::now() + HEADER_TIMEOUT * 3;
    while Instant::now() < busy_until {
        assert!(healthz_keep_alive(&mut busy).await.starts_with("HTTP/1.1 200"), "a busy connection is served");
        tokio::time::sleep(HEADER_TIMEOUT / 2).await;
    }
    let (closed, after) = idle_closed.await.expect("task");
    let got = closed.unwrap_or_else(|_| panic!("an idle keep-alive connection still open after {after:?}"));
    eprintln!("idle keep-alive connection closed after {after:?}");
    assert!(!got.starts_with(b"HTTP/"), "nothing more is sent: {:?}", String::from_utf8_lossy(&got));
    assert!(after >= HEADER_TIMEOUT - EARLY, "closed after {after:?}, before the header timeout");
}

#[tokio::test]
async fn beyond_max_connections_a_connection_is_closed_until_a_slot_frees() {
    const MAX: usize = 4;
    let f = start(limits(Duration::from_secs(30), BODY_TIMEOUT, MAX), false).await;
    let before = counter("its_http_connections_refused_total");
    let mut held = Vec::new();
    for _ in 0..MAX {
        let mut tcp = TcpStream::connect(f.http()).await.expect("connect");
        assert!(healthz_keep_alive(&mut tcp).await.starts_with("HTTP/1.1 200"));
        held.push(tcp);
    }
    // One more is accepted and closed at once, without an answer.
    let mut extra = TcpStream::connect(f.http()).await.expect("the kernel accepts it");
    let start = Instant::now();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    let got = until_closed(&mut extra, Duration::from_secs(5)).await.expect("closed at once");
    eprintln!("connection {} closed after {:?} with {MAX} open", MAX + 1, start.elapsed());
    assert!(got.is_empty(), "no answer: {:?}", String::from_utf8_lossy(&got));
    let refused = counter("its_http_connections_refused_total") - before;
    assert!(refused >= 1.0, "{refused} refusals counted");
    // The ones held are still served.
    for tcp in &mut held {
        assert!(healthz_keep_alive(tcp).await.starts_with("HTTP/1.1 200"));
    }

    // One closes: the next connection is served (once the server has seen the close).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut tcp = TcpStream::connect(f.http()).await.expect("connect");
        let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        let got = until_closed(&mut tcp, Duration::from_secs(10)).await.unwrap_or_default();
        if got.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "a freed slot was not reused: {:?}", String::from_utf8_lossy(&got));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn http2_connections_get_the_stream_cap_and_must_send_a_request() {
    let f = start(limits(HEADER_TIMEOUT, BODY_TIMEOUT, 1024), false).await;
    let start = Instant::now();
    let mut tcp = TcpStream::connect(f.http()).await.expect("connect");
    // The preface and an empty SETTINGS frame, then no request.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.expect("preface");
    let got = until_closed(&mut tcp, HEADER_TIMEOUT + MARGIN).await.expect("closed in time");
    let after = start.elapsed();
    eprintln!("silent HTTP/2 connection closed after {after:?}");
    assert!(after >= HEADER_TIMEOUT - EARLY, "closed after {after:?}, before the header timeout");
    // The server's first frame is its SETTINGS, which caps concurrent streams.
    assert!(got.len() >= 9, "{got:?}");
    let len = usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
    assert_eq!(got[3], 4, "a SETTINGS frame first: {got:?}");
    let settings: Vec<(u16, u32)> = got[9..9 + len]
        .chunks_exact(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect();
    assert!(settings.contains(&(3, H2_MAX_CONCURRENT_STREAMS)), "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}");
}

#[tokio::test]
async fn event_streams_outlive_the_header_and_body_timeouts() {
    // Ten messages, 300 ms apart: three times both (1 s) timeouts.
    let app = Router::new().route(
        "/stream",
        get(|| async {
            let ticks = futures::stream::unfold(0u32, |n| async move {
                if n == 10 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                Some((Ok::<_, std::convert::Infallible>(Event::default().data(format!("tick {n}"))), n + 1))
            });
            Sse::new(ticks)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, rx) = watch::channel(false);
    let second = Duration::from_secs(1);
    tokio::spawn(transport::serve(listener, app, None, limits(second, second, 8), rx));

    let start = Instant::now();
    let body = reqwest::Client::new()
        .get(format!("http://{addr}/stream"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("the whole stream");
    eprintln!("event stream of {:?} read whole", start.elapsed());
    assert!(start.elapsed() >= Duration::from_secs(3), "{:?}", start.elapsed());
    for n in 0..10 {
        assert!(body.contains(&format!("data: tick {n}\n")), "tick {n} missing: {body}");
    }
}
