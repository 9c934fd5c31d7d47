//! The embedded MQTT broker: rumqttd on a loopback port of its own, behind a front in this
//! process that every outside client goes through.
//!
//! rumqttd 0.20 can check a CONNECT's user name and password but has no hook for what a client
//! may subscribe to, receive or publish. So the front speaks MQTT 3.1.1 itself (rumqttc's
//! `mqttbytes` v4 codec) and enforces, per connection:
//! - CONNECT: asks the [`Authenticator`]s; a refused client gets CONNACK 4 (bad user name or
//!   password) or 5 (not authorised) from the front and is closed; an accepted one is forwarded
//!   to rumqttd with the broker's internal credentials (a random password made at start, so a
//!   local process cannot bypass the front by connecting to rumqttd's port) and the client id
//!   `{principal}:{generation}:{client id}` (`{principal}:{client id}` for grants without a
//!   generation), so no client can take over another's session, and a persistent session made
//!   under an earlier issue of a credential (deleted and created again, perhaps with fewer sites)
//!   is never resumed by a later one. An empty client id with clean session 0 gets CONNACK 2
//!   (identifier rejected), as MQTT 3.1.1 requires;
//! - connection limits ([`Limits`]): over the total or the per-principal cap the front answers
//!   CONNACK 3 (server unavailable) and closes (`its_mqtt_connect_over_limit_total{limit}`);
//!   one credential generation holds at most [`MAX_PERSISTENT_SESSIONS`] distinct persistent
//!   (clean session 0) client ids: a CONNECT with clean session 0 and yet another client id is
//!   forwarded with clean session 1 (the client gets a fresh session, and a session-present flag
//!   of 0 says so), so the sessions rumqttd keeps for gone clients stay bounded; a CONNECT with
//!   clean session 1 frees its id's place;
//! - SUBSCRIBE: each filter is checked against the client's [`Grant`]; refused filters get the
//!   failure return code (0x80) in the SUBACK (the front answers alone when all are refused,
//!   else forwards the allowed ones and merges rumqttd's SUBACK). A requested QoS 2 is forwarded
//!   as QoS 1 (the SUBACK then grants 1): the aggregator publishes QoS 1 at most, and the
//!   delivery filter below handles QoS 0 and 1 only;
//! - delivery: every PUBLISH rumqttd sends towards the client must match one of the grant's
//!   subscribe filters (a session's subscriptions can outlive the grant they were made under),
//!   else it is dropped (`its_mqtt_delivery_refused_total`). A dropped QoS 1 message is
//!   acknowledged to rumqttd by the front, in rumqttd's order among the client's own PUBACKs
//!   (rumqttd closes a connection whose acknowledgements come out of order), so it is not sent
//!   again. A QoS 2 delivery (impossible with the QoS cap) closes the connection;
//! - PUBLISH to a topic the grant does not allow is dropped (QoS 1 is acknowledged, like
//!   Mosquitto does with an ACL denial; QoS 2 closes the connection), as is a last will on such a
//!   topic;
//! - every [`RECHECK`] the grant's issuer is asked whether it still holds: a credential deleted,
//!   created again or with other sites loses its open connections (within [`RECHECK`] plus the
//!   issuer's cache time, e.g. [`super::credentials::CACHE_TTL`]);
//! - MQTT 5 clients are refused with CONNACK 1 (unacceptable protocol version).
//!
//! Everything else (PINGREQ, UNSUBSCRIBE, ...) passes through unchanged. The front's metrics are
//! declared in [`describe`].
//!
//! Left to rumqttd: it keeps the sessions of an earlier generation (at most
//! [`MAX_PERSISTENT_SESSIONS`] each, never resumed) until the aggregator restarts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Login, Packet, PubAck, SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::acl::{AuthOutcome, Authenticator, ConnectRequest, Grant};
use crate::certs::{ReloadingCert, TlsFiles};
use crate::telemetry::mqtt::{
    CONNECT_OVER_LIMIT, CONNECT_REFUSED, CONNECTIONS_ACTIVE, DELIVERY_REFUSED, GRANT_WITHDRAWN,
    PERSISTENT_SESSION_REFUSED, PUBLISH_REFUSED, SUBSCRIBE_REFUSED,
};

/// Largest MQTT packet accepted (either way).
pub const MAX_PACKET: usize = 1 << 20;
/// A client must send its CONNECT within this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connection's grant is checked again.
pub const RECHECK: Duration = Duration::from_secs(5);
/// Distinct persistent (clean session 0) client ids one credential generation may hold: enough
/// for an integrator's few consumers and a spare each, while sessions of clients that never come
/// back stay bounded (rumqttd keeps them until it stops).
pub const MAX_PERSISTENT_SESSIONS: usize = 8;
/// Connections rumqttd accepts beyond the front's cap: the aggregator's own, which go to it
/// directly (the publisher, tests' observers), and front connections whose upstream half is
/// still closing.
const INTERNAL_CONNECTIONS: usize = 10;
/// Most QoS 1 messages a client may leave unacknowledged: packet ids are 16-bit, so a client
/// with more has stopped acknowledging (rumqttd stops sending long before).
const MAX_UNACKED: usize = u16::MAX as usize;
/// User name of the internal credentials (the front and the aggregator's own connections).
const INTERNAL_USER: &str = "its-internal";

/// Caps on the front's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client connections at once.
    pub total: usize,
    /// Connections at once per principal (one credential, one device).
    pub per_principal: usize,
    /// Distinct persistent client ids per principal and generation.
    pub persistent_per_generation: usize,
}

/// Who is connected, for the [`Limits`].
#[derive(Debug, Default)]
struct Registry {
    total: usize,
    per_principal: HashMap<String, usize>,
    /// Principal -> its generation last seen, and the persistent client ids (as given to
    /// rumqttd) made under it.
    persistent: HashMap<String, (String, HashSet<String>)>,
}

impl Registry {
    /// Counts one more connection of `principal`; `Err`: the limit reached (`total` or
    /// `per_client`), nothing counted.
    fn admit(&mut self, limits: &Limits, principal: &str) -> Result<(), &'static str> {
        if self.total >= limits.total {
            return Err("total");
        }
        let mine = self.per_principal.get(principal).copied().unwrap_or(0);
        if mine >= limits.per_principal {
            return Err("per_client");
        }
        self.total += 1;
        self.per_principal.insert(principal.to_owned(), mine + 1);
        Ok(())
    }

    /// Whether a CONNECT of `grant` for `upstream_id` (the client id as given to rumqttd) with
    /// clean session 0 may keep it; false: it gets a clean session. A CONNECT with clean session 1
    /// frees the id's place (rumqttd drops its session) and answers false.
    fn keep_persistent(&mut self, limits: &Limits, grant: &Grant, upstream_id: &str, clean_session: bool) -> bool {
        let entry = self.persistent.entry(grant.principal.clone()).or_default();
        if entry.0 != grant.generation {
            // A new generation: the sessions of the earlier one can never be resumed.
            *entry = (grant.generation.clone(), HashSet::new());
        }
        if clean_session {
            entry.1.remove(upstream_id);
            return false;
        }
        if entry.1.contains(upstream_id) || entry.1.len() < limits.persistent_per_generation {
            entry.1.insert(upstream_id.to_owned());
            return true;
        }
        false
    }
}

/// One admitted connection's place in the [`Registry`]; dropping it frees the place.
struct Slot<'a> {
    registry: &'a Mutex<Registry>,
    principal: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut r = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        r.total = r.total.saturating_sub(1);
        if let Some(n) = r.per_principal.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.per_principal.remove(&self.principal);
            }
        }
        metrics::gauge!(CONNECTIONS_ACTIVE).decrement(1.0);
    }
}

/// The running broker: where clients connect, and who may.
pub struct Broker {
    /// The front's address (what clients connect to).
    pub listen: SocketAddr,
    /// rumqttd's own listener (loopback; needs the internal credentials).
    internal: SocketAddr,
    internal_password: String,
    authenticators: RwLock<Vec<Arc<dyn Authenticator>>>,
    limits: Limits,
    registry: Mutex<Registry>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("listen", &self.listen)
            .field("internal", &self.internal)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Binds the front on `listen` (TLS with `tls`), starts rumqttd on a free loopback port, and
    /// serves until `shutdown`. The front's accept loop goes into `tasks`.
    pub async fn start(
        listen: SocketAddr,
        tls: Option<TlsFiles>,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
        tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<Arc<Self>> {
        let listener = TcpListener::bind(listen).await.with_context(|| {
            format!("binding the embedded MQTT broker on {listen} (set [mqtt] listen, or mode = \"off\")")
        })?;
        let listen = listener.local_addr().context("MQTT local address")?;
        let acceptor = match tls {
            Some(files) => {
                let cert = ReloadingCert::load(files)?;
                tasks.spawn(Arc::clone(&cert).watch(crate::certs::RELOAD_INTERVAL, shutdown.clone()));
                let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .context("MQTT TLS versions")?
                .with_no_client_auth()
                .with_cert_resolver(cert);
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
            }
            None => None,
        };
        let internal_password = crate::auth::secrets::random_token(32);
        let internal = start_rumqttd(&internal_password, limits.total.saturating_add(INTERNAL_CONNECTIONS)).await?;
        let broker = Arc::new(Self {
            listen,
            internal,
            internal_password,
            authenticators: RwLock::new(Vec::new()),
            limits,
            registry: Mutex::new(Registry::default()),
        });
        tasks.spawn(Arc::clone(&broker).accept_loop(listener, acceptor, shutdown));
        Ok(broker)
    }

    /// Adds an authenticator; they are asked in the order they were added, the first that
    /// recognises a client decides.
    pub fn add_authenticator(&self, a: Arc<dyn Authenticator>) {
        if let Ok(mut list) = self.authenticators.write() {
            list.push(a);
        }
    }

    /// Options for a connection of the aggregator itself, straight to rumqttd (no ACL: it may
    /// publish and subscribe anywhere). `client_id` must not start with a principal prefix
    /// (`integrator:`, `device:`), which the front gives outside clients.
    pub fn internal_options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(client_id, self.internal.ip().to_string(), self.internal.port());
        o.set_credentials(INTERNAL_USER, self.internal_password.clone());
        o
    }

    /// Who decides about `req`, and what they decided (`Refused` when nobody recognised it).
    async fn authenticate(&self, req: &ConnectRequest) -> (AuthOutcome, Option<Arc<dyn Authenticator>>) {
        let list: Vec<Arc<dyn Authenticator>> = self.authenticators.read().map(|l| l.clone()).unwrap_or_default();
        for a in list {
            match a.authenticate(req).await {
                AuthOutcome::NotMine => continue,
                outcome => return (outcome, Some(a)),
            }
        }
        (AuthOutcome::NotMine, None)
    }

    /// A place for one more connection of `principal`; `Err`: the limit reached (`total` or
    /// `per_client`).
    fn admit(&self, principal: &str) -> Result<Slot<'_>, &'static str> {
        let mut r = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        r.admit(&self.limits, principal)?;
        metrics::gauge!(CONNECTIONS_ACTIVE).increment(1.0);
        Ok(Slot { registry: &self.registry, principal: principal.to_owned() })
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let broker = Arc::clone(&self);
            let tls = tls.clone();
            let sd = shutdown.clone();
            tokio::spawn(async move {
                let r = match tls {
                    Some(acceptor) => match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => broker.serve_client(s, peer, sd).await,
                        Ok(Err(e)) => Err(anyhow::anyhow!("TLS handshake: {e}")),
                        Err(_) => Err(anyhow::anyhow!("TLS handshake timed out")),
                    },
                    None => broker.serve_client(stream, peer, sd).await,
                };
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "MQTT client connection ended");
                }
            });
        }
    }

    /// One client, from its CONNECT to the end of its connection.
    async fn serve_client<S>(
        &self,
        mut client: S,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut cbuf = BytesMut::with_capacity(4096);
        let frame = tokio::time::timeout(CONNECT_TIMEOUT, read_frame(&mut client, &mut cbuf))
            .await
            .context("no CONNECT in time")??;
        if frame.first().map(|b| b >> 4) != Some(1) {
            anyhow::bail!("the first packet is not a CONNECT");
        }
        if protocol_level(&frame) != Some(4) {
            // MQTT 3.1 (`MQIsdp`, level 3) or 5: answer as 3.1.1 and close.
            write_packet(&mut client, &Packet::ConnAck(ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false)))
                .await?;
            anyhow::bail!("unsupported MQTT protocol level {:?}", protocol_level(&frame));
        }
        let Packet::Connect(mut connect) = Packet::read(&mut frame.clone(), MAX_PACKET)? else {
            anyhow::bail!("malformed CONNECT");
        };
        let req = ConnectRequest {
            client_id: connect.client_id.clone(),
            username: connect.login.as_ref().map(|l| l.username.clone()),
            password: connect.login.as_ref().map(|l| l.password.clone()),
            peer,
        };
        let (outcome, issuer) = self.authenticate(&req).await;
        let (grant, issuer) = match (outcome, issuer) {
            (AuthOutcome::Granted(g), Some(i)) => (g, i),
            _ => {
                let code = if connect.login.is_some() {
                    ConnectReturnCode::BadUserNamePassword
                } else {
                    ConnectReturnCode::NotAuthorized
                };
                metrics::counter!(CONNECT_REFUSED).increment(1);
                tracing::info!(%peer, user = ?req.username, "MQTT: CONNECT refused");
                return refuse(client, code).await;
            }
        };
        if connect.client_id.is_empty() && !connect.clean_session {
            // MQTT 3.1.1 §3.1.3-8: a session needs a client id to be resumed by.
            tracing::info!(%peer, principal = grant.principal, "MQTT: empty client id with clean session 0, refused");
            return refuse(client, ConnectReturnCode::BadClientId).await;
        }
        let _slot = match self.admit(&grant.principal) {
            Ok(slot) => slot,
            Err(limit) => {
                metrics::counter!(CONNECT_OVER_LIMIT, "limit" => limit).increment(1);
                tracing::info!(%peer, principal = grant.principal, limit, "MQTT: connection limit reached, CONNECT refused");
                return refuse(client, ConnectReturnCode::ServiceUnavailable).await;
            }
        };
        if let Some(will) = &connect.last_will
            && !grant.may_publish(&will.topic)
        {
            metrics::counter!(PUBLISH_REFUSED).increment(1);
            tracing::info!(%peer, principal = grant.principal, "MQTT: last will on a topic it may not publish to, dropped");
            connect.last_will = None;
        }
        let id =
            if connect.client_id.is_empty() { crate::auth::secrets::random_id(16) } else { connect.client_id.clone() };
        connect.client_id = upstream_client_id(&grant, &id);
        let keep = self.registry.lock().unwrap_or_else(PoisonError::into_inner).keep_persistent(
            &self.limits,
            &grant,
            &connect.client_id,
            connect.clean_session,
        );
        if !keep && !connect.clean_session {
            metrics::counter!(PERSISTENT_SESSION_REFUSED).increment(1);
            tracing::info!(
                %peer,
                principal = grant.principal,
                limit = self.limits.persistent_per_generation,
                "MQTT: too many persistent client ids for this credential, given a clean session"
            );
            connect.clean_session = true;
        }
        connect.login = Some(Login::new(INTERNAL_USER, self.internal_password.clone()));
        if connect.keep_alive == 0 {
            // rumqttd refuses 0 (no keep-alive); a silent client is then closed after ~15 min.
            connect.keep_alive = 600;
        }
        let mut upstream = TcpStream::connect(self.internal).await.context("connecting to rumqttd")?;
        let _ = upstream.set_nodelay(true);
        write_packet(&mut upstream, &Packet::Connect(connect)).await?;
        tracing::debug!(%peer, principal = grant.principal, "MQTT client connected");

        let (mut ur, mut uw) = upstream.into_split();
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut ubuf = BytesMut::with_capacity(4096);
        let mut session = Session::new(grant);
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        // Bytes that came after the CONNECT in the same read.
        let mut open = session.client_frames(&mut cbuf, &mut uw, &mut cw).await?;
        while open {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = recheck.tick() => {
                    if !issuer.is_current(&session.grant).await {
                        metrics::counter!(GRANT_WITHDRAWN).increment(1);
                        tracing::info!(%peer, principal = session.grant.principal, "MQTT: grant no longer holds, closing");
                        break;
                    }
                }
                n = cr.read_buf(&mut cbuf) => {
                    if n? == 0 { break; }
                    open = session.client_frames(&mut cbuf, &mut uw, &mut cw).await?;
                }
                n = ur.read_buf(&mut ubuf) => {
                    if n? == 0 { break; }
                    session.broker_frames(&mut ubuf, &mut uw, &mut cw).await?;
                }
            }
        }
        let _ = cw.shutdown().await;
        let _ = uw.shutdown().await;
        Ok(())
    }
}

/// Answers a CONNECT with `code` and closes.
async fn refuse<S: AsyncWrite + Unpin>(mut client: S, code: ConnectReturnCode) -> anyhow::Result<()> {
    write_packet(&mut client, &Packet::ConnAck(ConnAck::new(code, false))).await?;
    let _ = client.shutdown().await;
    Ok(())
}

/// The client id the front gives rumqttd for a client's own `id`: its principal and generation
/// first (neither contains `:` beyond the principal's kind), so ids of different principals or
/// generations never meet.
fn upstream_client_id(grant: &Grant, id: &str) -> String {
    if grant.generation.is_empty() {
        format!("{}:{id}", grant.principal)
    } else {
        format!("{}:{}:{id}", grant.principal, grant.generation)
    }
}

/// What the front tracks of one connection beyond its bytes.
#[derive(Debug)]
struct Session {
    grant: Grant,
    /// SUBSCRIBEs forwarded with some filters removed: pkid -> which original filters went on.
    trimmed: HashMap<u16, Vec<bool>>,
    /// QoS 1 messages rumqttd sent that it has no PUBACK for yet, in its order (it needs them in
    /// that order): pkid, and whether it may be acknowledged now (the client acknowledged it, or
    /// the front dropped it).
    unacked: VecDeque<(u16, bool)>,
}

impl Session {
    fn new(grant: Grant) -> Self {
        Self { grant, trimmed: HashMap::new(), unacked: VecDeque::new() }
    }

    /// Handles the complete client packets in `buf`; false: close the connection.
    async fn client_frames<U, C>(
        &mut self,
        buf: &mut BytesMut,
        upstream: &mut U,
        client: &mut C,
    ) -> anyhow::Result<bool>
    where
        U: AsyncWrite + Unpin,
        C: AsyncWrite + Unpin,
    {
        let grant = &self.grant;
        while let Some(frame) = take_frame(buf)? {
            match frame.first().map(|b| b >> 4) {
                Some(3) => {
                    let Packet::Publish(p) = Packet::read(&mut frame.clone(), MAX_PACKET)? else {
                        anyhow::bail!("malformed PUBLISH");
                    };
                    if grant.may_publish(&p.topic) {
                        upstream.write_all(&frame).await?;
                        continue;
                    }
                    metrics::counter!(PUBLISH_REFUSED).increment(1);
                    tracing::debug!(principal = grant.principal, topic = p.topic, "MQTT: PUBLISH refused");
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => write_packet(client, &Packet::PubAck(PubAck::new(p.pkid))).await?,
                        QoS::ExactlyOnce => return Ok(false),
                    }
                }
                Some(4) => {
                    let Packet::PubAck(ack) = Packet::read(&mut frame.clone(), MAX_PACKET)? else {
                        anyhow::bail!("malformed PUBACK");
                    };
                    match self.unacked.iter_mut().find(|(pkid, done)| *pkid == ack.pkid && !*done) {
                        Some(entry) => {
                            entry.1 = true;
                            flush_acks(&mut self.unacked, upstream).await?;
                        }
                        // Not one the front saw: rumqttd decides.
                        None => upstream.write_all(&frame).await?,
                    }
                }
                Some(8) => {
                    let Packet::Subscribe(s) = Packet::read(&mut frame.clone(), MAX_PACKET)? else {
                        anyhow::bail!("malformed SUBSCRIBE");
                    };
                    let allowed: Vec<bool> = s.filters.iter().map(|f| grant.may_subscribe(&f.path)).collect();
                    for (f, ok) in s.filters.iter().zip(&allowed) {
                        if !ok {
                            metrics::counter!(SUBSCRIBE_REFUSED).increment(1);
                            tracing::info!(principal = grant.principal, filter = f.path, "MQTT: SUBSCRIBE refused");
                        }
                    }
                    let qos2 = s.filters.iter().any(|f| f.qos == QoS::ExactlyOnce);
                    if !allowed.iter().any(|a| *a) {
                        let codes = vec![SubscribeReasonCode::Failure; s.filters.len()];
                        write_packet(client, &Packet::SubAck(SubAck::new(s.pkid, codes))).await?;
                    } else if allowed.iter().all(|a| *a) && !qos2 {
                        upstream.write_all(&frame).await?;
                    } else {
                        let filters = s.filters.iter().zip(&allowed).filter(|(_, a)| **a).map(|(f, _)| {
                            let mut f = f.clone();
                            f.qos = capped_qos(f.qos);
                            f
                        });
                        let mut fwd = Subscribe::new_many(filters);
                        fwd.pkid = s.pkid;
                        write_packet(upstream, &Packet::Subscribe(fwd)).await?;
                        if !allowed.iter().all(|a| *a) {
                            self.trimmed.insert(s.pkid, allowed);
                        }
                    }
                }
                // A second CONNECT is a protocol violation.
                Some(1) => return Ok(false),
                _ => upstream.write_all(&frame).await?,
            }
        }
        Ok(true)
    }

    /// Handles the complete broker packets in `buf`: deliveries outside the grant are dropped
    /// (and acknowledged to rumqttd when QoS 1), the SUBACKs of SUBSCRIBEs the front trimmed are
    /// merged, the rest goes to the client.
    async fn broker_frames<U, C>(&mut self, buf: &mut BytesMut, upstream: &mut U, client: &mut C) -> anyhow::Result<()>
    where
        U: AsyncWrite + Unpin,
        C: AsyncWrite + Unpin,
    {
        while let Some(frame) = take_frame(buf)? {
            match frame.first().map(|b| b >> 4) {
                Some(3) => {
                    let Packet::Publish(p) = Packet::read(&mut frame.clone(), MAX_PACKET)? else {
                        anyhow::bail!("malformed PUBLISH from rumqttd");
                    };
                    let allowed = self.grant.may_receive(&p.topic);
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce if self.unacked.len() >= MAX_UNACKED => {
                            anyhow::bail!("the client leaves too many messages unacknowledged")
                        }
                        QoS::AtLeastOnce => self.unacked.push_back((p.pkid, !allowed)),
                        // Subscriptions are granted QoS 1 at most.
                        QoS::ExactlyOnce => anyhow::bail!("rumqttd sent a QoS 2 message"),
                    }
                    if allowed {
                        client.write_all(&frame).await?;
                    } else {
                        metrics::counter!(DELIVERY_REFUSED).increment(1);
                        tracing::debug!(
                            principal = self.grant.principal,
                            topic = p.topic,
                            "MQTT: message outside the grant, not delivered"
                        );
                        flush_acks(&mut self.unacked, upstream).await?;
                    }
                }
                Some(9) if !self.trimmed.is_empty() => {
                    let Packet::SubAck(ack) = Packet::read(&mut frame.clone(), MAX_PACKET)? else {
                        anyhow::bail!("malformed SUBACK from rumqttd");
                    };
                    let Some(allowed) = self.trimmed.remove(&ack.pkid) else {
                        client.write_all(&frame).await?;
                        continue;
                    };
                    let mut theirs = ack.return_codes.into_iter();
                    let codes = allowed
                        .iter()
                        .map(|a| {
                            if *a {
                                theirs.next().unwrap_or(SubscribeReasonCode::Failure)
                            } else {
                                SubscribeReasonCode::Failure
                            }
                        })
                        .collect();
                    write_packet(client, &Packet::SubAck(SubAck::new(ack.pkid, codes))).await?;
                }
                _ => client.write_all(&frame).await?,
            }
        }
        Ok(())
    }
}

/// The QoS the front grants for a requested one: QoS 2 becomes 1.
fn capped_qos(q: QoS) -> QoS {
    match q {
        QoS::ExactlyOnce => QoS::AtLeastOnce,
        q => q,
    }
}

/// Sends rumqttd the PUBACKs that are due, in its order: those at the head of `unacked` that may
/// be acknowledged.
async fn flush_acks<U: AsyncWrite + Unpin>(
    unacked: &mut VecDeque<(u16, bool)>,
    upstream: &mut U,
) -> anyhow::Result<()> {
    while let Some(&(pkid, true)) = unacked.front() {
        write_packet(upstream, &Packet::PubAck(PubAck::new(pkid))).await?;
        unacked.pop_front();
    }
    Ok(())
}

/// The next complete packet in `buf` (removed from it), `None` when it is not all there yet.
fn take_frame(buf: &mut BytesMut) -> anyhow::Result<Option<BytesMut>> {
    match mqttbytes::check(buf.iter(), MAX_PACKET) {
        Ok(h) => Ok(Some(buf.split_to(h.frame_length()))),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(anyhow::anyhow!("bad MQTT packet: {e:?}")),
    }
}

/// Reads until `buf` holds a complete packet and returns it.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> anyhow::Result<BytesMut> {
    loop {
        if let Some(f) = take_frame(buf)? {
            return Ok(f);
        }
        if s.read_buf(buf).await? == 0 {
            anyhow::bail!("connection closed");
        }
    }
}

async fn write_packet<S: AsyncWrite + Unpin>(s: &mut S, p: &Packet) -> anyhow::Result<()> {
    let mut out = BytesMut::with_capacity(p.size());
    p.write(&mut out, MAX_PACKET).map_err(|e| anyhow::anyhow!("encoding MQTT: {e:?}"))?;
    s.write_all(&out).await?;
    Ok(())
}

/// The protocol level byte of a CONNECT frame (4: MQTT 3.1.1, 5: MQTT 5, 3: MQTT 3.1).
fn protocol_level(frame: &[u8]) -> Option<u8> {
    // Fixed header: type byte, then 1 to 4 remaining-length bytes (the last without 0x80).
    let len_bytes = frame.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let vh = frame.get(1 + len_bytes..)?;
    let name_len = usize::from(u16::from_be_bytes([*vh.first()?, *vh.get(1)?]));
    vh.get(2 + name_len).copied()
}

/// Starts rumqttd on a free loopback port with the internal credentials, for at most
/// `max_connections` connections; returns its address once it accepts connections.
async fn start_rumqttd(password: &str, max_connections: usize) -> anyhow::Result<SocketAddr> {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
    let addr = {
        let probe = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free loopback port")?;
        probe.local_addr()?
    };
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET,
        max_inflight_count: 200,
        auth: Some(HashMap::from([(INTERNAL_USER.to_owned(), password.to_owned())])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "its-internal-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("its".to_owned(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .context("starting the embedded MQTT broker")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(addr);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the embedded MQTT broker did not start listening on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_levels() {
        let mut buf = BytesMut::new();
        Packet::Connect(rumqttc::mqttbytes::v4::Connect::new("x")).write(&mut buf, MAX_PACKET).expect("encode");
        assert_eq!(protocol_level(&buf), Some(4));
        let v5 = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60];
        assert_eq!(protocol_level(&v5), Some(5));
        assert_eq!(protocol_level(&[0x10]), None);
    }

    fn grant() -> Grant {
        Grant {
            principal: "integrator:acme".into(),
            generation: "0123456789abcdef".into(),
            subscribe: vec!["its/v1/b/#".into(), "its/v1/devices/dev-b/status".into()],
            publish: vec![],
        }
    }

    fn encode(packets: &[Packet]) -> BytesMut {
        let mut buf = BytesMut::new();
        for p in packets {
            p.write(&mut buf, MAX_PACKET).expect("encode");
        }
        buf
    }

    fn decode(bytes: &[u8]) -> Vec<Packet> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while !buf.is_empty() {
            out.push(Packet::read(&mut buf, MAX_PACKET).expect("decode"));
        }
        out
    }

    fn publish(topic: &str, qos: QoS, pkid: u16) -> Packet {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(topic, qos, "{}");
        p.pkid = pkid;
        Packet::Publish(p)
    }

    fn topics(packets: &[Packet]) -> Vec<(String, u16)> {
        packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.topic.clone(), p.pkid)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn deliveries_outside_the_grant_are_dropped_and_acknowledged_in_order() {
        let mut session = Session::new(grant());
        let (mut up, mut client) = (Vec::new(), Vec::new());
        // What rumqttd sends on a session whose subscriptions predate the grant.
        let mut from_broker = encode(&[
            publish("its/v1/b/cam-b/counts", QoS::AtLeastOnce, 1),
            publish("its/v1/a/cam-a/counts", QoS::AtLeastOnce, 2),
            publish("its/v1/a/cam-a/events/line_crossing", QoS::AtMostOnce, 0),
            publish("its/v1/devices/dev-b/status", QoS::AtMostOnce, 0),
            publish("its/v1/devices/dev-a/status", QoS::AtLeastOnce, 3),
        ]);
        session.broker_frames(&mut from_broker, &mut up, &mut client).await.expect("broker frames");
        assert_eq!(
            topics(&decode(&client)),
            vec![("its/v1/b/cam-b/counts".to_owned(), 1), ("its/v1/devices/dev-b/status".to_owned(), 0)]
        );
        // rumqttd needs PUBACKs in its order: those of 2 and 3 wait for the client's of 1.
        assert!(up.is_empty(), "{:?}", decode(&up));
        let mut from_client = encode(&[Packet::PubAck(PubAck::new(1))]);
        assert!(session.client_frames(&mut from_client, &mut up, &mut client).await.expect("client frames"));
        assert_eq!(
            decode(&up),
            vec![Packet::PubAck(PubAck::new(1)), Packet::PubAck(PubAck::new(2)), Packet::PubAck(PubAck::new(3))]
        );
        assert!(session.unacked.is_empty());

        // A dropped message with nothing before it is acknowledged at once; an allowed one waits
        // for the client.
        up.clear();
        let mut from_broker = encode(&[
            publish("its/v1/a/x", QoS::AtLeastOnce, 4),
            publish("its/v1/b/x", QoS::AtLeastOnce, 5),
            publish("its/v1/a/y", QoS::AtLeastOnce, 6),
        ]);
        session.broker_frames(&mut from_broker, &mut up, &mut client).await.expect("broker frames");
        assert_eq!(decode(&up), vec![Packet::PubAck(PubAck::new(4))]);
        up.clear();
        // A PUBACK the front did not see a message for goes to rumqttd as it is.
        let mut from_client = encode(&[Packet::PubAck(PubAck::new(77)), Packet::PubAck(PubAck::new(5))]);
        assert!(session.client_frames(&mut from_client, &mut up, &mut client).await.expect("client frames"));
        assert_eq!(
            decode(&up),
            vec![Packet::PubAck(PubAck::new(77)), Packet::PubAck(PubAck::new(5)), Packet::PubAck(PubAck::new(6))]
        );

        // QoS 2 is never granted, so a QoS 2 delivery ends the connection.
        let mut from_broker = encode(&[publish("its/v1/b/x", QoS::ExactlyOnce, 7)]);
        assert!(session.broker_frames(&mut from_broker, &mut up, &mut client).await.is_err());
    }

    #[tokio::test]
    async fn subscriptions_are_granted_qos_1_at_most() {
        let mut session = Session::new(grant());
        let (mut up, mut client) = (Vec::new(), Vec::new());
        let mut sub = Subscribe::new("its/v1/b/#", QoS::ExactlyOnce);
        sub.pkid = 9;
        let mut from_client = encode(&[Packet::Subscribe(sub)]);
        assert!(session.client_frames(&mut from_client, &mut up, &mut client).await.expect("client frames"));
        let mut fwd = Subscribe::new("its/v1/b/#", QoS::AtLeastOnce);
        fwd.pkid = 9;
        assert_eq!(decode(&up), vec![Packet::Subscribe(fwd)]);
        assert!(client.is_empty());

        // With a refused filter too: the allowed one goes on at QoS 1, the SUBACKs are merged.
        up.clear();
        let mut sub = Subscribe::new_many([
            rumqttc::mqttbytes::v4::SubscribeFilter::new("its/v1/a/#".into(), QoS::AtLeastOnce),
            rumqttc::mqttbytes::v4::SubscribeFilter::new("its/v1/b/+/counts".into(), QoS::ExactlyOnce),
        ]);
        sub.pkid = 10;
        let mut from_client = encode(&[Packet::Subscribe(sub)]);
        assert!(session.client_frames(&mut from_client, &mut up, &mut client).await.expect("client frames"));
        let mut fwd = Subscribe::new("its/v1/b/+/counts", QoS::AtLeastOnce);
        fwd.pkid = 10;
        assert_eq!(decode(&up), vec![Packet::Subscribe(fwd)]);
        let mut from_broker =
            encode(&[Packet::SubAck(SubAck::new(10, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]))]);
        session.broker_frames(&mut from_broker, &mut up, &mut client).await.expect("broker frames");
        assert_eq!(
            decode(&client),
            vec![Packet::SubAck(SubAck::new(
                10,
                vec![SubscribeReasonCode::Failure, SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            ))]
        );
    }

    #[test]
    fn client_ids_carry_principal_and_generation() {
        assert_eq!(upstream_client_id(&grant(), "c1"), "integrator:acme:0123456789abcdef:c1");
        assert_eq!(upstream_client_id(&Grant::device_uplink("dev-1"), "c1"), "device:dev-1:c1");
    }

    #[test]
    fn connection_limits() {
        let limits = Limits { total: 3, per_principal: 2, persistent_per_generation: 2 };
        let mut r = Registry::default();
        assert_eq!(r.admit(&limits, "integrator:a"), Ok(()));
        assert_eq!(r.admit(&limits, "integrator:a"), Ok(()));
        assert_eq!(r.admit(&limits, "integrator:a"), Err("per_client"));
        assert_eq!(r.admit(&limits, "integrator:b"), Ok(()));
        assert_eq!(r.admit(&limits, "integrator:c"), Err("total"));
        assert_eq!(r.total, 3);

        // The slot gives its place back.
        let registry = Mutex::new(r);
        drop(Slot { registry: &registry, principal: "integrator:a".into() });
        let mut r = registry.into_inner().expect("lock");
        assert_eq!(r.per_principal.get("integrator:a"), Some(&1));
        assert_eq!(r.admit(&limits, "integrator:c"), Ok(()));
    }

    #[test]
    fn persistent_client_ids_per_generation() {
        let limits = Limits { total: 10, per_principal: 10, persistent_per_generation: 2 };
        let mut r = Registry::default();
        let g = grant();
        assert!(r.keep_persistent(&limits, &g, "a", false));
        assert!(r.keep_persistent(&limits, &g, "b", false));
        assert!(!r.keep_persistent(&limits, &g, "c", false), "a third id gets a clean session");
        assert!(r.keep_persistent(&limits, &g, "a", false), "a known id keeps its session");
        // A clean session frees the id's place.
        assert!(!r.keep_persistent(&limits, &g, "b", true));
        assert!(r.keep_persistent(&limits, &g, "c", false));
        // A new generation starts afresh.
        let g2 = Grant { generation: "fedcba9876543210".into(), ..grant() };
        assert!(r.keep_persistent(&limits, &g2, "x", false));
        assert!(r.keep_persistent(&limits, &g2, "y", false));
        assert!(!r.keep_persistent(&limits, &g2, "z", false));
    }
}
