//! Tracking accuracy on synthetic scenes with known ground truth (see `its_agent::scene`): each
//! scene is rendered from real pictures, encoded to H.264 and run through the real pipeline
//! (decode, detection on every frame, ByteTrack); the tracks are scored with CLEAR MOT and IDF1.
//!
//!     cargo bench -p its-agent --bench tracking [-- --backend onnxruntime] [-- --save-frames DIR]

use std::path::Path;
use std::sync::Arc;

use its_agent::detect::{BackendKind, BackendOptions, Detector, ModelManifest, load_detectors};
use its_agent::pipeline::VisionSettings;
use its_agent::scene::library::{Library, scenery_boxes, score};
use its_agent::scene::run_through_pipeline;
use its_agent::track::TrackerConfig;
use its_agent::track::metrics::MotMetrics;

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
        for s in lib.scenes() {
            for i in [0, s.frames / 6, s.frames / 3, s.frames / 2] {
                s.render(i).save(Path::new(&d).join(format!("{}-{i:03}.png", s.name)))?;
            }
        }
    }
    println!("{:<10} {}", "scene", MotMetrics::TABLE_HEADER);
    let mut all = Vec::new();
    for scene in lib.scenes() {
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
        let tracks = run_through_pipeline(&scene, detectors, settings, dir.path())?;
        let mut ignore = background.clone();
        ignore.extend(scenery_boxes(&scene));
        let m = score(&scene, &tracks, &ignore);
        if arg("--dump").as_deref() == Some(scene.name) {
            for (i, frame) in tracks.iter().enumerate() {
                let gt: Vec<String> = scene
                    .truth(i)
                    .iter()
                    .map(|b| format!("{}@{:.0},{:.0}v{:.1}", b.id, b.bbox[0], b.bbox[1], b.visible))
                    .collect();
                let hy: Vec<String> = frame.iter().map(|(id, b)| format!("{id}@{:.0},{:.0}", b[0], b[1])).collect();
                println!("{i:3} gt [{}] trk [{}]", gt.join(" "), hy.join(" "));
            }
        }
        println!("{:<10} {}", scene.name, m.table_row());
        all.push(m);
    }
    Ok(())
}
