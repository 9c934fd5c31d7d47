//! How the API is served: [`serve`] runs one accept loop for plain HTTP (loopback addresses
//! only, for a reverse proxy on the same host) and HTTPS alike, HTTP/1.1 and HTTP/2 on hyper-util's
//! auto builder.
//!
//! HTTPS takes the certificate chain and key from PEM files (`[http] tls_cert`, `tls_key`),
//! reloaded when the files change so a renewed certificate needs no restart ([`ReloadingCert`]);
//! it speaks TLS 1.2 and 1.3 with ALPN `h2` and `http/1.1`.
//!
//! Slow or idle clients cannot hold sockets ([`Limits`], `[http]` in the configuration), on
//! either scheme:
//! - the TLS handshake must finish within [`HANDSHAKE_TIMEOUT`];
//! - the first request head of a connection must arrive within `header_timeout_s` (HTTP/1 and
//!   HTTP/2), and so must every later HTTP/1 request head; an HTTP/1 keep-alive connection idle
//!   that long is closed;
//! - a request body must arrive whole within `body_timeout_s` of its head ([`TimedBody`]): the
//!   JSON extractor answers 408 `body_timeout` and an HTTP/1 connection is closed after the
//!   answer. Responses are not timed, so an event stream runs as long as it likes;
//! - at most `max_connections` are open at once (TLS handshakes included): one beyond it is
//!   accepted and closed at once, without an answer, and counted in
//!   `its_http_connections_refused_total`; the next connection after one closes is served;
//! - HTTP/2: at most [`H2_MAX_CONCURRENT_STREAMS`] streams per connection, and a ping every
//!   [`H2_KEEP_ALIVE_INTERVAL`] of silence; a connection whose ping goes unanswered for
//!   [`H2_KEEP_ALIVE_TIMEOUT`] is closed. One that has sent a request and whose peer answers
//!   pings stays open while idle: the connection cap bounds how many there can be.
//!
//! Timeouts are counted in `its_http_timeouts_total{phase}`. Handlers get the TCP peer as
//! `axum::extract::ConnectInfo<SocketAddr>` (the client behind a proxy:
//! [`super::client_addr::client_addr`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Version, header};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Sleep;
use tower::ServiceExt;

pub use crate::certs::{
    RELOAD_INTERVAL, ReloadingCert, TlsFileError, TlsFiles, load_cert_chain, load_signing_key, server_config,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client may take for the TLS handshake: a few round trips, a second on a bad link;
/// 10 s is far beyond that and still frees a slot held by a silent client soon.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[http] header_timeout_s`: a request head is a few hundred bytes a client sends at
/// once; 30 s tolerates a congested mobile link, and a keep-alive connection idle longer is
/// closed (a client reopens one in a round trip).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[http] body_timeout_s`: the API takes JSON bodies of at most 2 MB (axum's limit), so
/// 60 s asks for no more than ~35 kB/s; only a stalled or deliberately slow client is cut off.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `[http] max_connections`: far more than the dashboards, integrations and a reverse
/// proxy open (an HTTP/2 client multiplexes on one connection), while a flood holds at most 1024
/// file descriptors and their buffers (tens of MiB). The systemd unit raises `LimitNOFILE` well
/// above it, so the cap, not the descriptor limit, is what a flood meets.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// HTTP/2 streams one connection may have open at once: a dashboard runs a handful of requests
/// in parallel plus an event stream; hyper's default (200) lets one client make the server work
/// on far more at once than any client here needs.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 64;
/// An HTTP/2 connection silent this long is pinged (a peer gone without closing is found).
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed: a live peer answers within
/// a round trip, so 20 s is only missed by a dead one, whose slot is then free.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long open connections get to finish their requests at shutdown (within systemd's
/// `TimeoutStopSec=30s`, leaving time for the rest of the shutdown).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every listener enforces, plain HTTP or HTTPS (`[http]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The first request head of a connection (HTTP/1 or HTTP/2), and every later HTTP/1 request
    /// head, must have arrived within this; an HTTP/1 keep-alive connection idle for this long is
    /// closed.
    pub header_timeout: Duration,
    /// A request body must have arrived whole within this of its head: otherwise 408, and an
    /// HTTP/1 connection is closed.
    pub body_timeout: Duration,
    /// Connections open at once, TLS handshakes included; one beyond it is accepted and closed
    /// at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A request body that had not arrived whole within [`Limits::body_timeout`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// Whether `err`, or an error it wraps, is a [`BodyTimedOut`].
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| e.is::<BodyTimedOut>())
}

/// Serves `app` on `listener`, over TLS with `tls` (ALPN `h2` and `http/1.1`), plain HTTP
/// without, until `shutdown` changes; then lets open connections finish their requests (at most
/// [`SHUTDOWN_GRACE`]). HTTP/1.1 and HTTP/2 (by the connection preface) on both, with `limits`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let scheme = if tls.is_some() { "HTTPS" } else { "HTTP" };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let builder = Arc::new(connection_builder(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "{scheme} accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Accepted and closed at once rather than left in the kernel's backlog: the client learns
        // now, not after its own timeout, and the backlog stays free for when a slot frees.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            crate::telemetry::http_connection_refused();
            tracing::debug!(peer = %peer, max = limits.max_connections, "{scheme} connection refused: too many open");
            drop(tcp);
            continue;
        };
        let conn = Conn { peer, app: app.clone(), builder: Arc::clone(&builder), limits, watcher: graceful.watcher() };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _open = crate::telemetry::HttpConnectionOpen::new();
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor else {
                return conn.serve(tcp).await;
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => conn.serve(stream).await,
                Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                Err(_) => {
                    crate::telemetry::http_timeout("handshake");
                    tracing::debug!(peer = %peer, "TLS handshake timed out");
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("{scheme} connections still open {SHUTDOWN_GRACE:?} after shutdown began; not waiting for them");
    }
    Ok(())
}

/// HTTP/1.1 and HTTP/2 with the limits hyper enforces itself.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper starts the header timer whenever it waits for a request head, so it also closes a
    // keep-alive connection that stays idle that long.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

/// One accepted connection, before its protocol is known.
struct Conn {
    peer: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    watcher: Watcher,
}

impl Conn {
    /// Serves requests on `io` until the client or a limit closes it, or shutdown.
    async fn serve<S>(self, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self { peer, app, builder, limits, watcher } = self;
        let first = Arc::new(FirstRequest::default());
        let io = FirstRequestDeadline::new(io, limits.header_timeout, Arc::clone(&first));
        let service = hyper::service::service_fn({
            let first = Arc::clone(&first);
            move |req: Request<Incoming>| {
                first.arrived();
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo::<SocketAddr>(peer));
                let http1 = parts.version < Version::HTTP_2;
                let body = TimedBody::new(body, limits.body_timeout);
                let timed_out = Arc::clone(&body.timed_out);
                let req = Request::from_parts(parts, axum::body::Body::new(body));
                let app = app.clone();
                async move {
                    let mut resp = app.oneshot(req).await?;
                    // The rest of a body that timed out may still come: do not read it as the
                    // next request. (HTTP/2 has no such header; the stream ends with the answer.)
                    if http1 && timed_out.load(Ordering::Acquire) {
                        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(resp)
                }
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let result = watcher.watch(conn).await;
        let hyper_timeout = result.as_ref().err().is_some_and(|e| {
            std::iter::successors(Some(&**e as &(dyn std::error::Error + 'static)), |e| e.source())
                .any(|e| e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout))
        });
        if hyper_timeout || first.timed_out.load(Ordering::Acquire) {
            crate::telemetry::http_timeout("header");
        }
        if let Err(e) = result {
            tracing::debug!(peer = %peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Whether a connection's first request head has arrived, shared by its IO and its service.
#[derive(Debug)]
struct FirstRequest {
    awaiting: AtomicBool,
    /// The connection was closed because it had not arrived in time.
    timed_out: AtomicBool,
}

impl Default for FirstRequest {
    fn default() -> Self {
        Self { awaiting: AtomicBool::new(true), timed_out: AtomicBool::new(false) }
    }
}

impl FirstRequest {
    fn arrived(&self) {
        self.awaiting.store(false, Ordering::Release);
    }
}

/// A connection's IO whose reads fail with `TimedOut` once the header timeout has passed while
/// the first request head is still awaited. It covers what hyper's own HTTP/1 header timer does
/// not: the bytes read to tell HTTP/1 from HTTP/2, and HTTP/2 connections, which have no header
/// timer (after their first request, HTTP/2 keep-alive pings find dead peers).
struct FirstRequestDeadline<S> {
    io: S,
    first: Arc<FirstRequest>,
    /// `None` once the first request head arrived.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> FirstRequestDeadline<S> {
    fn new(io: S, timeout: Duration, first: Arc<FirstRequest>) -> Self {
        Self { io, first, deadline: Some(Box::pin(tokio::time::sleep(timeout))) }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstRequestDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        if !this.first.awaiting.load(Ordering::Acquire) {
            this.deadline = None;
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.first.timed_out.store(true, Ordering::Release);
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request head within the header timeout",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstRequestDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body that must have arrived whole by a deadline; past it, reading it fails with
/// [`BodyTimedOut`] (the JSON extractor answers 408). Only the request body is timed: a handler
/// that never reads it, and the response (an event stream), are not affected.
pub struct TimedBody<B> {
    inner: B,
    deadline: tokio::time::Instant,
    timeout: Duration,
    /// Made when the body is first waited for (a bodiless request needs no timer).
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl<B> TimedBody<B> {
    /// `inner`, which must be whole within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            sleep: None,
            timed_out: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<B> HttpBody for TimedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.timed_out.load(Ordering::Acquire) {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timed_out.store(true, Ordering::Release);
        crate::telemetry::http_timeout("body");
        Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
