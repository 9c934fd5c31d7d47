//! Helpers for the two-phase configuration both programs use: a raw serde form read from TOML
//! (with environment overrides), then a validated form built by collecting *every* error with its
//! path. Pure functions: the caller reads files and the environment.

use std::fmt;

/// One problem in a configuration, with the dotted path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// All problems found in a configuration; empty means valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors {
    pub source: String,
    pub issues: Vec<ConfigIssue>,
}

impl ConfigErrors {
    pub fn new(source: impl Into<String>) -> Self {
        Self { source: source.into(), issues: Vec::new() }
    }

    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue { path: path.into(), message: message.into() });
    }

    /// Records `message` at `path` unless `ok`.
    pub fn check(&mut self, ok: bool, path: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.push(path, message());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.issues.is_empty()
    }

    /// `Ok(value)` when no issue was recorded.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.issues.is_empty() { Ok(value) } else { Err(self) }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration in {} ({} problem(s)):", self.source, self.issues.len())?;
        for i in &self.issues {
            writeln!(f, "  - {i}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses a TOML document (`None`: an empty one, i.e. all defaults), applies the environment
/// overrides, and deserialises the result. `source` names the document in errors.
pub fn parse_toml_with_env<T, I>(source: &str, text: Option<&str>, prefix: &str, env: I) -> Result<T, ConfigParseError>
where
    T: serde::de::DeserializeOwned,
    I: IntoIterator<Item = (String, String)>,
{
    let err = |e: toml::de::Error| ConfigParseError { document: source.to_string(), message: e.to_string() };
    let mut doc: toml::Table = match text {
        Some(t) => t.parse().map_err(err)?,
        None => toml::Table::new(),
    };
    apply_env_overrides(&mut doc, prefix, env);
    toml::Value::Table(doc).try_into().map_err(err)
}

/// A configuration document that is not valid TOML or does not fit the configuration's shape
/// (unknown keys, wrong types); the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{document}: {message}")]
pub struct ConfigParseError {
    pub document: String,
    pub message: String,
}

/// Applies environment overrides to a parsed TOML document.
///
/// A variable `{prefix}SECTION__KEY=value` sets `section.key` (names lower-cased, `__` separates
/// levels). The value is parsed as a TOML value when it is one (`42`, `true`, `["a","b"]`), and
/// taken as a string otherwise. Returns the paths that were overridden.
pub fn apply_env_overrides<I>(doc: &mut toml::Table, prefix: &str, vars: I) -> Vec<String>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut applied = Vec::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            continue;
        }
        if set_path(doc, &path, parse_scalar(&raw)) {
            applied.push(path.join("."));
        }
    }
    applied
}

/// Sets `path` in `table`, creating tables on the way; false if a non-table is in the way.
fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> bool {
    match path {
        [] => false,
        [last] => {
            table.insert(last.clone(), value);
            true
        }
        [first, rest @ ..] => {
            let entry = table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => false,
            }
        }
    }
}

fn parse_scalar(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_set_nested_typed_values() {
        let mut doc: toml::Table = "[uplink]\naggregator = \"a:1\"\n".parse().expect("toml");
        let applied = apply_env_overrides(
            &mut doc,
            "ITS_AGENT__",
            vec![
                ("ITS_AGENT__UPLINK__AGGREGATOR".to_string(), "b:2".to_string()),
                ("ITS_AGENT__OUTBOX__MAX_BYTES".to_string(), "1024".to_string()),
                ("ITS_AGENT__SYNTHETIC__CAMERAS".to_string(), "[\"x\", \"y\"]".to_string()),
                ("OTHER".to_string(), "1".to_string()),
            ],
        );
        assert_eq!(applied.len(), 3);
        assert_eq!(doc["uplink"]["aggregator"].as_str(), Some("b:2"));
        assert_eq!(doc["outbox"]["max_bytes"].as_integer(), Some(1024));
        assert_eq!(doc["synthetic"]["cameras"].as_array().map(|a| a.len()), Some(2));
    }

    #[test]
    fn errors_collect_every_issue_with_its_path() {
        let mut e = ConfigErrors::new("agent.toml");
        e.check(false, "outbox.max_bytes", || "must be at least 1 MiB".into());
        e.check(true, "x", || unreachable!());
        e.push("uplink.aggregator", "not host:port");
        let text = e.to_string();
        assert!(text.contains("2 problem(s)"));
        assert!(text.contains("outbox.max_bytes: must be at least 1 MiB"));
        assert!(e.into_result(()).is_err());
    }
}
