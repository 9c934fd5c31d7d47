//! The workspace's programs, for tests that run them as processes.
//!
//! A test can name only its own package's binaries (`env!("CARGO_BIN_EXE_<name>")`); `its-agent`
//! and `its-aggregator` belong to other packages, which `cargo test -p its-e2e` does not build.
//! [`workspace_bin`] finds the one asked for in the target directory and profile the running test
//! was built in. `cargo test --workspace` (the README's test command) builds every package's
//! programs in the same run as the tests, with the same features: that program is used when it is
//! up to date (no source file of its package or of the libraries it uses is newer). Otherwise (a test run of one package,
//! a benchmark) it is built with `cargo build -p <package> --bin <name>` (once per test process)
//! and the path cargo reports is used, so a test never runs a stale program.
//!
//! Building it whenever a test asks, even when it is up to date, would not be free: a
//! `cargo build -p` resolves the features of that package alone, not those of the test run
//! (dev-dependencies bring features the programs then lack), so cargo would compile much of the
//! dependency graph a second time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The aggregator's binary (`its-aggregator`), up to date.
pub fn aggregator_bin() -> PathBuf {
    workspace_bin("its-aggregator", "aggregator", "its-aggregator")
}

/// The agent's binary (`its-agent`), up to date.
pub fn agent_bin() -> PathBuf {
    workspace_bin("its-agent", "edge-agent", "its-agent")
}

/// Binary `bin` of workspace package `package` (in folder `package_dir` of the workspace): the one
/// the test run built when it is up to date, else built (with the package's default features) with
/// the profile and into the target directory of the running test or benchmark. Panics when the
/// build fails, with cargo's output.
pub fn workspace_bin(package: &str, package_dir: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    // Held while building: concurrent tests of one process wait for one build.
    let mut built = BUILT.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = built.get(bin) {
        return path.clone();
    }
    let exe = std::env::current_exe().ok();
    let beside =
        exe.as_deref().and_then(layout).map(|l| l.profile_dir().join(format!("{bin}{}", std::env::consts::EXE_SUFFIX)));
    let path = match beside.filter(|p| up_to_date(p, package_dir)) {
        Some(path) => path,
        None => build(package, bin).unwrap_or_else(|e| panic!("building {bin} (package {package}): {e}")),
    };
    built.insert(bin.to_owned(), path.clone());
    path
}

/// Where the running executable was built: `<target dir>[/<triple>]/<profile dir>/deps/<name>`.
struct BuildLayout {
    target_dir: PathBuf,
    triple: Option<String>,
    /// The cargo profile (`dev` for `debug/`, `release` for `release/` and benchmarks).
    profile: String,
}

impl BuildLayout {
    /// Where cargo puts the programs of this profile (`<target dir>[/<triple>]/debug`).
    fn profile_dir(&self) -> PathBuf {
        let dir = match &self.triple {
            Some(t) => self.target_dir.join(t),
            None => self.target_dir.clone(),
        };
        dir.join(if self.profile == "dev" { "debug" } else { &self.profile })
    }
}

/// Whether the program at `path` is newer than every file it is built from, as far as a test can
/// tell: the sources of its package (`src/`, `migrations/`, the manifest, in `package_dir`), of the
/// workspace's library crates every program uses (`shared/`, `hostio/`), and the lock file.
fn up_to_date(path: &Path, package_dir: &str) -> bool {
    let Some(built) = modified(path) else { return false };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut roots = vec![workspace.join("Cargo.lock")];
    for dir in [package_dir, "shared", "hostio"] {
        let dir = workspace.join(dir);
        roots.extend([dir.join("src"), dir.join("migrations"), dir.join("Cargo.toml")]);
    }
    roots.iter().all(|r| newest(r).is_none_or(|m| m <= built))
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file, or of the files below a folder (`None`: nothing there).
fn newest(p: &Path) -> Option<std::time::SystemTime> {
    let Ok(entries) = std::fs::read_dir(p) else { return modified(p) };
    entries.flatten().filter_map(|e| newest(&e.path())).max()
}

fn layout(exe: &Path) -> Option<BuildLayout> {
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    let profile_dir = deps.parent()?;
    let profile = match profile_dir.file_name()?.to_str()? {
        "debug" => "dev".to_owned(),
        other => other.to_owned(),
    };
    let above = profile_dir.parent()?;
    // Cargo marks the root of a target directory with CACHEDIR.TAG; below it, a directory per
    // target triple when one was asked for.
    if above.join("CACHEDIR.TAG").is_file() || !above.parent()?.join("CACHEDIR.TAG").is_file() {
        return Some(BuildLayout { target_dir: above.to_path_buf(), triple: None, profile });
    }
    let triple = above.file_name()?.to_str()?.to_owned();
    Some(BuildLayout { target_dir: above.parent()?.to_path_buf(), triple: Some(triple), profile })
}

fn build(package: &str, bin: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test's own path: {e}"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--manifest-path").arg(&manifest).args([
        "-p",
        package,
        "--bin",
        bin,
        "--message-format=json-render-diagnostics",
    ]);
    if let Some(l) = layout(&exe) {
        cmd.arg("--target-dir").arg(&l.target_dir).args(["--profile", &l.profile]);
        if let Some(triple) = &l.triple {
            cmd.args(["--target", triple]);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running cargo (set CARGO to its path if it is not on PATH): {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    // The compiler-artifact message of the binary names the executable.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == bin
            && msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin"))
            && let Some(path) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(path));
        }
    }
    Err(format!("cargo reported no executable for {bin}:\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_layout_is_read_from_the_test_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path();
        std::fs::write(t.join("CACHEDIR.TAG"), "").expect("tag");
        let l = layout(&t.join("debug/deps/fault_e2e-0123")).expect("layout");
        assert_eq!((l.target_dir.as_path(), l.triple, l.profile.as_str()), (t, None, "dev"));
        let l = layout(&t.join("release/deps/uplink-0123")).expect("layout");
        assert_eq!(l.profile, "release");
        let l = layout(&t.join("aarch64-unknown-linux-gnu/debug/deps/x-1")).expect("layout");
        assert_eq!((l.target_dir.as_path(), l.triple.as_deref()), (t, Some("aarch64-unknown-linux-gnu")));
        assert!(layout(&t.join("debug/x")).is_none(), "not a deps directory");
        let l = layout(&t.join("debug/deps/fault_e2e-0123")).expect("layout");
        assert_eq!(l.profile_dir(), t.join("debug"));
        let l = layout(&t.join("aarch64-unknown-linux-gnu/release/deps/x-1")).expect("layout");
        assert_eq!(l.profile_dir(), t.join("aarch64-unknown-linux-gnu/release"));
    }

    #[test]
    fn a_program_is_up_to_date_when_no_source_is_newer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path();
        let set = |p: &Path, secs: u64| {
            let f = std::fs::File::options().write(true).open(p).expect("open");
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).expect("mtime");
        };
        std::fs::create_dir_all(t.join("src/deep")).expect("dirs");
        let (a, b) = (t.join("src/a.rs"), t.join("src/deep/b.rs"));
        std::fs::write(&a, "").expect("a");
        std::fs::write(&b, "").expect("b");
        set(&a, 1_000);
        set(&b, 1_500);
        assert_eq!(newest(&t.join("src")), Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500)));
        assert_eq!(newest(&t.join("missing")), None);
        // The workspace's own sources are older than a program built now, newer than one of 1970.
        let bin = t.join("prog");
        assert!(!up_to_date(&bin, "edge-agent"), "no program");
        std::fs::write(&bin, "").expect("bin");
        assert!(up_to_date(&bin, "edge-agent"));
        set(&bin, 1_000);
        assert!(!up_to_date(&bin, "edge-agent"), "sources are newer");
    }
}
