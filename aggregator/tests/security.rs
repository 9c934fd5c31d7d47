//! Secrets at rest and what an unauthenticated caller can make the database hold:
//!
//! - the signing keys, TOTP secrets and channel secrets are sealed: a copy of the SQLite file
//!   alone (with its WAL) holds none of them, and the file is readable by its owner only;
//! - without its key ring the database is refused, naming the key it needs (no new key is made
//!   silently); a rotation seals everything again with the new key; secrets written in clear by
//!   an earlier version are sealed at the next start;
//! - the audit log (which sign-in failures write) never counts against the events' storage
//!   limit, so it can never make size retention delete events.

use its_testkit::server as common;

use std::sync::Arc;

use its_aggregator::alerts::AlertStore;
use its_aggregator::alerts::model::{ChannelSpec, ChannelTarget};
use its_aggregator::auth::store::AuditEntry;
use its_aggregator::auth::{AuthConfig, AuthService, Role};
use its_aggregator::store::{EventStore, Scope, StoreError, open_store, open_store_with_secrets, sealed};
use its_aggregator::vault::{KeySource, Vault};

const PASSWORD: &str = "correct horse battery staple";
const TOTP_SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
const HOOK_SECRET: &str = "hook-secret-4f1c9a7e2b";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The database file and its WAL, as a copy of them would hold.
fn file_bytes(db: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(db).expect("db file");
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    if let Ok(w) = std::fs::read(std::path::PathBuf::from(wal)) {
        bytes.extend(w);
    }
    bytes
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

#[tokio::test]
async fn secrets_are_unreadable_from_the_database_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("data/events.db");
    let key_file = dir.path().join("keys/secrets.key");
    let url = format!("sqlite://{}", db.display());
    let source = KeySource::File(key_file.clone());
    let store = open_store_with_secrets(&url, &source).await.expect("open");
    let auth = AuthService::open(store.db(), AuthConfig::default()).await.expect("auth");
    let uid = auth.create_user("ann", PASSWORD, Role::Operator, &Scope::All).await.expect("user");
    auth.store.set_pending_totp(uid, TOTP_SECRET, its_aggregator::unix_ms()).await.expect("totp");
    let spec = ChannelSpec {
        name: "ops".into(),
        max_attempts: None,
        target: ChannelTarget::Webhook { url: "https://hooks.example.org/its".into(), secret: HOOK_SECRET.into() },
    };
    AlertStore::new(store.db()).create_channel(&spec, its_aggregator::unix_ms()).await.expect("channel");

    // The service reads them back.
    let user = auth.store.user_by_id(uid).await.expect("db").expect("user");
    assert_eq!(user.totp_secret.as_deref(), Some(TOTP_SECRET));
    let keys = auth.store.signing_keys(0).await.expect("keys");
    let pem = &keys.first().expect("a signing key").private_pem;
    assert!(pem.contains("PRIVATE KEY"));
    let channels = AlertStore::new(store.db()).list_channels().await.expect("channels");
    assert!(matches!(&channels[0].spec.target, ChannelTarget::Webhook { secret, .. } if secret == HOOK_SECRET));

    // The file alone holds none of them, and only its owner may read it.
    let bytes = file_bytes(&db);
    assert!(bytes.len() > 4096);
    let pem_body: String = pem.lines().nth(1).expect("pem body").chars().take(40).collect();
    for (what, needle) in [
        ("TOTP secret", TOTP_SECRET),
        ("webhook secret", HOOK_SECRET),
        ("private key", "PRIVATE KEY"),
        ("key body", &pem_body),
    ] {
        assert!(!contains(&bytes, needle), "the {what} is readable in the database file");
    }
    assert!(contains(&bytes, "sealed:v1:"), "the sealed values are there");
    #[cfg(unix)]
    {
        assert_eq!(mode(&db), 0o600, "database file mode");
        assert_eq!(mode(&key_file), 0o600, "key file mode");
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        assert_eq!(mode(std::path::Path::new(&wal)), 0o600, "WAL mode");
    }
    drop(auth);
    drop(store);

    // Without its key ring the database is refused, naming the key; no new ring is made.
    let moved = dir.path().join("keys/elsewhere.key");
    std::fs::rename(&key_file, &moved).expect("move the key away");
    let kid = Vault::parse("ring", &std::fs::read_to_string(&moved).expect("ring")).expect("ring").key_ids()[0].clone();
    match open_store_with_secrets(&url, &source).await {
        Err(StoreError::Config(m)) => assert!(m.contains(&kid), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened without its key"),
    }
    assert!(!key_file.exists(), "a key ring was made although the database needs another one");
    std::fs::rename(&moved, &key_file).expect("key back");

    // Rotation: a new key first; everything sealed again with it; the old one can then go.
    let (ring, _) = Vault::load(&source, false).expect("ring");
    let next = ring.with_new_active_key();
    next.write_file(&key_file).expect("write ring");
    let store = open_store_with_secrets(&url, &source).await.expect("reopen");
    let in_use = sealed::key_ids_in_use(&store.db()).await.expect("ids");
    assert_eq!(in_use, vec![next.active_key_id().expect("active").to_owned()]);
    next.active_only().write_file(&key_file).expect("retire");
    drop(store);
    let store = open_store_with_secrets(&url, &source).await.expect("reopen with the new key only");
    let auth = AuthService::open(store.db(), AuthConfig::default()).await.expect("auth");
    assert_eq!(auth.store.user_by_id(uid).await.expect("db").expect("user").totp_secret.as_deref(), Some(TOTP_SECRET));
}

#[tokio::test]
async fn secrets_written_in_clear_are_sealed_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("events.db");
    let url = format!("sqlite://{}", db.display());
    let source = KeySource::File(dir.path().join("secrets.key"));
    let store = open_store_with_secrets(&url, &source).await.expect("open");
    let auth = AuthService::open(store.db(), AuthConfig::default()).await.expect("auth");
    let uid = auth.create_user("bo", PASSWORD, Role::Viewer, &Scope::All).await.expect("user");
    drop(auth);
    // As an earlier version stored it: in clear.
    // A connection of its own: outside the store, the database is reached only through SQL.
    let writer = sqlx::SqlitePool::connect(&url).await.expect("connect");
    sqlx::query("UPDATE users SET totp_secret = $1 WHERE user_id = $2")
        .bind(TOTP_SECRET)
        .bind(uid)
        .execute(&writer)
        .await
        .expect("plain");
    drop(store);
    let store = open_store_with_secrets(&url, &source).await.expect("reopen");
    let auth = AuthService::open(store.db(), AuthConfig::default()).await.expect("auth");
    assert_eq!(auth.store.user_by_id(uid).await.expect("db").expect("user").totp_secret.as_deref(), Some(TOTP_SECRET));
    drop(auth);
    drop(store);
    assert!(!contains(&file_bytes(&db), TOTP_SECRET), "sealed at the start");
}

/// A sealed value copied to another row does not open there.
#[tokio::test]
async fn a_sealed_value_moved_to_another_row_does_not_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let store = open_store(&url, Vault::ephemeral()).await.expect("store");
    let auth = AuthService::open(store.db(), AuthConfig::default()).await.expect("auth");
    let a = auth.create_user("a1", PASSWORD, Role::Viewer, &Scope::All).await.expect("user");
    let b = auth.create_user("b1", PASSWORD, Role::Viewer, &Scope::All).await.expect("user");
    auth.store.set_pending_totp(a, TOTP_SECRET, 0).await.expect("totp");
    let writer = sqlx::SqlitePool::connect(&url).await.expect("connect");
    sqlx::query("UPDATE users SET totp_secret = (SELECT totp_secret FROM users WHERE user_id = $1) WHERE user_id = $2")
        .bind(a)
        .bind(b)
        .execute(&writer)
        .await
        .expect("copy");
    assert!(matches!(auth.store.user_by_id(b).await, Err(StoreError::Corrupt(_))));
    assert!(auth.store.user_by_id(a).await.is_ok());
}

async fn audit_log_never_counts_against_events(store: Arc<dyn EventStore>) {
    use its_aggregator::store::{Retention, RetentionPolicy};
    let snapshots = its_aggregator::snapshots::SnapshotObjects::with_store(
        Arc::new(object_store::memory::InMemory::new()),
        "memory",
    );
    let retention = Retention::new(store.db(), snapshots.clone(), RetentionPolicy::off());
    // Some events, so there is something retention could delete.
    let events: Vec<its_shared::EventEnvelope> = (1..=500u64)
        .map(|seq| its_shared::EventEnvelope {
            seq,
            camera: "cam".into(),
            observed_at_ms: 1_000 + seq as i64,
            kind: its_shared::EventKind::ZoneEnter {
                zone: "z".into(),
                object: its_shared::event::ObjectRef { track_id: seq, label: "car".into(), score: 0.9, bbox: [0.0; 4] },
            },
        })
        .collect();
    store.insert_events("box", &events, 2_000).await.expect("events");
    let before = retention.measure().await.expect("measure");
    let auth = its_aggregator::auth::store::AuthStore::new(store.db());
    for i in 0..20_000 {
        let entry = AuditEntry {
            actor: format!("user:flood-{i}"),
            action: "login.failure",
            target: None,
            outcome: "failure",
            client_addr: Some(format!("203.0.113.{}", i % 250)),
            detail: serde_json::json!({ "reason": "unknown user", "padding": "x".repeat(100) }),
        };
        auth.audit(&entry, 3_000 + i).await.expect("audit");
    }
    let after = retention.measure().await.expect("measure");
    assert_eq!(auth.audit_rows().await.expect("rows"), 20_000);
    // 20 000 entries of ~200 bytes (some 4 MB) in the audit log; what size retention counts grew by
    // at most a few pages.
    let grown = after.db_bytes.saturating_sub(before.db_bytes);
    assert!(grown < 64 * 1024, "size retention counts {grown} bytes more after the audit log grew");
    // A limit just above the events' size: nothing deleted although the database grew.
    let limit = after.total() + (1 << 20);
    let retention = Retention::new(
        store.db(),
        snapshots,
        RetentionPolicy { max_total_bytes: Some(limit), ..RetentionPolicy::off() },
    );
    let report = retention.run_once(10_000).await.expect("retention");
    assert!(report.runs.is_empty(), "{report:?}");
    assert_eq!(store.device_seqs("box").await.expect("seqs").len(), 500);
}

common::both_backends!(audit_log_never_counts_against_events);
