//! The shipped detector on real pictures, against boxes checked by hand on the pictures (drawn
//! with `its-agent detect --annotate` and looked at), on each backend of this build; and the
//! backends against each other.
//!
//! ONNX Runtime tests need its library (`scripts/fetch-onnxruntime`; the workspace's
//! `.cargo/config.toml` points `ORT_DYLIB_PATH` at it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use its_agent::detect::decode::iou;
use its_agent::detect::still::{RgbPicture, load_picture};
use its_agent::detect::{BackendKind, BackendOptions, Detection, Detector, ModelDetector, ModelManifest};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::load(&root().join("models/ssd-mobilenet-v2-coco/model.toml")).expect("manifest"))
}

fn detector(kind: BackendKind) -> ModelDetector {
    ModelDetector::load(manifest(), &BackendOptions { kind, threads: 2, ..BackendOptions::default() })
        .unwrap_or_else(|e| panic!("loading the {} backend: {e}", kind.as_str()))
}

fn picture(name: &str) -> RgbPicture {
    load_picture(&root().join("media").join(name), 0).expect("picture")
}

/// Hand-checked objects: label (or alternatives) and box in pixels.
struct Expected {
    labels: &'static [&'static str],
    bbox: [f32; 4],
}

/// Every expected object is found with the right label and IoU >= 0.5.
fn assert_finds(detections: &[Detection], expected: &[Expected], what: &str) {
    for e in expected {
        let best = detections
            .iter()
            .filter(|d| e.labels.contains(&&*d.label))
            .map(|d| (iou(&d.bbox, &e.bbox), d))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((v, d)) if v >= 0.5 => {
                assert!(d.score >= 0.5, "{what}: {:?} found with a low score {}", e.labels, d.score);
            }
            Some((v, d)) => panic!("{what}: best {:?} box {:?} has IoU {v:.2} with {:?}", e.labels, d.bbox, e.bbox),
            None => panic!("{what}: no {:?} among {detections:?}", e.labels),
        }
    }
}

const DOG: &[Expected] = &[
    Expected { labels: &["dog"], bbox: [130.0, 225.0, 318.0, 540.0] },
    Expected { labels: &["bicycle"], bbox: [125.0, 130.0, 565.0, 425.0] },
    // A pickup truck; COCO models call it either.
    Expected { labels: &["truck", "car"], bbox: [465.0, 80.0, 695.0, 172.0] },
];

/// Frame 0 of the street clip: three pedestrians, a parked van and a parked car.
const STREET: &[Expected] = &[
    Expected { labels: &["person"], bbox: [500.0, 158.0, 530.0, 228.0] },
    Expected { labels: &["person"], bbox: [253.0, 220.0, 281.0, 304.0] },
    Expected { labels: &["person"], bbox: [643.0, 240.0, 688.0, 320.0] },
    Expected { labels: &["car", "truck"], bbox: [645.0, 40.0, 720.0, 100.0] },
    Expected { labels: &["car", "truck"], bbox: [732.0, 50.0, 768.0, 96.0] },
];

fn check_backend(kind: BackendKind) {
    let mut d = detector(kind);
    let dog = picture("dog.jpg");
    let (found, _) = d.detect(&dog.as_picture(), 0.5).expect("detect");
    assert_finds(&found, DOG, "dog.jpg");
    assert_eq!(found.len(), 3, "nothing else in dog.jpg scores 0.5: {found:?}");

    let street = picture("vtest-street-768x576-10fps.mp4");
    let (found, _) = d.detect(&street.as_picture(), 0.5).expect("detect");
    assert_finds(&found, STREET, "street frame 0");

    let person = picture("person.jpg");
    let (found, _) = d.detect(&person.as_picture(), 0.5).expect("detect");
    assert!(found.iter().any(|d| &*d.label == "person" && d.score > 0.9), "{found:?}");
}

#[test]
fn tract_finds_the_hand_checked_objects() {
    check_backend(BackendKind::Tract);
}

#[cfg(feature = "onnxruntime")]
#[test]
fn onnxruntime_finds_the_hand_checked_objects() {
    check_backend(BackendKind::OnnxRuntime);
}

/// The same model on tract and on ONNX Runtime gives the same boxes and scores (within float
/// rounding), on photos and on decoded video frames.
#[cfg(feature = "onnxruntime")]
#[test]
fn tract_and_onnxruntime_agree() {
    let mut a = detector(BackendKind::Tract);
    let mut b = detector(BackendKind::OnnxRuntime);
    let mut compared = 0;
    for (name, frame) in [("dog.jpg", 0), ("person.jpg", 0), ("licenseplate_motion.jpg", 0)]
        .into_iter()
        .chain((0..6).map(|k| ("vtest-street-768x576-10fps.264", k * 60)))
    {
        let p = load_picture(&root().join("media").join(name), frame).expect("picture");
        let (x, _) = a.detect(&p.as_picture(), 0.3).expect("tract");
        let (y, _) = b.detect(&p.as_picture(), 0.3).expect("onnxruntime");
        // Detections near the threshold may fall on either side: compare the confident ones.
        for d in x.iter().filter(|d| d.score >= 0.35) {
            let m = y
                .iter()
                .filter(|e| e.class_id == d.class_id)
                .max_by(|p, q| iou(&p.bbox, &d.bbox).total_cmp(&iou(&q.bbox, &d.bbox)))
                .unwrap_or_else(|| panic!("{name}#{frame}: ONNX Runtime lacks {d:?}"));
            assert!(iou(&m.bbox, &d.bbox) > 0.98, "{name}#{frame}: {d:?} vs {m:?}");
            assert!((m.score - d.score).abs() < 0.01, "{name}#{frame}: {d:?} vs {m:?}");
            compared += 1;
        }
    }
    assert!(compared >= 20, "only {compared} detections compared");
}

#[test]
fn a_backend_missing_from_the_build_or_machine_is_a_clear_error() {
    // TensorRT cannot run here (no GPU, no TensorRT): with the feature it fails to load with
    // ONNX Runtime's reason; without it the error says which feature to build with.
    let cache = tempfile::tempdir().expect("tempdir");
    let opts = BackendOptions {
        kind: BackendKind::TensorRt,
        tensorrt_cache: cache.path().join("trt"),
        ..BackendOptions::default()
    };
    let r = ModelDetector::load(manifest(), &opts);
    let err = r.expect_err("no TensorRT here").to_string();
    if cfg!(feature = "tensorrt") {
        assert!(err.contains("tensorrt") || err.contains("TensorRT"), "{err}");
    } else {
        assert!(err.contains("--features tensorrt"), "{err}");
    }
}
