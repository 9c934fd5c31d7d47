//! Files only the service's own user may read: key files, the SQLite database and its journals.
//!
//! Whatever the process umask (a shell's 022 outside the systemd unit, which sets 077), these are
//! created with mode 0600, and an existing one that others can read is narrowed to 0600 (and
//! said so in the log). Depends on nothing else in the crate.

use std::fs;
use std::io::Write as _;
use std::path::Path;

/// Writes `contents` to `path` (created or truncated) with mode 0600, then syncs it.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    // `mode` applies only when the file is created: narrow one that existed.
    restrict(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Creates `path` empty with mode 0600 if it does not exist; narrows it (and the SQLite journal
/// files beside it, `-wal`, `-shm`, `-journal`) to 0600 if others can read them. SQLite gives
/// the journal files it creates the mode of the database file.
pub fn private_database_file(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    drop(opts.open(path)?);
    restrict(path)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        if p.exists() {
            restrict(&p)?;
        }
    }
    Ok(())
}

/// Mode 0600 when group or others have any access (logged).
#[cfg(unix)]
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        tracing::info!(path = %path.display(), was = format!("{:o}", mode & 0o777), "narrowed file mode to 600");
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn private_files_whatever_existed_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("k");
        fs::write(&key, "old").expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&key, b"new").expect("write");
        assert_eq!((mode(&key), fs::read_to_string(&key).expect("read")), (0o600, "new".to_owned()));

        let db = dir.path().join("data/events.db");
        private_database_file(&db).expect("create");
        assert_eq!(mode(&db), 0o600);
        let wal = dir.path().join("data/events.db-wal");
        fs::write(&wal, "").expect("wal");
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::set_permissions(&db, fs::Permissions::from_mode(0o664)).expect("chmod");
        private_database_file(&db).expect("narrow");
        assert_eq!((mode(&db), mode(&wal)), (0o600, 0o600));
    }
}
