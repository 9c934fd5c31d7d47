//! `object_track` events: one when a track is confirmed (`new`), one when it ends (`end`).

use its_shared::event::{EventKind, ObjectRef, TrackPhase};

use crate::buffer::NewEvent;
use crate::pipeline::FrameResult;

/// A pixel point as normalised `[x, y]` in 0..1.
fn point([x, y]: [f32; 2], (w, h): (u32, u32)) -> [f32; 2] {
    [(x / w.max(1) as f32).clamp(0.0, 1.0), (y / h.max(1) as f32).clamp(0.0, 1.0)]
}

/// A pixel box as a normalised `[x1, y1, x2, y2]` in 0..1.
fn normalise(b: [f32; 4], size: (u32, u32)) -> [f32; 4] {
    let ([x1, y1], [x2, y2]) = (point([b[0], b[1]], size), point([b[2], b[3]], size));
    [x1, y1, x2, y2]
}

/// The events one frame's tracking produced.
pub fn track_events(r: &FrameResult) -> Vec<NewEvent> {
    let size = r.size;
    let label =
        |class_id: usize| r.manifest.label(class_id).map_or_else(|| format!("class-{class_id}"), |l| l.to_string());
    let at = |t_s: f64| r.wall_ms - ((r.t_s - t_s) * 1000.0).round() as i64;
    let mut out = Vec::with_capacity(r.started.len() + r.ended.len());
    for t in &r.started {
        out.push(NewEvent {
            camera: r.camera_id.to_string(),
            observed_at_ms: r.wall_ms,
            kind: EventKind::ObjectTrack {
                phase: TrackPhase::New,
                object: ObjectRef {
                    track_id: t.id,
                    label: label(t.class_id),
                    score: t.score,
                    bbox: normalise(t.bbox, size),
                },
                first_seen_ms: at(t.first_seen_s),
                duration_s: 0.0,
                frames: t.hits,
                path: Vec::new(),
            },
        });
    }
    for e in &r.ended {
        out.push(NewEvent {
            camera: r.camera_id.to_string(),
            observed_at_ms: at(e.last_seen_s),
            kind: EventKind::ObjectTrack {
                phase: TrackPhase::End,
                object: ObjectRef {
                    track_id: e.id,
                    label: label(e.class_id),
                    score: e.mean_score,
                    bbox: normalise(e.last_bbox, size),
                },
                first_seen_ms: at(e.first_seen_s),
                duration_s: (e.last_seen_s - e.first_seen_s).max(0.0) as f32,
                frames: e.hits,
                path: e.path.iter().map(|&p| point(p, size)).collect(),
            },
        });
    }
    out
}
