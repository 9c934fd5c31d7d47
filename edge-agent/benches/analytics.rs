//! Traffic analytics against ground truth: each synthetic traffic clip (real vehicle pictures
//! driving at known speeds through a known calibration, see `its_testkit::footage::traffic`) is
//! encoded to H.264 and run through the whole pipeline (decode, detection on every frame,
//! tracking, the scene analyzer configured from the clip's survey); counts, speeds and incidents
//! are compared with the truth (`its_testkit::accuracy`). Prints the accuracy table of
//! BENCHMARKS.md.
//!
//!     cargo bench -p its-agent --bench analytics [-- --backend onnxruntime] [-- --only traffic-queue] [-- --events]

use std::path::Path;
use std::sync::Arc;

use its_agent::detect::{BackendKind, BackendOptions, ModelManifest, load_detectors};
use its_agent::pipeline::VisionSettings;
use its_agent::track::TrackerConfig;
use its_shared::config::ConfigErrors;
use its_testkit::accuracy::{Accuracy, evaluate, run_footage, scene_config};
use its_testkit::footage::library::Library;

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
    for footage in lib.traffic_footage() {
        if only.as_deref().is_some_and(|o| o != footage.footage.name) {
            continue;
        }
        let spec = scene_config(&footage)
            .validate("scene", &[], &mut ConfigErrors::new(footage.footage.name))
            .ok_or_else(|| anyhow::anyhow!("{}: the clip's own survey does not validate", footage.footage.name))?;
        if let Some(c) = &spec.calibration {
            println!(
                "{}: calibration from {} points, reprojection {:.3} m mean / {:.3} m worst",
                footage.footage.name,
                footage.layout.calibration.len(),
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
        let events = run_footage(&footage, spec, detectors, settings, dir.path())?;
        let acc = evaluate(&footage, &events);
        println!(
            "  {} frames in {:.1} s; counts {:?}; speed errors {:?}; incidents {:?}; false alarms {:?}",
            footage.footage.frames,
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
