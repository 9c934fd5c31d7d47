//! Traffic analytics against ground truth: each synthetic traffic scene (real vehicle pictures
//! driving at known speeds through a known calibration, see `its_agent::scene::traffic`) is
//! encoded to H.264 and run through the whole pipeline (decode, detection on every frame,
//! tracking, the scene analyzer configured from the scene's survey); counts, speeds and incidents
//! are compared with the truth (`its_agent::analyze::accuracy`). Prints the accuracy table of
//! BENCHMARKS.md.
//!
//!     cargo bench -p its-agent --bench analytics [-- --backend onnxruntime] [-- --only traffic-queue] [-- --events]

use std::path::Path;
use std::sync::Arc;

use its_agent::analyze::accuracy::{Accuracy, evaluate, run_scene, scene_config};
use its_agent::detect::{BackendKind, BackendOptions, ModelManifest, load_detectors};
use its_agent::pipeline::VisionSettings;
use its_agent::scene::library::Library;
use its_agent::track::TrackerConfig;
use its_shared::config::ConfigErrors;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let backend = BackendKind::parse(&arg("--backend").unwrap_or_else(|| "tract".into()))
        .ok_or_else(|| anyhow::anyhow!("unknown --backend"))?;
    let only = arg("--only");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = Arc::new(ModelManifest::load(&root.join("models/ssd-mobilenet-v2-coco/model.toml"))?);
    let lib = Library::load(&root.join("media"))?;
    let dir = tempfile::tempdir()?;
    let mut rows: Vec<Accuracy> = Vec::new();
    for scene in lib.traffic_scenes() {
        if only.as_deref().is_some_and(|o| o != scene.scene.name) {
            continue;
        }
        let spec = scene_config(&scene)
            .validate("scene", &[], &mut ConfigErrors::new(scene.scene.name))
            .ok_or_else(|| anyhow::anyhow!("{}: the scene's own survey does not validate", scene.scene.name))?;
        if let Some(c) = &spec.calibration {
            println!(
                "{}: calibration from {} points, reprojection {:.3} m mean / {:.3} m worst",
                scene.scene.name,
                scene.layout.calibration.len(),
                c.reprojection.mean_m,
                c.reprojection.max_m
            );
        }
        let detectors = load_detectors(
            &manifest,
            &[backend],
            &BackendOptions { kind: backend, threads: 2, ..Default::default() },
            1,
        )?;
        let settings = VisionSettings {
            tracker: TrackerConfig::for_detector_threshold(manifest.score_threshold),
            merged_classes: vec![vec![2, 5, 7]],
        };
        let t0 = std::time::Instant::now();
        let events = run_scene(&scene, spec, detectors, settings, dir.path())?;
        let acc = evaluate(&scene, &events);
        println!(
            "  {} frames in {:.1} s; counts {:?}; speed errors {:?}; incidents {:?}; false alarms {:?}",
            scene.scene.frames,
            t0.elapsed().as_secs_f64(),
            acc.counts,
            acc.speed_errors.iter().map(|e| (e * 10.0).round() / 10.0).collect::<Vec<_>>(),
            acc.incidents,
            acc.false_alarms
        );
        if args.iter().any(|a| a == "--events") {
            for (t, e) in &events {
                if e.kind.name() != "object_track" {
                    println!("    {t:7.2}  {}", serde_json::to_string(&e.kind)?);
                }
            }
        }
        rows.push(acc);
    }
    println!("\nbackend {}\n{}", backend.as_str(), Accuracy::TABLE_HEADER);
    for r in &rows {
        println!("{}", r.table_row());
    }
    let errors: Vec<f64> = rows.iter().filter(|r| r.clean).flat_map(|r| r.speed_errors.clone()).collect();
    if !errors.is_empty() {
        println!(
            "\nclean scenes: speed MAE {:.2} km/h over {} crossings, worst {:.2} km/h",
            errors.iter().sum::<f64>() / errors.len() as f64,
            errors.len(),
            errors.iter().copied().fold(0.0, f64::max)
        );
    }
    Ok(())
}
