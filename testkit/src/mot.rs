//! Multi-object tracking evaluation: CLEAR MOT (MOTA, MOTP, ID switches, fragmentations, mostly
//! tracked/lost) and the identity metrics IDF1, IDP and IDR, following py-motmetrics.
//!
//! # CLEAR MOT (Bernardin & Stiefelhagen 2008)
//!
//! A ground-truth box and a hypothesis box may correspond when their IoU is at least the
//! threshold. Frame by frame:
//!
//! 1. a ground-truth object matched in the previous frame keeps that hypothesis if it is present
//!    and still overlaps enough, even when another pairing would overlap more;
//! 2. the remaining objects and hypotheses get a maximum-cardinality, minimum-`Σ (1 - IoU)`
//!    assignment ([`solve_max_matching`]); a match to a different hypothesis id than the object's
//!    last match is an ID switch;
//! 3. unmatched objects are misses (FN), unmatched hypotheses false positives (FP).
//!
//! `MOTA = 1 - (FN + FP + IDSW) / GT`, with `GT` the number of ground-truth boxes. `MOTP` here is
//! the mean IoU of the matched pairs (higher is better, the overlap form of the CLEAR MOT paper);
//! py-motmetrics reports the mean distance `1 - IoU` instead, i.e. `1 - motp`.
//!
//! A fragmentation is an object going from tracked to missed and later being tracked again. An
//! object is mostly tracked when matched in at least 80 % of the frames it is present in, mostly
//! lost below 20 %, partially tracked in between.
//!
//! # Identity metrics (Ristani et al. 2016)
//!
//! Whole trajectories are matched one to one so as to maximise `IDTP`, the number of frames in
//! which a ground-truth object and its hypothesis are both present with IoU at least the
//! threshold. `IDFN = GT - IDTP`, `IDFP = hypothesis boxes - IDTP`,
//! `IDF1 = 2 IDTP / (2 IDTP + IDFP + IDFN)`, `IDP = IDTP / (IDTP + IDFP)`,
//! `IDR = IDTP / (IDTP + IDFN)`.
//!
//! Ratios with a zero denominator are NaN (py-motmetrics gives the same numbers, except MOTA with
//! false positives but no ground truth, which it reports as -inf).

use std::collections::HashMap;
use std::fmt;

use its_agent::track::iou;
use its_agent::track::{solve, solve_max_matching};

/// One frame of boxes: `(id, [x1, y1, x2, y2])`, ids unique within the frame.
pub type FrameBoxes = Vec<(u64, [f32; 4])>;

/// Result of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct MotMetrics {
    pub num_frames: usize,
    /// Ground-truth boxes.
    pub num_gt: usize,
    /// Hypothesis boxes.
    pub num_hyp: usize,
    /// Distinct ground-truth ids.
    pub num_gt_ids: usize,
    /// Distinct hypothesis ids.
    pub num_hyp_ids: usize,
    /// Matched pairs, ID switches included.
    pub true_positives: usize,
    pub false_positives: usize,
    pub misses: usize,
    pub id_switches: usize,
    pub fragmentations: usize,
    pub mostly_tracked: usize,
    pub partially_tracked: usize,
    pub mostly_lost: usize,
    pub mota: f64,
    /// Mean IoU of the matched pairs.
    pub motp: f64,
    pub precision: f64,
    pub recall: f64,
    pub idtp: usize,
    pub idfp: usize,
    pub idfn: usize,
    pub idf1: f64,
    pub idp: f64,
    pub idr: f64,
}

impl MotMetrics {
    /// Column titles for [`table_row`](Self::table_row), in the MOTChallenge order.
    pub const TABLE_HEADER: &'static str =
        "  IDF1    IDP    IDR   Rcll   Prcn    GT    MT    PT    ML      FP      FN    IDs     FM   MOTA   MOTP";

    /// One line of the results table, percentages with one decimal.
    pub fn table_row(&self) -> String {
        let pct = |v: f64| if v.is_finite() { format!("{:5.1}%", 100.0 * v) } else { "   n/a".to_owned() };
        format!(
            "{} {} {} {} {} {:5} {:5} {:5} {:5} {:7} {:7} {:6} {:6} {} {}",
            pct(self.idf1),
            pct(self.idp),
            pct(self.idr),
            pct(self.recall),
            pct(self.precision),
            self.num_gt_ids,
            self.mostly_tracked,
            self.partially_tracked,
            self.mostly_lost,
            self.false_positives,
            self.misses,
            self.id_switches,
            self.fragmentations,
            pct(self.mota),
            pct(self.motp),
        )
    }
}

impl fmt::Display for MotMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table_row())
    }
}

/// Per ground-truth object state for CLEAR MOT.
#[derive(Debug, Clone, Default)]
struct Object {
    present: usize,
    tracked: usize,
    /// Hypothesis (dense index) of the last match, and the frame it was made in.
    last_match: Option<(usize, usize)>,
    /// Matched when last present.
    was_tracked: bool,
    /// Missed since it was last tracked.
    in_gap: bool,
    fragmentations: usize,
}

/// Evaluates hypotheses `hyp` against ground truth `gt`, frames aligned by index (every index is a
/// frame; one side shorter than the other counts as empty there), boxes corresponding when their
/// IoU is at least `iou_threshold`.
pub fn evaluate(gt: &[FrameBoxes], hyp: &[FrameBoxes], iou_threshold: f32) -> MotMetrics {
    let num_frames = gt.len().max(hyp.len());
    let empty = FrameBoxes::new();
    let mut gt_index: HashMap<u64, usize> = HashMap::new();
    let mut hyp_index: HashMap<u64, usize> = HashMap::new();
    let mut objects: Vec<Object> = Vec::new();
    // Frames in which a ground-truth object and a hypothesis overlap enough, per (object, hypothesis).
    let mut overlaps: HashMap<(usize, usize), u32> = HashMap::new();

    let (mut tp, mut fp, mut misses, mut switches) = (0usize, 0usize, 0usize, 0usize);
    let mut iou_sum = 0.0f64;
    let (mut num_gt, mut num_hyp) = (0usize, 0usize);
    // Per-frame scratch.
    let (mut ious, mut cost) = (Vec::<f32>::new(), Vec::<f32>::new());
    let (mut g_idx, mut h_idx) = (Vec::<usize>::new(), Vec::<usize>::new());
    let (mut g_done, mut h_done) = (Vec::<bool>::new(), Vec::<bool>::new());
    let (mut g_rest, mut h_rest) = (Vec::<usize>::new(), Vec::<usize>::new());

    for f in 0..num_frames {
        let gf = gt.get(f).unwrap_or(&empty);
        let hf = hyp.get(f).unwrap_or(&empty);
        num_gt += gf.len();
        num_hyp += hf.len();
        g_idx.clear();
        for (id, _) in gf {
            let next = gt_index.len();
            let o = *gt_index.entry(*id).or_insert(next);
            if o == objects.len() {
                objects.push(Object::default());
            }
            objects[o].present += 1;
            g_idx.push(o);
        }
        h_idx.clear();
        for (id, _) in hf {
            let next = hyp_index.len();
            h_idx.push(*hyp_index.entry(*id).or_insert(next));
        }
        let (ng, nh) = (gf.len(), hf.len());
        ious.clear();
        for (i, (_, gb)) in gf.iter().enumerate() {
            for (j, (_, hb)) in hf.iter().enumerate() {
                let v = iou(gb, hb);
                ious.push(v);
                if v >= iou_threshold {
                    *overlaps.entry((g_idx[i], h_idx[j])).or_insert(0) += 1;
                }
            }
        }
        let ok = |i: usize, j: usize| ious[i * nh + j] >= iou_threshold;

        g_done.clear();
        g_done.resize(ng, false);
        h_done.clear();
        h_done.resize(nh, false);
        // 1. Keep last frame's correspondences that still hold.
        for i in 0..ng {
            let o = &mut objects[g_idx[i]];
            let Some((h, frame)) = o.last_match else { continue };
            if frame + 1 != f {
                continue;
            }
            if let Some(j) = (0..nh).find(|&j| !h_done[j] && h_idx[j] == h && ok(i, j)) {
                g_done[i] = true;
                h_done[j] = true;
                o.last_match = Some((h, f));
                tp += 1;
                iou_sum += f64::from(ious[i * nh + j]);
            }
        }
        // 2. Assign the rest.
        g_rest.clear();
        g_rest.extend((0..ng).filter(|&i| !g_done[i]));
        h_rest.clear();
        h_rest.extend((0..nh).filter(|&j| !h_done[j]));
        cost.clear();
        for &i in &g_rest {
            cost.extend(h_rest.iter().map(|&j| if ok(i, j) { 1.0 - ious[i * nh + j] } else { f32::NAN }));
        }
        let a = solve_max_matching(&cost, g_rest.len(), h_rest.len(), f32::INFINITY);
        for &(r, c) in &a.matches {
            let (i, j) = (g_rest[r], h_rest[c]);
            let o = &mut objects[g_idx[i]];
            if o.last_match.is_some_and(|(h, _)| h != h_idx[j]) {
                switches += 1;
            }
            o.last_match = Some((h_idx[j], f));
            g_done[i] = true;
            h_done[j] = true;
            tp += 1;
            iou_sum += f64::from(ious[i * nh + j]);
        }
        // 3. Misses and false positives; tracked/missed history per object.
        fp += h_done.iter().filter(|&&d| !d).count();
        for (i, &done) in g_done.iter().enumerate() {
            let o = &mut objects[g_idx[i]];
            if done {
                o.tracked += 1;
                if o.in_gap {
                    o.fragmentations += 1;
                    o.in_gap = false;
                }
            } else {
                misses += 1;
                if o.was_tracked {
                    o.in_gap = true;
                }
            }
            o.was_tracked = done;
        }
    }

    let idtp = identity_matching(&overlaps, objects.len(), hyp_index.len());
    let ratio = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    let track_ratio = |o: &Object| o.tracked as f64 / o.present as f64;
    MotMetrics {
        num_frames,
        num_gt,
        num_hyp,
        num_gt_ids: objects.len(),
        num_hyp_ids: hyp_index.len(),
        true_positives: tp,
        false_positives: fp,
        misses,
        id_switches: switches,
        fragmentations: objects.iter().map(|o| o.fragmentations).sum(),
        mostly_tracked: objects.iter().filter(|o| track_ratio(o) >= 0.8).count(),
        partially_tracked: objects.iter().filter(|o| (0.2..0.8).contains(&track_ratio(o))).count(),
        mostly_lost: objects.iter().filter(|o| track_ratio(o) < 0.2).count(),
        mota: if num_gt == 0 { f64::NAN } else { 1.0 - (misses + fp + switches) as f64 / num_gt as f64 },
        motp: if tp == 0 { f64::NAN } else { iou_sum / tp as f64 },
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, num_gt),
        idtp,
        idfp: num_hyp - idtp,
        idfn: num_gt - idtp,
        idf1: ratio(2 * idtp, num_gt + num_hyp),
        idp: ratio(idtp, num_hyp),
        idr: ratio(idtp, num_gt),
    }
}

/// IDTP: the most frames a one-to-one matching of ground-truth objects to hypotheses can have
/// them overlapping. Only trajectories that overlap anything take part.
fn identity_matching(overlaps: &HashMap<(usize, usize), u32>, objects: usize, hyps: usize) -> usize {
    let mut row_of = vec![usize::MAX; objects];
    let mut col_of = vec![usize::MAX; hyps];
    let (mut rows, mut cols) = (0usize, 0usize);
    for &(o, h) in overlaps.keys() {
        if row_of[o] == usize::MAX {
            row_of[o] = rows;
            rows += 1;
        }
        if col_of[h] == usize::MAX {
            col_of[h] = cols;
            cols += 1;
        }
    }
    let mut cost = vec![f32::NAN; rows * cols];
    for (&(o, h), &n) in overlaps {
        cost[row_of[o] * cols + col_of[h]] = -(n as f32);
    }
    // Minimising Σ (-frames + ε) over the pairs: every pair gains at least 1 - ε, and the ε per
    // pair (less than 1/2 in total) only breaks ties, so the total of frames is the maximum.
    let eps = 0.5 / (rows.min(cols) as f32 + 1.0);
    let a = solve(&cost, rows, cols, -eps);
    a.matches.iter().map(|&(r, c)| -cost[r * cols + c] as usize).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: f32, y: f32) -> [f32; 4] {
        [x, y, x + 10.0, y + 10.0]
    }

    /// `frames` frames of objects `(id, x)` on a row, each a 10x10 box at (x, 0) moving 1 px a frame.
    fn sequence(frames: usize, ids_at: impl Fn(usize) -> Vec<(u64, f32)>) -> Vec<FrameBoxes> {
        (0..frames).map(|f| ids_at(f).into_iter().map(|(id, x)| (id, square(x + f as f32, 0.0))).collect()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn perfect_tracking() {
        let gt = sequence(10, |_| vec![(1, 0.0), (2, 50.0)]);
        let hyp = sequence(10, |_| vec![(7, 0.0), (9, 50.0)]);
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!((m.num_frames, m.num_gt, m.num_hyp, m.true_positives), (10, 20, 20, 20));
        assert_eq!((m.false_positives, m.misses, m.id_switches, m.fragmentations), (0, 0, 0, 0));
        assert_eq!((m.mostly_tracked, m.partially_tracked, m.mostly_lost), (2, 0, 0));
        assert_eq!((m.idtp, m.idfp, m.idfn), (20, 0, 0));
        assert!(close(m.mota, 1.0) && close(m.motp, 1.0) && close(m.idf1, 1.0));
        assert!(close(m.precision, 1.0) && close(m.recall, 1.0) && close(m.idp, 1.0) && close(m.idr, 1.0));
    }

    #[test]
    fn one_id_switch_mid_sequence() {
        // GT 1 is followed by hypothesis 1 for frames 0-4 and by hypothesis 3 for frames 5-9;
        // GT 2 by hypothesis 2 throughout.
        let gt = sequence(10, |_| vec![(1, 0.0), (2, 50.0)]);
        let hyp = sequence(10, |f| vec![(if f < 5 { 1 } else { 3 }, 0.0), (2, 50.0)]);
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!(m.id_switches, 1);
        assert_eq!((m.false_positives, m.misses, m.fragmentations), (0, 0, 0));
        assert!(close(m.mota, 1.0 - 1.0 / 20.0));
        // Best identity matching: GT 1 <-> hyp 1 (or 3) for 5 frames, GT 2 <-> hyp 2 for 10.
        // IDTP = 15, IDFP = 20 - 15 = 5, IDFN = 20 - 15 = 5, IDF1 = 30 / (30 + 10) = 0.75.
        assert_eq!((m.idtp, m.idfp, m.idfn), (15, 5, 5));
        assert!(close(m.idf1, 0.75) && close(m.idp, 0.75) && close(m.idr, 0.75));
    }

    #[test]
    fn two_tracks_swapping_ids_count_two_switches() {
        // Hypotheses 1 and 2 trade objects at frame 5: both objects switch. IDTP = 5 + 5 = 10,
        // IDF1 = 20 / 40 = 0.5.
        let gt = sequence(10, |_| vec![(1, 0.0), (2, 50.0)]);
        let hyp = sequence(10, |f| if f < 5 { vec![(1, 0.0), (2, 50.0)] } else { vec![(2, 0.0), (1, 50.0)] });
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!(m.id_switches, 2);
        assert!(close(m.mota, 1.0 - 2.0 / 20.0));
        assert_eq!(m.idtp, 10);
        assert!(close(m.idf1, 0.5));
    }

    #[test]
    fn all_misses() {
        let gt = sequence(8, |_| vec![(1, 0.0), (2, 50.0), (3, 100.0)]);
        let m = evaluate(&gt, &[], 0.5);
        assert_eq!((m.num_frames, m.misses, m.false_positives, m.true_positives), (8, 24, 0, 0));
        assert_eq!((m.mostly_tracked, m.partially_tracked, m.mostly_lost), (0, 0, 3));
        assert!(close(m.mota, 0.0) && close(m.recall, 0.0) && close(m.idf1, 0.0));
        assert!(m.motp.is_nan() && m.precision.is_nan() && m.idp.is_nan());
        assert_eq!((m.idtp, m.idfn, m.idfp), (0, 24, 0));
    }

    #[test]
    fn a_false_positive_track() {
        // GT 1 tracked perfectly for 10 frames; hypothesis 9 floats elsewhere in frames 2-6.
        let gt = sequence(10, |_| vec![(1, 0.0)]);
        let hyp = sequence(10, |f| if (2..7).contains(&f) { vec![(4, 0.0), (9, 200.0)] } else { vec![(4, 0.0)] });
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!((m.false_positives, m.misses, m.id_switches, m.num_hyp_ids), (5, 0, 0, 2));
        assert!(close(m.mota, 1.0 - 5.0 / 10.0));
        assert!(close(m.precision, 10.0 / 15.0));
        // IDTP = 10, IDFP = 5, IDFN = 0: IDF1 = 20 / 25.
        assert!(close(m.idf1, 0.8) && close(m.idp, 10.0 / 15.0) && close(m.idr, 1.0));
    }

    #[test]
    fn fragmentation_and_track_ratios() {
        // GT 1 matched in frames 0-3, missed 4-5, matched 6-9 by the same hypothesis: one
        // fragmentation, no switch, tracked 8/10 = mostly tracked. GT 2 matched 3 frames of 10
        // (partially tracked), GT 3 one frame of 10 (mostly lost).
        let gt = sequence(10, |_| vec![(1, 0.0), (2, 100.0), (3, 200.0)]);
        let hyp = sequence(10, |f| {
            let mut v = Vec::new();
            if !(4..6).contains(&f) {
                v.push((1, 0.0));
            }
            if f < 3 {
                v.push((2, 100.0));
            }
            if f == 9 {
                v.push((3, 200.0));
            }
            v
        });
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!((m.fragmentations, m.id_switches), (1, 0));
        assert_eq!((m.mostly_tracked, m.partially_tracked, m.mostly_lost), (1, 1, 1));
        assert_eq!(m.misses, 2 + 7 + 9);
    }

    #[test]
    fn identity_matching_is_global_not_greedy() {
        // GT 1 overlaps hypothesis 1 in frames 0-5 and hypothesis 2 in frames 6-9; GT 2 exists
        // in frames 10-14 and is followed by hypothesis 1. Greedy (GT 1 <-> hyp 1) gives IDTP 6;
        // the optimum pairs GT 1 <-> hyp 2 and GT 2 <-> hyp 1 for IDTP 4 + 5 = 9.
        let gt = sequence(15, |f| if f < 10 { vec![(1, 0.0)] } else { vec![(2, 0.0)] });
        let hyp = sequence(15, |f| if (6..10).contains(&f) { vec![(2, 0.0)] } else { vec![(1, 0.0)] });
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!(m.idtp, 9);
        assert!(close(m.idf1, 18.0 / 30.0));
        // CLEAR: GT 1 switches at frame 6; GT 2 is new, so its match is no switch.
        assert_eq!(m.id_switches, 1);
    }

    #[test]
    fn py_motmetrics_correct_average() {
        // py-motmetrics test_correct_average (figure 3 of the CLEAR MOT paper): 4 objects missed
        // for 4 frames, then one object tracked for 4 frames: MOTA = 1 - 16 / 20 = 0.2.
        let mut gt = Vec::new();
        let mut hyp = Vec::new();
        for _ in 0..4 {
            gt.push((1..=4).map(|id| (id, square(30.0 * id as f32, 0.0))).collect());
            hyp.push(Vec::new());
        }
        for _ in 0..4 {
            gt.push(vec![(4, square(120.0, 0.0))]);
            hyp.push(vec![(4, square(120.0, 0.0))]);
        }
        let m = evaluate(&gt, &hyp, 0.5);
        assert!(close(m.mota, 0.2), "{m:?}");
    }

    #[test]
    fn py_motmetrics_mota_motp() {
        // py-motmetrics test_mota_motp with distances replaced by boxes (IoU >= 0.5 allowed):
        // frame 0 all FP, frame 1 all misses, frame 2 matches (1-b, 2-a), frame 3 both switch
        // (1-a, 2-b), frame 4 keeps the history although the swapped pairs overlap more, frame 5
        // empty. Expected there: 4 matches + 2 switches, 2 FP, 2 misses, MOTA 1 - 6/8.
        let full = |x: f32| [x, 0.0, x + 100.0, 100.0];
        let part = |x: f32, h: f32| [x, 0.0, x + 100.0, h];
        let gt = vec![
            vec![],
            vec![(1, full(0.0)), (2, full(500.0))],
            vec![(1, full(0.0)), (2, full(500.0))],
            vec![(1, full(0.0)), (2, full(500.0))],
            vec![(1, full(0.0)), (2, full(20.0))],
            vec![],
        ];
        let hyp = vec![
            vec![(10, full(0.0)), (11, full(500.0))],
            vec![],
            vec![(10, part(500.0, 70.0)), (11, part(0.0, 50.0))],
            vec![(10, part(0.0, 80.0)), (11, part(500.0, 90.0))],
            vec![(10, full(20.0)), (11, full(0.0))],
            vec![],
        ];
        let m = evaluate(&gt, &hyp, 0.5);
        assert_eq!((m.true_positives, m.id_switches, m.false_positives, m.misses), (6, 2, 2, 2));
        assert_eq!((m.num_gt, m.num_hyp, m.num_frames), (8, 8, 6));
        assert!(close(m.mota, 1.0 - 6.0 / 8.0));
        let frame4 = 80.0 / 120.0;
        assert!((m.motp - (0.7 + 0.5 + 0.8 + 0.9 + 2.0 * frame4) / 6.0).abs() < 1e-6, "{}", m.motp);
    }

    #[test]
    fn empty_input() {
        let m = evaluate(&[], &[], 0.5);
        assert_eq!((m.num_frames, m.num_gt, m.num_hyp, m.idtp), (0, 0, 0, 0));
        assert!(m.mota.is_nan() && m.idf1.is_nan());
        assert!(m.table_row().contains("n/a"));
    }

    #[test]
    fn table_row_lines_up_with_the_header() {
        let gt = sequence(10, |_| vec![(1, 0.0), (2, 50.0)]);
        let hyp = sequence(10, |f| vec![(if f < 5 { 1 } else { 3 }, 0.0), (2, 50.0)]);
        let m = evaluate(&gt, &hyp, 0.5);
        let row = m.to_string();
        assert_eq!(row.len(), MotMetrics::TABLE_HEADER.len(), "\n{}\n{row}", MotMetrics::TABLE_HEADER);
        assert!(row.starts_with(" 75.0%"), "{row}");
        assert!(row.ends_with(" 95.0% 100.0%"), "{row}");
    }
}
