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
//!
//! # Streams
//!
//! Every frame but [`Frame::Snapshot`] travels on the connection's one bidirectional control
//! stream. A [`Frame::Snapshot`] travels alone on a unidirectional stream of its own, opened by the
//! agent with a lower priority than the control stream, so a large picture never delays events or
//! acknowledgements; such a stream holds exactly one frame (decode it with [`decode_one`]) and is
//! at most [`MAX_SNAPSHOT_FRAME_LEN`] bytes long. The aggregator answers with
//! [`Frame::SnapshotStored`] on the control stream once the picture and its row are durable.

use serde::{Deserialize, Serialize};

use crate::event::{DeviceHealth, EventEnvelope};

/// Version byte of the frame format described above. 2: `object_track` events and the camera
/// counters in health reports. 3: event snapshots ([`Frame::Snapshot`] on unidirectional streams,
/// [`Frame::SnapshotStored`] on the control stream).
pub const WIRE_VERSION: u8 = 3;
/// Largest frame either side accepts: 8 MiB. An event batch is at most [`MAX_BATCH_BYTES`]; the margin leaves room for `Config` documents.
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;
/// Most bytes of encoded events one batch may carry: half a frame, leaving ample room for the
/// batch's own few bytes of framing. An event's bincode encoding inside a batch is the same as on
/// its own, so the agent can bound a batch by the sizes of its stored event bodies.
pub const MAX_BATCH_BYTES: usize = MAX_FRAME_LEN / 2;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Most bytes of JPEG one snapshot may carry, full frame and crop together: 3 MiB. A 1080p frame
/// at JPEG quality 90 is 0.3 to 1 MB and a crop a fraction of that; the margin covers 4K cameras
/// and busy scenes while keeping one upload small enough for a cellular link and for the
/// aggregator to hold a few per connection in memory. Enforced by both sides.
pub const MAX_SNAPSHOT_BYTES: usize = 3 * 1024 * 1024;
/// Longest camera id a snapshot may carry (camera ids are short names in practice).
pub const MAX_SNAPSHOT_CAMERA_LEN: usize = 256;
/// Longest encoded snapshot frame, length prefix included: the images, the camera id, and 64
/// bytes for the varints and tags around them (38 at most). A receiver stops reading a snapshot
/// stream longer than this.
pub const MAX_SNAPSHOT_FRAME_LEN: usize = MAX_SNAPSHOT_BYTES + MAX_SNAPSHOT_CAMERA_LEN + 64;
const _: () = assert!(MAX_SNAPSHOT_FRAME_LEN <= MAX_FRAME_LEN);

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

/// Most cameras one `Hello` may announce (a box runs a handful; the aggregator records each).
pub const MAX_HELLO_CAMERAS: usize = 64;
/// Longest camera id in a `Hello`, bytes.
pub const MAX_HELLO_CAMERA_ID_LEN: usize = 128;
/// Longest agent version or model name in a `Hello`, bytes.
pub const MAX_HELLO_TEXT_LEN: usize = 256;

/// Why a `Hello` is refused ([`Hello::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("{0} cameras announced; at most {MAX_HELLO_CAMERAS}")]
    TooManyCameras(usize),
    #[error("camera id {0:?}: 1 to {MAX_HELLO_CAMERA_ID_LEN} bytes without control characters")]
    BadCameraId(String),
    #[error("camera id {0:?} announced twice")]
    DuplicateCamera(String),
    #[error("{0} of {1} bytes; at most {MAX_HELLO_TEXT_LEN}")]
    TooLong(&'static str, usize),
}

impl Hello {
    /// Checks the limits the aggregator holds every `Hello` to, so that one connection cannot
    /// make it record an unbounded list of cameras or texts.
    pub fn check(&self) -> Result<(), HelloError> {
        if self.cameras.len() > MAX_HELLO_CAMERAS {
            return Err(HelloError::TooManyCameras(self.cameras.len()));
        }
        for (name, text) in [("agent version", &self.agent_version), ("model", &self.model)] {
            if text.len() > MAX_HELLO_TEXT_LEN {
                return Err(HelloError::TooLong(name, text.len()));
            }
        }
        for (i, c) in self.cameras.iter().enumerate() {
            if c.is_empty() || c.len() > MAX_HELLO_CAMERA_ID_LEN || c.chars().any(char::is_control) {
                return Err(HelloError::BadCameraId(c.chars().take(64).collect()));
            }
            if self.cameras[..i].contains(c) {
                return Err(HelloError::DuplicateCamera(c.chars().take(64).collect()));
            }
        }
        Ok(())
    }
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

/// The pictures of one event: the full frame with the event's box drawn, and optionally a crop
/// of the road user. Sent by the agent alone on a unidirectional stream (see *Streams* above).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotUpload {
    /// Sequence number of the event the pictures belong to (the event may already be stored,
    /// still pending, or evicted on the agent).
    pub seq: u64,
    /// Camera that took the pictures.
    pub camera: String,
    /// When the frame was captured, Unix ms, agent clock.
    pub taken_at_ms: i64,
    /// The full frame, JPEG.
    #[serde(with = "jpeg_bytes")]
    pub full_jpeg: Vec<u8>,
    /// A crop of the road user, JPEG.
    #[serde(with = "jpeg_bytes_opt")]
    pub crop_jpeg: Option<Vec<u8>>,
}

impl std::fmt::Debug for SnapshotUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sizes, not megabytes of bytes.
        f.debug_struct("SnapshotUpload")
            .field("seq", &self.seq)
            .field("camera", &self.camera)
            .field("taken_at_ms", &self.taken_at_ms)
            .field("full_jpeg_len", &self.full_jpeg.len())
            .field("crop_jpeg_len", &self.crop_jpeg.as_ref().map(Vec::len))
            .finish()
    }
}

/// Why a snapshot is refused, by the agent before it stores one and by the aggregator when one
/// arrives. Both sides apply the same [`SnapshotUpload::check`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// Full frame and crop together exceed [`MAX_SNAPSHOT_BYTES`].
    #[error("snapshot of {0} bytes exceeds {MAX_SNAPSHOT_BYTES}")]
    TooLarge(usize),
    /// The camera id is longer than [`MAX_SNAPSHOT_CAMERA_LEN`].
    #[error("camera id of {0} bytes exceeds {MAX_SNAPSHOT_CAMERA_LEN}")]
    CameraTooLong(usize),
    /// The named picture (`full` or `crop`) does not start with the JPEG magic bytes FF D8 FF.
    #[error("the {0} picture is not a JPEG")]
    NotJpeg(&'static str),
}

/// Whether `bytes` start like a JPEG file (SOI marker followed by another marker: FF D8 FF).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

impl SnapshotUpload {
    /// Bytes of JPEG carried (full frame and crop).
    pub fn image_bytes(&self) -> usize {
        self.full_jpeg.len().saturating_add(self.crop_jpeg.as_ref().map_or(0, Vec::len))
    }

    /// The limits and the JPEG magic bytes. A snapshot that passes encodes to at most
    /// [`MAX_SNAPSHOT_FRAME_LEN`] bytes.
    pub fn check(&self) -> Result<(), SnapshotError> {
        let bytes = self.image_bytes();
        if bytes > MAX_SNAPSHOT_BYTES {
            return Err(SnapshotError::TooLarge(bytes));
        }
        if self.camera.len() > MAX_SNAPSHOT_CAMERA_LEN {
            return Err(SnapshotError::CameraTooLong(self.camera.len()));
        }
        if !is_jpeg(&self.full_jpeg) {
            return Err(SnapshotError::NotJpeg("full"));
        }
        if self.crop_jpeg.as_deref().is_some_and(|c| !is_jpeg(c)) {
            return Err(SnapshotError::NotJpeg("crop"));
        }
        Ok(())
    }
}

/// `Vec<u8>` through serde's byte-buffer methods: the same bincode bytes as the default sequence
/// form (a varint length, then one byte per element), decoded in one copy instead of byte by
/// byte, and still bounded by the decoder's limit before anything is allocated.
mod jpeg_bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    pub(super) struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Self-describing formats; capacity only from what actually arrives.
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// `Option<Vec<u8>>` as [`jpeg_bytes`] does it (same bytes as the default form).
mod jpeg_bytes_opt {
    use serde::de::{Deserializer, Visitor};
    use serde::ser::Serializer;

    #[allow(clippy::ref_option)] // the signature serde's `with` expects
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&Bytes(b)),
            None => s.serialize_none(),
        }
    }

    struct Bytes<'a>(&'a [u8]);

    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptVisitor)
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("optional bytes")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_byte_buf(super::jpeg_bytes::BytesVisitor).map(Some)
        }
    }
}

/// Every message of the uplink. All travel on the control stream except [`Frame::Snapshot`]
/// (see *Streams* above).
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
    /// Agent to aggregator, alone on a unidirectional stream of its own: the pictures of one event.
    Snapshot(SnapshotUpload),
    /// Aggregator to agent, on the control stream: the snapshot of event `seq` and its row are
    /// durably stored; the agent may delete its copy.
    SnapshotStored {
        seq: u64,
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
            Frame::Snapshot(_) => "snapshot",
            Frame::SnapshotStored { .. } => "snapshot_stored",
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
    /// [`decode_one`]: the bytes end before the frame their length prefix announces.
    #[error("frame truncated: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
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

/// Decodes a buffer that holds exactly one frame, length prefix included (a snapshot stream read
/// to its end). Bytes after the frame are refused, as is a buffer shorter than the frame.
pub fn decode_one(bytes: &[u8]) -> Result<Frame, WireError> {
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated { expected: HEADER_LEN, got: bytes.len() });
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len == 0 || len > MAX_FRAME_LEN {
        return Err(WireError::BadLength(len));
    }
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(WireError::Truncated { expected: HEADER_LEN + len, got: bytes.len() }),
        std::cmp::Ordering::Greater => Err(WireError::Trailing(body.len() - len)),
        std::cmp::Ordering::Equal => decode_body(body),
    }
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

/// The MQTT uplink (for sites where UDP is blocked): the same frames as over QUIC, one per MQTT
/// message (QoS 1), each preceded by the id of the agent's session. A QUIC connection marks where
/// a session starts and ends; MQTT has no such thing, so both sides drop frames of any session but
/// the current one (a frame still queued in the broker from an earlier session must not answer a
/// newer `Hello`). The agent publishes on [`up_topic`], the aggregator answers on [`down_topic`];
/// the broker's ACL ties a device's login to its two topics.
pub mod mqtt {
    use super::{Frame, WireError, decode_one, encode_into};

    /// Bytes of the session id (big-endian) in front of every frame.
    pub const SESSION_ID_LEN: usize = 8;

    /// One message: the session id, then the encoded frame (`out` is cleared first).
    pub fn encode_message(session: u64, frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.clear();
        out.extend_from_slice(&session.to_be_bytes());
        encode_into(frame, out)
    }

    /// The session id and the frame of one message; anything else (short, trailing bytes, a bad
    /// frame) is an error.
    pub fn decode_message(bytes: &[u8]) -> Result<(u64, Frame), WireError> {
        let Some((id, frame)) = bytes.split_first_chunk::<SESSION_ID_LEN>() else {
            return Err(WireError::Truncated { expected: SESSION_ID_LEN, got: bytes.len() });
        };
        Ok((u64::from_be_bytes(*id), decode_one(frame)?))
    }

    /// Where a device's agent publishes its frames.
    pub fn up_topic(device: &str) -> String {
        format!("its/uplink/{device}/up")
    }

    /// Where the aggregator publishes the frames for a device.
    pub fn down_topic(device: &str) -> String {
        format!("its/uplink/{device}/down")
    }

    /// The device segment of an [`up_topic`] (not checked further).
    pub fn device_of_up_topic(topic: &str) -> Option<&str> {
        topic.strip_prefix("its/uplink/")?.strip_suffix("/up")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mqtt_messages_carry_the_session_id_before_the_frame_and_topics_the_device() {
        use super::mqtt::*;
        let mut buf = Vec::new();
        let frame = Frame::Ack(Ack { up_to: 7 });
        encode_message(0x0102_0304_0506_0708, &frame, &mut buf).expect("encode");
        assert_eq!(&buf[..SESSION_ID_LEN], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[SESSION_ID_LEN..], encode(&frame).expect("encode").as_slice());
        assert_eq!(decode_message(&buf).expect("decode"), (0x0102_0304_0506_0708, frame));
        assert!(decode_message(&buf[..5]).is_err());
        assert!(decode_message(&buf[..buf.len() - 1]).is_err());
        let mut trailing = buf.clone();
        trailing.push(0);
        assert!(decode_message(&trailing).is_err());
        assert_eq!(up_topic("box-1"), "its/uplink/box-1/up");
        assert_eq!(down_topic("box-1"), "its/uplink/box-1/down");
        assert_eq!(device_of_up_topic("its/uplink/box-1/up"), Some("box-1"));
        assert_eq!(device_of_up_topic("its/uplink/box-1/down"), None);
    }

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

    fn jpeg(len: usize, fill: u8) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0];
        v.resize(len.max(4), fill);
        v
    }

    fn sample_snapshot() -> SnapshotUpload {
        SnapshotUpload {
            seq: 42,
            camera: "cam-1".into(),
            taken_at_ms: 1_700_000_000_000,
            full_jpeg: jpeg(5000, 7),
            crop_jpeg: Some(jpeg(300, 9)),
        }
    }

    #[test]
    fn snapshot_frames_round_trip_alone_and_after_control_frames() {
        let frames = vec![
            Frame::Snapshot(sample_snapshot()),
            Frame::Snapshot(SnapshotUpload { crop_jpeg: None, ..sample_snapshot() }),
            Frame::SnapshotStored { seq: 42 },
        ];
        for f in &frames {
            let bytes = encode(f).expect("encode");
            assert_eq!(decode_one(&bytes).as_ref(), Ok(f));
        }
        let mut bytes = Vec::new();
        for f in &frames {
            encode_into(f, &mut bytes).expect("encode");
        }
        let mut d = FrameDecoder::new();
        d.extend(&bytes);
        for f in &frames {
            assert_eq!(d.next_frame().expect("decode").as_ref(), Some(f));
        }
    }

    /// The byte-buffer encoding of the pictures is exactly the default `Vec<u8>` encoding.
    #[test]
    fn picture_bytes_encode_like_plain_vectors() {
        #[derive(Serialize)]
        struct Plain {
            seq: u64,
            camera: String,
            taken_at_ms: i64,
            full_jpeg: Vec<u8>,
            crop_jpeg: Option<Vec<u8>>,
        }
        let s = sample_snapshot();
        for crop in [s.crop_jpeg.clone(), None] {
            let plain = Plain {
                seq: s.seq,
                camera: s.camera.clone(),
                taken_at_ms: s.taken_at_ms,
                full_jpeg: s.full_jpeg.clone(),
                crop_jpeg: crop.clone(),
            };
            let ours = SnapshotUpload { crop_jpeg: crop, ..s.clone() };
            let a = bincode::serde::encode_to_vec(&plain, config()).expect("plain");
            let b = bincode::serde::encode_to_vec(&ours, config()).expect("ours");
            assert_eq!(a, b);
        }
    }

    #[test]
    fn largest_valid_snapshot_fits_its_frame_limit() {
        let half = MAX_SNAPSHOT_BYTES / 2;
        let s = SnapshotUpload {
            seq: u64::MAX,
            camera: "c".repeat(MAX_SNAPSHOT_CAMERA_LEN),
            taken_at_ms: i64::MIN,
            full_jpeg: jpeg(MAX_SNAPSHOT_BYTES - half, 1),
            crop_jpeg: Some(jpeg(half, 2)),
        };
        assert_eq!(s.check(), Ok(()));
        let bytes = encode(&Frame::Snapshot(s)).expect("encode");
        assert!(bytes.len() <= MAX_SNAPSHOT_FRAME_LEN, "{} > {MAX_SNAPSHOT_FRAME_LEN}", bytes.len());
    }

    #[test]
    fn snapshot_checks() {
        let ok = sample_snapshot();
        assert_eq!(ok.check(), Ok(()));
        let big = SnapshotUpload { full_jpeg: jpeg(MAX_SNAPSHOT_BYTES - 299, 0), ..ok.clone() };
        assert_eq!(big.check(), Err(SnapshotError::TooLarge(MAX_SNAPSHOT_BYTES + 1)));
        let png = SnapshotUpload { full_jpeg: b"\x89PNG\r\n".to_vec(), ..ok.clone() };
        assert_eq!(png.check(), Err(SnapshotError::NotJpeg("full")));
        let bad_crop = SnapshotUpload { crop_jpeg: Some(vec![0xFF, 0xD8]), ..ok.clone() };
        assert_eq!(bad_crop.check(), Err(SnapshotError::NotJpeg("crop")));
        let empty = SnapshotUpload { full_jpeg: Vec::new(), ..ok.clone() };
        assert_eq!(empty.check(), Err(SnapshotError::NotJpeg("full")));
        let cam = SnapshotUpload { camera: "x".repeat(MAX_SNAPSHOT_CAMERA_LEN + 1), ..ok };
        assert_eq!(cam.check(), Err(SnapshotError::CameraTooLong(MAX_SNAPSHOT_CAMERA_LEN + 1)));
        assert!(format!("{:?}", sample_snapshot()).contains("full_jpeg_len: 5000"));
    }

    #[test]
    fn decode_one_refuses_short_long_and_empty_buffers() {
        let bytes = encode(&Frame::SnapshotStored { seq: 1 }).expect("encode");
        assert!(matches!(decode_one(&bytes[..bytes.len() - 1]), Err(WireError::Truncated { .. })));
        assert!(matches!(decode_one(&bytes[..2]), Err(WireError::Truncated { .. })));
        assert!(matches!(decode_one(&[]), Err(WireError::Truncated { .. })));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode_one(&long), Err(WireError::Trailing(1)));
        assert_eq!(decode_one(&[0, 0, 0, 0]), Err(WireError::BadLength(0)));
    }

    /// A snapshot body claiming a picture of 2^64 bytes is an error, not an allocation.
    #[test]
    fn huge_picture_length_is_an_error_not_an_allocation() {
        // Frame::Snapshot variant index 7, seq 1, camera "" (len 0), taken_at 0, then the full
        // picture's varint length u64::MAX.
        let mut body = vec![WIRE_VERSION, 7, 1, 0, 0, 0xFF];
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_body(&body), Err(WireError::Body(_))));
        // And one a little over the frame limit, with the bytes not there.
        let mut body = vec![WIRE_VERSION, 7, 1, 0, 0, 0xFC];
        body.extend_from_slice(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
        assert!(matches!(decode_body(&body), Err(WireError::Body(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes as a whole snapshot stream never panic [`decode_one`].
        #[test]
        fn decode_one_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_one(&data);
        }

        /// Corrupting one byte of a valid snapshot frame never panics either.
        #[test]
        fn corrupted_snapshot_frames_never_panic(idx in 0usize..8192, val in any::<u8>()) {
            let mut bytes = encode(&Frame::Snapshot(sample_snapshot())).expect("encode");
            let i = idx % bytes.len();
            bytes[i] = val;
            if let Ok(Frame::Snapshot(s)) = decode_one(&bytes) {
                let _ = s.check();
            }
        }

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
