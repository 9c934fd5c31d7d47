//! The one pagination cursor of every list the store pages through (events, alerts, rollups,
//! anomalies): [`PageCursor`] names the last row of a page by its time key and id.
//!
//! It has two written forms, because the API promises two things: events, rollups and anomalies
//! hand out an opaque token and accept only what the service issued ([`PageCursor::encode`],
//! URL-safe base64 of `<key_ms>:<id>`, strictly parsed); the alerts API documents its cursor as
//! `<opened_at_ms>-<alert_id>`, any text of that form being a position to page from
//! ([`PageCursor::encode_position`]).

use base64::Engine as _;

use super::StoreError;

/// Longest cursor accepted; anything longer was not issued by this service.
const MAX_CURSOR_LEN: usize = 64;

/// Position after the last row of a page: `(key_ms, id)` in the list's order (a time in Unix ms,
/// then the row id to break ties).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub key_ms: i64,
    pub id: i64,
}

impl PageCursor {
    pub fn new(key_ms: i64, id: i64) -> Self {
        Self { key_ms, id }
    }

    /// The opaque token: URL-safe base64 of `<key_ms>:<id>`.
    pub fn encode(self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", self.key_ms, self.id))
    }

    /// Parses exactly what [`PageCursor::encode`] writes (ids from 1); anything else is
    /// [`StoreError::BadCursor`].
    pub fn decode(s: &str) -> Result<Self, StoreError> {
        if s.is_empty() || s.len() > MAX_CURSOR_LEN {
            return Err(StoreError::BadCursor);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| StoreError::BadCursor)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| StoreError::BadCursor)?;
        let (key, id) = text.split_once(':').ok_or(StoreError::BadCursor)?;
        let strict = |p: &str| -> Result<i64, StoreError> {
            // Only what `encode` writes: an optional minus sign and digits.
            let digits = p.strip_prefix('-').unwrap_or(p);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(StoreError::BadCursor);
            }
            p.parse::<i64>().map_err(|_| StoreError::BadCursor)
        };
        let cursor = PageCursor { key_ms: strict(key)?, id: strict(id)? };
        if cursor.id < 1 {
            return Err(StoreError::BadCursor);
        }
        Ok(cursor)
    }

    /// The documented position form of the alerts API: `<key_ms>-<id>`.
    pub fn encode_position(self) -> String {
        format!("{}-{}", self.key_ms, self.id)
    }

    /// Parses a position, `^[0-9]{1,16}-[0-9]{1,18}$` (every such text is one); anything else is
    /// [`StoreError::BadCursor`].
    pub fn decode_position(s: &str) -> Result<Self, StoreError> {
        let (key, id) = s.split_once('-').ok_or(StoreError::BadCursor)?;
        let digits = |x: &str, max: usize| !x.is_empty() && x.len() <= max && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(key, 16) || !digits(id, 18) {
            return Err(StoreError::BadCursor);
        }
        let number = |x: &str| x.parse::<i64>().map_err(|_| StoreError::BadCursor);
        Ok(PageCursor { key_ms: number(key)?, id: number(id)? })
    }
}

#[cfg(test)]
mod tests {
    use super::PageCursor;

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        for (k, id) in [(1_700_000_000_000, 42), (-5, 1), (0, i64::MAX)] {
            let c = PageCursor::new(k, id);
            assert_eq!(PageCursor::decode(&c.encode()).expect("cursor"), c);
        }
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
        };
        for bad in ["", "xyz", "!!", &b64("5:"), &b64("5:0"), &b64("+5:1"), &b64("5:1:2"), &"A".repeat(65)] {
            assert!(PageCursor::decode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn positions_round_trip_and_any_text_of_their_form_is_one() {
        let c = PageCursor::new(1_700_000_000_000, 42);
        assert_eq!(c.encode_position(), "1700000000000-42");
        assert_eq!(PageCursor::decode_position(&c.encode_position()).expect("position"), c);
        assert_eq!(PageCursor::decode_position("0-0").expect("position"), PageCursor::new(0, 0));
        for bad in
            ["", "xyz", "5-", "-5-1", "5--1", "+5-1", "5-1-2", " 5-1", "12345678901234567-1", "1-1234567890123456789"]
        {
            assert!(PageCursor::decode_position(bad).is_err(), "{bad:?} accepted");
        }
    }
}
