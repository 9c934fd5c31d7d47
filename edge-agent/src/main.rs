//! `its-agent` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use its_agent::config::{ConfigError, RawConfig};

#[derive(Parser)]
#[command(
    name = "its-agent",
    version,
    about = "ITS Camera AI edge agent: camera streams in, traffic events out, nothing lost"
)]
struct Cli {
    /// Configuration file (TOML). Without it the embedded defaults apply; any value can be
    /// overridden with ITS_AGENT__SECTION__KEY=value.
    #[arg(long, short, global = true, env = "ITS_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration, print every problem, and exit.
    CheckConfig,
    /// Print the outbox's counters as JSON (works while the agent runs).
    OutboxStats {
        /// Outbox database; defaults to outbox.path from the configuration.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Load the configured detector once and run one inference, then exit: with TensorRT this
    /// builds the engine and stores it in detector.tensorrt_cache, so the service starts in
    /// seconds instead of minutes. Run it when provisioning a box (and after a model change).
    PrepareModel,
    /// Run the detector on pictures (JPEG, PNG) or a frame of a video file and print what it
    /// finds, one JSON object per detection: to check a model or a camera's view on site.
    Detect {
        /// Pictures or video files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Model manifest; defaults to detector.model from the configuration.
        #[arg(long)]
        model: Option<PathBuf>,
        /// tract, onnxruntime or tensorrt; defaults to the best one this build loads.
        #[arg(long)]
        backend: Option<String>,
        /// Lowest score reported; defaults to the model's threshold.
        #[arg(long)]
        min_score: Option<f32>,
        /// Frame of a video file (0-based).
        #[arg(long, default_value_t = 0)]
        frame: usize,
        /// Write each input with its boxes drawn to this directory (PNG).
        #[arg(long)]
        annotate: Option<PathBuf>,
    },
    /// Acceptance test of a camera: run a recording of it through the pipeline (as fast as the
    /// machine allows, no frame dropped), compare its line counts (and test vehicles' speeds)
    /// with a manual count, print the comparison and a verdict. Exit code 0: PASS, 1: FAIL,
    /// 2: nothing evaluated (a problem with the inputs, printed). See docs/acceptance-test.md.
    Evaluate {
        /// The camera's recording: MP4, or Annex-B H.264 (`.264`).
        recording: PathBuf,
        /// Manual counts, CSV `start,end,line,direction,class,count` (class `*`: car, truck,
        /// bus and motorcycle together).
        #[arg(long)]
        truth: PathBuf,
        /// Test vehicles of known speed, CSV `time,line,direction,speed_kmh`.
        #[arg(long)]
        passes: Option<PathBuf>,
        /// The camera of the configuration the recording is from: its scene, detection settings.
        #[arg(long)]
        camera: Option<String>,
        /// A TOML file holding just a scene table (the keys of `[cameras.scene]`), for a camera
        /// not in the configuration, or to replace the camera's scene.
        #[arg(long)]
        scene: Option<PathBuf>,
        /// Frame rate of an Annex-B recording (which carries no timestamps); default: the
        /// camera's `file_fps`.
        #[arg(long)]
        fps: Option<f64>,
        /// Compare per interval of this length (HH:MM:SS, MM:SS or seconds) from the start of
        /// the recording, summing the truth rows within each (e.g. `15:00` for minute counts of
        /// a loop detector); default: each truth row on its own.
        #[arg(long, value_parser = parse_interval)]
        interval: Option<i64>,
        /// Write the per-interval comparison here (CSV).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Write everything here (JSON): rows, totals, passes, summary, the settings used.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Overall count accuracy required (1 - sum |error| / sum truth).
        #[arg(long, default_value_t = 0.95)]
        min_accuracy: f64,
        /// Largest speed error allowed on a test pass, km/h.
        #[arg(long, default_value_t = 5.0)]
        max_speed_error: f64,
        /// Share of the test passes that must be found with a speed (0..=1).
        #[arg(long, default_value_t = 0.9)]
        min_speed_share: f64,
        /// A test pass is the crossing of its line and direction nearest in time within this
        /// many seconds.
        #[arg(long, default_value_t = 2.0)]
        match_window: f64,
    },
}

/// `--interval`: a duration as the truth files write times; milliseconds.
fn parse_interval(s: &str) -> Result<i64, String> {
    match its_agent::evaluate::truth::parse_time(s) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(format!("{s:?} is not a duration: write HH:MM:SS, MM:SS or seconds, above 0")),
    }
}

fn load(cli: &Cli) -> Result<RawConfig, ConfigError> {
    RawConfig::load(cli.config.as_deref(), std::env::vars())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    its_hostio::logging::init_stderr_logging("info");
    let source = cli.config.as_ref().map_or("<defaults>".to_string(), |p| p.display().to_string());
    if let Some(Command::OutboxStats { path: Some(path) }) = &cli.command {
        return report(print_stats(path.clone()));
    }
    let raw = match load(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::OutboxStats { path: None }) = &cli.command {
        return report(print_stats(raw.outbox.path.clone()));
    }
    if let Some(Command::Detect { inputs, model, backend, min_score, frame, annotate }) = &cli.command {
        let model = model.clone().unwrap_or_else(|| raw.detector.model.clone());
        return report(detect_stills(inputs, &model, backend.as_deref(), *min_score, *frame, annotate.as_deref()));
    }
    if let Some(Command::Evaluate {
        recording,
        truth,
        passes,
        camera,
        scene,
        fps,
        interval,
        csv,
        json,
        min_accuracy,
        max_speed_error,
        min_speed_share,
        match_window,
    }) = &cli.command
    {
        let opts = its_agent::evaluate::EvaluateOptions {
            recording: recording.clone(),
            truth: truth.clone(),
            passes: passes.clone(),
            camera: camera.clone(),
            scene: scene.clone(),
            fps: *fps,
            interval_ms: *interval,
            csv: csv.clone(),
            json: json.clone(),
            min_accuracy: *min_accuracy,
            max_speed_error_kmh: *max_speed_error,
            min_speed_share: *min_speed_share,
            match_window_ms: (match_window * 1000.0).round() as i64,
        };
        return ExitCode::from(its_agent::evaluate::run_cli(&opts, &raw, &source));
    }
    let cfg = match raw.validate(&source) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = &cli.command {
        println!("{source}: configuration is valid");
        for line in its_agent::reload::describe_scenes(&cfg) {
            println!("  {line}");
        }
        return ExitCode::SUCCESS;
    }
    if let Some(Command::PrepareModel) = &cli.command {
        return report(prepare_model(&cfg));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reload = its_agent::agent::Reloading {
        raw,
        source,
        file: cli.config.clone().map(|path| its_agent::reload::ConfigFile { path, env: std::env::vars().collect() }),
        now: std::sync::Arc::new(tokio::sync::Notify::new()),
        poll: std::time::Duration::from_secs(2),
    };
    report(rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        tokio::spawn(reload_on_sighup(reload.now.clone()));
        its_agent::agent::run_agent(cfg, reload, rx).await
    }))
}

/// SIGHUP reloads the configuration at once (it is also picked up by itself within seconds).
async fn reload_on_sighup(now: std::sync::Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                now.notify_one();
            }
        }
    }
    #[cfg(not(unix))]
    let _ = now;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn prepare_model(cfg: &its_agent::config::AgentConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    use its_agent::decode::{Frame, Picture};
    let v = cfg.vision.as_ref().context("no camera is configured, so no detector is used")?;
    let t0 = std::time::Instant::now();
    let mut detectors = its_agent::agent::load_configured_detectors(v, 1)?;
    let load = t0.elapsed();
    let d = detectors.first_mut().context("no detector")?;
    let frame = Frame::blank(v.manifest.input.width, v.manifest.input.height);
    let (_, first) = d.detect(&Picture::I420(&frame), 0.5)?;
    let (_, second) = d.detect(&Picture::I420(&frame), 0.5)?;
    println!(
        "{} on {}: loaded in {:.1} s, first inference {:.0} ms, then {:.1} ms",
        v.manifest.name,
        d.backend_name(),
        load.as_secs_f64(),
        first.inference.as_secs_f64() * 1000.0,
        second.inference.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn detect_stills(
    inputs: &[PathBuf],
    model: &std::path::Path,
    backend: Option<&str>,
    min_score: Option<f32>,
    frame: usize,
    annotate: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use its_agent::detect::{BackendKind, BackendOptions, ModelManifest, load_detectors, still};
    let manifest = std::sync::Arc::new(ModelManifest::load(model)?);
    let kinds: Vec<BackendKind> = match backend {
        Some(b) => vec![BackendKind::parse(b).with_context(|| format!("unknown backend {b:?}"))?],
        None => BackendKind::compiled_fastest_first(),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut detectors = load_detectors(&manifest, &kinds, &BackendOptions { threads, ..BackendOptions::default() }, 1)?;
    let detector = detectors.first_mut().context("no detector")?;
    let min_score = min_score.unwrap_or(manifest.score_threshold);
    if let Some(dir) = annotate {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for input in inputs {
        let picture = still::load_picture(input, frame).with_context(|| format!("reading {}", input.display()))?;
        let (detections, timings) = detector.detect(&picture.as_picture(), min_score)?;
        for d in &detections {
            let line = serde_json::json!({
                "input": input.display().to_string(),
                "label": &*d.label,
                "score": (d.score * 1000.0).round() / 1000.0,
                "box": d.bbox.map(|v| v.round()),
                "backend": detector.backend_name(),
                "inference_ms": timings.inference.as_secs_f64() * 1000.0,
            });
            println!("{line}");
        }
        if let Some(dir) = annotate {
            let name = input.file_stem().map_or("picture".into(), |s| s.to_string_lossy().to_string());
            let out = dir.join(format!("{name}.png"));
            still::annotate(&picture, &detections)
                .context("picture size mismatch")?
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
}

fn print_stats(path: PathBuf) -> anyhow::Result<()> {
    let stats = its_agent::buffer::read_stats(&path)?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
