//! Reading a configuration file. Only the reading is here: each program parses the text (with its
//! environment overrides, `its_shared::config::parse_toml_with_env`) and validates it itself.

use std::path::{Path, PathBuf};

/// Name of the configuration in messages when no file is given (the embedded defaults apply).
pub const DEFAULTS_NAME: &str = "<defaults>";

/// A configuration document as read, and the name its parse errors carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigText {
    /// The file's path as displayed, or [`DEFAULTS_NAME`] without a file.
    pub source: String,
    /// The file's contents; `None` without a file.
    pub text: Option<String>,
}

/// A configuration file that could not be read (missing, unreadable, not UTF-8).
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Reads the configuration file at `path`; without one, no text and the name [`DEFAULTS_NAME`].
pub fn read_config_file(path: Option<&Path>) -> Result<ConfigText, ReadError> {
    let Some(p) = path else { return Ok(ConfigText { source: DEFAULTS_NAME.to_string(), text: None }) };
    let text = std::fs::read_to_string(p).map_err(|source| ReadError { path: p.to_path_buf(), source })?;
    Ok(ConfigText { source: p.display().to_string(), text: Some(text) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_the_defaults_by_name() {
        let t = read_config_file(None).expect("defaults");
        assert_eq!(t, ConfigText { source: "<defaults>".into(), text: None });
    }

    #[test]
    fn a_file_is_read_and_named_by_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let t = read_config_file(Some(&path)).expect("reads");
        assert_eq!(t.source, path.display().to_string());
        assert_eq!(t.text.as_deref(), Some("a = 1\n"));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = read_config_file(Some(Path::new("/nonexistent/agent.toml"))).expect_err("missing");
        assert_eq!(err.path, Path::new("/nonexistent/agent.toml"));
        assert!(err.to_string().starts_with("/nonexistent/agent.toml: "), "{err}");
    }
}
