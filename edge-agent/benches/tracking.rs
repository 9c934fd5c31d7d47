//! Tracking accuracy on synthetic footage with known ground truth (see `its_testkit::footage`):
//! each clip is rendered from real pictures, encoded to H.264 and run through the real pipeline
//! (decode, detection on every frame, ByteTrack); the tracks are scored with CLEAR MOT and IDF1.
//!
//!     cargo bench -p its-agent --bench tracking [-- --backend onnxruntime] [-- --save-frames DIR]

use std::path::Path;
use std::sync::Arc;

use its_agent::detect::{BackendKind, BackendOptions, Detector, ModelManifest, load_detectors};
use its_agent::pipeline::VisionSettings;
use its_agent::track::TrackerConfig;
use its_testkit::footage::library::{Library, scenery_boxes, score};
use its_testkit::footage::run_through_pipeline;
use its_testkit::mot::MotMetrics;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let backend = BackendKind::parse(&arg("--backend").unwrap_or_else(|| "tract".into()))
        .ok_or_else(|| anyhow::anyhow!("unknown --backend"))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = Arc::new(ModelManifest::load(&root.join("models/ssd-mobilenet-v2-coco/model.toml"))?);
    let lib = Library::load(&root.join("media"))?;
    let dir = tempfile::tempdir()?;
    // Parked vehicles in the background are scenery: find them once on the empty street.
    let mut probe =
        load_detectors(&manifest, &[backend], &BackendOptions { kind: backend, threads: 2, ..Default::default() }, 1)?;
    let bg = &lib.background;
    let (bg_dets, _) = probe[0]
        .detect(&its_agent::decode::Picture::Rgb { width: bg.width(), height: bg.height(), data: bg.as_raw() }, 0.3)?;
    let background: Vec<[f32; 4]> = bg_dets.iter().map(|d| d.bbox).collect();
    println!("background scenery: {} boxes", background.len());
    if let Some(d) = arg("--save-frames") {
        std::fs::create_dir_all(&d)?;
        for s in lib.tracking_footage() {
            for i in [0, s.frames / 6, s.frames / 3, s.frames / 2] {
                s.render(i).save(Path::new(&d).join(format!("{}-{i:03}.png", s.name)))?;
            }
        }
    }
    println!("{:<10} {}", "scene", MotMetrics::TABLE_HEADER);
    let mut all = Vec::new();
    for footage in lib.tracking_footage() {
        let detectors: Vec<Box<dyn Detector>> = load_detectors(
            &manifest,
            &[backend],
            &BackendOptions { kind: backend, threads: 1, ..Default::default() },
            1,
        )?;
        let mut tracker = TrackerConfig::for_detector_threshold(manifest.score_threshold);
        let num = |name: &str| arg(name).and_then(|v| v.parse::<f32>().ok());
        if let Some(v) = num("--high") {
            tracker.high_score = v;
        }
        if let Some(v) = num("--new-track") {
            tracker.new_track_score = v;
        }
        if let Some(v) = num("--min-hits") {
            tracker.min_hits = v as u32;
        }
        if let Some(v) = num("--max-lost") {
            tracker.max_lost_s = v;
        }
        if let Some(v) = num("--match-iou") {
            tracker.match_iou = v;
        }
        let settings = VisionSettings { tracker, merged_classes: vec![vec![2, 5, 7]] };
        let tracks = run_through_pipeline(&footage, detectors, settings, dir.path())?;
        let mut ignore = background.clone();
        ignore.extend(scenery_boxes(&footage));
        let m = score(&footage, &tracks, &ignore);
        if arg("--dump").as_deref() == Some(footage.name) {
            for (i, frame) in tracks.iter().enumerate() {
                let gt: Vec<String> = footage
                    .truth(i)
                    .iter()
                    .map(|b| format!("{}@{:.0},{:.0}v{:.1}", b.id, b.bbox[0], b.bbox[1], b.visible))
                    .collect();
                let hy: Vec<String> = frame.iter().map(|(id, b)| format!("{id}@{:.0},{:.0}", b[0], b[1])).collect();
                println!("{i:3} gt [{}] trk [{}]", gt.join(" "), hy.join(" "));
            }
        }
        println!("{:<10} {}", footage.name, m.table_row());
        all.push(m);
    }
    real_clip(&manifest, backend)?;
    Ok(())
}

/// The real street clip has no ground truth; the number of person tracks and their durations
/// show how much tracks fragment (fewer, longer tracks for the same people is better).
fn real_clip(manifest: &Arc<ModelManifest>, backend: BackendKind) -> anyhow::Result<()> {
    use its_agent::pipeline::{CameraSpec, VisionPipeline};
    use its_agent::source::{FileSpec, VideoSource};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    println!("\nreal street clip (79.5 s, no ground truth): person tracks, every frame detected");
    println!("{:<34} {:>7} {:>10} {:>16}", "tracker", "tracks", "under 2 s", "median length s");
    let agent = TrackerConfig::for_detector_threshold(manifest.score_threshold);
    let bytetrack = TrackerConfig { high_score: 0.5, new_track_score: 0.6, match_iou: 0.2, ..agent };
    for (name, tracker) in [("agent (0.4 / 0.5 / IoU 0.1)", agent), ("ByteTrack's (0.5 / 0.6 / IoU 0.2)", bytetrack)] {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let opts = BackendOptions { kind: backend, threads: 2, ..Default::default() };
        let detectors = load_detectors(manifest, &[backend], &opts, 1)?;
        let camera = CameraSpec {
            id: "street".into(),
            source: VideoSource::File(FileSpec {
                path: root.join("media/vtest-street-768x576-10fps.mp4"),
                looped: false,
                realtime: false,
                fps: 10.0,
            }),
            detect_fps: 0.0,
            queue_frames: 2,
            detection: its_agent::detect::regions::DetectionSpec::full(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let settings = VisionSettings { tracker, merged_classes: vec![vec![2, 5, 7]] };
        let p = VisionPipeline::start(vec![camera], detectors, settings, tx, rt.handle().clone())?;
        let mut lengths = Vec::new();
        while let Some(r) = rx.blocking_recv() {
            for e in &r.ended {
                if manifest.label(e.class_id).map(|l| &**l) == Some("person") {
                    lengths.push(e.last_seen_s - e.first_seen_s);
                }
            }
        }
        p.join();
        lengths.sort_by(f64::total_cmp);
        let short = lengths.iter().filter(|d| **d < 2.0).count();
        let median = lengths.get(lengths.len() / 2).copied().unwrap_or(0.0);
        println!("{name:<34} {:>7} {short:>10} {median:>16.1}", lengths.len());
    }
    Ok(())
}
