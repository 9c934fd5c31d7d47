//! The rollup resolutions.

use serde::{Deserialize, Serialize};

/// A rollup resolution: `1m`, `15m` or `1h` (the API's and the rules' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Resolution {
    #[serde(rename = "1m")]
    Minute,
    #[serde(rename = "15m")]
    QuarterHour,
    #[serde(rename = "1h")]
    Hour,
}

impl Resolution {
    pub const ALL: [Resolution; 3] = [Resolution::Minute, Resolution::QuarterHour, Resolution::Hour];

    pub fn seconds(self) -> i64 {
        match self {
            Resolution::Minute => 60,
            Resolution::QuarterHour => 900,
            Resolution::Hour => 3600,
        }
    }

    pub fn millis(self) -> i64 {
        self.seconds() * 1000
    }

    /// `1m`, `15m`, `1h`: the API's names.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::Minute => "1m",
            Resolution::QuarterHour => "15m",
            Resolution::Hour => "1h",
        }
    }

    /// The same as [`Resolution::name`].
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    pub fn from_seconds(s: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.seconds() == s)
    }

    /// Start of the bucket that holds `ms`.
    pub fn bucket(self, ms: i64) -> i64 {
        ms.div_euclid(self.millis()) * self.millis()
    }
}

#[cfg(test)]
mod tests {
    use super::Resolution;

    #[test]
    fn names_serde_and_buckets_agree() {
        for r in Resolution::ALL {
            assert_eq!(Resolution::parse(r.name()), Some(r));
            assert_eq!(Resolution::from_seconds(r.seconds()), Some(r));
            assert_eq!(serde_json::to_string(&r).expect("json"), format!("\"{}\"", r.name()));
        }
        assert_eq!(Resolution::QuarterHour.bucket(1_000_000), 900_000);
        assert_eq!(Resolution::Minute.bucket(-1), -60_000);
        assert_eq!(Resolution::parse("5m"), None);
    }
}
