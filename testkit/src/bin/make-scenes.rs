//! `make-scenes --out DIR [--only NAME] [--size 1280x720|960x540] [--interval S] [--media DIR]`:
//! writes the four-lane traffic clips of `its_testkit::footage::far` with their truth, for
//! measuring the agent on them (`its-agent evaluate`).
//!
//! For each clip and size, into `DIR`, with `STEM` = `<name>-<width>x<height>`:
//! - `STEM.264`: the clip as Annex-B H.264 at 10 fps (at the clip's quantiser);
//! - `STEM.counts.csv`: true counts per interval (`--interval`, 60 s by default), line and
//!   direction;
//! - `STEM.passes.csv`: every true line crossing with its time and speed;
//! - `STEM.scene.toml`: the camera's scene (`[cameras.scene]`: calibration, one count line and
//!   one zone per lane), to append after the keys of a `[[cameras]]` entry.
//!
//! Without `--only`, every clip; without `--size`, both sizes. Media come from `media/` of the
//! workspace unless `--media` says otherwise.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use its_testkit::accuracy::{scene_config, scene_toml};
use its_testkit::footage::far::{FarClip, FarSet, SIZES, write_truth};
use its_testkit::footage::library::Library;

struct Args {
    out: PathBuf,
    only: Option<String>,
    sizes: Vec<(u32, u32)>,
    interval_s: u32,
    media: PathBuf,
}

const USAGE: &str =
    "usage: make-scenes --out DIR [--only NAME] [--size 1280x720|960x540] [--interval SECONDS] [--media DIR]";

fn parse_args() -> anyhow::Result<Args> {
    let mut out = None;
    let mut only = None;
    let mut sizes = SIZES.to_vec();
    let mut interval_s = 60;
    let mut media = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--only" => only = Some(value()?),
            "--size" => {
                let v = value()?;
                let size = SIZES
                    .iter()
                    .copied()
                    .find(|(w, h)| format!("{w}x{h}") == v)
                    .with_context(|| format!("--size {v}: one of 1280x720, 960x540"))?;
                sizes = vec![size];
            }
            "--interval" => {
                let v = value()?;
                interval_s =
                    v.parse().ok().filter(|&s| s > 0).with_context(|| format!("--interval {v}: seconds > 0"))?;
            }
            "--media" => media = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let out = out.with_context(|| format!("--out is required\n{USAGE}"))?;
    if let Some(name) = &only
        && !FarSet::names().contains(name)
    {
        bail!("--only {name}: no such clip (clips: {})", FarSet::names().join(", "));
    }
    Ok(Args { out, only, sizes, interval_s, media })
}

fn write_clip(clip: &FarClip, args: &Args) -> anyhow::Result<()> {
    let (w, h) = clip.size();
    let stem = format!("{}-{w}x{h}", clip.name());
    let started = Instant::now();
    let video = args.out.join(format!("{stem}.264"));
    clip.encode(&video).with_context(|| format!("encoding {}", video.display()))?;
    let encoded_s = started.elapsed().as_secs_f64();
    write_truth(&clip.traffic, &args.out, &stem, args.interval_s).context("writing the truth")?;
    let toml_path = args.out.join(format!("{stem}.scene.toml"));
    let toml = format!(
        "# Scene of {stem}.264 ({w}x{h}, 10 fps): append after the keys of its [[cameras]] entry.\n{}",
        scene_toml(&scene_config(&clip.traffic))
    );
    std::fs::write(&toml_path, toml).with_context(|| format!("writing {}", toml_path.display()))?;
    eprintln!(
        "{stem}: {} frames, {} vehicles, {} crossings, qp {}, rendered and encoded in {encoded_s:.1} s",
        clip.frames(),
        clip.traffic.truth.vehicles.len(),
        clip.traffic.truth.crossings.len(),
        clip.qp,
    );
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let library =
        Library::load(&args.media).with_context(|| format!("loading the media from {}", args.media.display()))?;
    for &size in &args.sizes {
        let set = FarSet::new(&library, size);
        let names = match &args.only {
            Some(n) => vec![n.clone()],
            None => FarSet::names(),
        };
        for name in names {
            let clip = set.by_name(&name).with_context(|| format!("no clip {name}"))?;
            write_clip(&clip, &args)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("make-scenes: {e:#}");
            ExitCode::FAILURE
        }
    }
}
