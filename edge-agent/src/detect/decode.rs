//! Output decoders: raw model outputs → candidate boxes, then per-class non-maximum suppression.
//!
//! - [`decode_ssd`]: TF Object Detection API SSD (anchors + the Faster R-CNN box coder with
//!   scales), one class per anchor (the best non-background score), as TFLite's fast post-processing.
//! - [`decode_yolo`]: ultralytics-style anchor-free output `[1, 4 + C, N]` (or transposed):
//!   centre x, centre y, width, height in input pixels, then C class scores (already sigmoid).
//!
//! Both produce boxes in model-input pixels; the caller maps them to the frame.

use crate::detect::manifest::YoloLayout;

/// A decoded box before it is mapped to the frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub class_id: usize,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in model-input pixels.
    pub bbox: [f32; 4],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// An output tensor does not have the size the manifest implies.
    #[error("output {name} has {actual} values, expected {expected} ({why})")]
    Shape { name: String, actual: usize, expected: usize, why: String },
}

/// Decodes SSD outputs. `boxes`: N x (ty, tx, th, tw); `scores`: N x C' where C' = classes + 1
/// with a background column, or classes without.
#[allow(clippy::too_many_arguments)]
pub fn decode_ssd(
    boxes: &[f32],
    scores: &[f32],
    anchors: &[[f32; 4]],
    scales: [f32; 4],
    background_column: bool,
    input_size: (u32, u32),
    score_threshold: f32,
    out: &mut Vec<Candidate>,
) -> Result<(), DecodeError> {
    let n = anchors.len();
    if boxes.len() != n * 4 {
        return Err(DecodeError::Shape {
            name: "boxes".into(),
            actual: boxes.len(),
            expected: n * 4,
            why: format!("{n} anchors x 4"),
        });
    }
    if scores.is_empty() || !scores.len().is_multiple_of(n) {
        return Err(DecodeError::Shape {
            name: "scores".into(),
            actual: scores.len(),
            expected: n * scores.len().div_ceil(n.max(1)).max(1),
            why: format!("a whole number of classes for {n} anchors"),
        });
    }
    let cols = scores.len() / n;
    let first = usize::from(background_column);
    let (w, h) = (input_size.0 as f32, input_size.1 as f32);
    for (a, anchor) in anchors.iter().enumerate() {
        let row = &scores[a * cols + first..(a + 1) * cols];
        let mut best = (0usize, f32::NEG_INFINITY);
        for (c, &s) in row.iter().enumerate() {
            if s > best.1 {
                best = (c, s);
            }
        }
        // NaN scores never pass the comparison.
        if best.1.is_nan() || best.1 < score_threshold {
            continue;
        }
        let [ya, xa, ha, wa] = *anchor;
        let t = &boxes[a * 4..a * 4 + 4];
        let yc = t[0] / scales[0] * ha + ya;
        let xc = t[1] / scales[1] * wa + xa;
        // Clamp the exponent: a hostile or broken model must not produce infinite boxes.
        let bh = (t[2] / scales[2]).clamp(-10.0, 10.0).exp() * ha;
        let bw = (t[3] / scales[3]).clamp(-10.0, 10.0).exp() * wa;
        let bbox = [(xc - bw / 2.0) * w, (yc - bh / 2.0) * h, (xc + bw / 2.0) * w, (yc + bh / 2.0) * h];
        if bbox.iter().all(|v| v.is_finite()) {
            out.push(Candidate { class_id: best.0, score: best.1, bbox });
        }
    }
    Ok(())
}

/// Decodes a YOLO (ultralytics v8/v11 style) output of `classes` classes.
pub fn decode_yolo(
    tensor: &[f32],
    layout: YoloLayout,
    classes: usize,
    score_threshold: f32,
    out: &mut Vec<Candidate>,
) -> Result<(), DecodeError> {
    let stride = 4 + classes;
    if classes == 0 || tensor.is_empty() || !tensor.len().is_multiple_of(stride) {
        return Err(DecodeError::Shape {
            name: "yolo output".into(),
            actual: tensor.len(),
            expected: stride * (tensor.len() / stride).max(1),
            why: format!("(4 + {classes} classes) x N"),
        });
    }
    let n = tensor.len() / stride;
    let at = |k: usize, i: usize| match layout {
        YoloLayout::ChannelsFirst => tensor[k * n + i],
        YoloLayout::ChannelsLast => tensor[i * stride + k],
    };
    for i in 0..n {
        let mut best = (0usize, f32::NEG_INFINITY);
        for c in 0..classes {
            let s = at(4 + c, i);
            if s > best.1 {
                best = (c, s);
            }
        }
        if best.1.is_nan() || best.1 < score_threshold {
            continue;
        }
        let (cx, cy, bw, bh) = (at(0, i), at(1, i), at(2, i), at(3, i));
        let bbox = [cx - bw / 2.0, cy - bh / 2.0, cx + bw / 2.0, cy + bh / 2.0];
        if bbox.iter().all(|v| v.is_finite()) && bw > 0.0 && bh > 0.0 {
            out.push(Candidate { class_id: best.0, score: best.1, bbox });
        }
    }
    Ok(())
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes (0 for empty ones).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Per-class greedy non-maximum suppression: within each class, a box is dropped when it
/// overlaps a higher-scoring kept box by more than `iou_threshold`. Keeps at most `max_out`
/// boxes overall (highest scores first). Sorts `cands` in place.
pub fn nms_per_class(cands: &mut [Candidate], iou_threshold: f32, max_out: usize) -> Vec<Candidate> {
    cands.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.class_id.cmp(&b.class_id)));
    let mut kept: Vec<Candidate> = Vec::new();
    for c in cands.iter() {
        if kept.len() >= max_out {
            break;
        }
        if kept.iter().any(|k| k.class_id == c.class_id && iou(&k.bbox, &c.bbox) > iou_threshold) {
            continue;
        }
        kept.push(*c);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssd_box_coder_inverts_the_encoding() {
        // One anchor at the centre, 0.2 x 0.4 (h x w); encode a box at (yc 0.6, xc 0.45, h 0.3, w 0.2).
        let anchors = [[0.5f32, 0.5, 0.2, 0.4]];
        let (yc, xc, h, w) = (0.6f32, 0.45f32, 0.3f32, 0.2f32);
        let enc = [(yc - 0.5) / 0.2 * 10.0, (xc - 0.5) / 0.4 * 10.0, (h / 0.2).ln() * 5.0, (w / 0.4).ln() * 5.0];
        // Background, class 0 (person) low, class 1 (bicycle) high.
        let scores = [0.9f32, 0.1, 0.8];
        let mut out = Vec::new();
        decode_ssd(&enc, &scores, &anchors, [10.0, 10.0, 5.0, 5.0], true, (300, 300), 0.5, &mut out).expect("ok");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].class_id, 1, "the background column is not a class");
        let want = [(xc - w / 2.0) * 300.0, (yc - h / 2.0) * 300.0, (xc + w / 2.0) * 300.0, (yc + h / 2.0) * 300.0];
        for k in 0..4 {
            assert!((out[0].bbox[k] - want[k]).abs() < 1e-3, "{:?} vs {want:?}", out[0].bbox);
        }
    }

    #[test]
    fn ssd_refuses_outputs_of_the_wrong_size_and_survives_hostile_values() {
        let anchors = [[0.5f32, 0.5, 0.2, 0.2]; 2];
        let mut out = Vec::new();
        let e = decode_ssd(&[0.0; 7], &[0.0; 4], &anchors, [10.0; 4], true, (300, 300), 0.5, &mut out);
        assert!(matches!(e, Err(DecodeError::Shape { .. })));
        let boxes = [f32::NAN, 0.0, 1e30, -1e30, 0.0, 0.0, f32::INFINITY, 0.0];
        let scores = [0.0, 0.9, 0.0, f32::NAN];
        decode_ssd(&boxes, &scores, &anchors, [10.0; 4], true, (300, 300), 0.5, &mut out).expect("ok");
        assert!(out.iter().all(|c| c.bbox.iter().all(|v| v.is_finite())), "{out:?}");
    }

    #[test]
    fn yolo_channels_first_and_last_decode_the_same_boxes() {
        // Two candidates, 3 classes: (cx 100, cy 50, w 20, h 10) class 2 at 0.9; second below threshold.
        let rows: [[f32; 7]; 2] = [[100.0, 50.0, 20.0, 10.0, 0.1, 0.2, 0.9], [10.0, 10.0, 5.0, 5.0, 0.3, 0.1, 0.2]];
        let last: Vec<f32> = rows.iter().flatten().copied().collect();
        let first: Vec<f32> = (0..7).flat_map(|k| rows.iter().map(move |r| r[k])).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        decode_yolo(&first, YoloLayout::ChannelsFirst, 3, 0.5, &mut a).expect("ok");
        decode_yolo(&last, YoloLayout::ChannelsLast, 3, 0.5, &mut b).expect("ok");
        assert_eq!(a, b);
        assert_eq!(a, vec![Candidate { class_id: 2, score: 0.9, bbox: [90.0, 45.0, 110.0, 55.0] }]);
        assert!(decode_yolo(&last[..13], YoloLayout::ChannelsLast, 3, 0.5, &mut a).is_err());
    }

    #[test]
    fn nms_is_per_class() {
        let b = [0.0, 0.0, 10.0, 10.0];
        let shifted = [1.0, 0.0, 11.0, 10.0];
        let mut c = vec![
            Candidate { class_id: 2, score: 0.8, bbox: b },
            Candidate { class_id: 2, score: 0.9, bbox: shifted },
            Candidate { class_id: 7, score: 0.7, bbox: b },
            Candidate { class_id: 2, score: 0.6, bbox: [50.0, 50.0, 60.0, 60.0] },
        ];
        let kept = nms_per_class(&mut c, 0.5, 100);
        let ids: Vec<(usize, f32)> = kept.iter().map(|k| (k.class_id, k.score)).collect();
        assert_eq!(ids, vec![(2, 0.9), (7, 0.7), (2, 0.6)]);
        assert_eq!(nms_per_class(&mut c, 0.5, 1).len(), 1);
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 3.0, 2.0]), 2.0 / 6.0);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }
}
