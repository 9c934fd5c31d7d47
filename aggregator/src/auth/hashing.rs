//! Password hashing on a bounded pool: the only place argon2 runs.
//!
//! argon2id with OWASP's minimum takes 19 MiB and tens of milliseconds of CPU per run, so an
//! unbounded number of concurrent runs (one per sign-in request) is a way to exhaust memory
//! without any credential. Here:
//! - a fixed number of worker threads (`[auth] hash_workers`, default the number of CPUs) each
//!   own one memory area, allocated at its first run and reused for every later one: argon2's
//!   memory is `workers x 19 MiB`, whatever the load;
//! - at most `[auth] hash_queue` requests wait for a worker; one more is refused at once
//!   ([`PoolError::Busy`], answered 503 with `Retry-After`), so waiting requests cannot pile up
//!   either;
//! - the queue depth is the gauge [`HASH_QUEUE`], refusals the counter [`HASH_BUSY`].
//!
//! Verification parses the PHC string and recomputes with the stored parameters (a hash made
//! with other parameters still verifies; one whose memory cost is above [`MAX_M_COST_KIB`] never
//! matches), comparing in constant time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use crate::telemetry::auth::{HASH_BUSY, HASH_QUEUE};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use rand::RngCore as _;
use subtle::ConstantTimeEq as _;

/// Largest argon2 memory cost (KiB) a stored hash may ask for: 64 MiB. Bounds what one
/// verification may allocate even for a hash made with other settings.
pub const MAX_M_COST_KIB: u32 = 64 * 1024;

/// The parameters of new hashes: argon2id, OWASP's recommended minimum (19 MiB, 2 passes, 1
/// lane). [`super::secrets::hash_password`] uses them too.
pub(super) fn params() -> Params {
    Params::new(Params::DEFAULT_M_COST, 2, 1, None).unwrap_or_default()
}

/// Why the pool did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every worker is busy and the queue is full: try again shortly.
    #[error("the password service is busy; try again in a second")]
    Busy,
    /// The workers are gone (the process is stopping).
    #[error("the password service stopped")]
    Stopped,
    /// Hashing failed (a password argon2 cannot take).
    #[error("hashing: {0}")]
    Hash(String),
}

enum Work {
    Hash(String),
    Verify(String, String),
}

enum Answer {
    Hashed(Result<String, String>),
    Verified(bool),
}

struct Job {
    work: Work,
    reply: tokio::sync::oneshot::Sender<Answer>,
}

/// The pool (see the module documentation).
pub struct PasswordPool {
    tx: SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    workers: usize,
    queue: usize,
}

impl std::fmt::Debug for PasswordPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordPool").field("workers", &self.workers).field("queue", &self.queue).finish()
    }
}

impl PasswordPool {
    /// Starts `workers` threads (at least 1) with room for `queue` waiting requests.
    pub fn new(workers: usize, queue: usize) -> Arc<Self> {
        let workers = workers.max(1);
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let queued = Arc::new(AtomicUsize::new(0));
        for i in 0..workers {
            let (rx, queued) = (Arc::clone(&rx), Arc::clone(&queued));
            let spawned = std::thread::Builder::new().name(format!("argon2-{i}")).spawn(move || worker(&rx, &queued));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "starting a password hashing worker failed");
            }
        }
        Arc::new(Self { tx, queued, workers, queue })
    }

    /// Workers and queue length.
    pub fn size(&self) -> (usize, usize) {
        (self.workers, self.queue)
    }

    async fn submit(&self, work: Work) -> Result<Answer, PoolError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Job { work, reply }) {
            Ok(()) => {}
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(match e {
                    TrySendError::Full(_) => {
                        metrics::counter!(HASH_BUSY).increment(1);
                        PoolError::Busy
                    }
                    TrySendError::Disconnected(_) => PoolError::Stopped,
                });
            }
        }
        metrics::gauge!(HASH_QUEUE).set(self.queued.load(Ordering::SeqCst) as f64);
        answer.await.map_err(|_| PoolError::Stopped)
    }

    /// Whether `password` matches the PHC string (a malformed hash never matches).
    pub async fn verify(&self, password: &str, phc: &str) -> Result<bool, PoolError> {
        if password.len() > super::secrets::MAX_PASSWORD_LEN {
            return Ok(false);
        }
        match self.submit(Work::Verify(password.to_owned(), phc.to_owned())).await? {
            Answer::Verified(ok) => Ok(ok),
            Answer::Hashed(_) => Err(PoolError::Stopped),
        }
    }

    /// The PHC string of a new argon2id hash with a fresh salt.
    pub async fn hash(&self, password: &str) -> Result<String, PoolError> {
        match self.submit(Work::Hash(password.to_owned())).await? {
            Answer::Hashed(r) => r.map_err(PoolError::Hash),
            Answer::Verified(_) => Err(PoolError::Stopped),
        }
    }
}

/// One worker: takes jobs until the pool is dropped, reusing its memory area.
fn worker(rx: &Mutex<Receiver<Job>>, queued: &AtomicUsize) {
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let waiting = queued.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!(HASH_QUEUE).set(waiting as f64);
        let answer = match job.work {
            Work::Hash(pw) => Answer::Hashed(hash_with(&pw, &mut memory)),
            Work::Verify(pw, phc) => Answer::Verified(verify_with(&pw, &phc, &mut memory)),
        };
        let _ = job.reply.send(answer);
    }
}

/// The memory area sized for `params` (grown if needed, never shrunk: bounded by
/// [`MAX_M_COST_KIB`]).
fn area<'a>(memory: &'a mut Vec<Block>, params: &Params) -> &'a mut [Block] {
    let n = params.block_count();
    if memory.len() < n {
        memory.resize(n, Block::default());
    }
    &mut memory[..n]
}

fn hash_with(password: &str, memory: &mut Vec<Block>) -> Result<String, String> {
    let params = params();
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, area(memory, &params))
        .map_err(|e| e.to_string())?;
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, b);
    Ok(format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        b64(&salt),
        b64(&out)
    ))
}

fn verify_with(password: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else { return false };
    let Ok(algorithm) = Algorithm::new(parsed.algorithm.as_str()) else { return false };
    let version = match parsed.version {
        Some(v) => match Version::try_from(v) {
            Ok(v) => v,
            Err(_) => return false,
        },
        None => Version::V0x13,
    };
    let Ok(params) = Params::try_from(&parsed) else { return false };
    if params.m_cost() > MAX_M_COST_KIB {
        tracing::warn!(m_cost_kib = params.m_cost(), "a stored password hash asks for more memory than allowed");
        return false;
    }
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params.clone());
    if argon.hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, area(memory, &params)).is_err() {
        return false;
    }
    bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

/// A hash to verify against when the user does not exist, so that an unknown name costs the
/// same time as a wrong password (of a random password nobody knows).
pub const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$CvFyA3JcO2pP8v5uQf3P0A$1hP5m5oL0m3bb8sXbnm0S5t7tqI9i0uXy0W1hUuTz0k";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_interoperate_with_argon2_phc() {
        let pool = PasswordPool::new(2, 4);
        let h = pool.hash("correct horse battery").await.expect("hash");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(pool.verify("correct horse battery", &h).await.expect("verify"));
        assert!(!pool.verify("correct horse batterY", &h).await.expect("verify"));
        assert!(!pool.verify("x", "not a hash").await.expect("verify"));
        assert!(!pool.verify("x", DUMMY_HASH).await.expect("verify"));
        // The dummy is a well-formed hash (so verifying against it costs a full run).
        let dummy = PasswordHash::new(DUMMY_HASH).expect("parses");
        assert_eq!((dummy.salt.map(|s| s.len()), dummy.hash.map(|h| h.len())), (Some(16), Some(32)));
        assert_eq!(Params::try_from(&dummy).expect("params").m_cost(), Params::DEFAULT_M_COST);
        // A hash made by the argon2 crate's own PHC encoder verifies here, and ours there.
        let theirs = super::super::secrets::hash_password("another password").expect("hash");
        assert!(pool.verify("another password", &theirs).await.expect("verify"));
        use argon2::PasswordVerifier as _;
        assert!(Argon2::default().verify_password(b"correct horse battery", h.as_str()).is_ok());
        // Other parameters (smaller memory) still verify.
        let small = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(8 * 1024, 1, 1, None).expect("p"));
        let small = argon2::PasswordHasher::hash_password(&small, b"pw with other params").expect("hash").to_string();
        assert!(pool.verify("pw with other params", &small).await.expect("verify"));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let pool = PasswordPool::new(1, 2);
        let h = super::super::secrets::hash_password("correct horse battery").expect("hash");
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let (pool, h) = (Arc::clone(&pool), h.clone());
            tasks.push(tokio::spawn(async move { pool.verify("wrong password here", &h).await }));
        }
        let mut busy = 0;
        let mut answered = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(false) => answered += 1,
                Err(PoolError::Busy) => busy += 1,
                other => panic!("{other:?}"),
            }
        }
        // One running, two waiting; the rest refused (the first may finish early and free a
        // slot, so at least 3 answered).
        assert!(answered >= 3 && busy >= 1 && answered + busy == 12, "answered {answered}, busy {busy}");
    }
}
