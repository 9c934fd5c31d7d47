//! Authentication and authorisation through the REST API, in-process (`tower::ServiceExt::oneshot`),
//! on both backends: the permission matrix of every endpoint against every role and every kind of
//! bad credential, sign-in and its throttling, refresh-token rotation and reuse detection,
//! revocation, signing-key rotation, TOTP MFA at a controlled time, role MFA policy, the audit
//! log, API keys and site-limited grants.

use its_testkit::server as common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine as _;
use its_aggregator::auth::secrets::totp;
use its_aggregator::auth::tokens::{AUDIENCE_ACCESS, ISSUER};
use its_aggregator::auth::{
    Access, AccessClaims, AuthConfig, AuthService, LoginOutcome, Permission, PermissionSet, Principal, Role, Subject,
};
use its_aggregator::snapshots::SnapshotObjects;
use its_aggregator::store::{EventStore, Fleet, NewSnapshot, Scope};
use its_shared::event::ObjectRef;
use its_shared::wire::Hello;
use its_shared::{EventEnvelope, EventKind};
use serde_json::{Value, json};
use tower::ServiceExt as _;

const PASSWORD: &str = "correct horse battery staple";
/// A fixed TOTP secret (base32) for users the fixtures enrol directly.
const SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn wall_ms() -> i64 {
    its_aggregator::unix_ms()
}

// ---------------------------------------------------------------------------------------------
// Both backends.

common::both_backends!(
    permission_matrix,
    login_failures_look_the_same,
    account_lockout_and_unlock,
    address_lockout,
    refresh_rotation_and_reuse,
    logout_and_account_changes_revoke_sessions,
    jwks_and_key_rotation,
    mfa_with_totp,
    role_policy_requires_mfa,
    audit_log_names_the_actors,
    api_keys,
    site_limited_viewer,
    scoped_writes_and_grants,
    channel_targets_are_checked,
    concurrent_sign_ins_are_counted_first,
    ipv6_clients_are_limited_by_their_64,
    own_secret_checks_are_limited,
    streams_end_with_their_credential,
    failures_leave_bounded_rows,
);

// ---------------------------------------------------------------------------------------------
// The app and its calls.

/// How a request authenticates.
#[derive(Debug, Clone)]
enum Auth {
    None,
    /// `Authorization: Bearer <token or its_ key>`.
    Bearer(String),
    /// `X-API-Key: <key>`.
    ApiKey(String),
}

fn bearer(token: &str) -> Auth {
    Auth::Bearer(token.to_owned())
}

#[derive(Debug)]
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    /// The JSON body; `Null` when the body is not JSON.
    body: Value,
    bytes: Vec<u8>,
}

impl Resp {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn str(&self, field: &str) -> String {
        self.body[field].as_str().unwrap_or_else(|| panic!("{field} in {}", self.body)).to_owned()
    }
}

struct Api {
    router: Router,
    auth: Arc<AuthService>,
    store: Arc<dyn EventStore>,
    fleet: Fleet,
    snapshots: SnapshotObjects,
    /// Access token of `common::TEST_ADMIN`.
    admin: String,
    /// The auth service's clock, Unix ms.
    clock: Arc<AtomicI64>,
}

impl Api {
    async fn new(store: Arc<dyn EventStore>) -> Self {
        let snapshots = SnapshotObjects::with_store(Arc::new(object_store::memory::InMemory::new()), "memory");
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        let (state, admin) =
            common::test_state(Arc::clone(&store), snapshots.clone(), metrics, AuthConfig::default()).await;
        let clock = Arc::new(AtomicI64::new(wall_ms()));
        let c = Arc::clone(&clock);
        state.auth.set_clock(Arc::new(move || c.load(Ordering::SeqCst)));
        Self {
            auth: Arc::clone(&state.auth),
            fleet: state.fleet.clone(),
            router: its_aggregator::http::router(state),
            store,
            snapshots,
            admin,
            clock,
        }
    }

    fn now(&self) -> i64 {
        self.clock.load(Ordering::SeqCst)
    }

    fn set_now(&self, ms: i64) {
        self.clock.store(ms, Ordering::SeqCst);
    }

    fn advance(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        auth: &Auth,
        body: Option<Value>,
        from: Option<SocketAddr>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        match auth {
            Auth::None => {}
            Auth::Bearer(t) => req = req.header(header::AUTHORIZATION, format!("Bearer {t}")),
            Auth::ApiKey(k) => req = req.header("x-api-key", k.as_str()),
        }
        let mut req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&b).expect("json")))
                .expect("request"),
            None => req.body(Body::empty()).expect("request"),
        };
        if let Some(addr) = from {
            req.extensions_mut().insert(ConnectInfo(addr));
        }
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20).await.expect("body").to_vec();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, headers, body, bytes }
    }

    async fn get(&self, uri: &str, auth: &Auth) -> Resp {
        self.send(Method::GET, uri, auth, None, None).await
    }

    async fn post(&self, uri: &str, auth: &Auth, body: Value) -> Resp {
        self.send(Method::POST, uri, auth, Some(body), None).await
    }

    async fn login(&self, username: &str, password: &str) -> Resp {
        self.post("/api/v1/auth/login", &Auth::None, json!({ "username": username, "password": password })).await
    }

    async fn login_from(&self, addr: SocketAddr, username: &str, password: &str) -> Resp {
        let body = json!({ "username": username, "password": password });
        self.send(Method::POST, "/api/v1/auth/login", &Auth::None, Some(body), Some(addr)).await
    }

    /// Signs in (no MFA) and returns (access token, refresh token).
    async fn tokens(&self, username: &str, password: &str) -> (String, String) {
        let r = self.login(username, password).await;
        assert_eq!(r.status, StatusCode::OK, "login of {username}: {}", r.body);
        assert!(r.body.get("mfa_required").is_none(), "{}", r.body);
        (r.str("access_token"), r.str("refresh_token"))
    }

    async fn user(&self, name: &str, role: Role) -> i64 {
        self.auth.create_user(name, PASSWORD, role, &Scope::All).await.expect("create user")
    }

    /// The status of `GET /api/v1/auth/me` with a token.
    async fn me(&self, token: &str) -> StatusCode {
        self.get("/api/v1/auth/me", &bearer(token)).await.status
    }

    async fn audit(&self, action: &str) -> Vec<Value> {
        let r = self.get(&format!("/api/v1/audit?action={action}&limit=1000"), &bearer(&self.admin)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["entries"].as_array().expect("entries").clone()
    }
}

/// Header and claims of a JWT, without checking anything.
fn jwt_parts(token: &str) -> (Value, Value) {
    let mut it = token.split('.');
    let mut part = || {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(it.next().expect("part")).expect("b64");
        serde_json::from_slice::<Value>(&bytes).expect("json")
    };
    (part(), part())
}

fn event(seq: u64, camera: &str, observed_at_ms: i64) -> EventEnvelope {
    let object = ObjectRef { track_id: seq, label: "car".into(), score: 0.9, bbox: [0.0, 0.0, 0.5, 0.5] };
    EventEnvelope {
        seq,
        camera: camera.to_owned(),
        observed_at_ms,
        kind: EventKind::ZoneEnter { zone: "junction".into(), object },
    }
}

/// A device with cameras, `n` events (on its cameras in turn) and a snapshot of event 1.
async fn seed_device(api: &Api, device: &str, cameras: &[&str], n: u64) {
    let t0 = wall_ms() - 3_600_000;
    let hello = Hello {
        agent_version: "1.0.0".into(),
        model: "yolo11n".into(),
        cameras: cameras.iter().map(|c| (*c).to_owned()).collect(),
        last_acked_seq: 0,
        last_assigned_seq: 0,
    };
    api.store.record_hello(device, &hello, t0).await.expect("hello");
    let events: Vec<_> =
        (1..=n).map(|s| event(s, cameras[(s as usize - 1) % cameras.len()], t0 + s as i64 * 1000)).collect();
    api.store.insert_events(device, &events, t0).await.expect("insert events");
    let key = SnapshotObjects::full_key(device, 1).expect("key");
    api.snapshots.put(&key, b"\xff\xd8jpeg\xff\xd9".to_vec()).await.expect("put snapshot");
    let key = key.to_string();
    let snap = NewSnapshot { seq: 1, camera: cameras[0], taken_at_ms: t0, full_key: &key, full_bytes: 8, crop: None };
    api.store.record_snapshot(device, &snap, t0).await.expect("record snapshot");
}

// ---------------------------------------------------------------------------------------------
// Tokens made by hand: forged, expired, signed by a key the service does not know.

/// A JWT from a header, claims and a signing function over `header.claims`.
fn jwt(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(header).expect("json")),
        b64url(&serde_json::to_vec(claims).expect("json"))
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64url(&sig))
}

fn rs256(key: &aws_lc_rs::rsa::KeyPair, msg: &[u8]) -> Vec<u8> {
    let mut sig = vec![0; key.public_modulus_len()];
    key.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), msg, &mut sig)
        .expect("sign");
    sig
}

fn hs256(secret: &[u8], msg: &[u8]) -> Vec<u8> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    aws_lc_rs::hmac::sign(&key, msg).as_ref().to_vec()
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).expect("pem")
}

/// Valid access claims of a user in session `sid` (`None`: a made-up session).
fn claims_of(uid: i64, name: &str, role: Role, exp_s: i64, sid: Option<&str>) -> AccessClaims {
    AccessClaims {
        iss: ISSUER.into(),
        aud: AUDIENCE_ACCESS.into(),
        sub: uid.to_string(),
        name: name.into(),
        role,
        sid: sid.map_or_else(|| format!("forged{}", rand::random::<u64>()), str::to_owned),
        scope: Scope::All,
        amr: vec!["pwd".into()],
        iat: wall_ms() / 1000 - 10,
        exp: exp_s,
        mfa_enrolment_only: false,
    }
}

/// The service's active signing key (kid, key pair).
async fn active_key(auth: &AuthService) -> (String, aws_lc_rs::rsa::KeyPair) {
    let (kid, _) = auth.keys.active_kid().expect("active key");
    let rows = auth.store.signing_keys(0).await.expect("keys");
    let row = rows.iter().find(|r| r.kid == kid).expect("active key row");
    let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(&pem_der(&row.private_pem)).expect("pkcs8");
    (kid, kp)
}

// ---------------------------------------------------------------------------------------------
// 1. The permission matrix: every endpoint of the access map × every role and credential.

/// A column of the matrix: one way of calling.
enum Col {
    Anonymous,
    /// A signed-in user of `users[i]`.
    Role(usize),
    /// A valid admin token made for each request: by the service's key ring, or by hand (RS256
    /// with the active key: shows that the hand-made tokens below fail only for what they get
    /// wrong).
    Minted {
        by_hand: bool,
    },
    /// A credential that must be refused with 401.
    Bad(Auth),
    /// A valid API key with these permissions.
    Key(Auth, PermissionSet),
}

/// What the handler sees of the caller (how the request for it is built).
#[derive(Debug, Clone, Copy)]
enum Who {
    Nobody,
    User(i64),
    Key,
}

struct RoleUser {
    role: Role,
    uid: i64,
    name: String,
    token: String,
}

enum After {
    Nothing,
    /// Keep the refresh token the answer carries.
    Refresh,
    /// The caller's sessions ended: sign in again before its next request.
    EndSession(i64),
    /// MFA was enabled (and the sessions ended): turn it off again.
    DisableMfa(i64),
}

struct Prepared {
    uri: String,
    body: Option<Value>,
    success: StatusCode,
    after: After,
}

struct Fixture {
    api: Api,
    users: Vec<RoleUser>,
    admin_uid: i64,
    victim: i64,
    mfa_user: i64,
    refresh: String,
    signing: (String, aws_lc_rs::rsa::KeyPair),
    dirty: HashSet<i64>,
    n: u32,
}

/// A valid alert rule body for the matrix.
fn alert_rule_body(n: u32) -> Value {
    json!({ "name": format!("m-rule-{n}"), "severity": "info", "condition": { "type": "camera_down" } })
}

/// A valid alert channel body for the matrix (nothing listens there; no worker runs).
fn alert_channel_body(n: u32) -> Value {
    json!({ "name": format!("m-channel-{n}"),
        "target": { "kind": "webhook", "url": "http://192.0.2.1:9/hook", "secret": "matrix" } })
}

impl Fixture {
    async fn alert_rule(&self, n: u32) -> i64 {
        let mut spec: its_aggregator::alerts::RuleSpec = serde_json::from_value(alert_rule_body(n)).expect("rule");
        spec.validate().expect("valid rule");
        let store = its_aggregator::alerts::AlertStore::new(self.api.store.db());
        store.create_rule(&spec, None, self.api.now()).await.expect("rule").rule_id
    }

    async fn alert_channel(&self, n: u32) -> i64 {
        let spec: its_aggregator::alerts::ChannelSpec = serde_json::from_value(alert_channel_body(n)).expect("channel");
        let store = its_aggregator::alerts::AlertStore::new(self.api.store.db());
        store.create_channel(&spec, self.api.now()).await.expect("channel").channel_id
    }

    /// An open alert on dev-a/cam-1 of its own; with a channel, its delivery made dead.
    async fn alert(&self, n: u32, channel: Option<i64>) -> (i64, Option<i64>) {
        use its_aggregator::alerts::store::{AttemptResult, Fired, Firing};
        let store = its_aggregator::alerts::AlertStore::new(self.api.store.db());
        let subject = format!("camera:dev-a/cam-1#{n}");
        let channels: Vec<i64> = channel.into_iter().collect();
        let firing = Firing {
            rule_id: 1,
            rule_name: "m-rule",
            severity: its_aggregator::alerts::Severity::Warning,
            subject: &subject,
            device_id: Some("dev-a"),
            camera: Some("cam-1"),
            title: "matrix",
            details: &json!({}),
            dedupe_since_ms: None,
            channels: &channels,
        };
        let now = self.api.now();
        let Fired::Opened(alert) = store.fire(&firing, now).await.expect("fire") else { panic!("a new alert") };
        if channel.is_none() {
            return (alert.alert_id, None);
        }
        let claimed = store.claim_due(i64::MAX - 1, now, 1000).await.expect("claim");
        let d = claimed.into_iter().find(|d| d.alert_id == alert.alert_id).expect("its delivery");
        let failed =
            AttemptResult { delivered: false, permanent: true, http_status: Some(410), error: None, latency_ms: 1 };
        assert_eq!(store.record_attempt(&d, &failed, 5, now, now).await.expect("attempt"), "dead");
        (alert.alert_id, Some(d.delivery_id))
    }

    /// The session of the admin user's current token: minted tokens belong to it (a token of
    /// a session that does not exist is refused).
    fn admin_sid(&self) -> String {
        jwt_parts(&self.users[0].token).1["sid"].as_str().expect("sid").to_owned()
    }

    /// Signs the admin user in again if its sessions ended.
    async fn fresh_admin(&mut self) {
        if self.dirty.remove(&self.admin_uid) {
            let LoginOutcome::Tokens(t) =
                self.api.auth.login(&self.users[0].name, PASSWORD, None).await.expect("sign in again")
            else {
                panic!("the admin has MFA left on")
            };
            self.users[0].token = t.access_token;
        }
    }

    fn admin_principal(&self) -> Principal {
        Principal {
            subject: Subject::User {
                user_id: self.admin_uid,
                username: "m-admin".into(),
                role: Role::Admin,
                session_id: "fixture".into(),
            },
            permissions: PermissionSet::all(),
            scope: Scope::All,
            mfa_enrolment_only: false,
            expires_at_ms: None,
        }
    }

    fn minted(&self, by_hand: bool) -> String {
        let claims = claims_of(self.admin_uid, "m-admin", Role::Admin, wall_ms() / 1000 + 600, Some(&self.admin_sid()));
        if by_hand {
            let (kid, key) = &self.signing;
            let header = json!({ "alg": "RS256", "typ": "JWT", "kid": kid });
            jwt(&header, &serde_json::to_value(&claims).expect("claims"), |m| rs256(key, m))
        } else {
            self.api.auth.keys.sign(&claims).expect("sign")
        }
    }

    /// The request a caller makes to `method path` in the matrix, such that an allowed caller
    /// reaches the handler and gets `success`; with what it needs prepared first.
    async fn prepare(&mut self, method: &Method, path: &str, who: Who) -> Result<Prepared, String> {
        self.n += 1;
        let n = self.n;
        let now = self.api.now();
        let auth = Arc::clone(&self.api.auth);
        // What the endpoints for users signed in with a password answer an API key.
        let users_only = |s: StatusCode| if matches!(who, Who::Key) { StatusCode::BAD_REQUEST } else { s };
        let ok = StatusCode::OK;
        let p = |uri: &str, body: Option<Value>, success: StatusCode| Prepared {
            uri: uri.to_owned(),
            body,
            success,
            after: After::Nothing,
        };
        let code_now = || totp::code_at(SECRET, u64::try_from(now / 1000).expect("time")).expect("code");
        Ok(match (method.as_str(), path) {
            ("GET", "/healthz") => p(path, None, ok),
            ("GET", "/.well-known/jwks.json") => p(path, None, ok),
            ("POST", "/api/v1/auth/login") => p(path, Some(json!({ "username": "m-login", "password": PASSWORD })), ok),
            ("POST", "/api/v1/auth/login/mfa") => {
                // Enrolled afresh, so that the current code has not been used yet.
                auth.store.set_pending_totp(self.mfa_user, SECRET, now).await.expect("pending");
                auth.store.enable_totp(self.mfa_user, &[], now).await.expect("enable");
                let LoginOutcome::MfaRequired { mfa_token, .. } =
                    auth.login("m-mfa", PASSWORD, None).await.expect("password step")
                else {
                    return Err("m-mfa got tokens without MFA".into());
                };
                p(path, Some(json!({ "mfa_token": mfa_token, "code": code_now() })), ok)
            }
            ("POST", "/api/v1/auth/refresh") => {
                Prepared { after: After::Refresh, ..p(path, Some(json!({ "refresh_token": self.refresh })), ok) }
            }
            ("POST", "/api/v1/auth/logout") => Prepared {
                after: match who {
                    Who::User(uid) => After::EndSession(uid),
                    _ => After::Nothing,
                },
                ..p(path, None, users_only(StatusCode::NO_CONTENT))
            },
            ("GET", "/api/v1/auth/me") => p(path, None, ok),
            ("POST", "/api/v1/auth/password") => Prepared {
                after: match who {
                    Who::User(uid) => After::EndSession(uid),
                    _ => After::Nothing,
                },
                ..p(
                    path,
                    Some(json!({ "current_password": PASSWORD, "new_password": PASSWORD })),
                    users_only(StatusCode::NO_CONTENT),
                )
            },
            ("POST", "/api/v1/auth/mfa/enroll") => p(path, None, users_only(ok)),
            ("POST", "/api/v1/auth/mfa/confirm") => {
                let mut after = After::Nothing;
                if let Who::User(uid) = who {
                    auth.store.set_pending_totp(uid, SECRET, now).await.expect("pending");
                    after = After::DisableMfa(uid);
                }
                Prepared { after, ..p(path, Some(json!({ "code": code_now() })), users_only(ok)) }
            }
            ("POST", "/api/v1/auth/mfa/disable") => {
                let mut after = After::Nothing;
                if let Who::User(uid) = who {
                    auth.store.set_pending_totp(uid, SECRET, now).await.expect("pending");
                    auth.store.enable_totp(uid, &[], now).await.expect("enable");
                    after = After::EndSession(uid);
                }
                Prepared { after, ..p(path, Some(json!({ "code": code_now() })), users_only(StatusCode::NO_CONTENT)) }
            }
            ("POST", "/api/v1/auth/keys/rotate") => p(path, None, ok),
            ("GET", "/api/v1/users") => p(path, None, ok),
            ("POST", "/api/v1/users") => p(
                path,
                Some(json!({ "username": format!("m-new-{n}"), "password": PASSWORD, "role": "viewer" })),
                StatusCode::CREATED,
            ),
            ("GET", "/api/v1/users/{id}") => p(&format!("/api/v1/users/{}", self.victim), None, ok),
            ("PATCH", "/api/v1/users/{id}") => {
                p(&format!("/api/v1/users/{}", self.victim), Some(json!({ "disabled": false })), ok)
            }
            ("DELETE", "/api/v1/users/{id}/mfa") => {
                p(&format!("/api/v1/users/{}/mfa", self.victim), None, StatusCode::NO_CONTENT)
            }
            ("GET", "/api/v1/roles") => p(path, None, ok),
            ("PUT", "/api/v1/roles/{role}/policy") => {
                p("/api/v1/roles/analyst/policy", Some(json!({ "require_mfa": false })), ok)
            }
            ("GET", "/api/v1/api-keys") => p(path, None, ok),
            ("POST", "/api/v1/api-keys") => p(
                path,
                Some(json!({ "name": format!("m-key-{n}"), "permissions": ["events:read"] })),
                StatusCode::CREATED,
            ),
            ("DELETE", "/api/v1/api-keys/{id}") => {
                let perms = PermissionSet::of(&[Permission::EventsRead]);
                let (row, _) = auth
                    .create_api_key(&self.admin_principal(), &format!("m-doomed-{n}"), perms, Scope::All, None)
                    .await
                    .expect("key");
                p(&format!("/api/v1/api-keys/{}", row.key_id), None, StatusCode::NO_CONTENT)
            }
            ("GET", "/api/v1/audit") => p(path, None, ok),
            ("GET", "/api/v1/mqtt/credentials") => p(path, None, ok),
            ("POST", "/api/v1/mqtt/credentials") => {
                p(path, Some(json!({ "username": format!("m-mqtt-{n}"), "sites": ["north"] })), StatusCode::CREATED)
            }
            ("DELETE", "/api/v1/mqtt/credentials/{username}") => {
                let name = format!("m-mqtt-gone-{n}");
                its_aggregator::mqtt::credentials::CredentialStore::new(self.api.store.db())
                    .create(&name, &[], false, None, now)
                    .await
                    .expect("MQTT credential");
                p(&format!("/api/v1/mqtt/credentials/{name}"), None, StatusCode::NO_CONTENT)
            }
            ("GET", "/api/v1/sites") => p(path, None, ok),
            ("POST", "/api/v1/sites") => p(
                path,
                Some(json!({ "site_id": format!("m-site-{n}"), "name": format!("Site {n}") })),
                StatusCode::CREATED,
            ),
            ("PATCH", "/api/v1/sites/{site}") => {
                p("/api/v1/sites/north", Some(json!({ "name": format!("North {n}") })), ok)
            }
            ("DELETE", "/api/v1/sites/{site}") => {
                let site = format!("m-gone-{n}");
                self.api.fleet.create_site(&site, "Gone", now).await.expect("site");
                p(&format!("/api/v1/sites/{site}"), None, StatusCode::NO_CONTENT)
            }
            ("GET", "/api/v1/devices") => p(path, None, ok),
            ("GET", "/api/v1/devices/{device}") => p("/api/v1/devices/dev-a", None, ok),
            ("PATCH", "/api/v1/devices/{device}") => {
                p("/api/v1/devices/dev-a", Some(json!({ "name": format!("Box {n}") })), ok)
            }
            ("GET", "/api/v1/devices/{device}/health") => p("/api/v1/devices/dev-a/health", None, ok),
            ("GET", "/api/v1/cameras") => p(path, None, ok),
            ("GET", "/api/v1/devices/{device}/cameras/{camera}") => p("/api/v1/devices/dev-a/cameras/cam-1", None, ok),
            ("PATCH", "/api/v1/devices/{device}/cameras/{camera}") => {
                p("/api/v1/devices/dev-a/cameras/cam-1", Some(json!({ "name": format!("Cam {n}") })), ok)
            }
            ("GET", "/api/v1/events") => p(path, None, ok),
            // A stream: `duration_s=0` ends it right after the `: ready` comment.
            ("GET", "/api/v1/stream") => p("/api/v1/stream?duration_s=0", None, ok),
            ("GET", "/api/v1/events/{id}/snapshot") => p("/api/v1/events/dev-a:1/snapshot", None, ok),
            ("GET", "/api/v1/system/storage") => p(path, None, ok),
            ("GET", "/api/v1/metrics") | ("GET", "/api/v1/anomalies") => p(path, None, ok),
            ("GET", "/api/v1/alert-rules") | ("GET", "/api/v1/alert-channels") | ("GET", "/api/v1/alerts") => {
                p(path, None, ok)
            }
            ("GET", "/api/v1/alert-deliveries/dead") => p(path, None, ok),
            ("POST", "/api/v1/alert-rules") => p(path, Some(alert_rule_body(n)), StatusCode::CREATED),
            ("GET", "/api/v1/alert-rules/{id}") => {
                p(&format!("/api/v1/alert-rules/{}", self.alert_rule(n).await), None, ok)
            }
            ("PUT", "/api/v1/alert-rules/{id}") => {
                p(&format!("/api/v1/alert-rules/{}", self.alert_rule(n).await), Some(alert_rule_body(n)), ok)
            }
            ("DELETE", "/api/v1/alert-rules/{id}") => {
                p(&format!("/api/v1/alert-rules/{}", self.alert_rule(n).await), None, StatusCode::NO_CONTENT)
            }
            ("POST", "/api/v1/alert-channels") => p(path, Some(alert_channel_body(n)), StatusCode::CREATED),
            ("GET", "/api/v1/alert-channels/{id}") => {
                p(&format!("/api/v1/alert-channels/{}", self.alert_channel(n).await), None, ok)
            }
            ("PUT", "/api/v1/alert-channels/{id}") => {
                p(&format!("/api/v1/alert-channels/{}", self.alert_channel(n).await), Some(alert_channel_body(n)), ok)
            }
            ("DELETE", "/api/v1/alert-channels/{id}") => {
                p(&format!("/api/v1/alert-channels/{}", self.alert_channel(n).await), None, StatusCode::NO_CONTENT)
            }
            ("GET", "/api/v1/alerts/{id}") => p(&format!("/api/v1/alerts/{}", self.alert(n, None).await.0), None, ok),
            ("GET", "/api/v1/alerts/{id}/deliveries") => {
                p(&format!("/api/v1/alerts/{}/deliveries", self.alert(n, None).await.0), None, ok)
            }
            ("POST", "/api/v1/alerts/{id}/ack") => {
                p(&format!("/api/v1/alerts/{}/ack", self.alert(n, None).await.0), None, ok)
            }
            ("POST", "/api/v1/alerts/{id}/resolve") => {
                p(&format!("/api/v1/alerts/{}/resolve", self.alert(n, None).await.0), None, ok)
            }
            ("POST", "/api/v1/alert-deliveries/{id}/retry") => {
                let channel = self.alert_channel(n).await;
                let (_, delivery) = self.alert(n, Some(channel)).await;
                p(&format!("/api/v1/alert-deliveries/{}/retry", delivery.expect("a dead delivery")), None, ok)
            }
            _ => return Err(format!("no request for {method} {path} in the matrix's table: add one")),
        })
    }
}

async fn permission_matrix(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let entries = its_aggregator::http::access_map().expect("access map").entries();
    assert!(entries.len() >= 29, "only {} endpoints in the access map: {entries:?}", entries.len());

    // What the requests need: a device with cameras, events and a snapshot; a site; users.
    seed_device(&api, "dev-a", &["cam-1", "cam-2"], 10).await;
    api.fleet.create_site("north", "North", api.now()).await.expect("site");
    let mut users = Vec::new();
    for role in Role::ALL {
        let name = format!("m-{role}");
        let uid = api.user(&name, *role).await;
        let (token, _) = api.tokens(&name, PASSWORD).await;
        users.push(RoleUser { role: *role, uid, name, token });
    }
    let admin_uid = users[0].uid;
    let victim = api.user("m-victim", Role::Viewer).await;
    api.user("m-login", Role::Viewer).await;
    let mfa_user = api.user("m-mfa", Role::Viewer).await;
    let (_, refresh) = api.tokens("m-login", PASSWORD).await;
    api.user("m-gone", Role::Viewer).await;
    let (logged_out, _) = api.tokens("m-gone", PASSWORD).await;
    assert_eq!(api.post("/api/v1/auth/logout", &bearer(&logged_out), json!({})).await.status, StatusCode::NO_CONTENT);

    let signing = active_key(&api.auth).await;
    let mut fx = Fixture { api, users, admin_uid, victim, mfa_user, refresh, signing, dirty: HashSet::new(), n: 0 };

    // API keys: one with a few permissions (one of them admin-only), one revoked.
    let key_perms = PermissionSet::of(&[
        Permission::EventsRead,
        Permission::DevicesRead,
        Permission::SitesRead,
        Permission::AuditRead,
    ]);
    let (_, key) =
        fx.api.auth.create_api_key(&fx.admin_principal(), "m-subset", key_perms, Scope::All, None).await.expect("key");
    let (revoked_row, revoked) =
        fx.api.auth.create_api_key(&fx.admin_principal(), "m-revoked", key_perms, Scope::All, None).await.expect("key");
    assert!(fx.api.auth.store.revoke_api_key(&revoked_row.key_id, fx.api.now()).await.expect("revoke"));

    // Bad tokens, all with otherwise valid admin claims.
    let (kid, signing_key) = (&fx.signing.0, &fx.signing.1);
    let admin_sid = fx.admin_sid();
    let claims =
        serde_json::to_value(claims_of(admin_uid, "m-admin", Role::Admin, wall_ms() / 1000 + 600, Some(&admin_sid)))
            .expect("c");
    let expired = fx
        .api
        .auth
        .keys
        .sign(&claims_of(admin_uid, "m-admin", Role::Admin, wall_ms() / 1000 - 3600, Some(&admin_sid)))
        .expect("sign");
    // Signed with the real key (as by someone who read it), for a session that does not exist:
    // of an existing admin, and of a user that does not exist at all.
    let forged_session = fx
        .api
        .auth
        .keys
        .sign(&claims_of(admin_uid, "m-admin", Role::Admin, wall_ms() / 1000 + 600, None))
        .expect("sign");
    let forged_user =
        fx.api.auth.keys.sign(&claims_of(987_654, "nobody", Role::Admin, wall_ms() / 1000 + 600, None)).expect("sign");
    let stranger = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let unknown_kid = format!("k{}-zzzzzz", wall_ms() / 1000);
    let rs = |kid: &str| jwt(&json!({ "alg": "RS256", "typ": "JWT", "kid": kid }), &claims, |m| rs256(&stranger, m));
    let (stranger_unknown_kid, stranger_real_kid) = (rs(&unknown_kid), rs(kid));
    let none = {
        let t = jwt(&json!({ "alg": "none", "typ": "JWT", "kid": kid }), &claims, |_| Vec::new());
        assert!(t.ends_with('.'), "{t}");
        t
    };
    let (spki_der, modulus) = {
        use aws_lc_rs::encoding::{AsDer as _, PublicKeyX509Der};
        use aws_lc_rs::signature::KeyPair as _;
        let der: PublicKeyX509Der<'static> = signing_key.public_key().as_der().expect("spki");
        let jwks = fx.api.auth.keys.jwks();
        let jwk = jwks["keys"].as_array().expect("keys").iter().find(|k| k["kid"] == kid.as_str()).expect("jwk");
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwk["n"].as_str().expect("n")).expect("n");
        (der.as_ref().to_vec(), n)
    };
    let hs = |secret: &[u8]| jwt(&json!({ "alg": "HS256", "typ": "JWT", "kid": kid }), &claims, |m| hs256(secret, m));
    let (hs_pem, hs_der, hs_n) = (hs(pem("PUBLIC KEY", &spki_der).as_bytes()), hs(&spki_der), hs(&modulus));

    let mut cols: Vec<(&str, Col)> = vec![("anon", Col::Anonymous)];
    let short = ["admin", "operator", "analyst", "viewer", "integr", "device"];
    for (i, u) in fx.users.iter().enumerate() {
        assert_eq!(u.role.as_str().get(..3), short[i].get(..3));
        cols.push((short[i], Col::Role(i)));
    }
    cols.extend([
        ("minted", Col::Minted { by_hand: false }),
        ("byhand", Col::Minted { by_hand: true }),
        ("expired", Col::Bad(bearer(&expired))),
        ("rsa-kid?", Col::Bad(bearer(&stranger_unknown_kid))),
        ("rsa-kid", Col::Bad(bearer(&stranger_real_kid))),
        ("none", Col::Bad(bearer(&none))),
        ("hs-pem", Col::Bad(bearer(&hs_pem))),
        ("hs-der", Col::Bad(bearer(&hs_der))),
        ("hs-n", Col::Bad(bearer(&hs_n))),
        ("key", Col::Key(bearer(&key), key_perms)),
        ("key-x", Col::Key(Auth::ApiKey(key.clone()), key_perms)),
        ("key-rev", Col::Bad(bearer(&revoked))),
        ("key-revx", Col::Bad(Auth::ApiKey(revoked.clone()))),
        ("loggedout", Col::Bad(bearer(&logged_out))),
        ("fake-sid", Col::Bad(bearer(&forged_session))),
        ("fake-usr", Col::Bad(bearer(&forged_user))),
    ]);

    let mut table: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (row, (method, path, access)) in entries.iter().enumerate() {
        for (name, col) in &cols {
            // The credential, what it may do (None: refused), and who the handler sees.
            let (auth, perms, who) = match col {
                Col::Anonymous => (Auth::None, None, Who::Nobody),
                Col::Role(i) => {
                    let u = &fx.users[*i];
                    if fx.dirty.remove(&u.uid) {
                        let LoginOutcome::Tokens(t) =
                            fx.api.auth.login(&u.name, PASSWORD, None).await.expect("sign in again")
                        else {
                            panic!("{} has MFA left on", u.name)
                        };
                        fx.users[*i].token = t.access_token;
                    }
                    let u = &fx.users[*i];
                    (bearer(&u.token), Some(u.role.permissions()), Who::User(u.uid))
                }
                Col::Minted { by_hand } => {
                    fx.fresh_admin().await;
                    (bearer(&fx.minted(*by_hand)), Some(PermissionSet::all()), Who::User(fx.admin_uid))
                }
                Col::Bad(a) => (a.clone(), None, Who::Nobody),
                Col::Key(a, p) => (a.clone(), Some(*p), Who::Key),
            };
            let prepared = match fx.prepare(method, path, who).await {
                Ok(p) => p,
                Err(e) => {
                    if !failures.contains(&e) {
                        failures.push(e);
                    }
                    table.entry(row).or_default().push("?".into());
                    continue;
                }
            };
            let resp = fx.api.send(method.clone(), &prepared.uri, &auth, prepared.body.clone(), None).await;
            let s = resp.status;
            let expected = match (access, perms) {
                (Access::Public, _) => prepared.success,
                (_, None) => StatusCode::UNAUTHORIZED,
                (Access::Authenticated, Some(_)) => prepared.success,
                (Access::Requires(p), Some(perms)) if perms.contains(*p) => prepared.success,
                (Access::Requires(_), Some(_)) => StatusCode::FORBIDDEN,
            };
            let mut wrong = expected != s;
            if *access == Access::Public && (s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN) {
                wrong = true;
            }
            // Refusals say why, in the error form.
            let want_code = match (s, col) {
                (StatusCode::UNAUTHORIZED, Col::Anonymous) => Some("unauthenticated"),
                (StatusCode::UNAUTHORIZED, _) if *access != Access::Public => Some("invalid_token"),
                (StatusCode::FORBIDDEN, _) => Some("forbidden"),
                _ => None,
            };
            if let Some(c) = want_code
                && resp.code() != c
            {
                wrong = true;
            }
            if s == StatusCode::UNAUTHORIZED && !resp.headers.contains_key(header::WWW_AUTHENTICATE) {
                wrong = true;
            }
            if wrong {
                failures.push(format!(
                    "{method} {} as {name}: {s}, expected {} ({}); body {}",
                    prepared.uri,
                    expected.as_u16(),
                    access.as_str(),
                    String::from_utf8_lossy(&resp.bytes).chars().take(200).collect::<String>()
                ));
            }
            table.entry(row).or_default().push(format!("{}{}", s.as_u16(), if wrong { "!" } else { "" }));
            match prepared.after {
                After::Nothing => {}
                After::Refresh => {
                    if s == StatusCode::OK {
                        fx.refresh = resp.str("refresh_token");
                    }
                }
                After::EndSession(uid) => {
                    fx.dirty.insert(uid);
                }
                After::DisableMfa(uid) => {
                    fx.api.auth.store.disable_totp(uid, fx.api.now()).await.expect("disable");
                    fx.dirty.insert(uid);
                }
            }
        }
    }
    if !failures.is_empty() {
        let width =
            entries.iter().map(|(m, p, a)| m.as_str().len() + p.len() + a.as_str().len() + 3).max().unwrap_or(0);
        let mut out = format!("{:width$}", "");
        for (name, _) in &cols {
            let _ = write!(out, " {name:>9}");
        }
        out.push('\n');
        for (row, (method, path, access)) in entries.iter().enumerate() {
            let _ = write!(out, "{:width$}", format!("{method} {path} [{}]", access.as_str()));
            for cell in table.get(&row).into_iter().flatten() {
                let _ = write!(out, " {cell:>9}");
            }
            out.push('\n');
        }
        panic!("permission matrix ({} wrong, marked !):\n{out}\n{}", failures.len(), failures.join("\n"));
    }
    // The admin of the fixture is untouched by all this.
    assert_eq!(fx.api.me(&fx.api.admin).await, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// 2. Sign-in, throttling, sessions, keys.

async fn login_failures_look_the_same(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let uid = api.user("alice", Role::Operator).await;
    let unknown = api.login("nobody", PASSWORD).await;
    let wrong = api.login("alice", "not the password at all").await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"), "{}", unknown.body);
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.bytes, wrong.bytes, "an unknown user and a wrong password get the same answer");
    assert_eq!(unknown.headers.get(header::CONTENT_TYPE), wrong.headers.get(header::CONTENT_TYPE));

    // Names compare without case and surrounding spaces.
    let ok = api.login("  Alice ", PASSWORD).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["token_type"], "Bearer");
    assert_eq!(ok.body["expires_in"], 600);
    assert_eq!(ok.body["mfa_enrolment_required"], false);
    let access = ok.str("access_token");
    let (header, claims) = jwt_parts(&access);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"].as_str(), api.auth.keys.active_kid().map(|k| k.0).as_deref());
    assert_eq!((claims["sub"].as_str(), claims["role"].as_str()), (Some(uid.to_string().as_str()), Some("operator")));
    assert_eq!((claims["aud"].as_str(), claims["iss"].as_str()), (Some(AUDIENCE_ACCESS), Some(ISSUER)));
    assert_eq!(claims["sid"], ok.body["session_id"]);
    let me = api.get("/api/v1/auth/me", &bearer(&access)).await;
    assert_eq!(
        (me.status, &me.body["username"], &me.body["role"]),
        (StatusCode::OK, &json!("alice"), &json!("operator"))
    );

    // Malformed sign-ins are 4xx, never 500.
    for body in [json!({ "username": "alice" }), json!({ "username": "alice", "password": PASSWORD, "x": 1 })] {
        let r = api.post("/api/v1/auth/login", &Auth::None, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    }

    // A disabled user cannot sign in (and gets the same answer as a wrong password); its
    // tokens stop working.
    let r = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{uid}"),
            &bearer(&api.admin),
            Some(json!({ "disabled": true })),
            None,
        )
        .await;
    assert_eq!((r.status, &r.body["disabled"]), (StatusCode::OK, &json!(true)), "{}", r.body);
    let disabled = api.login("alice", PASSWORD).await;
    assert_eq!(disabled.status, StatusCode::UNAUTHORIZED);
    assert_eq!(disabled.bytes, unknown.bytes);
    assert_eq!(api.me(&access).await, StatusCode::UNAUTHORIZED);
    let r = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{uid}"),
            &bearer(&api.admin),
            Some(json!({ "disabled": false })),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    api.tokens("alice", PASSWORD).await;
}

/// `Retry-After` of a 429, seconds.
fn retry_after(r: &Resp) -> u64 {
    assert_eq!((r.status, r.code()), (StatusCode::TOO_MANY_REQUESTS, "too_many_attempts"), "{}", r.body);
    r.headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in {:?}", r.headers))
}

async fn account_lockout_and_unlock(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    api.user("bob", Role::Viewer).await;
    let max = api.auth.config.max_failures_per_account;
    let lockout_ms = i64::try_from(api.auth.config.lockout.as_millis()).expect("ms");
    for i in 0..max {
        let r = api.login("bob", "not the password at all").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "failure {i}: {}", r.body);
    }
    // Locked: even the right password is refused, with when to try again.
    let r = api.login("bob", PASSWORD).await;
    assert_eq!(retry_after(&r), u64::try_from(lockout_ms / 1000).expect("s"));
    assert!(r.body.get("access_token").is_none());
    let r = api.login("BOB", PASSWORD).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "the name is normalised before throttling");

    // Unknown names lock the same way: nothing tells them apart.
    for _ in 0..max {
        assert_eq!(api.login("ghost", "not the password at all").await.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(retry_after(&api.login("ghost", PASSWORD).await), u64::try_from(lockout_ms / 1000).expect("s"));

    // Still locked just before the end, open after it.
    api.advance(lockout_ms - 2_000);
    assert_eq!(retry_after(&api.login("bob", PASSWORD).await), 2);
    api.advance(2_001);
    api.tokens("bob", PASSWORD).await;
    // The count started again: one failure does not lock.
    assert_eq!(api.login("bob", "not the password at all").await.status, StatusCode::UNAUTHORIZED);
    api.tokens("bob", PASSWORD).await;
    assert!(!api.audit("login.locked").await.is_empty());
}

async fn address_lockout(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    api.user("carol", Role::Viewer).await;
    let attacker: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
    let other: SocketAddr = "198.51.100.8:40000".parse().expect("addr");
    let max = api.auth.config.max_failures_per_addr;
    assert!(max > api.auth.config.max_failures_per_account);
    // Many names, one failure each: no account locks, the address does.
    for i in 0..max {
        let r = api.login_from(attacker, &format!("guess-{i}"), "not the password at all").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "failure {i}: {}", r.body);
    }
    let r = api.login_from(attacker, "carol", PASSWORD).await;
    assert!(retry_after(&r) > 0);
    let r = api.login_from(other, "carol", PASSWORD).await;
    assert_eq!(r.status, StatusCode::OK, "another address is not locked: {}", r.body);
    assert_eq!(api.login("carol", PASSWORD).await.status, StatusCode::OK);
    // The audit log has the address.
    let failures = api.audit("login.failure").await;
    assert!(
        failures.iter().any(|e| e["client_addr"] == "198.51.100.7" && e["actor"] == "user:guess-0"),
        "{failures:?}"
    );
    api.advance(i64::try_from(api.auth.config.lockout.as_millis()).expect("ms") + 1);
    assert_eq!(api.login_from(attacker, "carol", PASSWORD).await.status, StatusCode::OK);
}

async fn refresh(api: &Api, token: &str) -> Resp {
    api.post("/api/v1/auth/refresh", &Auth::None, json!({ "refresh_token": token })).await
}

async fn refresh_rotation_and_reuse(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    api.user("dave", Role::Analyst).await;
    let first = api.login("dave", PASSWORD).await;
    let (a1, r1, sid) = (first.str("access_token"), first.str("refresh_token"), first.str("session_id"));
    let second = refresh(&api, &r1).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    let (a2, r2) = (second.str("access_token"), second.str("refresh_token"));
    assert_ne!(r1, r2);
    assert_eq!(second.str("session_id"), sid, "the same session");
    let third = refresh(&api, &r2).await;
    assert_eq!(third.status, StatusCode::OK, "the new refresh token works: {}", third.body);
    let (a3, r3) = (third.str("access_token"), third.str("refresh_token"));
    for a in [&a1, &a2, &a3] {
        assert_eq!(api.me(a).await, StatusCode::OK);
    }

    // The first one again: refused, and the whole session is revoked.
    let reuse = refresh(&api, &r1).await;
    assert_eq!((reuse.status, reuse.code()), (StatusCode::UNAUTHORIZED, "invalid_token"), "{}", reuse.body);
    assert_eq!(refresh(&api, &r3).await.status, StatusCode::UNAUTHORIZED, "the newest refresh token is dead too");
    for a in [&a1, &a2, &a3] {
        assert_eq!(api.me(a).await, StatusCode::UNAUTHORIZED, "access tokens of the session are dead");
    }
    let reuses = api.audit("token.reuse_detected").await;
    assert_eq!(reuses.len(), 1, "{reuses:?}");
    assert_eq!((&reuses[0]["actor"], &reuses[0]["target"]), (&json!("user:dave"), &json!(format!("session:{sid}"))));

    // Another session of the same user is not affected; junk is refused.
    let (a4, r4) = api.tokens("dave", PASSWORD).await;
    assert_eq!(api.me(&a4).await, StatusCode::OK);
    assert_eq!(refresh(&api, &r4).await.status, StatusCode::OK);
    for junk in ["", "x", &"y".repeat(300), &a4] {
        assert_eq!(refresh(&api, junk).await.status, StatusCode::UNAUTHORIZED, "{junk}");
    }
}

async fn logout_and_account_changes_revoke_sessions(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let uid = api.user("erin", Role::Operator).await;
    let (a, r) = api.tokens("erin", PASSWORD).await;
    let (a_other, r_other) = api.tokens("erin", PASSWORD).await;
    let out = api.post("/api/v1/auth/logout", &bearer(&a), json!({})).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT, "{}", out.body);
    assert_eq!(api.me(&a).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&api, &r).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.me(&a_other).await, StatusCode::OK, "another session stays");

    // A role change ends every session of the user.
    let site = json!({ "site_id": "s1", "name": "S1" });
    assert_eq!(api.post("/api/v1/sites", &bearer(&a_other), site).await.status, StatusCode::CREATED);
    let r = api
        .send(
            Method::PATCH,
            &format!("/api/v1/users/{uid}"),
            &bearer(&api.admin),
            Some(json!({ "role": "viewer" })),
            None,
        )
        .await;
    assert_eq!((r.status, &r.body["role"]), (StatusCode::OK, &json!("viewer")), "{}", r.body);
    assert_eq!(api.me(&a_other).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&api, &r_other).await.status, StatusCode::UNAUTHORIZED);
    let (a_viewer, _) = api.tokens("erin", PASSWORD).await;
    let site = json!({ "site_id": "s2", "name": "S2" });
    assert_eq!(api.post("/api/v1/sites", &bearer(&a_viewer), site).await.status, StatusCode::FORBIDDEN);
    assert_eq!(api.get("/api/v1/sites", &bearer(&a_viewer)).await.status, StatusCode::OK);

    // A password change too; the old password stops working.
    let wrong = json!({ "current_password": "not the password at all", "new_password": "a brand new passphrase" });
    let r = api.post("/api/v1/auth/password", &bearer(&a_viewer), wrong).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let weak = json!({ "current_password": PASSWORD, "new_password": "short" });
    assert_eq!(api.post("/api/v1/auth/password", &bearer(&a_viewer), weak).await.status, StatusCode::BAD_REQUEST);
    let change = json!({ "current_password": PASSWORD, "new_password": "a brand new passphrase" });
    assert_eq!(api.post("/api/v1/auth/password", &bearer(&a_viewer), change).await.status, StatusCode::NO_CONTENT);
    assert_eq!(api.me(&a_viewer).await, StatusCode::UNAUTHORIZED);
    assert_eq!(api.login("erin", PASSWORD).await.status, StatusCode::UNAUTHORIZED);
    api.tokens("erin", "a brand new passphrase").await;
}

async fn jwks_and_key_rotation(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let (kid0, _) = api.auth.keys.active_kid().expect("key");
    let kids = |v: &Value| -> Vec<String> {
        v["keys"].as_array().expect("keys").iter().map(|k| k["kid"].as_str().expect("kid").to_owned()).collect()
    };
    let jwks = api.get("/.well-known/jwks.json", &Auth::None).await;
    assert_eq!(jwks.status, StatusCode::OK);
    assert!(jwks.headers.contains_key(header::CACHE_CONTROL));
    assert!(kids(&jwks.body).contains(&kid0), "{}", jwks.body);
    for k in jwks.body["keys"].as_array().expect("keys") {
        assert_eq!((&k["kty"], &k["alg"], &k["use"]), (&json!("RSA"), &json!("RS256"), &json!("sig")));
        assert!(k["n"].as_str().is_some_and(|n| n.len() > 300) && k["e"].is_string(), "{k}");
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(k.get(private).is_none(), "private part {private} in the JWKS: {k}");
        }
    }
    assert_eq!(jwt_parts(&api.admin).0["kid"], kid0.as_str());

    let r = api.post("/api/v1/auth/keys/rotate", &bearer(&api.admin), json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let kid1 = r.str("kid");
    assert_ne!(kid1, kid0);
    assert_eq!(api.auth.keys.active_kid().map(|k| k.0), Some(kid1.clone()));
    let jwks = api.get("/.well-known/jwks.json", &Auth::None).await;
    let listed = kids(&jwks.body);
    assert!(listed.contains(&kid0) && listed.contains(&kid1), "{listed:?}");

    // A token signed before still verifies; new ones carry the new kid.
    assert_eq!(api.me(&api.admin).await, StatusCode::OK);
    let (fresh, _) = api.tokens(common::TEST_ADMIN.0, common::TEST_ADMIN.1).await;
    assert_eq!(jwt_parts(&fresh).0["kid"], kid1.as_str());
    assert_eq!(api.me(&fresh).await, StatusCode::OK);
    let rotated = api.audit("keys.rotated").await;
    assert!(rotated.iter().any(|e| e["target"] == kid1.as_str() && e["actor"] == "user:test-admin"), "{rotated:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. MFA with real TOTP codes at a controlled time.

/// The start of the next TOTP step (plus a second), Unix seconds. Never behind the wall clock:
/// the service's clock only moves forward in these tests (revocations are polled by time).
fn step_start_s() -> i64 {
    (wall_ms() / 1000 / 30 + 1) * 30 + 1
}

fn code(secret: &str, t_s: i64) -> String {
    totp::code_at(secret, u64::try_from(t_s).expect("time")).expect("code")
}

/// A 6-digit code that is none of the codes accepted around `t_s`.
fn wrong_code(secret: &str, t_s: i64) -> String {
    let near: Vec<String> = [-30, 0, 30].iter().map(|d| code(secret, t_s + d)).collect();
    (0..1_000_000u32)
        .map(|n| format!("{:06}", (n * 7919 + 123_457) % 1_000_000))
        .find(|c| !near.contains(c))
        .expect("code")
}

async fn enroll(api: &Api, token: &str) -> String {
    let r = api.send(Method::POST, "/api/v1/auth/mfa/enroll", &bearer(token), None, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (secret, uri) = (r.str("secret"), r.str("otpauth_uri"));
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    let query = uri.split_once('?').expect("query").1;
    let from_uri = query.split('&').find_map(|kv| kv.strip_prefix("secret=")).expect("secret in the URI");
    assert_eq!(from_uri, secret);
    assert!(r.str("qr_svg").contains("<svg"), "the QR code is an SVG document");
    from_uri.to_owned()
}

/// The password step; returns the MFA token.
async fn mfa_challenge(api: &Api, user: &str) -> String {
    let r = api.login(user, PASSWORD).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["mfa_required"], true, "{}", r.body);
    assert!(r.body.get("access_token").is_none(), "no tokens before the second factor: {}", r.body);
    r.str("mfa_token")
}

async fn second_step(api: &Api, mfa_token: &str, factor: Value) -> Resp {
    let mut body = json!({ "mfa_token": mfa_token });
    body.as_object_mut().expect("object").extend(factor.as_object().expect("object").clone());
    api.post("/api/v1/auth/login/mfa", &Auth::None, body).await
}

async fn mfa_with_totp(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let mut t = step_start_s();
    api.set_now(t * 1000);
    api.user("frank", Role::Operator).await;
    let (a, _) = api.tokens("frank", PASSWORD).await;
    let secret = enroll(&api, &a).await;
    // Not on until confirmed: the password alone still signs in.
    api.tokens("frank", PASSWORD).await;
    let r = api.post("/api/v1/auth/mfa/confirm", &bearer(&a), json!({ "code": wrong_code(&secret, t) })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_code"), "{}", r.body);
    let first = code(&secret, t);
    let r = api.post("/api/v1/auth/mfa/confirm", &bearer(&a), json!({ "code": first })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let recovery: Vec<String> = r.body["recovery_codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().expect("code").to_owned())
        .collect();
    assert_eq!(recovery.len(), 10);
    assert_eq!(api.me(&a).await, StatusCode::UNAUTHORIZED, "enabling MFA ends the sessions");

    // The password is not enough any more; the code used to confirm cannot be used again, even
    // within its 30 s.
    let mfa = mfa_challenge(&api, "frank").await;
    let r = second_step(&api, &mfa, json!({ "code": first })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_code"), "replay: {}", r.body);
    t += 30;
    api.set_now(t * 1000);
    let next = code(&secret, t);
    let r = second_step(&api, &mfa, json!({ "code": next })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let access = r.str("access_token");
    assert_eq!(jwt_parts(&access).1["amr"], json!(["pwd", "otp"]));
    let me = api.get("/api/v1/auth/me", &bearer(&access)).await;
    assert_eq!((&me.body["mfa_enabled"], &me.body["recovery_codes_left"]), (&json!(true), &json!(10)), "{}", me.body);
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, json!({ "code": next })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the same step again: {}", r.body);
    t += 30;
    api.set_now(t * 1000);
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, json!({ "code": code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::OK, "the next step's code: {}", r.body);
    // A token of the wrong audience is not an MFA token, nor the reverse.
    let r = second_step(&api, &access, json!({ "code": code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.me(&mfa_challenge(&api, "frank").await).await, StatusCode::UNAUTHORIZED);

    // Recovery codes work once, in any case and with or without the dash.
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, json!({ "recovery_code": recovery[0] })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, json!({ "recovery_code": recovery[0] })).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_code"), "twice: {}", r.body);
    let sloppy = recovery[1].replace('-', "").to_uppercase();
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, json!({ "recovery_code": sloppy })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let me = api.get("/api/v1/auth/me", &bearer(&r.str("access_token"))).await;
    assert_eq!(me.body["recovery_codes_left"], 8);
    let both = json!({ "code": code(&secret, t), "recovery_code": recovery[2] });
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, both).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);

    // Wrong codes count toward the lockout, also across a new password step (which must not
    // reset the count, or the second factor could be guessed without end).
    let max = api.auth.config.max_failures_per_account;
    let mfa = mfa_challenge(&api, "frank").await;
    for _ in 0..max - 1 {
        let r = second_step(&api, &mfa, json!({ "code": wrong_code(&secret, t) })).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    }
    let mfa = mfa_challenge(&api, "frank").await;
    let r = second_step(&api, &mfa, json!({ "code": wrong_code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    t += 30;
    api.set_now(t * 1000);
    let r = second_step(&api, &mfa, json!({ "code": code(&secret, t) })).await;
    assert!(retry_after(&r) > 0, "locked after {max} wrong codes, even with the right one");
    assert!(retry_after(&api.login("frank", PASSWORD).await) > 0);
    t += i64::try_from(api.auth.config.lockout.as_secs()).expect("s") + 30;
    api.set_now(t * 1000);
    let r = second_step(&api, &mfa_challenge(&api, "frank").await, json!({ "code": code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::OK, "open again after the lockout: {}", r.body);
    // Repeated failures are written once, then summarised with their count.
    api.auth.flush_audit_digest(api.now(), true).await;
    let failures = api.audit("mfa.failure").await;
    assert!(failures.iter().all(|e| e["actor"] == "user:frank"), "{failures:?}");
    let counted: i64 = failures.iter().map(|e| 1 + e["detail"]["repeated"].as_i64().unwrap_or(0)).sum();
    assert!(counted >= max, "{counted} failures recorded: {failures:?}");
}

async fn role_policy_requires_mfa(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let mut t = step_start_s();
    api.set_now(t * 1000);
    api.user("gina", Role::Viewer).await;
    let (before, _) = api.tokens("gina", PASSWORD).await;
    assert_eq!(api.get("/api/v1/events", &bearer(&before)).await.status, StatusCode::OK);
    let r = api
        .send(
            Method::PUT,
            "/api/v1/roles/viewer/policy",
            &bearer(&api.admin),
            Some(json!({ "require_mfa": true })),
            None,
        )
        .await;
    assert_eq!((r.status, &r.body["require_mfa"]), (StatusCode::OK, &json!(true)), "{}", r.body);
    let roles = api.get("/api/v1/roles", &bearer(&api.admin)).await;
    let viewer = roles.body["roles"].as_array().expect("roles").iter().find(|r| r["role"] == "viewer").cloned();
    assert_eq!(viewer.map(|v| v["require_mfa"].clone()), Some(json!(true)));
    // A session from before the policy does not keep its full rights.
    let r = api.get("/api/v1/events", &bearer(&before)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a token from before the policy still reads events: {}", r.body);

    let r = api.login("gina", PASSWORD).await;
    assert_eq!((r.status, &r.body["mfa_enrolment_required"]), (StatusCode::OK, &json!(true)), "{}", r.body);
    let (token, refresh_token) = (r.str("access_token"), r.str("refresh_token"));
    assert_eq!(jwt_parts(&token).1["mfa_enrolment_only"], true);
    assert_enrolment_only(&api, &token).await;
    let me = api.get("/api/v1/auth/me", &bearer(&token)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!((&me.body["mfa_enrolment_only"], &me.body["mfa_required_by_role"]), (&json!(true), &json!(true)));
    // Refreshing does not lift it.
    let r = refresh(&api, &refresh_token).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_enrolment_only(&api, &r.str("access_token")).await;

    let secret = enroll(&api, &token).await;
    let r = api.post("/api/v1/auth/mfa/confirm", &bearer(&token), json!({ "code": code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    t += 30;
    api.set_now(t * 1000);
    let r = second_step(&api, &mfa_challenge(&api, "gina").await, json!({ "code": code(&secret, t) })).await;
    assert_eq!((r.status, &r.body["mfa_enrolment_required"]), (StatusCode::OK, &json!(false)), "{}", r.body);
    let full = r.str("access_token");
    assert_eq!(api.get("/api/v1/events", &bearer(&full)).await.status, StatusCode::OK);
    // The role requires it: it cannot be turned off.
    t += 30;
    api.set_now(t * 1000);
    let r = api.post("/api/v1/auth/mfa/disable", &bearer(&full), json!({ "code": code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    // Other roles are not affected.
    api.user("otto", Role::Operator).await;
    let r = api.login("otto", PASSWORD).await;
    assert_eq!(r.body["mfa_enrolment_required"], false);
}

/// Every endpoint that needs a permission answers `mfa_enrolment_required` to the token.
async fn assert_enrolment_only(api: &Api, token: &str) {
    let mut wrong = Vec::new();
    for (method, path, access) in its_aggregator::http::access_map().expect("map").entries() {
        if !matches!(access, Access::Requires(_)) {
            continue;
        }
        let uri = fill(&path);
        let body = (method != Method::GET).then(|| json!({}));
        let r = api.send(method.clone(), &uri, &bearer(token), body, None).await;
        if (r.status, r.code()) != (StatusCode::FORBIDDEN, "mfa_enrolment_required") {
            wrong.push(format!("{method} {uri}: {} {}", r.status, r.body));
        }
    }
    assert!(wrong.is_empty(), "only enrolment is allowed:\n{}", wrong.join("\n"));
}

/// A route template with every parameter filled in.
fn fill(template: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in template.chars() {
        match c {
            '{' => in_param = true,
            '}' => {
                in_param = false;
                out.push('x');
            }
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

async fn audit_log_names_the_actors(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let t = step_start_s();
    api.set_now(t * 1000);
    let admin = bearer(&api.admin);
    let uid = api.user("hank", Role::Viewer).await;
    assert_eq!(api.login("hank", "not the password at all").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.login("no-such-user", "not the password at all").await.status, StatusCode::UNAUTHORIZED);
    let (token, _) = api.tokens("hank", PASSWORD).await;
    let secret = enroll(&api, &token).await;
    let r = api.post("/api/v1/auth/mfa/confirm", &bearer(&token), json!({ "code": code(&secret, t) })).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api
        .send(Method::PATCH, &format!("/api/v1/users/{uid}"), &admin, Some(json!({ "role": "analyst" })), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api.post("/api/v1/api-keys", &admin, json!({ "name": "exporter", "permissions": ["events:read"] })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let key_id = r.str("key_id");
    api.user("jill", Role::Viewer).await;
    let (_, r1) = api.tokens("jill", PASSWORD).await;
    assert_eq!(refresh(&api, &r1).await.status, StatusCode::OK);
    assert_eq!(refresh(&api, &r1).await.status, StatusCode::UNAUTHORIZED);

    let one = |entries: Vec<Value>, pred: &dyn Fn(&Value) -> bool| -> Value {
        let found: Vec<&Value> = entries.iter().filter(|e| pred(e)).collect();
        assert_eq!(found.len(), 1, "{entries:?}");
        found[0].clone()
    };
    let e = one(api.audit("login.failure").await, &|e| e["actor"] == "user:hank");
    assert_eq!((&e["outcome"], &e["detail"]["reason"]), (&json!("failure"), &json!("wrong password")));
    let e = one(api.audit("login.failure").await, &|e| e["actor"] == "user:no-such-user");
    assert_eq!(e["detail"]["reason"], "unknown user");
    let e = one(api.audit("mfa.enabled").await, &|_| true);
    assert_eq!((&e["actor"], &e["target"]), (&json!("user:hank"), &json!("user:hank")));
    let e = one(api.audit("user.role_changed").await, &|_| true);
    assert_eq!((&e["actor"], &e["target"]), (&json!("user:test-admin"), &json!("user:hank")));
    assert_eq!((&e["detail"]["from"], &e["detail"]["to"]), (&json!("viewer"), &json!("analyst")));
    let e = one(api.audit("apikey.created").await, &|_| true);
    assert_eq!((&e["actor"], &e["target"]), (&json!("user:test-admin"), &json!(format!("apikey:{key_id}"))));
    assert_eq!(e["detail"]["permissions"], json!(["events:read"]));
    let e = one(api.audit("token.reuse_detected").await, &|_| true);
    assert_eq!((&e["actor"], &e["outcome"]), (&json!("user:jill"), &json!("denied")));
    assert!(e["target"].as_str().is_some_and(|t| t.starts_with("session:")), "{e}");
    // Filters and the cursor.
    let r = api.get("/api/v1/audit?actor=user:hank&limit=1", &admin).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["entries"].as_array().map(Vec::len), Some(1));
    let cursor = r.str("next_cursor");
    let r = api.get(&format!("/api/v1/audit?actor=user:hank&cursor={cursor}"), &admin).await;
    let rest = r.body["entries"].as_array().expect("entries");
    assert!(!rest.is_empty() && rest.iter().all(|e| e["actor"] == "user:hank"), "{}", r.body);
    assert_eq!(api.get("/api/v1/audit?limit=0", &admin).await.status, StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------------
// 4. API keys and site-limited grants.

async fn create_key(api: &Api, creator: &Auth, body: Value) -> Resp {
    api.post("/api/v1/api-keys", creator, body).await
}

async fn api_keys(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    // The service's clock, days away from the wall clock: expiry and last use follow it.
    let t = wall_ms() + 3 * 86_400_000;
    api.set_now(t);
    let admin = bearer(&api.admin);
    let r = create_key(
        &api,
        &admin,
        json!({ "name": "exporter", "permissions": ["events:read", "devices:read"], "expires_in_days": 1 }),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let (key, key_id) = (r.str("key"), r.str("key_id"));
    assert!(key.starts_with(&format!("its_{key_id}_")), "{key}");
    assert_eq!((&r.body["created_by"], &r.body["created_at_ms"]), (&json!("user:test-admin"), &json!(t)));
    assert_eq!(r.body["expires_at_ms"], json!(t + 86_400_000), "expiry on the service's clock: {}", r.body);
    assert_eq!((&r.body["last_used_ms"], &r.body["revoked"]), (&Value::Null, &json!(false)));

    // Shown once: the list has no secret.
    let list = api.get("/api/v1/api-keys", &admin).await;
    assert_eq!(list.status, StatusCode::OK);
    let secret = key.rsplit_once('_').expect("secret").1;
    assert!(!String::from_utf8_lossy(&list.bytes).contains(secret), "{}", list.body);
    let entry = |list: &Resp, id: &str| -> Value {
        list.body["api_keys"].as_array().expect("keys").iter().find(|k| k["key_id"] == id).cloned().expect("listed")
    };
    assert!(entry(&list, &key_id).get("key").is_none());

    // It works both ways, with its permissions only.
    for auth in [bearer(&key), Auth::ApiKey(key.clone())] {
        assert_eq!(api.get("/api/v1/events", &auth).await.status, StatusCode::OK);
        assert_eq!(api.get("/api/v1/devices", &auth).await.status, StatusCode::OK);
        let r = api.get("/api/v1/users", &auth).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
        assert_eq!(api.get("/api/v1/sites", &auth).await.status, StatusCode::FORBIDDEN);
    }
    let me = api.get("/api/v1/auth/me", &bearer(&key)).await;
    assert_eq!((&me.body["kind"], &me.body["api_key_id"]), (&json!("api_key"), &json!(key_id)), "{}", me.body);
    assert_eq!(me.body["permissions"], json!(["devices:read", "events:read"]));
    assert_eq!(api.post("/api/v1/auth/logout", &bearer(&key), json!({})).await.status, StatusCode::BAD_REQUEST);
    // Its last use is recorded.
    assert_eq!(entry(&api.get("/api/v1/api-keys", &admin).await, &key_id)["last_used_ms"], json!(t));

    // A key cannot do more than whoever creates it: a key that may create keys cannot give
    // a permission it lacks, nor a wider scope.
    let r = create_key(
        &api,
        &admin,
        json!({ "name": "key maker", "permissions": ["apikeys:write", "events:read"], "grants": { "sites": ["north"] } }),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let maker = bearer(&r.str("key"));
    let r = create_key(&api, &maker, json!({ "name": "more", "permissions": ["users:read"] })).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "{}", r.body);
    let r = create_key(
        &api,
        &maker,
        json!({ "name": "wider", "permissions": ["events:read"], "grants": { "sites": ["south"] } }),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = create_key(&api, &maker, json!({ "name": "narrower", "permissions": ["events:read"] })).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["grants"], json!({ "sites": ["north"], "cameras": [] }), "the creator's scope by default");
    assert_eq!(r.body["created_by"], json!(format!("apikey:{}", jwt_less_id(&maker))));
    for bad in [
        json!({ "name": "x", "permissions": [] }),
        json!({ "name": "x", "permissions": ["events:delete"] }),
        json!({ "name": "", "permissions": ["events:read"] }),
        json!({ "name": "x", "permissions": ["events:read"], "expires_in_days": 0 }),
        json!({ "name": "x", "permissions": ["events:read"], "expires_in_days": 3651 }),
    ] {
        assert_eq!(create_key(&api, &admin, bad.clone()).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // A user without apikeys:write cannot create one at all.
    api.user("olga", Role::Operator).await;
    let (olga, _) = api.tokens("olga", PASSWORD).await;
    let r = create_key(&api, &bearer(&olga), json!({ "name": "x", "permissions": ["events:read"] })).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Revocation is immediate.
    let r = create_key(&api, &admin, json!({ "name": "short-lived", "permissions": ["events:read"] })).await;
    let (doomed, doomed_id) = (r.str("key"), r.str("key_id"));
    assert_eq!(api.get("/api/v1/events", &Auth::ApiKey(doomed.clone())).await.status, StatusCode::OK);
    let r = api.send(Method::DELETE, &format!("/api/v1/api-keys/{doomed_id}"), &admin, None, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    for auth in [bearer(&doomed), Auth::ApiKey(doomed.clone())] {
        assert_eq!(api.get("/api/v1/events", &auth).await.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(entry(&api.get("/api/v1/api-keys", &admin).await, &doomed_id)["revoked"], true);
    let r = api.send(Method::DELETE, "/api/v1/api-keys/nosuchkey123", &admin, None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let audit = api.audit("apikey.revoked").await;
    assert!(audit.iter().any(|e| e["target"] == json!(format!("apikey:{doomed_id}"))), "{audit:?}");

    // Keys that are not keys: the wrong secret, a malformed one.
    let forged = format!("its_{key_id}_{}", "A".repeat(43));
    for junk in [forged.as_str(), "its_", "its_short_x", &format!("{key}x")] {
        assert_eq!(api.get("/api/v1/events", &Auth::ApiKey(junk.to_owned())).await.status, StatusCode::UNAUTHORIZED);
        assert_eq!(api.get("/api/v1/events", &bearer(junk)).await.status, StatusCode::UNAUTHORIZED, "{junk}");
    }

    // Expiry, on the service's clock.
    api.set_now(t + 86_400_000 - 1_000);
    assert_eq!(api.get("/api/v1/events", &bearer(&key)).await.status, StatusCode::OK);
    api.set_now(t + 86_400_000);
    let r = api.get("/api/v1/events", &bearer(&key)).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_token"), "expired: {}", r.body);
    assert_eq!(api.get("/api/v1/events", &Auth::ApiKey(key.clone())).await.status, StatusCode::UNAUTHORIZED);
}

/// The key id of an `its_<id>_<secret>` key in an `Auth`.
fn jwt_less_id(auth: &Auth) -> String {
    let (Auth::Bearer(k) | Auth::ApiKey(k)) = auth else { panic!("no key") };
    k.strip_prefix("its_").and_then(|r| r.split_once('_')).expect("key").0.to_owned()
}

async fn site_limited_viewer(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let admin = bearer(&api.admin);
    seed_device(&api, "dev-n", &["cam-n"], 6).await;
    seed_device(&api, "dev-s", &["cam-s"], 4).await;
    for (site, device) in [("north", "dev-n"), ("south", "dev-s")] {
        let r = api.post("/api/v1/sites", &admin, json!({ "site_id": site, "name": site })).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let r = api
            .send(Method::PATCH, &format!("/api/v1/devices/{device}"), &admin, Some(json!({ "site_id": site })), None)
            .await;
        assert_eq!((r.status, &r.body["site_id"]), (StatusCode::OK, &json!(site)), "{}", r.body);
    }
    let r = api
        .post(
            "/api/v1/users",
            &admin,
            json!({ "username": "vic", "password": PASSWORD, "role": "viewer", "grants": { "sites": ["north"] } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["grants"], json!({ "sites": ["north"], "cameras": [] }));
    let (vic, _) = api.tokens("vic", PASSWORD).await;
    let vic = bearer(&vic);

    let devices_of = |r: &Resp| -> HashSet<String> {
        r.body["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["device_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let r = api.get("/api/v1/events?limit=1000", &vic).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["events"].as_array().map(Vec::len), Some(6), "{}", r.body);
    assert_eq!(devices_of(&r), HashSet::from(["dev-n".to_owned()]));
    for uri in ["/api/v1/events?device=dev-s", "/api/v1/events?site=south", "/api/v1/events?camera=cam-s"] {
        let r = api.get(uri, &vic).await;
        assert_eq!((r.status, r.body["events"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{uri}");
    }
    let all = api.get("/api/v1/events?limit=1000", &admin).await;
    assert_eq!(all.body["events"].as_array().map(Vec::len), Some(10));

    let r = api.get("/api/v1/devices", &vic).await;
    let ids: Vec<&str> =
        r.body["devices"].as_array().expect("devices").iter().filter_map(|d| d["device_id"].as_str()).collect();
    assert_eq!(ids, ["dev-n"]);
    let r = api.get("/api/v1/cameras", &vic).await;
    let cams: Vec<&str> =
        r.body["cameras"].as_array().expect("cameras").iter().filter_map(|c| c["camera"].as_str()).collect();
    assert_eq!(cams, ["cam-n"]);
    let r = api.get("/api/v1/sites", &vic).await;
    let sites: Vec<&str> =
        r.body["sites"].as_array().expect("sites").iter().filter_map(|s| s["site_id"].as_str()).collect();
    assert_eq!(sites, ["north"]);
    assert_eq!(api.get("/api/v1/devices/dev-n", &vic).await.status, StatusCode::OK);
    // What it does not see does not exist for it: the same 404 as something missing.
    for (uri, missing) in [
        ("/api/v1/devices/dev-s", "/api/v1/devices/dev-zz"),
        ("/api/v1/devices/dev-s/health", "/api/v1/devices/dev-zz/health"),
        ("/api/v1/devices/dev-s/cameras/cam-s", "/api/v1/devices/dev-zz/cameras/cam-s"),
        ("/api/v1/events/dev-s:1/snapshot", "/api/v1/events/dev-zz:1/snapshot"),
    ] {
        let (hidden, absent) = (api.get(uri, &vic).await, api.get(missing, &vic).await);
        assert_eq!(
            (hidden.status, absent.status),
            (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND),
            "{uri}: {}",
            hidden.body
        );
        assert_eq!(hidden.code(), absent.code(), "{uri}");
        assert_eq!(api.get(uri, &admin).await.status, StatusCode::OK, "{uri} exists");
    }
    let r = api.get("/api/v1/events/dev-n:1/snapshot", &vic).await;
    assert_eq!(
        (r.status, r.headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes())),
        (StatusCode::OK, Some(&b"image/jpeg"[..]))
    );

    // A camera grant sees that camera wherever its site is; a key with a site grant sees its site.
    let r = api
        .post(
            "/api/v1/users",
            &admin,
            json!({ "username": "walt", "password": PASSWORD, "role": "integrator", "grants": { "cameras": ["dev-s/cam-s"] } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let (walt, _) = api.tokens("walt", PASSWORD).await;
    let r = api.get("/api/v1/events?limit=1000", &bearer(&walt)).await;
    assert_eq!(devices_of(&r), HashSet::from(["dev-s".to_owned()]));
    assert_eq!(r.body["events"].as_array().map(Vec::len), Some(4));
    let r = create_key(
        &api,
        &admin,
        json!({ "name": "south feed", "permissions": ["events:read"], "grants": { "sites": ["south"] } }),
    )
    .await;
    let r = api.get("/api/v1/events?limit=1000", &Auth::ApiKey(r.str("key"))).await;
    assert_eq!(devices_of(&r), HashSet::from(["dev-s".to_owned()]));

    // Moving the device moves what the grant sees, at once.
    let r = api.send(Method::PATCH, "/api/v1/devices/dev-s", &admin, Some(json!({ "site_id": "north" })), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api.get("/api/v1/events?limit=1000", &vic).await;
    assert_eq!(r.body["events"].as_array().map(Vec::len), Some(10));

    // Only viewers and integrators can be limited.
    let r = api
        .post(
            "/api/v1/users",
            &admin,
            json!({ "username": "oscar", "password": PASSWORD, "role": "operator", "grants": { "sites": ["north"] } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// 5. Holes closed: writes within the caller's sites, no grant beyond the caller's own, sign-in
//    floods counted before the password is checked, streams that end with their credential,
//    bounded audit and throttle growth.

/// A key created by the admin with these permissions, limited to `sites`.
async fn limited_key(api: &Api, name: &str, perms: &[&str], sites: &[&str]) -> Auth {
    let r = create_key(
        api,
        &bearer(&api.admin),
        json!({ "name": name, "permissions": perms, "grants": { "sites": sites } }),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    Auth::ApiKey(r.str("key"))
}

async fn patch(api: &Api, uri: &str, auth: &Auth, body: Value) -> Resp {
    api.send(Method::PATCH, uri, auth, Some(body), None).await
}

fn health_of(cameras: &[&str]) -> its_shared::wire::Heartbeat {
    its_shared::wire::Heartbeat {
        sent_at_ms: wall_ms(),
        health: its_shared::event::DeviceHealth {
            agent_version: "1.0.0".into(),
            cameras: cameras
                .iter()
                .map(|c| its_shared::event::CameraHealth {
                    camera: (*c).to_owned(),
                    state: "streaming".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
    }
}

fn health_cameras(v: &Value) -> Vec<String> {
    v["cameras"].as_array().into_iter().flatten().filter_map(|c| c["camera"].as_str().map(str::to_owned)).collect()
}

async fn scoped_writes_and_grants(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let admin = bearer(&api.admin);
    // alpha: dev-a (cam-a1); bravo: dev-b (cam-b1); dev-m in bravo with cam-m1 moved to alpha.
    seed_device(&api, "dev-a", &["cam-a1"], 4).await;
    seed_device(&api, "dev-b", &["cam-b1"], 4).await;
    seed_device(&api, "dev-m", &["cam-m1", "cam-m2"], 4).await;
    for site in ["alpha", "bravo"] {
        assert_eq!(
            api.post("/api/v1/sites", &admin, json!({ "site_id": site, "name": site })).await.status,
            StatusCode::CREATED
        );
    }
    for (device, site) in [("dev-a", "alpha"), ("dev-b", "bravo"), ("dev-m", "bravo")] {
        let r = patch(&api, &format!("/api/v1/devices/{device}"), &admin, json!({ "site_id": site })).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let r = patch(&api, "/api/v1/devices/dev-m/cameras/cam-m1", &admin, json!({ "site_id": "alpha" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    api.store.record_health("dev-m", &health_of(&["cam-m1", "cam-m2"]), wall_ms()).await.expect("health");

    // The reproduced attack: devices:write limited to bravo moves alpha's camera into bravo, then
    // reads its events. The camera is not found for it, and stays where it was.
    let dev = limited_key(&api, "bravo-devices", &["devices:write", "devices:read", "events:read"], &["bravo"]).await;
    let r = patch(&api, "/api/v1/devices/dev-a/cameras/cam-a1", &dev, json!({ "site_id": "bravo" })).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"), "{}", r.body);
    let r = api.get("/api/v1/devices/dev-a/cameras/cam-a1", &admin).await;
    assert_eq!(r.body["site_id"], "alpha", "{}", r.body);
    let r = api.get("/api/v1/events?device=dev-a", &dev).await;
    assert_eq!(r.body["events"].as_array().map(Vec::len), Some(0), "{}", r.body);
    assert_eq!(
        patch(&api, "/api/v1/devices/dev-a", &dev, json!({ "site_id": "bravo" })).await.status,
        StatusCode::NOT_FOUND
    );
    // Its own device: renamed yes; moved out of its sites, or unassigned, no.
    assert_eq!(patch(&api, "/api/v1/devices/dev-b", &dev, json!({ "name": "Bravo box" })).await.status, StatusCode::OK);
    for body in [json!({ "site_id": "alpha" }), json!({ "site_id": null })] {
        let r = patch(&api, "/api/v1/devices/dev-b", &dev, body.clone()).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "{body}: {}", r.body);
    }
    assert_eq!(api.get("/api/v1/devices/dev-b", &admin).await.body["site_id"], "bravo");
    // A device with a camera outside its sites: seen, not changed (disabling it would stop alpha's
    // camera too); its camera in alpha not found; its camera in bravo not moved to alpha.
    let r = patch(&api, "/api/v1/devices/dev-m", &dev, json!({ "disabled": true })).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(api.get("/api/v1/devices/dev-m", &admin).await.body["disabled"], false);
    assert_eq!(
        patch(&api, "/api/v1/devices/dev-m/cameras/cam-m1", &dev, json!({ "name": "x" })).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        patch(&api, "/api/v1/devices/dev-m/cameras/cam-m2", &dev, json!({ "site_id": "alpha" })).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        patch(&api, "/api/v1/devices/dev-m/cameras/cam-m2", &dev, json!({ "name": "Bravo cam" })).await.status,
        StatusCode::OK
    );
    // The health of the device it sees names only the cameras it sees.
    let r = api.get("/api/v1/devices/dev-m", &dev).await;
    assert_eq!(health_cameras(&r.body["last_health"]), ["cam-m2"], "{}", r.body);
    let r = api.get("/api/v1/devices/dev-m/health", &dev).await;
    let first = &r.body["health"][0]["report"];
    assert_eq!(health_cameras(first), ["cam-m2"], "{}", r.body);
    let r = api.get("/api/v1/devices/dev-m", &admin).await;
    assert_eq!(health_cameras(&r.body["last_health"]), ["cam-m1", "cam-m2"]);

    // Sites: none created, only its own renamed or deleted.
    let sites = limited_key(&api, "bravo-sites", &["sites:write", "sites:read"], &["bravo"]).await;
    assert_eq!(
        api.post("/api/v1/sites", &sites, json!({ "site_id": "charlie", "name": "C" })).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        patch(&api, "/api/v1/sites/alpha", &sites, json!({ "name": "Mine" })).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(api.send(Method::DELETE, "/api/v1/sites/alpha", &sites, None, None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(patch(&api, "/api/v1/sites/bravo", &sites, json!({ "name": "Bravo" })).await.status, StatusCode::OK);

    // The reproduced escalation: users:write limited to bravo made an admin. No grant or role
    // beyond the creator's own.
    let viewer_perms = ["devices:read", "sites:read", "events:read", "metrics:read", "alerts:read"];
    let mut perms = vec!["users:write", "users:read"];
    perms.extend(viewer_perms);
    let users = limited_key(&api, "bravo-users", &perms, &["bravo"]).await;
    let new_user = |name: &str, role: &str, grants: Option<Value>| {
        let mut body = json!({ "username": name, "password": PASSWORD, "role": role });
        if let Some(g) = grants {
            body["grants"] = g;
        }
        body
    };
    for (body, what) in [
        (new_user("evil", "admin", None), "an admin"),
        (new_user("evil", "operator", None), "an operator"),
        (new_user("evil", "viewer", None), "a viewer of every site"),
        (new_user("evil", "viewer", Some(json!({ "sites": ["alpha"] }))), "a viewer of another site"),
        (new_user("evil", "viewer", Some(json!({ "sites": ["bravo", "alpha"] }))), "a viewer of more sites"),
    ] {
        let r = api.post("/api/v1/users", &users, body).await;
        assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"), "{what}: {}", r.body);
    }
    let r = api.post("/api/v1/users", &users, new_user("bea", "viewer", Some(json!({ "sites": ["bravo"] })))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let bea = r.body["user_id"].as_i64().expect("id");
    // It sees and manages only users within its sites, and cannot raise them.
    let r = api.get("/api/v1/users", &users).await;
    let names: Vec<&str> =
        r.body["users"].as_array().expect("users").iter().filter_map(|u| u["username"].as_str()).collect();
    assert_eq!(names, ["bea"], "{}", r.body);
    let admin_id = api.auth.store.user_by_name(common::TEST_ADMIN.0).await.expect("db").expect("admin").user_id;
    for (uri, body) in [
        (format!("/api/v1/users/{admin_id}"), json!({ "disabled": true })),
        (format!("/api/v1/users/{admin_id}"), json!({ "password": "a brand new password" })),
    ] {
        assert_eq!(patch(&api, &uri, &users, body).await.status, StatusCode::NOT_FOUND, "{uri}");
    }
    assert_eq!(
        api.send(Method::DELETE, &format!("/api/v1/users/{admin_id}/mfa"), &users, None, None).await.status,
        StatusCode::NOT_FOUND
    );
    for body in [json!({ "role": "admin" }), json!({ "grants": { "sites": ["alpha"] } }), json!({ "grants": null })] {
        let r = patch(&api, &format!("/api/v1/users/{bea}"), &users, body.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{body}: {}", r.body);
    }
    assert_eq!(
        patch(&api, &format!("/api/v1/users/{bea}"), &users, json!({ "disabled": true })).await.status,
        StatusCode::OK
    );
    let r =
        api.send(Method::PUT, "/api/v1/roles/viewer/policy", &users, Some(json!({ "require_mfa": true })), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a role policy reaches every site: {}", r.body);

    // API keys: listed and revoked only within reach.
    let keys = limited_key(&api, "bravo-keys", &["apikeys:write", "apikeys:read", "events:read"], &["bravo"]).await;
    let r = create_key(&api, &admin, json!({ "name": "all-sites", "permissions": ["events:read"] })).await;
    let all_sites = r.str("key_id");
    let r = api.get("/api/v1/api-keys", &keys).await;
    let listed: Vec<&str> =
        r.body["api_keys"].as_array().expect("keys").iter().filter_map(|k| k["name"].as_str()).collect();
    assert!(!listed.contains(&"all-sites") && listed.contains(&"bravo-keys"), "{listed:?}");
    let r = api.send(Method::DELETE, &format!("/api/v1/api-keys/{all_sites}"), &keys, None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = create_key(
        &api,
        &keys,
        json!({ "name": "wider", "permissions": ["events:read"], "grants": { "sites": ["alpha"] } }),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);

    // What covers every site (the audit log, alert rules and channels) needs a credential that
    // is not limited to sites.
    let auditor = limited_key(&api, "bravo-audit", &["audit:read"], &["bravo"]).await;
    assert_eq!(api.get("/api/v1/audit", &auditor).await.status, StatusCode::FORBIDDEN);
    let rules = limited_key(&api, "bravo-rules", &["rules:write", "rules:read"], &["bravo"]).await;
    let r = api.post("/api/v1/alert-rules", &rules, alert_rule_body(1)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = api.post("/api/v1/alert-channels", &rules, alert_channel_body(1)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // Every refused write changed nothing: the admin sees the fleet as it was.
    let r = api.get("/api/v1/devices/dev-a", &admin).await;
    assert_eq!((r.body["site_id"].as_str(), r.body["disabled"].as_bool()), (Some("alpha"), Some(false)));
    assert!(api.auth.store.user_by_name("evil").await.expect("db").is_none());
}

/// Channels may not point at the aggregator's own host.
async fn channel_targets_are_checked(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let admin = bearer(&api.admin);
    for (target, field) in [
        (json!({ "kind": "webhook", "url": "http://127.0.0.1:8470/api/v1/users", "secret": "k" }), "target.url"),
        (json!({ "kind": "webhook", "url": "http://localhost/x", "secret": "k" }), "target.url"),
        (json!({ "kind": "webhook", "url": "http://169.254.169.254/latest/meta-data/", "secret": "k" }), "target.url"),
        (json!({ "kind": "webhook", "url": "http://[::1]:9/x", "secret": "k" }), "target.url"),
        (json!({ "kind": "mqtt", "broker": "mqtt://127.0.0.1:1883" }), "target.broker"),
        (
            json!({ "kind": "email", "to": ["ops@example.org"], "smtp": { "host": "127.0.0.1", "port": 25, "from": "its@example.org" } }),
            "target.smtp.host",
        ),
    ] {
        let r = api.post("/api/v1/alert-channels", &admin, json!({ "name": "c", "target": target })).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_field"), "{target}: {}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap_or("").contains(field), "{}", r.body);
    }
    let r = api.post("/api/v1/alert-channels", &admin, alert_channel_body(1)).await;
    assert_eq!(r.status, StatusCode::CREATED, "a private or public address is fine: {}", r.body);
}

fn statuses(rs: &[Resp]) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for r in rs {
        *m.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    m
}

async fn concurrent_sign_ins_are_counted_first(store: Arc<dyn EventStore>) {
    let api = Arc::new(Api::new(store).await);
    api.user("alice", Role::Operator).await;
    let max = api.auth.config.max_failures_per_account as usize;
    let from: SocketAddr = "192.0.2.10:5000".parse().expect("addr");
    // 60 wrong passwords at once: at most the limit get checked (401), the others are refused
    // before any hashing (429).
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let api = Arc::clone(&api);
        tasks.push(tokio::spawn(async move { api.login_from(from, "alice", "not the password at all").await }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let counts = statuses(&answers);
    assert_eq!(counts.get(&401).copied().unwrap_or(0), max, "{counts:?}");
    assert_eq!(counts.get(&429).copied().unwrap_or(0), 60 - max, "{counts:?}");
    // Locked: the right password too.
    assert_eq!(api.login_from(from, "alice", PASSWORD).await.status, StatusCode::TOO_MANY_REQUESTS);
    // The flood left a handful of audit entries, not one per request.
    let n = api.audit("login.failure").await.len() + api.audit("login.locked").await.len();
    assert!(n <= 2, "{n} audit entries");

    // The second factor: the same race, the same limit.
    let uid = api.user("mia", Role::Operator).await;
    api.auth.store.set_pending_totp(uid, SECRET, api.now()).await.expect("totp");
    api.auth.store.enable_totp(uid, &[], api.now()).await.expect("enable");
    let challenge = api.login("mia", PASSWORD).await;
    let mfa_token = challenge.str("mfa_token");
    let wrong = wrong_code(SECRET, api.now() / 1000);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (api, token, code) = (Arc::clone(&api), mfa_token.clone(), wrong.clone());
        tasks.push(tokio::spawn(async move { second_step(&api, &token, json!({ "code": code })).await }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let counts = statuses(&answers);
    assert_eq!(counts.get(&401).copied().unwrap_or(0), max, "{counts:?}");
    assert_eq!(counts.get(&429).copied().unwrap_or(0), 40 - max, "{counts:?}");
    let right = code(SECRET, api.now() / 1000);
    assert_eq!(second_step(&api, &mfa_token, json!({ "code": right })).await.status, StatusCode::TOO_MANY_REQUESTS);
}

async fn ipv6_clients_are_limited_by_their_64(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let max = api.auth.config.max_failures_per_addr;
    // One subscriber's /64 holds 2^64 addresses: each attempt from another one of them.
    for i in 0..max {
        let from: SocketAddr = format!("[2001:db8:7:8::{:x}]:443", i + 1).parse().expect("addr");
        let r = api.login_from(from, &format!("name-{i}"), "not the password at all").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{i}: {}", r.body);
    }
    let same64: SocketAddr = "[2001:db8:7:8:ffff:1:2:3]:443".parse().expect("addr");
    assert_eq!(api.login_from(same64, "name-x", "not the password at all").await.status, StatusCode::TOO_MANY_REQUESTS);
    let other64: SocketAddr = "[2001:db8:7:9::1]:443".parse().expect("addr");
    assert_eq!(api.login_from(other64, "name-y", "not the password at all").await.status, StatusCode::UNAUTHORIZED);
    // An IPv4 client seen through a dual-stack socket is its IPv4 address.
    for i in 0..max {
        let from: SocketAddr = "[::ffff:198.51.100.20]:1".parse().expect("addr");
        assert_eq!(
            api.login_from(from, &format!("v4-{i}"), "not the password at all").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let plain: SocketAddr = "198.51.100.20:1".parse().expect("addr");
    assert_eq!(api.login_from(plain, "v4-x", "not the password at all").await.status, StatusCode::TOO_MANY_REQUESTS);
}

async fn own_secret_checks_are_limited(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let uid = api.user("olga", Role::Operator).await;
    let (token, _) = api.tokens("olga", PASSWORD).await;
    let max = api.auth.config.max_failures_per_account;
    let change = |current: &str| json!({ "current_password": current, "new_password": "an entirely new passphrase" });
    for i in 0..max {
        let r = api.post("/api/v1/auth/password", &bearer(&token), change("a wrong password here")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{i}: {}", r.body);
    }
    let r = api.post("/api/v1/auth/password", &bearer(&token), change(PASSWORD)).await;
    assert!(retry_after(&r) > 0, "a stolen token cannot guess the password without end");
    assert!(!api.audit("password.change_failure").await.is_empty());
    // MFA off needs a code, under the same limit.
    api.advance(i64::try_from(api.auth.config.lockout.as_millis()).expect("ms") + 1);
    api.auth.store.set_pending_totp(uid, SECRET, api.now()).await.expect("totp");
    api.auth.store.enable_totp(uid, &[], api.now()).await.expect("enable");
    let challenge = api.login("olga", PASSWORD).await;
    let r = second_step(&api, &challenge.str("mfa_token"), json!({ "code": code(SECRET, api.now() / 1000) })).await;
    let token = r.str("access_token");
    for i in 0..max {
        let r = api
            .post("/api/v1/auth/mfa/disable", &bearer(&token), json!({ "code": wrong_code(SECRET, api.now() / 1000) }))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{i}: {}", r.body);
    }
    api.advance(30_000);
    let r =
        api.post("/api/v1/auth/mfa/disable", &bearer(&token), json!({ "code": code(SECRET, api.now() / 1000) })).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert!(api.auth.store.user_by_id(uid).await.expect("db").expect("user").totp_enabled);
}

/// Opens `GET /api/v1/stream` and returns its body once `: ready` arrived.
async fn open_stream(api: &Api, auth: &Auth) -> axum::body::BodyDataStream {
    let mut req = Request::builder().method(Method::GET).uri("/api/v1/stream");
    match auth {
        Auth::Bearer(t) => req = req.header(header::AUTHORIZATION, format!("Bearer {t}")),
        Auth::ApiKey(k) => req = req.header("x-api-key", k.as_str()),
        Auth::None => {}
    }
    let resp = api.router.clone().oneshot(req.body(Body::empty()).expect("req")).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body().into_data_stream();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), futures::StreamExt::next(&mut body))
        .await
        .expect("ready in time")
        .expect("a chunk")
        .expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("ready"), "{first:?}");
    body
}

/// Reads the stream until it ends; returns what it said last, and how long it took.
async fn stream_end(
    mut body: axum::body::BodyDataStream,
    within: std::time::Duration,
) -> (String, std::time::Duration) {
    let start = std::time::Instant::now();
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
        }
    };
    tokio::time::timeout(within, read).await.expect("the stream ended in time");
    (text, start.elapsed())
}

async fn streams_end_with_their_credential(store: Arc<dyn EventStore>) {
    let api = Api::new(store).await;
    let admin = bearer(&api.admin);
    // An API key revoked: its stream ends.
    let r = create_key(&api, &admin, json!({ "name": "feed", "permissions": ["events:read"] })).await;
    let (key, key_id) = (Auth::ApiKey(r.str("key")), r.str("key_id"));
    let body = open_stream(&api, &key).await;
    let ended = tokio::spawn(stream_end(body, std::time::Duration::from_secs(5)));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!ended.is_finished(), "the stream stays open while the key is valid");
    let r = api.send(Method::DELETE, &format!("/api/v1/api-keys/{key_id}"), &admin, None, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let (text, took) = ended.await.expect("task");
    assert!(text.contains("event: end"), "{text:?}");
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");

    // A user disabled: their stream ends; another user's stream goes on.
    let uid = api.user("sam", Role::Viewer).await;
    api.user("tia", Role::Viewer).await;
    let (sam, _) = api.tokens("sam", PASSWORD).await;
    let (tia, _) = api.tokens("tia", PASSWORD).await;
    let sam_stream =
        tokio::spawn(stream_end(open_stream(&api, &bearer(&sam)).await, std::time::Duration::from_secs(5)));
    let tia_stream =
        tokio::spawn(stream_end(open_stream(&api, &bearer(&tia)).await, std::time::Duration::from_secs(30)));
    let r = patch(&api, &format!("/api/v1/users/{uid}"), &admin, json!({ "disabled": true })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let (text, took) = sam_stream.await.expect("task");
    assert!(text.contains("event: end") && took < std::time::Duration::from_secs(3), "{text:?} after {took:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!tia_stream.is_finished(), "another credential's stream is not touched");
    tia_stream.abort();
}

async fn failures_leave_bounded_rows(store: Arc<dyn EventStore>) {
    use its_aggregator::auth::audit_digest::{MAX_KINDS, WINDOW_MS};
    let api = Api::new(store).await;
    let before = api.auth.store.audit_rows().await.expect("rows");
    // 300 names from 300 addresses, one wrong password each: each is checked (nothing locks), yet
    // the audit log gets one entry per kind up to MAX_KINDS and one for the rest.
    for i in 0..300u32 {
        let from: SocketAddr = format!("10.{}.{}.{}:1", i / 65_536, (i / 256) % 256, i % 256).parse().expect("addr");
        let r = api.login_from(from, &format!("guess-{i}"), "not the password at all").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let written = api.auth.store.audit_rows().await.expect("rows") - before;
    assert_eq!(written, MAX_KINDS as i64 + 1, "one per kind and one for the overflow");
    // Throttle rows are purged once their window has passed.
    assert!(api.auth.store.throttle_rows().await.expect("rows") >= 600);
    let window = i64::try_from(api.auth.config.throttle_window.as_millis()).expect("ms");
    api.advance(window + WINDOW_MS + 1);
    api.auth.store.purge_throttle(api.now() - window, api.now()).await.expect("purge");
    assert_eq!(api.auth.store.throttle_rows().await.expect("rows"), 0);
    // The audit log's own retention trims it to its limit, newest kept.
    api.auth.store.trim_audit(10, 1000).await.expect("trim");
    assert_eq!(api.auth.store.audit_rows().await.expect("rows"), 10);
}
