//! `its-agent evaluate`, the acceptance test, as a site engineer runs it: the clean free-flow
//! traffic clip of `its_testkit::footage` (real vehicle pictures at known speeds through a known
//! calibration) encoded to a `.264` recording, its scene written as the agent's TOML, and truth
//! files written from the clip's ground truth as a person would fill them in (counts per interval,
//! line, direction; test passes with their speeds). The built program must pass the exact truth,
//! fail a count sheet that is off by 3 in one interval (naming that interval), and refuse a
//! malformed one with every problem at `file:line`, without running anything.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use its_testkit::accuracy::{scene_config, scene_toml};
use its_testkit::bins::agent_bin;
use its_testkit::footage::encode_footage;
use its_testkit::footage::far::passes_csv;
use its_testkit::footage::library::Library;
use its_testkit::footage::traffic::TrafficFootage;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model() -> PathBuf {
    root().join("models/ssd-mobilenet-v2-coco/model.toml")
}

/// Three intervals' boundaries (seconds): near thirds of the clip, each in the widest gap
/// between true crossings there, so a crossing measured a frame or two early or late stays in its
/// interval.
fn boundaries(footage: &TrafficFootage) -> Vec<f64> {
    let end = (footage.footage.frames as f64 / footage.footage.fps).ceil();
    let gap = |t: f64| footage.truth.crossings.iter().map(|c| (c.t_s - t).abs()).fold(f64::MAX, f64::min);
    let mut cuts = vec![0.0];
    for k in 1..3 {
        let want = end * f64::from(k) / 3.0;
        let best =
            (0..100).map(|d| (want - 5.0 + f64::from(d) / 10.0).max(1.0)).max_by(|a, b| gap(*a).total_cmp(&gap(*b)));
        cuts.extend(best.filter(|t| gap(*t) >= 0.5));
    }
    cuts.push(end);
    cuts
}

/// The count sheet: every vehicle (`*`) per interval, line and direction, as a person fills it in.
fn counts_csv(footage: &TrafficFootage, cuts: &[f64]) -> String {
    let mut s = String::from("# count sheet\nstart,end,line,direction,class,count\n");
    for w in cuts.windows(2) {
        for line in &footage.layout.lines {
            for dir in ["in", "out"] {
                let n = footage
                    .truth
                    .crossings
                    .iter()
                    .filter(|c| c.line == line.name && c.direction == dir && c.t_s >= w[0] && c.t_s < w[1])
                    .count();
                let _ = writeln!(s, "{:.1},{:.1},{},{dir},*,{n}", w[0], w[1], line.name);
            }
        }
    }
    s
}

/// The count sheet's data rows as (start seconds, line, direction, count).
fn sheet_rows(csv: &str) -> Vec<(f64, String, String, u32)> {
    csv.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("start,"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let start = f[0].parse::<f64>().expect("seconds");
            (start, f[2].to_string(), f[3].to_string(), f[5].parse().expect("count"))
        })
        .collect()
}

/// The sheet with `add` more counted in data row `row`.
fn adjusted(csv: &str, row: usize, add: u32) -> String {
    let mut out = String::new();
    let mut data = 0;
    for l in csv.lines() {
        if l.starts_with('#') || l.starts_with("start,") {
            let _ = writeln!(out, "{l}");
            continue;
        }
        if data == row {
            let (head, count) = l.rsplit_once(',').expect("fields");
            let _ = writeln!(out, "{head},{}", count.parse::<u32>().expect("count") + add);
        } else {
            let _ = writeln!(out, "{l}");
        }
        data += 1;
    }
    out
}

fn evaluate(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .arg("evaluate")
        .args(args)
        .env_remove("ITS_AGENT_CONFIG")
        .output()
        .expect("its-agent runs")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("JSON written")).expect("JSON parses")
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_recording_passes_with_its_true_counts_and_fails_a_sheet_off_by_three() {
    let lib = Library::load(&root().join("media")).expect("media");
    let footage = lib.traffic_free_flow();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let recording = d.join("free-flow.264");
    encode_footage(&footage.footage, &recording, 26, 30).expect("encode");
    let scene = scene_toml(&scene_config(&footage));
    // The same scene as a file of its own (`--scene`): its tables without the camera's prefix.
    let standalone = scene.replace("[cameras.scene]\n", "").replace("cameras.scene.", "");
    std::fs::write(d.join("scene.toml"), &standalone).expect("write");
    let config = format!(
        "[detector]\nmodel = {:?}\n\n[[cameras]]\nid = \"road-1\"\nurl = {:?}\ndetect_fps = 0\nfile_fps = {}\n\n{scene}",
        model().display().to_string(),
        recording.display().to_string(),
        footage.footage.fps
    );
    std::fs::write(d.join("agent.toml"), config).expect("write");
    // The truth as a person would write it (test passes: the kit's writer).
    let cuts = boundaries(&footage);
    assert_eq!(cuts.len(), 4, "three intervals: {cuts:?}");
    let good = counts_csv(&footage, &cuts);
    std::fs::write(d.join("counts.csv"), &good).expect("write");
    std::fs::write(d.join("passes.csv"), passes_csv(&footage)).expect("write");
    let rows = sheet_rows(&good);
    assert!(rows.len() >= 3 * 2 * footage.layout.lines.len(), "three intervals or more: {good}");
    let total: u32 = rows.iter().map(|r| r.3).sum();
    assert_eq!(total as usize, footage.truth.crossings.len());
    assert!(total >= 10, "{total} crossings");

    let p = |name: &str| d.join(name).display().to_string();
    let out = evaluate(&[
        &p("free-flow.264"),
        "--config",
        &p("agent.toml"),
        "--camera",
        "road-1",
        "--truth",
        &p("counts.csv"),
        "--passes",
        &p("passes.csv"),
        "--json",
        &p("good.json"),
        "--csv",
        &p("good.csv"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Verdict: PASS"), "{stdout}");
    let j = json(&d.join("good.json"));
    let s = &j["summary"];
    assert_eq!(s["verdict"], "PASS", "{s}");
    assert!(s["accuracy"].as_f64().expect("accuracy") >= 0.95, "{s}");
    assert_eq!(s["truth"], u64::from(total), "{s}");
    let measured = s["measured"].as_u64().expect("measured");
    assert!(measured.abs_diff(u64::from(total)) <= 1, "{s}");
    assert_eq!(j["intervals"].as_array().expect("rows").len(), rows.len());
    let lines = footage.layout.lines.len();
    assert_eq!(j["totals"].as_array().expect("totals").len(), lines * 2, "per line and direction");
    let frames = footage.footage.frames as u64;
    assert_eq!(s["frames_decoded"], frames, "every frame decoded: {s}");
    assert_eq!(s["frames_detected"], frames, "every frame detected (detect_fps = 0): {s}");
    assert_eq!(j["recording"]["frames_dropped"], 0);
    assert!(j["recording"]["frames_per_s"].as_f64().expect("speed") > 0.0);
    assert_eq!(j["detection"]["detect_fps"], 0.0);
    assert_eq!(j["scene"]["calibrated"], true);
    let speed = &s["speed"];
    assert_eq!(speed["passes"], footage.truth.crossings.len(), "{speed}");
    assert_eq!(speed["missed"], 0, "{speed}");
    assert!(speed["max_error_kmh"].as_f64().expect("max") <= 5.0, "{speed}");
    let csv = std::fs::read_to_string(d.join("good.csv")).expect("CSV written");
    assert_eq!(csv.lines().count(), rows.len() + 1, "{csv}");
    assert!(csv.starts_with("start,end,line,direction,class,truth,measured,error,error_pct\n"), "{csv}");

    // The same sheet with 3 more in one interval where the agent did not over-count: that row is
    // 3 further off, and the whole fails.
    let e0 = s["abs_error"].as_u64().expect("abs_error") as u32;
    assert!(20 * (e0 + 3) > total + 3, "3 more wrong must take the sheet below 95 %: {e0} wrong of {total}");
    let intervals = j["intervals"].as_array().expect("rows").clone();
    let (k, before) = intervals
        .iter()
        .enumerate()
        .find(|(_, r)| r["truth"].as_u64().is_some_and(|t| t > 0) && r["error"].as_i64().is_some_and(|e| e <= 0))
        .map(|(k, r)| (k, r.clone()))
        .expect("a counted row not over-counted");
    let sheet_row = rows
        .iter()
        .position(|r| {
            Some(r.0) == before["start_s"].as_f64()
                && before["line"] == r.1.as_str()
                && before["direction"] == r.2.as_str()
        })
        .expect("the row in the sheet");
    std::fs::write(d.join("off.csv"), adjusted(&good, sheet_row, 3)).expect("write");
    // With --scene instead of --camera: the scene from its own file, the detector from the
    // configuration, the frame rate from the command line.
    let out = evaluate(&[
        &p("free-flow.264"),
        "--config",
        &p("agent.toml"),
        "--scene",
        &p("scene.toml"),
        "--fps",
        "10",
        "--truth",
        &p("off.csv"),
        "--json",
        &p("off.json"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Verdict: FAIL"), "{stdout}");
    assert!(stdout.contains("count accuracy"), "{stdout}");
    let o = json(&d.join("off.json"));
    let after = o["intervals"][k].clone();
    assert_eq!(after["start"], before["start"]);
    assert_eq!(after["line"], before["line"]);
    assert_eq!(after["direction"], before["direction"]);
    assert_eq!(after["truth"].as_u64(), before["truth"].as_u64().map(|t| t + 3));
    assert_eq!(after["measured"], before["measured"], "the same recording measures the same");
    assert_eq!(after["error"].as_i64(), before["error"].as_i64().map(|e| e - 3), "{after}");
    let (start, line, err) = (
        after["start"].as_str().expect("start"),
        after["line"].as_str().expect("line"),
        after["error"].as_i64().expect("error"),
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(&format!("{start}-")) && l.contains(line) && l.contains(&format!(" {err:+} "))),
        "the table shows the interval's error {err:+}: {stdout}"
    );
    assert_eq!(o["summary"]["verdict"], "FAIL");
    assert_eq!(o["summary"]["abs_error"].as_u64(), s["abs_error"].as_u64().map(|e| e + 3));
    assert_eq!(o["scene"]["source"], p("scene.toml"));
    assert!(o["summary"]["accuracy"].as_f64().expect("accuracy") < 0.95);
}

#[test]
fn malformed_truth_files_are_refused_with_every_problem_at_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let p = |name: &str| d.join(name).display().to_string();
    // Nothing is run: the recording only has to exist.
    std::fs::write(d.join("rec.264"), b"\x00\x00\x00\x01").expect("write");
    std::fs::write(
        d.join("scene.toml"),
        "image_size = [640, 480]\n[[lines]]\nname = \"east\"\npoints = [[100.0, 200.0], [500.0, 220.0]]\nin_side = \"left\"\n",
    )
    .expect("write");
    std::fs::write(d.join("agent.toml"), format!("[detector]\nmodel = {:?}\n", model().display().to_string()))
        .expect("write");
    std::fs::write(
        d.join("counts.csv"),
        "start,end,line,direction,class,count\n\
         0:00,15:00,east,in,car,4\n\
         15:00,14:00,east,in,car,4\n\
         0:00,15:00,west,in,car,4\n\
         0:00,15:00,east,sideways,car,4\n\
         0:00,15:00,east,out,tram,4\n\
         0:00,15:00,east,out,car,-1\n\
         5:00,20:00,east,in,*,4\n\
         0:00,15:xx,east,in,car,4\n",
    )
    .expect("write");
    std::fs::write(d.join("passes.csv"), "time,line,direction,speed_kmh\n0:10,east,in,fast\n").expect("write");
    let out = evaluate(&[
        &p("rec.264"),
        "--config",
        &p("agent.toml"),
        "--scene",
        &p("scene.toml"),
        "--truth",
        &p("counts.csv"),
        "--passes",
        &p("passes.csv"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let c = p("counts.csv");
    for want in [
        format!("{c}:3: end 0:14:00 is not after start 0:15:00"),
        format!("{c}:4: line \"west\" is not a count line of the scene (its lines: east)"),
        format!("{c}:5: direction \"sideways\" is not `in` or `out`"),
        format!("{c}:6: class \"tram\" is not one of"),
        format!("{c}:7: count -1 is negative"),
        format!("{c}:8: overlaps line 2"),
        format!("{c}:9: end \"15:xx\" is not a time"),
        format!("{}:2: speed_kmh \"fast\"", p("passes.csv")),
    ] {
        assert!(err.contains(&want), "missing {want:?} in\n{}", show(&out));
    }
    assert!(out.stdout.is_empty(), "no report: {}", show(&out));

    // A scene without the line, a missing recording: refused before anything runs, also exit 2.
    let out = evaluate(&[
        &p("missing.264"),
        "--config",
        &p("agent.toml"),
        "--scene",
        &p("scene.toml"),
        "--truth",
        &p("counts.csv"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.264 is not a readable file"), "{}", show(&out));
    let out = evaluate(&[&p("rec.264"), "--config", &p("agent.toml"), "--camera", "nope", "--truth", &p("counts.csv")]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no camera \"nope\""), "{}", show(&out));
}
