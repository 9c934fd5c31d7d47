//! Hostile and corrupt video never panics the agent: arbitrary bytes through the Annex-B
//! splitter (in any chunking) and into the H.264 decoder, and arbitrary files as MP4.

use its_agent::decode::{SoftwareDecoder, VideoDecoder};
use its_agent::source::annexb::AccessUnitSplitter;
use its_agent::source::mp4::Mp4H264;
use proptest::prelude::*;

fn split(bytes: &[u8], chunks: &[usize]) -> Vec<Vec<u8>> {
    let mut s = AccessUnitSplitter::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    for &c in chunks {
        if rest.is_empty() {
            break;
        }
        let n = c.min(rest.len());
        s.push(&rest[..n], &mut out);
        rest = &rest[n..];
    }
    s.push(rest, &mut out);
    s.finish(&mut out);
    out
}

/// Bytes that look like H.264: start codes and NAL headers of every type, random payloads.
fn nal_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((0u8..=31, prop::collection::vec(any::<u8>(), 0..200), any::<bool>()), 0..40).prop_map(
        |nals| {
            let mut v = Vec::new();
            for (t, payload, long) in nals {
                v.extend_from_slice(if long { &[0, 0, 0, 1] } else { &[0, 0, 1] });
                v.push(0x60 | t);
                v.extend(payload);
            }
            v
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_splitter_gives_the_same_access_units_whatever_the_chunking(
        bytes in prop_oneof![nal_soup(), prop::collection::vec(any::<u8>(), 0..3000)],
        chunks in prop::collection::vec(1usize..700, 0..20),
    ) {
        let whole = split(&bytes, &[]);
        let chunked = split(&bytes, &chunks);
        prop_assert_eq!(whole, chunked);
    }

    #[test]
    fn the_decoder_survives_arbitrary_access_units(aus in prop::collection::vec(nal_soup(), 1..8)) {
        let mut dec = SoftwareDecoder::new().expect("decoder");
        for (i, au) in aus.iter().enumerate() {
            // Errors are fine (counted by the pipeline); panics and crashes are not.
            let _ = dec.decode(au, i as f64 * 0.1);
        }
    }

    #[test]
    fn arbitrary_files_are_refused_as_mp4_without_panicking(
        bytes in prop::collection::vec(any::<u8>(), 0..2000),
        boxes in prop::collection::vec((any::<u32>(), prop::sample::select(vec![*b"moov", *b"trak", *b"mdia", *b"minf", *b"stbl", *b"stsd", *b"avc1", *b"stsz", *b"stco", *b"free"])), 0..12),
    ) {
        // Random box headers (sizes included) in front of random bytes.
        let mut file = Vec::new();
        for (size, kind) in boxes {
            file.extend_from_slice(&(size % 4096).to_be_bytes());
            file.extend_from_slice(&kind);
        }
        file.extend(bytes);
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.mp4");
        std::fs::write(&p, &file).expect("write");
        if let Ok(mut m) = Mp4H264::open(&p) {
            while let Ok(Some(_)) = m.next_sample() {}
        }
    }
}
