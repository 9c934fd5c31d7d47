//! Configuration reload without a restart, on real cameras (the bundled street clip replayed in
//! real time, decoded, detected and tracked): adding and removing a camera and changing another
//! camera's scene leave the untouched camera streaming without a gap; an invalid configuration is
//! refused whole, with every problem and its path, and the running cameras stay as they were.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use its_agent::analyze::runner::SceneBoard;
use its_agent::config::RawConfig;
use its_agent::pipeline::FrameResult;
use its_agent::reload::{LiveVision, ReloadError};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn camera(id: &str, scene: &str) -> String {
    let clip = root().join("media/vtest-street-768x576-10fps.mp4");
    format!(
        r#"
        [[cameras]]
        id = "{id}"
        url = {clip:?}
        detect_fps = 2
        {scene}
        "#,
        clip = clip.display().to_string()
    )
}

fn document(bundle: &Path, cameras: &[String]) -> String {
    let model = root().join("models/ssd-mobilenet-v2-coco/model.toml");
    format!(
        "device_bundle = {:?}\n[detector]\nmodel = {:?}\nbackend = \"tract\"\nworkers = 1\nthreads = 1\n{}",
        bundle.display().to_string(),
        model.display().to_string(),
        cameras.join("\n")
    )
}

const LINE: &str = r#"
        [cameras.scene]
        image_size = [768, 576]
        [[cameras.scene.lines]]
        name = "kerb"
        points = [[0.0, 400.0], [768.0, 400.0]]
        in_side = "left"
"#;

#[derive(Default)]
struct Seen {
    /// Per camera: (arrival, stream time, discontinuity) of each frame result.
    frames: HashMap<String, Vec<(Instant, f64, bool)>>,
    ended: Vec<String>,
}

fn frames_after(seen: &Mutex<Seen>, camera: &str, after: Instant) -> usize {
    let s = seen.lock().expect("lock");
    s.frames.get(camera).map_or(0, |v| v.iter().filter(|(at, _, _)| *at > after).count())
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cameras_and_scenes_change_without_interrupting_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir");
    for f in ["device.pem", "device.key", "ca.pem"] {
        std::fs::write(bundle.join(f), "x").expect("write");
    }
    let path = dir.path().join("agent.toml");
    let load = |text: &str| {
        std::fs::write(&path, text).expect("write");
        RawConfig::load(Some(&path), Vec::new()).expect("parses")
    };

    let raw = load(&document(&bundle, &[camera("north", ""), camera("south", "")]));
    let cfg = raw.validate("agent.toml").expect("valid");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<FrameResult>(64);
    let board = Arc::new(SceneBoard::default());
    let mut live =
        LiveVision::start(raw, "agent.toml".into(), &cfg, board, tx, rt.handle().clone()).expect("cameras start");

    let seen = Arc::new(Mutex::new(Seen::default()));
    let collector = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            while let Some(r) = rx.blocking_recv() {
                let mut s = seen.lock().expect("lock");
                if r.end_of_stream {
                    s.ended.push(r.camera_id.to_string());
                } else {
                    s.frames.entry(r.camera_id.to_string()).or_default().push((Instant::now(), r.t_s, r.discontinuity));
                }
            }
        })
    };
    let t0 = Instant::now();
    wait_for("both cameras", || frames_after(&seen, "north", t0) >= 3 && frames_after(&seen, "south", t0) >= 3);
    let north_stats = live.pipeline().read().expect("lock").as_ref().expect("running").stats()[0].clone();

    // Add a camera, remove one, give the remaining one a count line.
    let reloaded = Instant::now();
    let report = live
        .apply(load(&document(&bundle, &[camera("north", LINE), camera("east", "")])))
        .expect("a valid change is applied");
    assert_eq!(report.added, vec!["east".to_string()]);
    assert_eq!(report.removed, vec!["south".to_string()]);
    assert_eq!(report.rescened, vec!["north".to_string()]);
    assert!(report.restarted.is_empty() && report.needs_restart.is_empty(), "{report:?}");
    wait_for("the new camera", || frames_after(&seen, "east", reloaded) >= 3);
    wait_for("north after the change", || frames_after(&seen, "north", reloaded) >= 4);
    {
        let s = seen.lock().expect("lock");
        assert_eq!(s.ended, vec!["south".to_string()], "the removed camera's tracks were ended");
        let south_last = s.frames["south"].last().map(|f| f.0).expect("south frames");
        assert!(south_last < reloaded + Duration::from_millis(500), "no frame of a removed camera afterwards");
        let north = &s.frames["north"];
        // The first frame of a stream starts its tracks (a discontinuity); none after it.
        assert!(north.iter().skip(1).all(|f| !f.2), "north never restarted its stream");
        assert!(north.windows(2).all(|w| w[1].1 > w[0].1), "north's stream time ran on");
        let gaps = north.windows(2).map(|w| w[1].0.duration_since(w[0].0)).max().expect("frames");
        assert!(gaps < Duration::from_secs(2), "north had a gap of {gaps:?} (detecting at 2 fps)");
    }
    assert_eq!(north_stats.source.reconnects.load(std::sync::atomic::Ordering::Relaxed), 0);

    // An invalid file: every problem reported, nothing changed.
    let bad = document(
        &bundle,
        &[
            camera("north", LINE),
            camera("east", "").replace("detect_fps = 2", "detect_fps = -3"),
            camera(
                "west",
                "[cameras.scene]\nimage_size = [768, 576]\n[[cameras.scene.zones]]\nname = \"z\"\npolygon = [[0.0, 0.0], [9.0, 9.0]]\n",
            ),
        ],
    );
    let before = live.pipeline().read().expect("lock").as_ref().expect("running").camera_ids();
    match live.apply(load(&bad)) {
        Err(ReloadError::Invalid(e)) => {
            let paths: Vec<&str> = e.issues.iter().map(|i| i.path.as_str()).collect();
            assert!(paths.contains(&"cameras[1].detect_fps"), "{paths:?}");
            assert!(paths.contains(&"cameras[2].scene.zones[0].polygon"), "{paths:?}");
        }
        other => panic!("an invalid configuration must be refused, got {other:?}"),
    }
    let after = live.pipeline().read().expect("lock").as_ref().expect("running").camera_ids();
    assert_eq!(before, after, "the running cameras stay");
    let refused = Instant::now();
    wait_for("north still running", || frames_after(&seen, "north", refused) >= 2);

    live.stop();
    drop(live);
    collector.join().expect("collector");
}
