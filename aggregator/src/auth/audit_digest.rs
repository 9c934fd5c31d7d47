//! Repeated failures, summarised: what anyone can cause without a credential (a wrong password, a
//! locked account, a wrong second factor) must not write one audit row per request, or a flood
//! of sign-ins grows the database at the attacker's rate.
//!
//! The first failure of a kind (action, outcome, actor, client address) is written at once; the
//! ones that follow within [`WINDOW_MS`] are only counted, and written as one summary entry
//! (`detail.repeated` = how many, `detail.window_ms`, the first and last time) when the window
//! ends. At most [`MAX_KINDS`] kinds are tracked at a time: beyond that, further kinds are
//! counted together under the actor `various` (and `detail.kinds_overflowed`), so the audit rows
//! a flood can cause are bounded by about `2 x MAX_KINDS` per window, whatever the number of
//! names and addresses it uses.

use std::collections::HashMap;
use std::sync::Mutex;

use super::store::AuditEntry;

/// How long repeats of one kind are counted before their summary is written.
pub const WINDOW_MS: i64 = 60_000;
/// Kinds tracked at once before they are counted together.
pub const MAX_KINDS: usize = 200;
/// The actor of the summary of overflowed kinds.
pub const OVERFLOW_ACTOR: &str = "various";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    action: &'static str,
    outcome: &'static str,
    actor: String,
    client_addr: Option<String>,
}

#[derive(Debug)]
struct Pending {
    first_ms: i64,
    last_ms: i64,
    /// Entries counted after the first (which was written).
    repeated: u64,
    /// Distinct kinds folded into an overflow entry.
    kinds: u64,
    sample: AuditEntry,
}

/// The summariser (see the module documentation).
#[derive(Debug, Default)]
pub struct AuditDigest {
    pending: Mutex<HashMap<Kind, Pending>>,
    /// Summaries of windows replaced before they were flushed.
    late: Mutex<Vec<AuditEntry>>,
}

impl AuditDigest {
    /// What to write now for `entry`: the entry itself when it opens a window, `None` when it is
    /// counted into a pending summary.
    pub fn admit(&self, entry: AuditEntry, now_ms: i64) -> Option<AuditEntry> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut kind = Kind {
            action: entry.action,
            outcome: entry.outcome,
            actor: entry.actor.clone(),
            client_addr: entry.client_addr.clone(),
        };
        let mut overflowed = false;
        if !pending.contains_key(&kind) && pending.len() >= MAX_KINDS {
            kind =
                Kind { action: entry.action, outcome: entry.outcome, actor: OVERFLOW_ACTOR.into(), client_addr: None };
            overflowed = true;
        }
        if let Some(p) = pending.get_mut(&kind)
            && now_ms - p.first_ms < WINDOW_MS
        {
            p.repeated += 1;
            p.last_ms = now_ms;
            if overflowed {
                p.kinds += 1;
            }
            return None;
        }
        let mut sample = entry;
        if overflowed {
            sample.actor = OVERFLOW_ACTOR.into();
            sample.client_addr = None;
            sample.detail = serde_json::json!({ "kinds_overflowed": 1 });
        }
        // A window that ended but was not flushed yet: its summary goes out with the next flush.
        let written = sample.clone();
        let old = pending.insert(
            kind,
            Pending { first_ms: now_ms, last_ms: now_ms, repeated: 0, kinds: u64::from(overflowed), sample },
        );
        drop(pending);
        if let Some(old) = old.filter(|o| o.repeated > 0) {
            self.late.lock().unwrap_or_else(|p| p.into_inner()).push(summary(old));
        }
        Some(written)
    }

    /// The summaries of the windows that ended by `now_ms` (all of them with `all`, at
    /// shutdown), to be written; their kinds are forgotten.
    pub fn due(&self, now_ms: i64, all: bool) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = std::mem::take(&mut *self.late.lock().unwrap_or_else(|p| p.into_inner()));
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let ended: Vec<Kind> =
            pending.iter().filter(|(_, p)| all || now_ms - p.first_ms >= WINDOW_MS).map(|(k, _)| k.clone()).collect();
        for k in ended {
            if let Some(p) = pending.remove(&k)
                && p.repeated > 0
            {
                out.push(summary(p));
            }
        }
        out
    }

    /// Kinds tracked now.
    pub fn tracked(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn summary(p: Pending) -> AuditEntry {
    let mut detail = match p.sample.detail {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    detail.insert("repeated".into(), p.repeated.into());
    detail.insert("window_ms".into(), WINDOW_MS.into());
    detail.insert("first_ms".into(), p.first_ms.into());
    detail.insert("last_ms".into(), p.last_ms.into());
    if p.kinds > 0 {
        detail.insert("kinds_overflowed".into(), p.kinds.into());
    }
    AuditEntry { detail: serde_json::Value::Object(detail), ..p.sample }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(actor: &str, addr: &str) -> AuditEntry {
        AuditEntry {
            actor: actor.into(),
            action: "login.failure",
            target: None,
            outcome: "failure",
            client_addr: Some(addr.into()),
            detail: serde_json::json!({ "reason": "wrong password" }),
        }
    }

    #[test]
    fn repeats_are_counted_into_one_summary() {
        let d = AuditDigest::default();
        assert!(d.admit(failure("user:a", "192.0.2.1"), 0).is_some(), "the first is written");
        for t in 1..1000 {
            assert!(d.admit(failure("user:a", "192.0.2.1"), t).is_none());
        }
        assert!(d.admit(failure("user:b", "192.0.2.1"), 5).is_some(), "another actor is another kind");
        assert!(d.due(WINDOW_MS - 1, false).is_empty(), "the window has not ended");
        let due = d.due(WINDOW_MS, false);
        assert_eq!(due.len(), 1, "user:b had no repeats: no summary");
        assert_eq!(due[0].detail["repeated"], 999);
        assert_eq!(due[0].detail["reason"], "wrong password");
        assert_eq!(d.tracked(), 1, "user:b's window (from t=5) is still open");
        assert!(d.admit(failure("user:a", "192.0.2.1"), WINDOW_MS + 1).is_some(), "a new window");
    }

    #[test]
    fn many_kinds_are_bounded() {
        let d = AuditDigest::default();
        let mut written = 0;
        for i in 0..10_000 {
            if d.admit(failure(&format!("user:u{i}"), &format!("10.0.{}.{}", i / 256, i % 256)), i).is_some() {
                written += 1;
            }
        }
        assert_eq!(written, MAX_KINDS + 1, "one per tracked kind and one overflow entry");
        let due = d.due(i64::MAX / 2, true);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].actor, OVERFLOW_ACTOR);
        assert_eq!(due[0].detail["kinds_overflowed"], 10_000 - MAX_KINDS as u64);
    }
}
