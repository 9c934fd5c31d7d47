//! H.264 Annex-B byte streams: splitting into NAL units and grouping them into access units
//! (ITU-T H.264 §7.4.1.2.3), incrementally, so a stream of any length is read in bounded memory.

/// NAL unit type (the low five bits of the first byte after the start code).
pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// The NAL units of an Annex-B buffer, start codes (and trailing zero bytes) removed.
pub fn nal_units(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = match find_start_code(data) {
        Some((pos, len)) => &data[pos + len..],
        None => &data[data.len()..],
    };
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (nal, next) = match find_start_code(rest) {
            Some((pos, len)) => (&rest[..pos], &rest[pos + len..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        let mut end = nal.len();
        while end > 0 && nal[end - 1] == 0 {
            end -= 1;
        }
        Some(&nal[..end])
    })
    .filter(|n| !n.is_empty())
}

/// Whether a VCL NAL unit is the first slice of a picture: `first_mb_in_slice` (the first
/// Exp-Golomb code of the slice header) is 0, which is a single 1 bit.
fn is_first_slice(nal: &[u8]) -> bool {
    nal.get(1).is_some_and(|b| b & 0x80 != 0)
}

fn is_vcl(t: u8) -> bool {
    (1..=5).contains(&t)
}

/// Splits a byte stream into NAL units (without start codes) and groups them into access units
/// (each emitted as Annex-B with 4-byte start codes). Feed bytes in any chunking.
#[derive(Debug, Default)]
pub struct AccessUnitSplitter {
    buf: Vec<u8>,
    /// Scan position in `buf` (bytes before it hold no start code not yet seen).
    scan: usize,
    /// Start of the current NAL unit's payload in `buf`, once a start code was found.
    nal_start: Option<usize>,
    current: Vec<u8>,
    current_has_vcl: bool,
    /// NAL units larger than this are dropped (a hostile or corrupt stream): 16 MiB.
    pub max_nal: usize,
    /// NAL units dropped for exceeding `max_nal`.
    pub oversized: u64,
}

impl AccessUnitSplitter {
    pub fn new() -> Self {
        Self { max_nal: 16 << 20, ..Self::default() }
    }

    /// Adds bytes; returns the access units completed by them.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Vec<u8>>) {
        self.buf.extend_from_slice(data);
        loop {
            let from = self.scan;
            match find_start_code(&self.buf[from..]) {
                Some((pos, len)) => {
                    let sc = from + pos;
                    if let Some(start) = self.nal_start {
                        // Trailing zero bytes before a start code belong to the next start code.
                        let mut end = sc;
                        while end > start && self.buf[end - 1] == 0 {
                            end -= 1;
                        }
                        let nal = self.buf[start..end].to_vec();
                        self.on_nal(&nal, out);
                    }
                    self.nal_start = Some(sc + len);
                    self.scan = sc + len;
                }
                None => {
                    // Keep up to 3 bytes unscanned: a start code may straddle the chunk boundary.
                    self.scan = self.buf.len().saturating_sub(3).max(self.nal_start.unwrap_or(0));
                    break;
                }
            }
        }
        // Drop consumed bytes.
        let keep_from = self.nal_start.unwrap_or(self.scan).min(self.scan);
        if keep_from > 0 {
            self.buf.drain(..keep_from);
            self.scan -= keep_from;
            if let Some(s) = self.nal_start.as_mut() {
                *s -= keep_from;
            }
        }
        if self.nal_start.is_some() && self.buf.len() > self.max_nal {
            // An unterminated NAL unit beyond the limit: drop it and resynchronise.
            self.oversized += 1;
            self.buf.clear();
            self.scan = 0;
            self.nal_start = None;
        }
    }

    /// Ends the stream: the last NAL unit and access unit are complete.
    pub fn finish(&mut self, out: &mut Vec<Vec<u8>>) {
        if let Some(start) = self.nal_start.take() {
            let nal = self.buf[start..].to_vec();
            self.on_nal(&nal, out);
        }
        self.buf.clear();
        self.scan = 0;
        self.flush(out);
    }

    fn flush(&mut self, out: &mut Vec<Vec<u8>>) {
        if self.current_has_vcl {
            out.push(std::mem::take(&mut self.current));
        }
        self.current.clear();
        self.current_has_vcl = false;
    }

    fn on_nal(&mut self, nal: &[u8], out: &mut Vec<Vec<u8>>) {
        if nal.is_empty() {
            return;
        }
        if nal.len() > self.max_nal {
            self.oversized += 1;
            return;
        }
        let t = nal_type(nal);
        let starts_new = if is_vcl(t) {
            self.current_has_vcl && is_first_slice(nal)
        } else {
            // AUD, SEI, SPS, PPS and types 14..18 start a new access unit after a picture.
            self.current_has_vcl && matches!(t, 6..=9 | 14..=18)
        };
        if starts_new {
            self.flush(out);
        }
        // End of sequence / end of stream NAL units are dropped.
        if matches!(t, 10 | 11) {
            return;
        }
        if self.current.len() + nal.len() + 4 > self.max_nal {
            // An access unit that never ends (no slice starts a new picture, or endless
            // parameter sets): drop what it holds rather than grow without bound.
            self.oversized += 1;
            self.current.clear();
            self.current_has_vcl = false;
        }
        self.current.extend_from_slice(&[0, 0, 0, 1]);
        self.current.extend_from_slice(nal);
        self.current_has_vcl |= is_vcl(t);
    }
}

/// Position and length of the first start code (`00 00 01` or `00 00 00 01`) in `b`.
fn find_start_code(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 3 <= b.len() {
        // Skip fast: a start code needs b[i+2] == 1 with two zeros before it.
        if b[i + 2] > 1 {
            i += 3;
            continue;
        }
        if b[i] == 0 && b[i + 1] == 0 && b[i + 2] == 1 {
            if i > 0 && b[i - 1] == 0 {
                return Some((i - 1, 4));
            }
            return Some((i, 3));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nal(t: u8, first_slice: bool, len: usize) -> Vec<u8> {
        let mut v = vec![0x60 | t, if first_slice { 0x88 } else { 0x08 }];
        v.extend((0..len).map(|i| (i % 200 + 2) as u8));
        v
    }

    fn stream(nals: &[Vec<u8>]) -> Vec<u8> {
        nals.iter().flat_map(|n| [0, 0, 0, 1].iter().copied().chain(n.iter().copied())).collect()
    }

    fn split_in_chunks(bytes: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let mut s = AccessUnitSplitter::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn groups_parameter_sets_with_the_keyframe_and_slices_by_picture() {
        let nals = vec![
            nal(7, false, 10), // SPS
            nal(8, false, 4),  // PPS
            nal(5, true, 50),  // IDR slice 1
            nal(5, false, 50), // IDR slice 2 of the same picture
            nal(1, true, 30),  // P picture
            nal(9, false, 1),  // AUD
            nal(1, true, 30),  // P picture
        ];
        let bytes = stream(&nals);
        for chunk in [1, 2, 3, 7, 64, bytes.len()] {
            let aus = split_in_chunks(&bytes, chunk);
            assert_eq!(aus.len(), 3, "chunk {chunk}");
            assert_eq!(aus[0], stream(&nals[0..4]), "chunk {chunk}");
            assert_eq!(aus[1], stream(&nals[4..5]));
            assert_eq!(aus[2], stream(&nals[5..7]));
        }
    }

    #[test]
    fn nal_units_of_a_buffer() {
        let nals = vec![nal(7, false, 3), nal(8, false, 2), nal(5, true, 4)];
        let mut bytes = stream(&nals);
        bytes.extend([0, 0]);
        let got: Vec<&[u8]> = nal_units(&bytes).collect();
        assert_eq!(got, nals.iter().map(|n| n.as_slice()).collect::<Vec<_>>());
        assert_eq!(nal_units(&[1, 2, 3]).count(), 0, "no start code, no NAL unit");
    }

    #[test]
    fn three_byte_start_codes_and_trailing_zeros() {
        let mut bytes = vec![0, 0, 1];
        bytes.extend(nal(5, true, 5));
        bytes.extend([0, 0, 0, 0, 1]);
        bytes.extend(nal(1, true, 5));
        let aus = split_in_chunks(&bytes, 4);
        assert_eq!(aus.len(), 2);
        assert_eq!(aus[0], stream(&[nal(5, true, 5)]));
    }

    #[test]
    fn an_access_unit_that_never_ends_stays_bounded() {
        let mut s = AccessUnitSplitter::new();
        s.max_nal = 1000;
        let mut out = Vec::new();
        // Slices that all continue one picture (first_mb_in_slice != 0), forever.
        s.push(&stream(&[nal(5, true, 50)]), &mut out);
        for _ in 0..100 {
            s.push(&stream(&[nal(5, false, 50)]), &mut out);
        }
        assert!(s.current.len() <= 1000, "{}", s.current.len());
        assert!(s.oversized >= 1);
    }

    #[test]
    fn garbage_without_start_codes_yields_nothing_and_stays_bounded() {
        let mut s = AccessUnitSplitter::new();
        s.max_nal = 1000;
        let mut out = Vec::new();
        s.push(&[0, 0, 1, 0x65, 0x88], &mut out);
        for _ in 0..100 {
            s.push(&[0xAB; 100], &mut out);
        }
        assert!(s.buf.len() <= 1100, "buffer grew to {}", s.buf.len());
        assert_eq!(s.oversized, 1);
        s.finish(&mut out);
        assert!(out.is_empty());
    }
}
