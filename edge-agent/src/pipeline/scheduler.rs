//! Frames waiting for detection, per camera, and the hand-out to detector workers.
//!
//! Each camera has a short queue. A live camera never waits for detection: when its queue is
//! full the *oldest* waiting frame is dropped (and counted), so what is detected is always
//! recent and memory is bounded by `cameras x capacity` frames whatever the load. A replayed
//! file (not real time) waits instead, so no frame is lost.
//!
//! A camera is handed to one worker at a time, so its frames are detected and tracked in order;
//! different cameras run in parallel. Among cameras with work, the one served least recently goes
//! first (round robin), so under overload every camera gets an equal share. (Taking the oldest
//! waiting frame first is not fair with drop-oldest queues: the camera whose frames arrive a few
//! milliseconds earlier in each period would win every time.)

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A slot's frames and flags.
#[derive(Debug)]
struct Slot<T> {
    queue: VecDeque<(Instant, T)>,
    capacity: usize,
    /// Drop the oldest when full (live) rather than wait (replay).
    live: bool,
    /// A worker holds this camera.
    busy: bool,
    /// The camera will push no more frames.
    closed: bool,
    dropped: u64,
    /// When a worker last took a frame of this camera (`None`: never).
    last_served: Option<Instant>,
}

#[derive(Debug)]
struct State<T> {
    slots: Vec<Slot<T>>,
    shutdown: bool,
    /// Workers wait for work even when every slot is closed (slots may still be added).
    keep_open: bool,
}

/// The frame queues of all cameras.
#[derive(Debug)]
pub struct Scheduler<T> {
    state: Mutex<State<T>>,
    /// Signalled when a frame arrives, a camera is released, or on shutdown.
    work: Condvar,
    /// Signalled when a queue has room (replay cameras wait on it).
    room: Condvar,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued, and the oldest waiting frame was dropped to make room.
    DroppedOldest,
    /// The scheduler is shut down; the frame was not queued.
    Shutdown,
}

impl<T> Scheduler<T> {
    /// One slot per camera: `(capacity, live)`.
    pub fn new(slots: &[(usize, bool)]) -> Self {
        let s = Self {
            state: Mutex::new(State { slots: Vec::new(), shutdown: false, keep_open: false }),
            work: Condvar::new(),
            room: Condvar::new(),
        };
        for &(capacity, live) in slots {
            s.add_slot(capacity, live);
        }
        s
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A worker that panicked while holding the lock leaves consistent data (every update is a
        // single assignment or queue operation): keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame of camera `slot`, which arrived at `arrived`.
    pub fn push(&self, slot: usize, arrived: Instant, item: T) -> Pushed {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return Pushed::Shutdown;
            }
            let Some(s) = st.slots.get_mut(slot) else { return Pushed::Shutdown };
            if s.closed {
                return Pushed::Shutdown; // retired
            }
            if s.queue.len() < s.capacity {
                s.queue.push_back((arrived, item));
                self.work.notify_one();
                return Pushed::Queued;
            }
            if s.live {
                s.queue.pop_front();
                s.dropped += 1;
                s.queue.push_back((arrived, item));
                self.work.notify_one();
                return Pushed::DroppedOldest;
            }
            st = self.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes the oldest waiting frame of the least recently served camera that no other worker
    /// holds; blocks until there is one. `None` once shut down, or once every camera is closed
    /// and drained.
    pub fn take(&self) -> Option<(usize, Instant, T)> {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return None;
            }
            let pick = st
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.busy)
                .filter_map(|(i, s)| s.queue.front().map(|(t, _)| (i, s.last_served, *t)))
                .min_by_key(|&(_, served, t)| (served, t))
                .map(|(i, _, _)| i);
            if let Some(i) = pick {
                let s = &mut st.slots[i];
                if let Some((arrived, item)) = s.queue.pop_front() {
                    s.busy = true;
                    s.last_served = Some(Instant::now());
                    self.room.notify_all();
                    return Some((i, arrived, item));
                }
            }
            if !st.keep_open && st.slots.iter().all(|s| s.closed && s.queue.is_empty()) {
                return None;
            }
            st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The worker is done with camera `slot`'s frame.
    pub fn release(&self, slot: usize) {
        let mut st = self.lock();
        if let Some(s) = st.slots.get_mut(slot) {
            s.busy = false;
        }
        self.work.notify_all();
    }

    /// Camera `slot` will push no more frames.
    pub fn close(&self, slot: usize) {
        let mut st = self.lock();
        if let Some(s) = st.slots.get_mut(slot) {
            s.closed = true;
        }
        self.work.notify_all();
    }

    /// Stops everything: pushes are refused, `take` returns `None`.
    /// Adds a camera slot (`capacity` frames, live or not) and returns its index. Indices are
    /// never reused.
    pub fn add_slot(&self, capacity: usize, live: bool) -> usize {
        let mut st = self.lock();
        st.slots.push(Slot {
            queue: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            live,
            busy: false,
            closed: false,
            dropped: 0,
            last_served: None,
        });
        st.slots.len() - 1
    }

    /// Closes a slot and drops what waits in it (a camera removed): a pusher blocked on it
    /// returns.
    pub fn retire(&self, slot: usize) {
        let mut st = self.lock();
        if let Some(s) = st.slots.get_mut(slot) {
            s.closed = true;
            s.queue.clear();
            s.capacity = 0;
        }
        self.work.notify_all();
        self.room.notify_all();
    }

    /// Whether workers keep waiting when every slot is closed (see [`State::keep_open`]).
    pub fn keep_open(&self, keep: bool) {
        self.lock().keep_open = keep;
        self.work.notify_all();
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.work.notify_all();
        self.room.notify_all();
    }

    /// Frames dropped from camera `slot`'s queue so far.
    pub fn dropped(&self, slot: usize) -> u64 {
        self.lock().slots.get(slot).map_or(0, |s| s.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_live_camera_drops_its_oldest_frame_when_full() {
        let s = Scheduler::new(&[(2, true)]);
        let t = Instant::now();
        assert_eq!(s.push(0, t, 1), Pushed::Queued);
        assert_eq!(s.push(0, t, 2), Pushed::Queued);
        assert_eq!(s.push(0, t, 3), Pushed::DroppedOldest);
        assert_eq!(s.dropped(0), 1);
        assert_eq!(s.take().map(|(_, _, v)| v), Some(2), "the oldest (1) was dropped");
    }

    #[test]
    fn a_camera_is_held_by_one_worker_at_a_time_and_cameras_take_turns() {
        let s = Scheduler::new(&[(4, true), (4, true)]);
        let t0 = Instant::now();
        s.push(0, t0 + Duration::from_millis(5), "a1");
        s.push(0, t0 + Duration::from_millis(6), "a2");
        s.push(1, t0 + Duration::from_millis(1), "b1");
        let first = s.take().expect("work");
        assert_eq!((first.0, first.2), (1, "b1"), "neither served yet: the older frame first");
        let second = s.take().expect("work");
        assert_eq!((second.0, second.2), (0, "a1"));
        // Camera 0 is busy and camera 1 empty: closing both ends the wait once released.
        s.close(0);
        s.close(1);
        let s = Arc::new(s);
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || s2.take().map(|(i, _, v)| (i, v)));
        std::thread::sleep(Duration::from_millis(50));
        s.release(0);
        assert_eq!(waiter.join().expect("join"), Some((0, "a2")), "a2 only after a1 was released");
        s.release(0);
        s.release(1);
        assert!(s.take().is_none(), "closed and drained");
    }

    #[test]
    fn under_overload_every_camera_gets_its_turn() {
        // Camera 0's frames always arrive a little earlier than camera 1's; both queues are full.
        let s = Scheduler::new(&[(2, true), (2, true)]);
        let mut served = [0u32; 2];
        let t0 = Instant::now();
        for round in 0..20u64 {
            let base = t0 + Duration::from_millis(100 * round);
            s.push(0, base, round);
            s.push(1, base + Duration::from_millis(3), round);
            s.push(0, base + Duration::from_millis(50), round);
            s.push(1, base + Duration::from_millis(53), round);
            // One worker, one frame per round.
            let (cam, _, _) = s.take().expect("work");
            served[cam] += 1;
            s.release(cam);
        }
        assert_eq!(served, [10, 10], "round robin, not the earliest phase winning every time");
    }

    #[test]
    fn a_replay_camera_waits_for_room_instead_of_dropping() {
        let s = Arc::new(Scheduler::new(&[(1, false)]));
        let t = Instant::now();
        assert_eq!(s.push(0, t, 1), Pushed::Queued);
        let s2 = s.clone();
        let pusher = std::thread::spawn(move || s2.push(0, t, 2));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished(), "the push waits while the queue is full");
        assert_eq!(s.take().map(|(_, _, v)| v), Some(1));
        assert_eq!(pusher.join().expect("join"), Pushed::Queued);
        assert_eq!(s.dropped(0), 0);
        s.shutdown();
        assert!(s.take().is_none());
    }
}
