//! Tracking accuracy floor on the synthetic footage (`its_testkit::footage`: real pictures, known
//! trajectories, encoded to H.264 and run through the real pipeline): the clean clip must be
//! tracked with no identity switch and high MOTA/IDF1; the clip with crossings must stay usable.
//! The full figures for all clips are in BENCHMARKS.md (`cargo bench -p its-agent --bench tracking`).

use std::path::Path;
use std::sync::Arc;

use its_agent::decode::Picture;
use its_agent::detect::{BackendKind, BackendOptions, Detector, ModelManifest, load_detectors};
use its_agent::pipeline::VisionSettings;
use its_agent::track::TrackerConfig;
use its_testkit::footage::library::{Library, scenery_boxes, score};
use its_testkit::footage::run_through_pipeline;

#[test]
fn synthetic_scenes_are_tracked_to_the_expected_accuracy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest =
        Arc::new(ModelManifest::load(&root.join("models/ssd-mobilenet-v2-coco/model.toml")).expect("manifest"));
    let lib = Library::load(&root.join("media")).expect("media");
    let opts = BackendOptions { kind: BackendKind::Tract, threads: 1, ..BackendOptions::default() };
    let mut probe = load_detectors(&manifest, &[BackendKind::Tract], &opts, 1).expect("detector");
    let bg = &lib.background;
    let (scenery, _) = probe[0]
        .detect(&Picture::Rgb { width: bg.width(), height: bg.height(), data: bg.as_raw() }, 0.3)
        .expect("detect");
    let dir = tempfile::tempdir().expect("tempdir");
    for (footage, min_mota, min_idf1, max_switches) in [(lib.straight(), 0.75, 0.85, 0), (lib.crossing(), 0.7, 0.6, 8)]
    {
        let detectors: Vec<Box<dyn Detector>> =
            load_detectors(&manifest, &[BackendKind::Tract], &opts, 1).expect("detector");
        let settings = VisionSettings {
            tracker: TrackerConfig::for_detector_threshold(manifest.score_threshold),
            merged_classes: vec![vec![2, 5, 7]],
        };
        let tracks = run_through_pipeline(&footage, detectors, settings, dir.path()).expect("pipeline");
        let mut ignore: Vec<[f32; 4]> = scenery.iter().map(|d| d.bbox).collect();
        ignore.extend(scenery_boxes(&footage));
        let m = score(&footage, &tracks, &ignore);
        println!(
            "{:<10} {}\n{:<10} {}",
            "scene",
            its_testkit::mot::MotMetrics::TABLE_HEADER,
            footage.name,
            m.table_row()
        );
        assert!(m.mota >= min_mota, "{}: MOTA {:.3} below {min_mota}", footage.name, m.mota);
        assert!(m.idf1 >= min_idf1, "{}: IDF1 {:.3} below {min_idf1}", footage.name, m.idf1);
        assert!(m.id_switches <= max_switches, "{}: {} identity switches", footage.name, m.id_switches);
    }
}
