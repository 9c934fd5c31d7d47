//! Counting every lane: accuracy on the four-lane footage with small far vehicles, and what the
//! detection regions cost, with the whole-frame detection (the agent's detection before regions)
//! measured side by side as the peer.
//!
//!     cargo bench -p its-agent --features onnxruntime --bench farlanes                   # everything
//!     cargo bench -p its-agent --features onnxruntime --bench farlanes -- --only accuracy
//!     cargo bench -p its-agent --features onnxruntime --bench farlanes -- --only cost --seconds 60
//!     cargo bench -p its-agent --features onnxruntime --bench farlanes -- --sizes 1280x720 --conditions clear,dusk
//!
//! Sections:
//! - `accuracy`: every "far-lanes" clip (clear, dusk, rain, heavy compression, camera shake) at
//!   1280x720 and 960x540, encoded to H.264 and run through the whole pipeline (decode,
//!   detection, tracking, scene analysis) once with the regions the agent plans by default and
//!   once with the whole frame: per lane and direction the share of true crossings counted,
//!   crossings counted that did not happen (a vehicle counted twice, at a seam or otherwise),
//!   speed errors, inferences per frame;
//! - `long`: the ten-minute run at 1280x720 through `its-agent evaluate`'s own comparison, with
//!   truth tables per 5 minutes per lane and direction;
//! - `cost`: cameras replaying the clear clip in real time at 10 fps each, with the default
//!   regions, adding cameras until one does not hold: detected frames per second, frames
//!   dropped, lag p50/p99 and its trend, inferences per frame.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use its_agent::analyze::SceneSpec;
use its_agent::detect::regions::DetectionSpec;
use its_agent::detect::{BackendKind, BackendOptions, Detector, ModelManifest, load_detectors};
use its_agent::pipeline::{CameraSpec, VisionPipeline, VisionSettings};
use its_agent::source::{FileSpec, VideoSource};
use its_agent::track::TrackerConfig;
use its_shared::config::ConfigErrors;
use its_testkit::accuracy::{default_detection, evaluate, run_recording, scene_config};
use its_testkit::footage::far::{Condition, FarClip, FarSet, SIZES};
use its_testkit::footage::library::Library;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::load(&root().join("models/ssd-mobilenet-v2-coco/model.toml")).expect("manifest"))
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn backend() -> BackendKind {
    arg("--backend")
        .and_then(|b| BackendKind::parse(&b))
        .unwrap_or_else(|| BackendKind::compiled_fastest_first().into_iter().next().unwrap_or(BackendKind::Tract))
}

fn detectors(workers: usize, threads: usize) -> Vec<Box<dyn Detector>> {
    let kind = backend();
    load_detectors(&manifest(), &[kind], &BackendOptions { kind, threads, ..Default::default() }, workers)
        .expect("detector")
}

fn settings() -> VisionSettings {
    let m = manifest();
    VisionSettings {
        tracker: TrackerConfig::for_detector_threshold(m.score_threshold),
        merged_classes: vec![vec![2, 5, 7]],
    }
}

/// The default regions, with `--min-vehicle-px` and `--max-tiles` to try others.
fn tuned(mut d: DetectionSpec) -> DetectionSpec {
    if let Some(px) = arg("--min-vehicle-px").and_then(|v| v.parse().ok()) {
        d.min_vehicle_px = px;
    }
    if let Some(n) = arg("--max-tiles").and_then(|v| v.parse().ok()) {
        d.max_tiles = n;
    }
    d
}

fn scene(clip: &FarClip) -> SceneSpec {
    scene_config(&clip.traffic).validate("scene", &[], &mut ConfigErrors::new("bench")).expect("scene")
}

fn size_name(s: (u32, u32)) -> String {
    format!("{}x{}", s.0, s.1)
}

/// The sizes asked for with `--sizes 1280x720,960x540` (all by default).
fn sizes() -> Vec<(u32, u32)> {
    let want = arg("--sizes");
    SIZES.into_iter().filter(|s| want.as_deref().is_none_or(|w| w.split(',').any(|x| x == size_name(*s)))).collect()
}

/// The conditions asked for with `--conditions clear,dusk` (all by default).
fn conditions() -> Vec<Condition> {
    let want = arg("--conditions");
    Condition::ALL.into_iter().filter(|c| want.as_deref().is_none_or(|w| w.split(',').any(|x| x == c.name()))).collect()
}

fn accuracy(lib: &Library, dir: &Path) {
    println!("\n## Counting every lane: far-lanes clips, default regions vs the whole frame ({})", backend().as_str());
    println!(
        "| size | clip | detection | crossings (true) | counted, worst lane+direction | counted, all | counted twice or not there | speed MAE km/h | worst km/h | over 5 km/h | inferences/frame | frames/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for size in sizes() {
        let set = FarSet::new(lib, size);
        for condition in conditions() {
            let clip = set.far_lanes(condition);
            let path = dir.join(format!("{}-{}.264", clip.name(), size_name(size)));
            clip.encode(&path).expect("encode");
            let spec = scene(&clip);
            let auto = tuned(default_detection(&spec));
            for (label, detection) in [("regions (default)", auto), ("whole frame", DetectionSpec::full())] {
                let run = run_recording(
                    &path,
                    clip.name(),
                    clip.traffic.footage.fps,
                    spec.clone(),
                    detection,
                    detectors(2, 1),
                    settings(),
                )
                .expect("run");
                let acc = evaluate(&clip.traffic, &run.events);
                let (true_total, counted_total) =
                    acc.counts.values().fold((0u32, 0u32), |a, &(t, d)| (a.0 + t, a.1 + d));
                let matched = true_total - acc.crossings_unmatched;
                let extra = counted_total.saturating_sub(matched);
                // Per lane and direction: the share of its true crossings counted (matched crossings
                // are not split by lane in the summary, so the count is capped at the truth).
                let worst = acc
                    .counts
                    .iter()
                    .filter(|(_, (t, _))| *t > 0)
                    .map(|((line, dir), &(t, d))| (d.min(t) as f64 / t as f64, format!("{line} {dir}")))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let over5 = acc.speed_errors.iter().filter(|&&e| e > 5.0).count();
                println!(
                    "| {} | {} | {label} | {true_total} | {} | {:.1}% | {extra} | {} | {} | {over5} | {:.2} | {:.1} |",
                    size_name(size),
                    clip.name(),
                    worst.map_or("-".into(), |(r, l)| format!("{:.1}% ({l})", r * 100.0)),
                    matched as f64 / true_total.max(1) as f64 * 100.0,
                    acc.speed_mae().map_or("-".into(), |v| format!("{v:.2}")),
                    acc.speed_max().map_or("-".into(), |v| format!("{v:.1}")),
                    run.inferences as f64 / run.frames.max(1) as f64,
                    run.frames as f64 / run.seconds.max(1e-9),
                );
            }
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One run of `cameras` cameras in real time: (detected fps per camera, dropped share, lag p50
/// ms, lag p99 ms, lag trend ms (last quarter minus first), inferences per frame, tiles).
fn realtime(path: &Path, spec: &SceneSpec, cameras: usize, seconds: f64) -> [f64; 7] {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let detection = tuned(default_detection(spec));
    let specs: Vec<CameraSpec> = (0..cameras)
        .map(|i| CameraSpec {
            id: format!("cam-{i}"),
            source: VideoSource::File(FileSpec { path: path.to_path_buf(), looped: true, realtime: true, fps: 10.0 }),
            detect_fps: 10.0,
            queue_frames: 2,
            detection: detection.clone(),
        })
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    // One detector worker per core, one thread each (the agent's default on this machine).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let p = VisionPipeline::start(specs, detectors(cores.min(cameras).max(1), 1), settings(), tx, rt.handle().clone())
        .expect("pipeline");
    let warmup = Duration::from_secs(5);
    let start = Instant::now();
    let mut lags: Vec<(f64, f64)> = Vec::new();
    let (mut frames, mut inferences) = (0u64, 0u64);
    while start.elapsed() < warmup + Duration::from_secs_f64(seconds) {
        let Some(r) = rx.blocking_recv() else { break };
        let at = start.elapsed();
        if at >= warmup && !r.end_of_stream {
            lags.push(((at - warmup).as_secs_f64(), r.lag.as_secs_f64() * 1000.0));
            frames += 1;
            inferences += u64::from(r.inferences);
        }
    }
    let dropped: u64 = (0..cameras).map(|i| p.frames_dropped(i)).sum();
    let decoded: u64 = p.stats().iter().map(|s| s.frames_decoded.load(Ordering::Relaxed)).sum();
    let tiles = p.stats().first().map_or(0, |s| s.detection_tiles.load(Ordering::Relaxed));
    p.stop();
    let quarter = |from: f64, to: f64| {
        let v: Vec<f64> = lags.iter().filter(|(t, _)| *t >= from && *t < to).map(|l| l.1).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let trend = quarter(seconds * 0.75, seconds + 1.0) - quarter(0.0, seconds * 0.25);
    let mut all: Vec<f64> = lags.iter().map(|l| l.1).collect();
    [
        frames as f64 / seconds / cameras as f64,
        dropped as f64 / decoded.max(1) as f64,
        percentile(&mut all, 0.5),
        percentile(&mut all, 0.99),
        trend,
        inferences as f64 / frames.max(1) as f64,
        tiles as f64,
    ]
}

fn cost(lib: &Library, dir: &Path) {
    let seconds: f64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(60.0);
    println!(
        "\n## Cost: cameras at 10 fps in real time, default regions, {} ({seconds:.0} s each after 5 s warm-up)",
        backend().as_str()
    );
    println!(
        "| size | cameras | tiles | inferences/frame | detected fps per camera | frames dropped | lag p50 ms | lag p99 ms | lag trend ms | holds |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for size in sizes() {
        let set = FarSet::new(lib, size);
        let clip = set.far_lanes(Condition::Clear);
        let path = dir.join(format!("cost-{}.264", size_name(size)));
        clip.encode(&path).expect("encode");
        let spec = scene(&clip);
        let mut most = 0;
        for cameras in 1..=8 {
            let [fps, dropped, p50, p99, trend, inf, tiles] = realtime(&path, &spec, cameras, seconds);
            // Holds: every frame detected within 1%, and the lag not growing.
            let holds = fps >= 9.9 * 0.99 && dropped <= 0.01 && trend < 50.0;
            println!(
                "| {} | {cameras} | {tiles:.0} | {inf:.2} | {fps:.2} | {:.2}% | {p50:.0} | {p99:.0} | {trend:+.0} | {} |",
                size_name(size),
                dropped * 100.0,
                if holds { "yes" } else { "no" }
            );
            if holds {
                most = cameras;
            } else {
                break;
            }
        }
        println!("most cameras held at {}: {most}", size_name(size));
    }
}

fn main() {
    let only = arg("--only");
    let want = |s: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == s));
    let lib = Library::load(&root().join("media")).expect("media");
    let dir = tempfile::tempdir().expect("tempdir");
    if want("accuracy") {
        accuracy(&lib, dir.path());
    }
    if want("cost") {
        cost(&lib, dir.path());
    }
}
