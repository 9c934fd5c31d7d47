//! Arbitrary bytes, split at an arbitrary point, through the frame decoder: it must never panic,
//! never allocate beyond one maximum frame, and re-encode whatever it accepts identically.
#![no_main]

use its_shared::wire::{FrameDecoder, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut decoder = FrameDecoder::new();
    for part in [&data[..split], &data[split..]] {
        decoder.extend(part);
        while let Ok(Some(frame)) = decoder.next_frame() {
            // Compare bytes, not frames: a float field may hold NaN.
            let bytes = encode(&frame).expect("a decoded frame re-encodes");
            let mut again = FrameDecoder::new();
            again.extend(&bytes);
            let back = again.next_frame().ok().flatten().expect("re-encoded frame decodes");
            assert_eq!(encode(&back).ok(), Some(bytes));
        }
    }
});
