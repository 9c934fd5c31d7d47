//! `outbox-writer --path <outbox.db> [--batch 50]`: the crash-test writer of the outbox kill -9
//! test (`tests/outbox_kill9.rs`). Appends synthetic events forever and reports each committed
//! range on stdout, so a test can kill the process at random points and check that every reported
//! event survived.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use its_shared::EventKind;
use its_shared::event::{Direction, ObjectRef};

use its_agent::buffer::{NewEvent, Outbox, OutboxConfig};

/// Appends batches of `batch` synthetic events to the outbox at `path` in a loop, printing
/// `committed <first> <last>` and flushing stdout after each append returned. Never returns
/// `Ok`; ends with an error (or by being killed).
fn run_outbox_writer(path: &Path, batch: usize) -> anyhow::Result<()> {
    let cfg = OutboxConfig {
        path: path.to_path_buf(),
        max_bytes: u64::MAX / 2,
        max_age: Duration::from_secs(365 * 24 * 3600),
        reserve_ahead: 0,
    };
    let outbox = Outbox::open(cfg)?;
    let mut stdout = std::io::stdout().lock();
    let mut track_id = 0u64;
    loop {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let events: Vec<NewEvent> = (0..batch.max(1))
            .map(|i| {
                track_id += 1;
                NewEvent {
                    camera: "stress-cam".into(),
                    observed_at_ms: now_ms,
                    kind: EventKind::LineCrossing {
                        line: format!("line-{}", i % 3),
                        object: ObjectRef { track_id, label: "car".into(), score: 0.75, bbox: [0.1, 0.2, 0.3, 0.4] },
                        direction: if i % 2 == 0 { Direction::In } else { Direction::Out },
                        speed_kmh: Some(50.0),
                    },
                }
            })
            .collect();
        let out = outbox.append(&events, now_ms)?;
        writeln!(stdout, "committed {} {}", out.first_seq, out.last_seq)?;
        stdout.flush()?;
    }
}

/// `--path` and `--batch` (default 50), as the agent's former `debug outbox-writer` took them.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(PathBuf, usize), String> {
    let (mut path, mut batch) = (None, 50);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--path" => path = Some(PathBuf::from(value()?)),
            "--batch" => batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok((path.ok_or("--path is required")?, batch))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (path, batch) = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("usage: outbox-writer --path <outbox.db> [--batch N]: {e}");
            return ExitCode::from(2);
        }
    };
    match run_outbox_writer(&path, batch) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
