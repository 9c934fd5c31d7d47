//! The uplink wire format: length-prefixed, versioned frames.
//!
//! ```text
//! +----------------+-----------+-------------------------------+
//! | length: u32 BE | version:u8| body: bincode(Frame), standard |
//! +----------------+-----------+-------------------------------+
//!   length counts version + body; 1 <= length <= MAX_FRAME_LEN
//! ```
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated or awaited, and
//! bincode decodes with the same limit, so a hostile peer can make neither side allocate more than
//! one maximum frame. [`FrameDecoder`] never panics on any input (property test and the cargo-fuzz
//! target `frame_decoder`).

use serde::{Deserialize, Serialize};

use crate::event::{DeviceHealth, EventEnvelope};

/// Version byte of the frame format described above. 2: `object_track` events and the camera
/// counters in health reports.
pub const WIRE_VERSION: u8 = 2;
/// Largest frame either side accepts: 8 MiB. An event batch is at most [`MAX_BATCH_BYTES`]; the margin leaves room for `Config` documents.
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;
/// Most bytes of encoded events one batch may carry: half a frame, leaving ample room for the
/// batch's own few bytes of framing. An event's bincode encoding inside a batch is the same as on
/// its own, so the agent can bound a batch by the sizes of its stored event bodies.
pub const MAX_BATCH_BYTES: usize = MAX_FRAME_LEN / 2;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_LEN>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// First frame of every connection, from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Agent version (semver).
    pub agent_version: String,
    /// Detector model the agent runs.
    pub model: String,
    /// Camera ids configured on the agent.
    pub cameras: Vec<String>,
    /// Highest sequence number the agent has seen acknowledged.
    pub last_acked_seq: u64,
    /// Highest sequence number the agent has assigned so far.
    pub last_assigned_seq: u64,
}

/// A run of events from the outbox.
///
/// `after` is the sender's claim that every event with a sequence number in
/// `after+1 .. first event's seq` either was in an earlier batch or no longer exists (evicted):
/// the receiver accepts the batch only when it already holds everything up to `after`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    pub after: u64,
    /// Strictly increasing sequence numbers, all greater than `after`.
    pub events: Vec<EventEnvelope>,
}

impl EventBatch {
    /// Sequence number of the last event (or `after` for an empty batch).
    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(self.after, |e| e.seq)
    }

    /// Whether the batch is internally consistent: sequence numbers strictly increasing and above `after`.
    pub fn is_well_formed(&self) -> bool {
        let mut prev = self.after;
        for e in &self.events {
            if e.seq <= prev {
                return false;
            }
            prev = e.seq;
        }
        true
    }
}

/// Cumulative acknowledgement: the aggregator has committed every event of this device it was
/// sent with a sequence number up to and including `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub up_to: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sent_at_ms: i64,
    pub health: DeviceHealth,
}

/// Desired configuration pushed by the aggregator (used by a later release; agents ignore
/// revisions they do not understand).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigPush {
    pub revision: u64,
    /// TOML document.
    pub document: String,
}

/// An over-the-air update on offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtaOffer {
    pub version: String,
    pub bundle_url: String,
    pub sha256_hex: String,
}

/// Every message of the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    EventBatch(EventBatch),
    Ack(Ack),
    Heartbeat(Heartbeat),
    Config(ConfigPush),
    OtaOffer(OtaOffer),
    /// The peer refuses the session and will close it; `reason` is for logs.
    Refuse {
        reason: String,
    },
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::EventBatch(_) => "event_batch",
            Frame::Ack(_) => "ack",
            Frame::Heartbeat(_) => "heartbeat",
            Frame::Config(_) => "config",
            Frame::OtaOffer(_) => "ota_offer",
            Frame::Refuse { .. } => "refuse",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The length prefix announces a frame larger than [`MAX_FRAME_LEN`] (or zero).
    #[error("frame length {0} outside 1..={MAX_FRAME_LEN}")]
    BadLength(usize),
    /// The version byte is not one this build speaks.
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u8),
    /// The body is not a valid frame.
    #[error("malformed frame body: {0}")]
    Body(String),
    /// The body decoded but left bytes over.
    #[error("frame body has {0} trailing bytes")]
    Trailing(usize),
    /// Encoding produced a frame larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
}

/// Appends one encoded frame to `out`.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, WIRE_VERSION]);
    bincode::serde::encode_into_std_write(frame, out, config()).map_err(|e| WireError::Body(e.to_string()))?;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(WireError::TooLarge(len));
    }
    let len32 = u32::try_from(len).map_err(|_| WireError::TooLarge(len))?;
    out[start..start + HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// One encoded frame.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(frame, &mut out)?;
    Ok(out)
}

/// Decodes the body of one frame (version byte + bincode), as framed by the length prefix.
pub fn decode_body(body: &[u8]) -> Result<Frame, WireError> {
    let (&version, rest) = body.split_first().ok_or(WireError::BadLength(0))?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let (frame, used): (Frame, usize) =
        bincode::serde::decode_from_slice(rest, config()).map_err(|e| WireError::Body(e.to_string()))?;
    if used != rest.len() {
        return Err(WireError::Trailing(rest.len() - used));
    }
    Ok(frame)
}

/// Incremental decoder for a byte stream of frames.
///
/// Feed it whatever arrived with [`FrameDecoder::extend`], then take frames with
/// [`FrameDecoder::next_frame`] until it returns `Ok(None)`. After an error the stream is
/// unusable (framing is lost): close the connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Length of the next frame's body if its header has arrived, after checking it.
    pub fn peek_len(&self) -> Result<Option<usize>, WireError> {
        let avail = &self.buf[self.pos..];
        let Some(header) = avail.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEADER_LEN];
        len_bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(WireError::BadLength(len));
        }
        Ok(Some(len))
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(len) = self.peek_len()? else {
            return Ok(None);
        };
        let start = self.pos + HEADER_LEN;
        let Some(body) = self.buf.get(start..start + len) else {
            return Ok(None);
        };
        let frame = decode_body(body)?;
        self.pos = start + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, ObjectRef};
    use proptest::prelude::*;

    fn sample_batch(n: u64) -> Frame {
        Frame::EventBatch(EventBatch {
            after: 9,
            events: (10..10 + n)
                .map(|seq| EventEnvelope {
                    seq,
                    camera: "cam".into(),
                    observed_at_ms: 1,
                    kind: EventKind::ZoneEnter {
                        zone: "z".into(),
                        object: ObjectRef { track_id: seq, label: "car".into(), score: 0.5, bbox: [0.0; 4] },
                    },
                })
                .collect(),
        })
    }

    #[test]
    fn round_trip_split_at_every_byte() {
        let frames = vec![sample_batch(3), Frame::Ack(Ack { up_to: 12 }), Frame::Refuse { reason: "no".into() }];
        let mut bytes = Vec::new();
        for f in &frames {
            encode_into(f, &mut bytes).expect("encode");
        }
        for split in 0..bytes.len() {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            d.extend(&bytes[..split]);
            while let Some(f) = d.next_frame().expect("decode") {
                got.push(f);
            }
            d.extend(&bytes[split..]);
            while let Some(f) = d.next_frame().expect("decode") {
                got.push(f);
            }
            assert_eq!(got, frames, "split at {split}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut d = FrameDecoder::new();
        d.extend(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert_eq!(d.next_frame(), Err(WireError::BadLength(MAX_FRAME_LEN + 1)));
        let mut d = FrameDecoder::new();
        d.extend(&0u32.to_be_bytes());
        assert_eq!(d.next_frame(), Err(WireError::BadLength(0)));
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut bytes = encode(&Frame::Ack(Ack { up_to: 1 })).expect("encode");
        bytes[HEADER_LEN] = 99;
        let mut d = FrameDecoder::new();
        d.extend(&bytes);
        assert_eq!(d.next_frame(), Err(WireError::Version(99)));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_refused() {
        let mut bytes = encode(&Frame::Ack(Ack { up_to: 1 })).expect("encode");
        bytes.push(0);
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        let mut d = FrameDecoder::new();
        d.extend(&bytes);
        assert_eq!(d.next_frame(), Err(WireError::Trailing(1)));
    }

    /// A length-prefixed body claiming a huge Vec must not allocate it: bincode's limit stops it.
    #[test]
    fn huge_inner_length_is_an_error_not_an_allocation() {
        // Frame::EventBatch variant index 1, after = 0, then a varint Vec length of u64::MAX.
        let mut body = vec![WIRE_VERSION, 1, 0, 0xFF];
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_body(&body), Err(WireError::Body(_))));
    }

    #[test]
    fn batch_well_formedness() {
        let Frame::EventBatch(mut b) = sample_batch(3) else { unreachable!() };
        assert!(b.is_well_formed());
        assert_eq!(b.last_seq(), 12);
        b.events.swap(0, 1);
        assert!(!b.is_well_formed());
        b.events.clear();
        assert_eq!(b.last_seq(), 9);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes, fed in arbitrary chunks, never panic the decoder.
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let mut d = FrameDecoder::new();
            for c in data.chunks(chunk) {
                d.extend(c);
                while let Ok(Some(_)) = d.next_frame() {}
            }
        }

        /// A valid header followed by arbitrary body bytes never panics either.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut with_version = vec![WIRE_VERSION];
            with_version.extend_from_slice(&body);
            let _ = decode_body(&with_version);
        }

        /// Corrupting one byte of a valid frame gives an error or some frame, never a panic.
        #[test]
        fn corrupted_valid_frames_never_panic(idx in 0usize..4096, val in any::<u8>()) {
            let mut bytes = encode(&sample_batch(5)).expect("encode");
            let i = idx % bytes.len();
            bytes[i] = val;
            let mut d = FrameDecoder::new();
            d.extend(&bytes);
            let _ = d.next_frame();
        }
    }
}
