//! Crash-test helper behind the hidden `its-agent debug outbox-writer` subcommand: appends
//! synthetic events forever and reports each committed range on stdout, so a test can kill the
//! process at random points and check that every reported event survived.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use its_shared::EventKind;
use its_shared::event::{Direction, ObjectRef};

use super::{NewEvent, Outbox, OutboxConfig};

/// Appends batches of `batch` synthetic events to the outbox at `path` in a loop, printing
/// `committed <first> <last>` and flushing stdout after each append returned. Never returns
/// `Ok`; ends with an error (or by being killed).
pub fn run_outbox_writer(path: &Path, batch: usize) -> anyhow::Result<()> {
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
