//! Vision pipeline benchmark on the real street clip (768x576, 10 fps) and the shipped model.
//!
//!     cargo bench -p its-agent --features onnxruntime --bench pipeline            # everything
//!     cargo bench -p its-agent --features onnxruntime --bench pipeline -- --only latency,stages,realtime,rss,floor
//!
//! Sections:
//! - `latency`: detector latency (pre-processing, inference, post-processing) of tract and of
//!   ONNX Runtime on the same 60 decoded frames, 1 and 2 threads, side by side, as ratios;
//! - `stages`: per-stage time per frame through the whole pipeline (decode, pre-process,
//!   inference, post-process, tracking) and frames per second per CPU core (CPU time measured);
//! - `realtime`: two cameras at 10 fps each in real time for `--seconds` (default 60): detected
//!   frames per second, frames dropped, and lag from a frame's arrival to its tracks, with the
//!   lag's trend (first vs last quarter) to show it does not grow;
//! - `rss`: peak resident memory of the whole process with 1 and with 4 cameras (real time);
//! - `floor`: the model's multiply-adds over this CPU's measured peak multiply-add rate.

#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use its_agent::decode::decode_recording;
use its_agent::decode::{Frame, Picture};
use its_agent::detect::{BackendKind, BackendOptions, Detector, ModelDetector, ModelManifest, load_detectors};
use its_agent::pipeline::{CameraSpec, FrameResult, VisionPipeline, VisionSettings};
use its_agent::source::{FileSpec, VideoSource};
use its_agent::track::TrackerConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn clip() -> PathBuf {
    root().join("media/vtest-street-768x576-10fps.mp4")
}

fn manifest() -> Arc<ModelManifest> {
    Arc::new(ModelManifest::load(&root().join("models/ssd-mobilenet-v2-coco/model.toml")).expect("manifest"))
}

fn backends() -> Vec<BackendKind> {
    let mut v = vec![BackendKind::Tract];
    if cfg!(feature = "onnxruntime") {
        v.push(BackendKind::OnnxRuntime);
    }
    v
}

/// The backend of the real-time and memory sections: `--backend`, else the fastest in the build.
fn chosen_backend() -> Option<BackendKind> {
    let args: Vec<String> = std::env::args().collect();
    let named =
        args.iter().position(|a| a == "--backend").and_then(|i| args.get(i + 1)).and_then(|b| BackendKind::parse(b));
    named.or_else(|| backends().last().copied())
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn decode_frames(n: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    decode_recording(&clip(), 10.0, |f, _| {
        out.push(f);
        out.len() < n
    })
    .expect("clip");
    out
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency() {
    println!("\n## Detector latency, same model and frames (60 frames of the street clip, after 5 warm-up)");
    let frames = decode_frames(65);
    println!("| backend | threads | pre-process ms | inference ms (mean) | p50 | p95 | post-process ms | total ms |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut means = Vec::new();
    for kind in backends() {
        for threads in [1, 2] {
            let mut d = ModelDetector::load(manifest(), &BackendOptions { kind, threads, ..BackendOptions::default() })
                .expect("detector");
            let (mut pre, mut inf, mut post) = (Vec::new(), Vec::new(), Vec::new());
            for (i, f) in frames.iter().enumerate() {
                let (_, t) = d.detect(&Picture::I420(f), 0.1).expect("detect");
                if i >= 5 {
                    pre.push(ms(t.preprocess));
                    inf.push(ms(t.inference));
                    post.push(ms(t.postprocess));
                }
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (mp, mi, mo) = (mean(&pre), mean(&inf), mean(&post));
            println!(
                "| {} | {threads} | {mp:.2} | {mi:.1} | {:.1} | {:.1} | {mo:.2} | {:.1} |",
                kind.as_str(),
                percentile(&mut inf.clone(), 0.5),
                percentile(&mut inf.clone(), 0.95),
                mp + mi + mo
            );
            means.push((kind, threads, mi));
        }
    }
    for threads in [1, 2] {
        let get = |k: BackendKind| means.iter().find(|m| m.0 == k && m.1 == threads).map(|m| m.2);
        if let (Some(t), Some(o)) = (get(BackendKind::Tract), get(BackendKind::OnnxRuntime)) {
            println!("ratio tract / onnxruntime inference, {threads} thread(s): {:.2}x", t / o);
        }
    }
}

fn camera(id: &str, realtime: bool, looped: bool, detect_fps: f64) -> CameraSpec {
    CameraSpec {
        id: id.into(),
        source: VideoSource::File(FileSpec { path: clip(), looped, realtime, fps: 10.0 }),
        detect_fps,
        queue_frames: 2,
        detection: its_agent::detect::regions::DetectionSpec::full(),
    }
}

fn settings() -> VisionSettings {
    VisionSettings {
        tracker: TrackerConfig::for_detector_threshold(manifest().score_threshold),
        merged_classes: vec![vec![2, 5, 7]],
    }
}

fn start(
    cams: Vec<CameraSpec>,
    kind: BackendKind,
    workers: usize,
    threads: usize,
) -> (tokio::runtime::Runtime, VisionPipeline, tokio::sync::mpsc::Receiver<FrameResult>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let detectors: Vec<Box<dyn Detector>> =
        load_detectors(&manifest(), &[kind], &BackendOptions { kind, threads, ..BackendOptions::default() }, workers)
            .expect("detectors");
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let p = VisionPipeline::start(cams, detectors, settings(), tx, rt.handle().clone()).expect("pipeline");
    (rt, p, rx)
}

fn stages() {
    println!("\n## Per-stage time per frame and throughput (whole clip, 795 frames, detection on every frame)");
    println!(
        "| backend | workers x threads | decode ms | pre-process ms | inference ms | post-process ms | tracking ms | non-inference share | frames/s | CPU cores used | frames/s per core |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for kind in backends() {
        for (workers, threads) in [(1, 1), (2, 1)] {
            // Two cameras on the same clip so two workers have work.
            let cams: Vec<CameraSpec> = (0..workers).map(|i| camera(&format!("c{i}"), false, false, 0.0)).collect();
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let (_rt, p, mut rx) = start(cams, kind, workers, threads);
            let mut n = 0u64;
            while let Some(r) = rx.blocking_recv() {
                if !r.end_of_stream {
                    n += 1;
                }
            }
            let stats = p.stats();
            p.join();
            let wall = t0.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu0;
            let sum = |f: &dyn Fn(&its_agent::pipeline::CameraStats) -> u64| -> f64 {
                stats.iter().map(|s| f(s) as f64).sum::<f64>() / 1000.0 / n.max(1) as f64
            };
            let decoded: u64 = stats.iter().map(|s| s.frames_decoded.load(Ordering::Relaxed)).sum();
            let decode = stats.iter().map(|s| s.decode_us_total.load(Ordering::Relaxed) as f64).sum::<f64>()
                / 1000.0
                / decoded.max(1) as f64;
            let pre = sum(&|s| s.preprocess_us_total.load(Ordering::Relaxed));
            let inf = sum(&|s| s.inference_us_total.load(Ordering::Relaxed));
            let post = sum(&|s| s.postprocess_us_total.load(Ordering::Relaxed));
            let trk = sum(&|s| s.track_us_total.load(Ordering::Relaxed));
            let other = decode + pre + post + trk;
            println!(
                "| {} | {workers} x {threads} | {decode:.2} | {pre:.2} | {inf:.1} | {post:.2} | {trk:.3} | {:.1}% | {:.1} | {:.2} | {:.1} |",
                kind.as_str(),
                100.0 * other / (other + inf),
                n as f64 / wall,
                cpu / wall,
                n as f64 / cpu
            );
        }
    }
}

fn realtime(seconds: u64) {
    let Some(kind) = chosen_backend() else { return };
    println!(
        "\n## Real time: 2 cameras x 10 fps (street clip, looped), detection at 10 fps each, {} with 2 workers x 1 thread, {seconds} s",
        kind.as_str()
    );
    let cams = vec![camera("a", true, true, 10.0), camera("b", true, true, 10.0)];
    let (_rt, p, mut rx) = start(cams, kind, 2, 1);
    let warmup = Duration::from_secs(5);
    let t0 = Instant::now();
    let mut lags: Vec<(f64, f64)> = Vec::new();
    let mut counted = 0u64;
    let mut dropped0 = None;
    while t0.elapsed() < warmup + Duration::from_secs(seconds) {
        let Some(r) = rx.blocking_recv() else { break };
        if t0.elapsed() < warmup {
            continue;
        }
        let drops = || (0..2).map(|i| p.frames_dropped(i)).sum::<u64>();
        dropped0.get_or_insert_with(drops);
        counted += 1;
        lags.push((t0.elapsed().as_secs_f64(), ms(r.lag)));
    }
    let dropped = (0..2).map(|i| p.frames_dropped(i)).sum::<u64>() - dropped0.unwrap_or(0);
    let decoded: u64 = p.stats().iter().map(|s| s.frames_decoded.load(Ordering::Relaxed)).sum();
    p.stop();
    let mut all: Vec<f64> = lags.iter().map(|l| l.1).collect();
    let q = lags.len() / 4;
    let mean = |v: &[(f64, f64)]| v.iter().map(|l| l.1).sum::<f64>() / v.len().max(1) as f64;
    println!(
        "| detected frames/s (total) | frames dropped | lag p50 ms | lag p99 ms | lag max ms | lag mean, first quarter | lag mean, last quarter |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {:.1} | {dropped} of {decoded} decoded | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        counted as f64 / seconds as f64,
        percentile(&mut all, 0.5),
        percentile(&mut all, 0.99),
        all.iter().copied().fold(0.0, f64::max),
        mean(&lags[..q]),
        mean(&lags[lags.len() - q..])
    );
}

fn rss_child(cameras: usize, seconds: u64) {
    let Some(kind) = chosen_backend() else { return };
    let cams: Vec<CameraSpec> = (0..cameras).map(|i| camera(&format!("c{i}"), true, true, 10.0)).collect();
    // Two workers (two model sessions) whatever the number of cameras, so the difference
    // between 1 and 4 cameras is what the cameras themselves cost.
    let (_rt, p, mut rx) = start(cams, kind, 2, 1);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(seconds) {
        if rx.blocking_recv().is_none() {
            break;
        }
        n += 1;
    }
    let dropped: u64 = (0..cameras).map(|i| p.frames_dropped(i)).sum();
    p.stop();
    println!("rss {cameras} {:.1} {n} {dropped} {}", peak_rss_mib(), kind.as_str());
}

fn rss(seconds: u64) {
    println!("\n## Peak resident memory (whole process), cameras in real time at 10 fps, {seconds} s each");
    println!("two detector workers (model sessions) in both runs");
    println!("| cameras | backend | peak RSS MiB | frames detected | frames dropped (load) |");
    println!("|---|---|---|---|---|");
    let me = std::env::current_exe().expect("exe");
    for cameras in [1, 4] {
        let out = std::process::Command::new(&me)
            .args(["--rss-child", &cameras.to_string(), "--seconds", &seconds.to_string()])
            .args(chosen_backend().map(|b| vec!["--backend".to_string(), b.as_str().to_string()]).unwrap_or_default())
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.starts_with("rss ")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            println!("| {} | {} | {} | {} | {} |", f[1], f[5], f[2], f[3], f[4]);
        } else {
            println!("| {cameras} | failed: {} |", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
        }
    }
}

/// Peak single-precision multiply-add rate of one core, GMAC/s, and the instructions that reach
/// it: AVX-512 FMA where the CPU has it, else AVX2 FMA (12 independent chains either way, enough
/// to hide the latency of two FMA pipes).
#[cfg(target_arch = "x86_64")]
fn peak_gmacs_one_core() -> Option<(f64, &'static str)> {
    let avx2 = peak_avx2();
    let avx512 = peak_avx512();
    match (avx2, avx512) {
        (Some(a), Some(b)) if b > a => Some((b, "AVX-512 FMA")),
        (Some(a), _) => Some((a, "AVX2 FMA")),
        (None, b) => b.map(|b| (b, "AVX-512 FMA")),
    }
}

#[cfg(target_arch = "x86_64")]
fn peak_avx512() -> Option<f64> {
    if !is_x86_feature_detected!("avx512f") {
        return None;
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }
    let iters = 100_000_000u64;
    let t0 = Instant::now();
    // SAFETY: the CPU has AVX-512F (checked above), all the kernel needs.
    let r = unsafe { kernel(iters) };
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(r);
    Some(iters as f64 * 12.0 * 16.0 / secs / 1e9)
}

#[cfg(target_arch = "x86_64")]
fn peak_avx2() -> Option<f64> {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return None;
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32, what an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
    let iters = 200_000_000u64;
    let t0 = Instant::now();
    // SAFETY: the CPU has AVX2 and FMA (checked above), all the kernel needs.
    let r = unsafe { kernel(iters) };
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(r);
    Some(iters as f64 * 12.0 * 8.0 / secs / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn peak_gmacs_one_core() -> Option<(f64, &'static str)> {
    None
}

fn floor() {
    println!("\n## Compute floor");
    let m = manifest();
    let macs = its_agent::detect::backend::tract::multiply_adds(&m).expect("cost");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model multiply-adds per frame (convolutions and matrix products, tract's count): {:.3} G",
        macs as f64 / 1e9
    );
    match peak_gmacs_one_core() {
        Some((peak, how)) => {
            let floor_ms = macs as f64 / (peak * 1e9) * 1000.0;
            println!(
                "measured peak of one core: {peak:.1} GMAC/s ({how}, f32); {cores} cores: {:.1} GMAC/s",
                peak * cores as f64
            );
            println!(
                "floor: {floor_ms:.2} ms per frame on one core, {:.2} ms on {cores}; at most {:.0} frames/s on this machine",
                floor_ms / cores as f64,
                1000.0 / floor_ms * cores as f64
            );
        }
        None => println!("peak multiply-add rate: not measured on this CPU (needs x86_64 with AVX2/FMA or AVX-512)"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(60);
    if let Some(n) = arg("--rss-child").and_then(|s| s.parse().ok()) {
        rss_child(n, seconds);
        return;
    }
    let only = arg("--only").unwrap_or_else(|| "latency,stages,realtime,rss,floor".into());
    println!(
        "machine: {} cores; backends in this build: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        backends().iter().map(|b| b.as_str()).collect::<Vec<_>>().join(", ")
    );
    for section in only.split(',') {
        match section {
            "latency" => latency(),
            "stages" => stages(),
            "realtime" => realtime(seconds),
            "rss" => rss(seconds.min(30)),
            "floor" => floor(),
            other => eprintln!("unknown section {other}"),
        }
    }
}
