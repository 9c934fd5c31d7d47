//! The vision pipeline: cameras in, tracked road users out.
//!
//! ```text
//! per camera (own thread)                          shared                 per worker (own thread)
//! source --access units--> decode --sample--> [ Scheduler: a short ] --> detect --> track --> FrameResult
//!   (RTSP task or file)    (every frame)     [ queue per camera    ]    (one camera at a time)
//! ```
//!
//! - Every access unit is decoded (H.264 needs them all); detection runs at the camera's
//!   `detect_fps`. Under load the scheduler drops a live camera's oldest waiting frame (counted),
//!   so memory is bounded by `cameras x queue_frames` and detections are never late by more than
//!   the queue.
//! - One camera failing (server gone, corrupt video) affects only its own thread; its source
//!   reconnects by itself.
//! - Results go out on a channel as [`FrameResult`]s; the agent turns them into events.
//!
//! - [`scheduler`]: the shared queue of frames waiting for a detection worker.
//!
//! May depend on: `source`, `decode`, `detect`, `track` (the stages it runs).

pub mod scheduler;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::decode::{Frame, Picture, SoftwareDecoder, VideoDecoder};
use crate::detect::regions::{DetectionSpec, ModelInput, MotionGate, TilePlan, merge_tiles, plan_tiles};
use crate::detect::{DetectError, DetectTimings, Detection, Detector, ModelManifest};
use crate::source::file::FileSource;
use crate::source::rtsp::{SourceStats, run_rtsp};
use crate::source::{SourceItem, VideoSource};
use crate::track::{EndedTrack, TrackInput, TrackedObject, Tracker, TrackerConfig};
use scheduler::{Pushed, Scheduler};

/// One camera of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraSpec {
    pub id: String,
    pub source: VideoSource,
    /// Frames per second run through detection (0: every decoded frame).
    pub detect_fps: f64,
    /// Frames that may wait for detection (2: one being detected elsewhere plus one fresh).
    pub queue_frames: usize,
    /// Where in the picture the detector runs (tiles over the road, or the whole frame).
    pub detection: DetectionSpec,
}

impl CameraSpec {
    /// Live cameras drop frames under load; replayed files (not real time) wait instead.
    pub fn live(&self) -> bool {
        match &self.source {
            VideoSource::Rtsp(_) => true,
            VideoSource::File(f) => f.realtime,
        }
    }
}

/// Tracker settings shared by all cameras.
#[derive(Debug, Clone)]
pub struct VisionSettings {
    pub tracker: TrackerConfig,
    /// Classes tracked together (a car seen as a truck in one frame stays one track); every other
    /// road-user class is tracked on its own.
    pub merged_classes: Vec<Vec<usize>>,
}

/// Counters of one camera, shared with the health report.
#[derive(Debug, Default)]
pub struct CameraStats {
    pub source: Arc<SourceStats>,
    pub frames_decoded: AtomicU64,
    pub frames_detected: AtomicU64,
    pub decode_errors: AtomicU64,
    pub detect_errors: AtomicU64,
    /// Detector runs (one per tile run), for the inferences per frame.
    pub inferences: AtomicU64,
    /// Tiles of the camera's current detection plan.
    pub detection_tiles: AtomicU64,
    /// Sum of arrival → detections done, for the mean lag.
    pub lag_us_total: AtomicU64,
    pub decode_us_total: AtomicU64,
    pub preprocess_us_total: AtomicU64,
    pub inference_us_total: AtomicU64,
    pub postprocess_us_total: AtomicU64,
    pub track_us_total: AtomicU64,
}

/// What detection and tracking made of one frame.
#[derive(Debug, Clone)]
pub struct FrameResult {
    /// Index of the camera in the pipeline's list.
    pub camera: usize,
    pub camera_id: Arc<str>,
    /// Frame size in pixels (at end of stream: that of the last frame, which the ended tracks'
    /// boxes refer to).
    pub size: (u32, u32),
    /// Stream time of the frame, seconds (monotonic across reconnects and loops).
    pub t_s: f64,
    /// Wall-clock time of the frame (Unix milliseconds).
    pub wall_ms: i64,
    pub detections: Vec<Detection>,
    /// Confirmed tracks matched in this frame, with camera-wide ids.
    pub tracks: Vec<TrackedObject>,
    pub started: Vec<TrackedObject>,
    pub ended: Vec<EndedTrack>,
    /// Arrival of the frame's access unit → its detections and tracks done.
    pub lag: Duration,
    pub timings: DetectTimings,
    /// Detector runs this frame took (tiles run; 0 at end of stream).
    pub inferences: u32,
    pub track_time: Duration,
    /// Labels by class id, to name `tracks`/`ended` classes.
    pub manifest: Arc<ModelManifest>,
    /// The stream started again before this frame (reconnect, loop): earlier tracks were ended.
    pub discontinuity: bool,
    /// The camera's stream ended (a file without loop): no frame, only the last `ended` tracks.
    pub end_of_stream: bool,
    /// The decoded picture (shared, not copied), for snapshots; `None` at end of stream.
    pub frame: Option<Arc<Frame>>,
}

/// A decoded frame waiting for detection.
#[derive(Debug)]
struct SampledFrame {
    frame: Frame,
    t_s: f64,
    wall_ms: i64,
    /// Run of the stream the frame belongs to (see `decode_loop`).
    epoch: u64,
}

/// What a camera hands to the workers.
#[derive(Debug)]
enum Work {
    Frame(SampledFrame),
    /// The stream ended (file without loop): end its tracks.
    End {
        t_s: f64,
        wall_ms: i64,
    },
}

/// Per-camera tracking state: one tracker per class group, camera-wide ids.
struct CameraTracks {
    trackers: Vec<Tracker>,
    /// (group, tracker id) → camera id.
    ids: HashMap<(usize, u64), u64>,
    next_id: u64,
    /// Run of the stream the tracks belong to.
    epoch: u64,
    /// Picture size of the last frame (the frame the tracks' boxes refer to).
    size: (u32, u32),
    /// The camera was removed and its tracks ended: late frames are ignored.
    removed: bool,
}

impl CameraTracks {
    fn new(groups: usize, cfg: TrackerConfig) -> Self {
        Self {
            trackers: (0..groups).map(|_| Tracker::new(cfg)).collect(),
            ids: HashMap::new(),
            next_id: 1,
            epoch: 0,
            size: (0, 0),
            removed: false,
        }
    }

    fn global(&mut self, group: usize, id: u64) -> u64 {
        let next = &mut self.next_id;
        *self.ids.entry((group, id)).or_insert_with(|| {
            let v = *next;
            *next += 1;
            v
        })
    }

    /// The camera-wide id of an ended track, forgotten from then on.
    fn release(&mut self, group: usize, id: u64) -> u64 {
        self.ids.remove(&(group, id)).unwrap_or_else(|| {
            // Every confirmed track is reported started (and so mapped) before it can end.
            let v = self.next_id;
            self.next_id += 1;
            v
        })
    }

    /// Ends every track (stream discontinuity or end).
    fn finish(&mut self) -> Vec<EndedTrack> {
        let mut ended = Vec::new();
        for g in 0..self.trackers.len() {
            for mut e in self.trackers[g].finish() {
                e.id = self.release(g, e.id);
                ended.push(e);
            }
        }
        ended
    }
}

/// Class id → tracker group (`None`: not a road user, not tracked).
fn class_groups(manifest: &ModelManifest, merged: &[Vec<usize>]) -> (Vec<Option<usize>>, usize) {
    let mut group = vec![None; manifest.class_count()];
    let mut n = 0;
    for set in merged {
        let members: Vec<usize> = set.iter().copied().filter(|&c| manifest.is_road_user(c)).collect();
        if members.is_empty() {
            continue;
        }
        for c in members {
            group[c] = Some(n);
        }
        n += 1;
    }
    for (c, g) in group.iter_mut().enumerate() {
        if g.is_none() && manifest.is_road_user(c) {
            *g = Some(n);
            n += 1;
        }
    }
    (group, n)
}

/// A running pipeline.
pub struct VisionPipeline {
    /// Cameras by scheduler slot; a removed camera leaves `None` (slots are never reused, so a
    /// late frame of a removed camera can never be taken for another).
    slots: Arc<RwLock<Vec<Option<Arc<CameraSlot>>>>>,
    scheduler: Arc<Scheduler<Work>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    camera_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    manifest: Arc<ModelManifest>,
    groups: usize,
    tracker: TrackerConfig,
    /// Weak: the workers hold the channel open, so its receiver sees the end when they are gone
    /// (every camera's stream ended, or the pipeline stopped).
    results: mpsc::WeakSender<FrameResult>,
    rt: tokio::runtime::Handle,
}

/// Where a camera's detector runs: the plan for the current frame size, which tiles moved, and
/// where its tracks were lately.
#[derive(Debug, Default)]
struct CameraRegions {
    /// The camera's detection settings (replaced without a restart when only its scene changed).
    spec: DetectionSpec,
    plan: Option<TilePlan>,
    gate: MotionGate,
    /// (stream time, box) of the tracks seen in the last second.
    recent_tracks: Vec<(f64, [f32; 4])>,
}

/// One camera of a running pipeline.
struct CameraSlot {
    spec: CameraSpec,
    id: Arc<str>,
    stats: Arc<CameraStats>,
    tracks: Mutex<CameraTracks>,
    regions: Mutex<CameraRegions>,
    stop: Arc<AtomicBool>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl CameraSlot {
    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }
}

impl std::fmt::Debug for VisionPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionPipeline").field("cameras", &self.camera_ids()).finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VisionPipeline {
    /// Starts the detector workers (one per detector) and the cameras. The pipeline ends by
    /// itself when every camera's stream ended (replayed files), unless [`Self::keep_open`].
    pub fn start(
        cameras: Vec<CameraSpec>,
        detectors: Vec<Box<dyn Detector>>,
        settings: VisionSettings,
        results: mpsc::Sender<FrameResult>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let Some(manifest) = detectors.first().map(|d| d.manifest().clone()) else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no detector"));
        };
        let scheduler = Arc::new(Scheduler::new(&[]));
        // Until the cameras are added, workers must not take "no open camera" for "all done".
        scheduler.keep_open(true);
        let (groups, n_groups) = class_groups(&manifest, &settings.merged_classes);
        let groups = Arc::new(groups);
        let slots = Arc::new(RwLock::new(Vec::new()));
        let mut workers = Vec::new();
        for (w, mut detector) in detectors.into_iter().enumerate() {
            let ctx = WorkerContext {
                scheduler: scheduler.clone(),
                slots: slots.clone(),
                groups: groups.clone(),
                results: results.clone(),
                min_score: settings.tracker.low_score,
            };
            workers.push(
                std::thread::Builder::new().name(format!("detect-{w}")).spawn(move || ctx.run(detector.as_mut()))?,
            );
        }
        let pipeline = Self {
            slots,
            scheduler,
            workers: Mutex::new(workers),
            camera_threads: Mutex::new(Vec::new()),
            manifest,
            groups: n_groups,
            tracker: settings.tracker,
            results: results.downgrade(),
            rt,
        };
        for cam in cameras {
            pipeline.add_camera(cam)?;
        }
        pipeline.scheduler.keep_open(false);
        Ok(pipeline)
    }

    /// Keeps the workers waiting for cameras even when none is left (a running agent whose
    /// configuration may add cameras at any time).
    pub fn keep_open(&self) {
        self.scheduler.keep_open(true);
    }

    /// Starts one more camera; the others are not touched. Returns its slot.
    pub fn add_camera(&self, spec: CameraSpec) -> std::io::Result<usize> {
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let slot = Arc::new(CameraSlot {
            id: Arc::from(spec.id.as_str()),
            stats: Arc::new(CameraStats::default()),
            tracks: Mutex::new(CameraTracks::new(self.groups, self.tracker)),
            regions: Mutex::new(CameraRegions { spec: spec.detection.clone(), ..CameraRegions::default() }),
            stop: Arc::new(AtomicBool::new(false)),
            shutdown,
            spec: spec.clone(),
        });
        let index = {
            let mut slots = write(&self.slots);
            let index = self.scheduler.add_slot(spec.queue_frames.max(1), spec.live());
            if slots.len() <= index {
                slots.resize(index + 1, None);
            }
            slots[index] = Some(slot.clone());
            index
        };
        let ctx = CameraContext {
            slot: index,
            spec: spec.clone(),
            scheduler: self.scheduler.clone(),
            stats: slot.stats.clone(),
            stop: slot.stop.clone(),
            shutdown: shutdown_rx,
        };
        let rt = self.rt.clone();
        let thread = std::thread::Builder::new().name(format!("cam-{}", spec.id)).spawn(move || ctx.run(rt));
        match thread {
            Ok(t) => lock(&self.camera_threads).push(t),
            Err(e) => {
                write(&self.slots)[index] = None;
                self.scheduler.close(index);
                return Err(e);
            }
        }
        tracing::info!(camera = %spec.id, slot = index, "camera added");
        Ok(index)
    }

    /// Stops one camera: its stream is closed, its waiting frames dropped, its open tracks
    /// ended (reported like the end of a stream). The other cameras are not touched. `false`
    /// when no camera has that id.
    pub fn remove_camera(&self, id: &str) -> bool {
        let found = {
            let mut slots = write(&self.slots);
            let found = slots.iter().position(|s| s.as_ref().is_some_and(|c| &*c.id == id));
            found.and_then(|i| slots[i].take().map(|c| (i, c)))
        };
        let Some((index, cam)) = found else { return false };
        cam.signal_stop();
        self.scheduler.retire(index);
        let (ended, size) = {
            let mut ct = lock(&cam.tracks);
            ct.removed = true;
            (ct.finish(), ct.size)
        };
        let (t_s, wall_ms) = (ended.iter().map(|e| e.last_seen_s).fold(0.0, f64::max), crate::unix_ms());
        if let Some(tx) = self.results.upgrade() {
            let _ = tx.blocking_send(end_result(index, &cam.id, size, t_s, wall_ms, ended, &self.manifest));
        }
        cam.stats.source.set_state("stopped");
        tracing::info!(camera = %id, "camera removed");
        true
    }

    /// Replaces a running camera's detection settings (its tiles are planned again on its next
    /// frame) without touching its stream or tracks. `false` when no camera has that id.
    pub fn set_detection(&self, id: &str, detection: DetectionSpec) -> bool {
        let slot = read(&self.slots).iter().flatten().find(|c| &*c.id == id).cloned();
        let Some(slot) = slot else { return false };
        let mut regions = lock(&slot.regions);
        *regions = CameraRegions { spec: detection, ..CameraRegions::default() };
        true
    }

    /// The running cameras: slot, spec and counters.
    pub fn cameras(&self) -> Vec<(usize, CameraSpec, Arc<CameraStats>)> {
        read(&self.slots)
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|c| (i, c.spec.clone(), c.stats.clone())))
            .collect()
    }

    pub fn camera_ids(&self) -> Vec<String> {
        read(&self.slots).iter().flatten().map(|c| c.id.to_string()).collect()
    }

    /// Counters of the running cameras, in the order they were added.
    pub fn stats(&self) -> Vec<Arc<CameraStats>> {
        read(&self.slots).iter().flatten().map(|c| c.stats.clone()).collect()
    }

    /// Frames dropped from slot `i`'s detection queue so far.
    pub fn frames_dropped(&self, i: usize) -> u64 {
        self.scheduler.dropped(i)
    }

    /// A handle that reads the per-camera drop counters (for the health report).
    pub fn drop_counter(&self) -> DropCounter {
        DropCounter(self.scheduler.clone())
    }

    /// Stops the cameras and workers and waits for their threads.
    pub fn stop(&self) {
        for c in read(&self.slots).iter().flatten() {
            c.signal_stop();
        }
        self.scheduler.shutdown();
        self.join_threads();
    }

    fn join_threads(&self) {
        let cams: Vec<_> = lock(&self.camera_threads).drain(..).collect();
        for t in cams {
            let _ = t.join();
        }
        let workers: Vec<_> = lock(&self.workers).drain(..).collect();
        for t in workers {
            let _ = t.join();
        }
    }

    /// Waits until every camera's stream ended and the workers finished their frames.
    pub fn join(self) {
        self.join_threads();
    }
}

impl Drop for VisionPipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The result that ends a camera's tracks (end of stream, or the camera removed).
fn end_result(
    camera: usize,
    id: &Arc<str>,
    size: (u32, u32),
    t_s: f64,
    wall_ms: i64,
    ended: Vec<EndedTrack>,
    manifest: &Arc<ModelManifest>,
) -> FrameResult {
    FrameResult {
        camera,
        camera_id: id.clone(),
        size,
        t_s,
        wall_ms,
        detections: Vec::new(),
        tracks: Vec::new(),
        started: Vec::new(),
        ended,
        lag: Duration::ZERO,
        timings: DetectTimings::default(),
        inferences: 0,
        track_time: Duration::ZERO,
        manifest: manifest.clone(),
        discontinuity: false,
        end_of_stream: true,
        frame: None,
    }
}

/// Reads the per-camera drop counters.
#[derive(Clone)]
pub struct DropCounter(Arc<Scheduler<Work>>);

impl std::fmt::Debug for DropCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DropCounter")
    }
}

impl DropCounter {
    pub fn dropped(&self, camera: usize) -> u64 {
        self.0.dropped(camera)
    }
}

struct CameraContext {
    slot: usize,
    spec: CameraSpec,
    scheduler: Arc<Scheduler<Work>>,
    stats: Arc<CameraStats>,
    stop: Arc<AtomicBool>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Decides which decoded frames go to detection: at most `fps` per second of stream time.
#[derive(Debug, Clone)]
pub struct Sampler {
    period: f64,
    next_due: Option<f64>,
}

impl Sampler {
    pub fn new(fps: f64) -> Self {
        Self { period: if fps > 0.0 { 1.0 / fps } else { 0.0 }, next_due: None }
    }

    /// Whether the frame at stream time `t` is detected.
    pub fn take(&mut self, t: f64) -> bool {
        // A millisecond of slack: 10 fps video sampled at 10 fps must take every frame.
        match self.next_due {
            Some(due) if t + 1e-3 < due => false,
            Some(due) => {
                // Behind by more than a period (a gap in the stream): restart from now.
                self.next_due = Some(if t - due > self.period { t + self.period } else { due + self.period });
                true
            }
            None => {
                self.next_due = Some(t + self.period);
                true
            }
        }
    }

    pub fn reset(&mut self) {
        self.next_due = None;
    }
}

impl CameraContext {
    fn run(self, rt: tokio::runtime::Handle) {
        let id = self.spec.id.clone();
        let mut clock = StreamClock::new(self.spec.live());
        self.stats.source.set_state("connecting");
        let result = match self.spec.source.clone() {
            VideoSource::File(f) => match FileSource::open(f) {
                Ok(mut src) => self.decode_loop(&mut clock, |stop| src.next(stop).map_err(|e| e.to_string())),
                Err(e) => Err(e.to_string()),
            },
            VideoSource::Rtsp(spec) => {
                let (tx, mut rx) = mpsc::channel(crate::source::rtsp::CHANNEL_UNITS);
                let task = rt.spawn(run_rtsp(spec, tx, self.stats.source.clone(), self.shutdown.clone()));
                let r = self.decode_loop(&mut clock, |_| Ok(rx.blocking_recv()));
                task.abort();
                // Let the task end before the state is set below, so it cannot overwrite it.
                let deadline = Instant::now() + Duration::from_secs(1);
                while !task.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                r
            }
        };
        if let Err(e) = result {
            tracing::error!(camera = %id, error = %e, "camera failed");
            self.stats.source.set_state("failed");
            if let Ok(mut g) = self.stats.source.last_error.lock() {
                *g = Some(e);
            }
            // Its open tracks end here.
            let (t_s, wall_ms) = clock.now();
            self.scheduler.push(self.slot, Instant::now(), Work::End { t_s, wall_ms });
        }
        self.scheduler.close(self.slot);
    }

    /// Pulls items until the source ends or the pipeline stops.
    fn decode_loop(
        &self,
        clock: &mut StreamClock,
        mut next: impl FnMut(&AtomicBool) -> Result<Option<SourceItem>, String>,
    ) -> Result<(), String> {
        let mut decoder = SoftwareDecoder::new().map_err(|e| e.to_string())?;
        let mut sampler = Sampler::new(self.spec.detect_fps);
        // Incremented at every (re)start of the stream; frames carry it so the worker ends the
        // old stream's tracks even if the first frame after a restart was dropped under load.
        let mut epoch = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let Some(item) = next(&self.stop)? else { break };
            match item {
                SourceItem::Started { description } => {
                    tracing::info!(camera = %self.spec.id, source = %description, "camera started");
                    self.stats.source.set_state("streaming");
                    decoder.reset().map_err(|e| e.to_string())?;
                    sampler.reset();
                    clock.restart();
                    epoch += 1;
                }
                SourceItem::Ended => {
                    self.stats.source.set_state("ended");
                    let (t_s, wall_ms) = clock.now();
                    self.scheduler.push(self.slot, Instant::now(), Work::End { t_s, wall_ms });
                    break;
                }
                SourceItem::Unit(unit) => {
                    let arrived = Instant::now();
                    let decoded = decoder.decode(&unit.data, unit.pts_s);
                    self.stats.decode_us_total.fetch_add(arrived.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let (frame, pts_s) = match decoded {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(e) => {
                            let n = self.stats.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
                            // Log the first few and then every 100th, not every corrupt frame.
                            if n <= 3 || n.is_multiple_of(100) {
                                tracing::warn!(camera = %self.spec.id, errors = n, error = %e, "undecodable video; waiting for the next keyframe");
                            }
                            continue;
                        }
                    };
                    self.stats.frames_decoded.fetch_add(1, Ordering::Relaxed);
                    let (t_s, wall_ms) = clock.frame(pts_s);
                    if !sampler.take(t_s) {
                        continue;
                    }
                    let sf = SampledFrame { frame, t_s, wall_ms, epoch };
                    if self.scheduler.push(self.slot, arrived, Work::Frame(sf)) == Pushed::Shutdown {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Maps a stream's presentation times to pipeline time (seconds, monotonic for the camera's
/// whole life, across reconnects and loops) and wall-clock time.
///
/// Anchored at the first frame of every run of the stream. For a live source (a camera, or a
/// file played in real time) stream time must keep pace with the clock: timestamps that stand
/// still or run backwards (some cameras' RTP clocks), or that drift or jump more than
/// [`StreamClock::MAX_SKEW_S`] from the clock, re-anchor it to the frame's arrival. A replayed
/// file (not real time) keeps its own timestamps however fast it is read.
#[derive(Debug, Clone)]
pub struct StreamClock {
    live: bool,
    started: Instant,
    /// `(pts0, mono0, wall0)`: the stream time, pipeline time and wall time of the anchor.
    anchor: Option<(f64, f64, i64)>,
    /// Pipeline and wall time of the last frame.
    last: Option<(f64, i64)>,
}

impl StreamClock {
    /// Largest difference tolerated between a live stream's time and the clock.
    pub const MAX_SKEW_S: f64 = 2.0;

    pub fn new(live: bool) -> Self {
        Self { live, started: Instant::now(), anchor: None, last: None }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The stream starts again: the next frame anchors the clock.
    pub fn restart(&mut self) {
        self.anchor = None;
    }

    fn anchor_at(&mut self, pts_s: f64) -> (f64, f64, i64) {
        // Never behind the last frame, so time stays monotonic across restarts.
        let mono0 = self.last.map_or(self.elapsed(), |(t, _)| self.elapsed().max(t + 1e-3));
        let wall0 = self.last.map_or(crate::unix_ms(), |(_, w)| crate::unix_ms().max(w + 1));
        let a = (pts_s, mono0, wall0);
        self.anchor = Some(a);
        a
    }

    /// Pipeline and wall-clock time of a frame presented at `pts_s`.
    pub fn frame(&mut self, pts_s: f64) -> (f64, i64) {
        let (pts0, mono0, wall0) = match self.anchor {
            Some(a) => a,
            None => self.anchor_at(pts_s),
        };
        let mut t = mono0 + (pts_s - pts0);
        let mut wall = wall0 + ((pts_s - pts0) * 1000.0).round() as i64;
        let behind = self.last.is_some_and(|(lt, _)| t <= lt);
        let skewed = self.live && (t - self.elapsed()).abs() > Self::MAX_SKEW_S;
        if behind || skewed {
            let (_, m, w) = self.anchor_at(pts_s);
            (t, wall) = (m, w);
        }
        self.last = Some((t, wall));
        (t, wall)
    }

    /// The time of the last frame (or now, before any).
    pub fn now(&self) -> (f64, i64) {
        self.last.unwrap_or((self.elapsed(), crate::unix_ms()))
    }
}

struct WorkerContext {
    scheduler: Arc<Scheduler<Work>>,
    slots: Arc<RwLock<Vec<Option<Arc<CameraSlot>>>>>,
    groups: Arc<Vec<Option<usize>>>,
    results: mpsc::Sender<FrameResult>,
    min_score: f32,
}

/// Gives a camera back to the scheduler when dropped, also when processing panicked.
struct Held<'a> {
    scheduler: &'a Scheduler<Work>,
    camera: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.scheduler.release(self.camera);
    }
}

impl WorkerContext {
    fn run(self, detector: &mut dyn Detector) {
        while let Some((cam, arrived, work)) = self.scheduler.take() {
            let _held = Held { scheduler: &self.scheduler, camera: cam };
            let Some(slot) = read(&self.slots).get(cam).cloned().flatten() else {
                continue; // removed meanwhile: its tracks were ended by the removal
            };
            // A panic on one frame (a bug, or a backend tripping over a hostile picture) costs
            // that frame, counted as a detection error, not the worker.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match work {
                Work::Frame(sf) => self.process(detector, cam, &slot, arrived, sf),
                Work::End { t_s, wall_ms } => self.end(detector, cam, &slot, t_s, wall_ms),
            }));
            let keep_going = outcome.unwrap_or_else(|_| {
                slot.stats.detect_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(camera = %slot.id, "frame processing panicked; frame skipped");
                true
            });
            if !keep_going {
                break;
            }
        }
    }

    /// The camera's stream ended: report its remaining tracks as ended.
    fn end(&self, detector: &dyn Detector, cam: usize, slot: &CameraSlot, t_s: f64, wall_ms: i64) -> bool {
        let (ended, size) = {
            let mut ct = lock(&slot.tracks);
            if ct.removed {
                return true;
            }
            (ct.finish(), ct.size)
        };
        let result = end_result(cam, &slot.id, size, t_s, wall_ms, ended, detector.manifest());
        self.results.blocking_send(result).is_ok()
    }

    /// Detects and tracks one frame; `false` when the results receiver is gone.
    fn process(
        &self,
        detector: &mut dyn Detector,
        cam: usize,
        slot: &CameraSlot,
        arrived: Instant,
        sf: SampledFrame,
    ) -> bool {
        let stats = &slot.stats;
        let (detections, timings, inferences) = match self.detect_tiles(detector, slot, &sf) {
            Ok(r) => r,
            Err(e) => {
                let n = stats.detect_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n <= 3 || n.is_multiple_of(100) {
                    tracing::warn!(camera = %slot.id, errors = n, error = %e, "detection failed");
                }
                return true;
            }
        };
        let t0 = Instant::now();
        // A worker that panicked mid-update leaves trackers that are still consistent enough to
        // go on with (each update replaces whole tracks).
        let mut ct = lock(&slot.tracks);
        if ct.removed {
            return true;
        }
        let discontinuity = sf.epoch != ct.epoch;
        let mut ended = if discontinuity { ct.finish() } else { Vec::new() };
        ct.epoch = sf.epoch;
        ct.size = (sf.frame.width, sf.frame.height);
        let mut per_group: Vec<Vec<TrackInput>> = vec![Vec::new(); ct.trackers.len()];
        for d in &detections {
            if let Some(Some(g)) = self.groups.get(d.class_id) {
                per_group[*g].push(TrackInput { bbox: d.bbox, score: d.score, class_id: d.class_id });
            }
        }
        let (mut tracks, mut started) = (Vec::new(), Vec::new());
        for (g, inputs) in per_group.iter().enumerate() {
            let out = ct.trackers[g].update(inputs, sf.t_s);
            for mut t in out.tracks {
                t.id = ct.global(g, t.id);
                tracks.push(t);
            }
            for mut t in out.started {
                t.id = ct.global(g, t.id);
                started.push(t);
            }
            for mut e in out.ended {
                e.id = ct.release(g, e.id);
                ended.push(e);
            }
        }
        drop(ct);
        {
            let mut regions = lock(&slot.regions);
            let keep = regions.spec.refresh_s.max(0.5);
            regions.recent_tracks.retain(|(t, _)| sf.t_s - *t <= keep && *t <= sf.t_s);
            regions.recent_tracks.extend(tracks.iter().map(|t| (sf.t_s, t.bbox)));
        }
        let track_time = t0.elapsed();
        let lag = arrived.elapsed();
        stats.frames_detected.fetch_add(1, Ordering::Relaxed);
        stats.lag_us_total.fetch_add(lag.as_micros() as u64, Ordering::Relaxed);
        stats.preprocess_us_total.fetch_add(timings.preprocess.as_micros() as u64, Ordering::Relaxed);
        stats.inference_us_total.fetch_add(timings.inference.as_micros() as u64, Ordering::Relaxed);
        stats.postprocess_us_total.fetch_add(timings.postprocess.as_micros() as u64, Ordering::Relaxed);
        stats.track_us_total.fetch_add(track_time.as_micros() as u64, Ordering::Relaxed);
        let result = FrameResult {
            camera: cam,
            camera_id: slot.id.clone(),
            size: (sf.frame.width, sf.frame.height),
            t_s: sf.t_s,
            wall_ms: sf.wall_ms,
            detections,
            tracks,
            started,
            ended,
            lag,
            timings,
            inferences,
            track_time,
            manifest: detector.manifest().clone(),
            discontinuity,
            end_of_stream: false,
            frame: Some(Arc::new(sf.frame)),
        };
        self.results.blocking_send(result).is_ok()
    }

    /// Runs the detector on the tiles of the camera's plan that need it this frame (see
    /// [`crate::detect::regions`]) and merges their boxes.
    fn detect_tiles(
        &self,
        detector: &mut dyn Detector,
        slot: &CameraSlot,
        sf: &SampledFrame,
    ) -> Result<(Vec<Detection>, DetectTimings, u32), DetectError> {
        let frame = &sf.frame;
        let size = (frame.width, frame.height);
        let (plan, run) = {
            let mut regions = lock(&slot.regions);
            if regions.plan.as_ref().is_none_or(|p| p.frame != size) {
                let plan = plan_tiles(&regions.spec, size, ModelInput::of(&detector.manifest().input));
                tracing::info!(
                    camera = %slot.id,
                    width = size.0,
                    height = size.1,
                    tiles = plan.tiles.len(),
                    vehicle_px = plan.vehicle_px,
                    "detection regions planned"
                );
                slot.stats.detection_tiles.store(plan.tiles.len() as u64, Ordering::Relaxed);
                regions.plan = Some(plan);
            }
            let CameraRegions { spec, plan, gate, recent_tracks } = &mut *regions;
            let Some(plan) = plan.clone() else { return Ok((Vec::new(), DetectTimings::default(), 0)) };
            let boxes: Vec<[f32; 4]> = recent_tracks.iter().map(|(_, b)| *b).collect();
            let run = gate.select(&plan, frame, sf.t_s, &boxes, spec);
            (plan, run)
        };
        let picture = Picture::I420(frame);
        let mut timings = DetectTimings::default();
        let mut per_tile = Vec::with_capacity(plan.tiles.len());
        let mut runs = 0u32;
        for (tile, go) in plan.tiles.iter().zip(&run) {
            if !go {
                per_tile.push(Vec::new());
                continue;
            }
            let (found, t) = detector.detect_region(&picture, tile.rect, self.min_score)?;
            runs += 1;
            timings.preprocess += t.preprocess;
            timings.inference += t.inference;
            timings.postprocess += t.postprocess;
            per_tile.push(found);
        }
        slot.stats.inferences.fetch_add(u64::from(runs), Ordering::Relaxed);
        let t0 = Instant::now();
        let merged = merge_tiles(&plan.tiles, per_tile);
        timings.postprocess += t0.elapsed();
        Ok((merged, timings, runs))
    }
}
