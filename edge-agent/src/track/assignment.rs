//! Optimal linear assignment on a rectangular cost matrix with a cost threshold.
//!
//! Both solvers give every row a free "stay unmatched" option and then run the shortest
//! augmenting path Hungarian method (Kuhn–Munkres with row and column potentials, `O(n² m)` for
//! `n` rows against `m ≥ n` columns, with no padding to a square matrix):
//!
//! - [`solve`] is the tracker's assignment: among pairs with `cost <= max_cost` it minimises
//!   `Σ (cost - max_cost)` over the matched pairs. This is what `lapjv(extend_cost=True,
//!   cost_limit=max_cost)` computes in ByteTrack: leaving a row and a column unmatched costs
//!   `max_cost / 2` each, so a pair is worth matching only when it beats that.
//! - [`solve_max_matching`] is the evaluation's assignment (CLEAR MOT, as py-motmetrics does it):
//!   it matches as many allowed pairs as possible, and among those matchings takes the cheapest.
//!
//! A cost that is not finite (NaN, ±∞) or above `max_cost` marks a pair that is never matched.
//! Rows and columns without any allowed pair are answered as unmatched without entering the
//! solver.

/// Result of an assignment: matched `(row, col)` pairs and what was left over, each sorted
/// ascending (matches by row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub matches: Vec<(usize, usize)>,
    pub unmatched_rows: Vec<usize>,
    pub unmatched_cols: Vec<usize>,
}

/// Optimal assignment of the row-major `rows × cols` matrix `cost` under `max_cost`: the matching
/// minimising `Σ (cost[r][c] - max_cost)` over its pairs, using only pairs with a finite
/// `cost <= max_cost` (the semantics of ByteTrack's `lapjv` with `cost_limit`).
///
/// A pair whose cost equals `max_cost` gains nothing; such pairs are added greedily afterwards, so
/// the result is maximal: no allowed pair joins an unmatched row to an unmatched column. With
/// `max_cost = +∞` every pair gains without bound, which is [`solve_max_matching`].
///
/// # Panics
/// If `cost.len() != rows * cols`.
pub fn solve(cost: &[f32], rows: usize, cols: usize, max_cost: f32) -> Assignment {
    if max_cost == f32::INFINITY {
        return solve_max_matching(cost, rows, cols, max_cost);
    }
    let limit = f64::from(max_cost);
    matching(cost, rows, cols, max_cost, |c| c - limit)
}

/// Minimum-cost maximum-cardinality assignment of the row-major `rows × cols` matrix `cost`: the
/// largest possible number of pairs with a finite `cost <= max_cost`, and among such matchings
/// one with the smallest total cost.
///
/// # Panics
/// If `cost.len() != rows * cols`.
pub fn solve_max_matching(cost: &[f32], rows: usize, cols: usize, max_cost: f32) -> Assignment {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &c in cost.iter().filter(|&&c| c.is_finite() && c <= max_cost) {
        lo = lo.min(f64::from(c));
        hi = hi.max(f64::from(c));
    }
    // Every pair earns a bonus larger than the cost spread of any matching, so one more pair
    // always beats any saving in cost.
    let bonus = (hi - lo + 1.0) * (rows.min(cols) as f64 + 1.0);
    matching(cost, rows, cols, max_cost, |c| c - lo - bonus)
}

/// Shared driver: `reduced` maps an allowed cost to the solver's cost, which must be `<= 0`
/// (leaving a row unmatched costs 0; a forbidden pair costs 1, so it is never chosen).
fn matching(cost: &[f32], rows: usize, cols: usize, max_cost: f32, reduced: impl Fn(f64) -> f64) -> Assignment {
    assert_eq!(cost.len(), rows * cols, "cost matrix must have rows * cols entries");
    let allowed = |c: f32| c.is_finite() && c <= max_cost;

    // Only rows and columns with at least one allowed pair take part.
    let mut col_active = vec![false; cols];
    let mut active_rows = Vec::new();
    for r in 0..rows {
        let row = &cost[r * cols..(r + 1) * cols];
        let mut any = false;
        for (c, &v) in row.iter().enumerate() {
            if allowed(v) {
                col_active[c] = true;
                any = true;
            }
        }
        if any {
            active_rows.push(r);
        }
    }
    let active_cols: Vec<usize> = (0..cols).filter(|&c| col_active[c]).collect();

    // Solve with the shorter side as the solver's rows.
    let transpose = active_rows.len() > active_cols.len();
    let (outer, inner) = if transpose { (&active_cols, &active_rows) } else { (&active_rows, &active_cols) };
    let (n, m) = (outer.len(), inner.len());
    let mut dense = vec![1.0f64; n * m];
    for (i, &a) in outer.iter().enumerate() {
        for (j, &b) in inner.iter().enumerate() {
            let (r, c) = if transpose { (b, a) } else { (a, b) };
            let v = cost[r * cols + c];
            if allowed(v) {
                dense[i * m + j] = reduced(f64::from(v)).min(0.0);
            }
        }
    }
    // Columns m..m+n are the "unmatched" options, free for every row.
    let col_of = hungarian(n, m + n, |i, j| if j < m { dense[i * m + j] } else { 0.0 });

    let mut row_match = vec![None; rows];
    let mut col_used = vec![false; cols];
    for (i, j) in col_of.into_iter().enumerate() {
        if j < m && dense[i * m + j] <= 0.0 {
            let (r, c) = if transpose { (inner[j], outer[i]) } else { (outer[i], inner[j]) };
            row_match[r] = Some(c);
            col_used[c] = true;
        }
    }
    // Zero-gain pairs (cost == max_cost) may have been left out; add them greedily.
    for &r in &active_rows {
        if row_match[r].is_some() {
            continue;
        }
        if let Some(&c) = active_cols.iter().find(|&&c| !col_used[c] && allowed(cost[r * cols + c])) {
            row_match[r] = Some(c);
            col_used[c] = true;
        }
    }

    let mut out = Assignment::default();
    for (r, m) in row_match.iter().enumerate() {
        match m {
            Some(c) => out.matches.push((r, *c)),
            None => out.unmatched_rows.push(r),
        }
    }
    out.unmatched_cols = (0..cols).filter(|&c| !col_used[c]).collect();
    out
}

/// Minimum-cost assignment of every one of `n` rows to a distinct column out of `m >= n`, for
/// finite `cost(row, col)`; returns each row's column. Shortest augmenting paths with row and
/// column potentials (the classic `O(n² m)` Hungarian method); arrays are 1-based with slot 0 as
/// the virtual start column.
fn hungarian(n: usize, m: usize, cost: impl Fn(usize, usize) -> f64) -> Vec<usize> {
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut row_of_col = vec![0usize; m + 1];
    let mut way = vec![0usize; m + 1];
    let mut min_slack = vec![0.0f64; m + 1];
    let mut used = vec![false; m + 1];
    for i in 1..=n {
        row_of_col[0] = i;
        let mut j0 = 0;
        min_slack.fill(f64::INFINITY);
        used.fill(false);
        loop {
            used[j0] = true;
            let i0 = row_of_col[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let slack = cost(i0 - 1, j - 1) - u[i0] - v[j];
                if slack < min_slack[j] {
                    min_slack[j] = slack;
                    way[j] = j0;
                }
                if min_slack[j] < delta {
                    delta = min_slack[j];
                    j1 = j;
                }
            }
            if j1 == 0 {
                // Only reachable with non-finite costs or m < n, which the callers rule out.
                debug_assert!(false, "assignment has no augmenting path");
                return vec![usize::MAX; n];
            }
            for j in 0..=m {
                if used[j] {
                    u[row_of_col[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_slack[j] -= delta;
                }
            }
            j0 = j1;
            if row_of_col[j0] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the start.
        while j0 != 0 {
            let prev = way[j0];
            row_of_col[j0] = row_of_col[prev];
            j0 = prev;
        }
    }
    let mut col_of_row = vec![usize::MAX; n];
    for (j, &i) in row_of_col.iter().enumerate().skip(1) {
        if i != 0 {
            col_of_row[i - 1] = j - 1;
        }
    }
    col_of_row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a tiny deterministic generator for test matrices.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
        fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn allowed(v: f32, max_cost: f32) -> bool {
        v.is_finite() && v <= max_cost
    }

    /// Checks that `a` is a valid matching of the matrix under `max_cost`, with consistent
    /// leftovers, and returns (pairs, total cost).
    fn check_valid(a: &Assignment, cost: &[f32], rows: usize, cols: usize, max_cost: f32) -> (usize, f64) {
        let mut row_seen = vec![false; rows];
        let mut col_seen = vec![false; cols];
        let mut total = 0.0;
        for &(r, c) in &a.matches {
            assert!(!row_seen[r] && !col_seen[c], "row or column matched twice: {a:?}");
            row_seen[r] = true;
            col_seen[c] = true;
            let v = cost[r * cols + c];
            assert!(allowed(v, max_cost), "pair ({r},{c}) with cost {v} above {max_cost}");
            total += f64::from(v);
        }
        let rows_left: Vec<usize> = (0..rows).filter(|&r| !row_seen[r]).collect();
        let cols_left: Vec<usize> = (0..cols).filter(|&c| !col_seen[c]).collect();
        assert_eq!(a.unmatched_rows, rows_left);
        assert_eq!(a.unmatched_cols, cols_left);
        assert!(a.matches.windows(2).all(|w| w[0].0 < w[1].0), "matches not sorted by row");
        (a.matches.len(), total)
    }

    /// Every matching of allowed pairs, as (pairs, total cost), by exhaustive search.
    fn all_matchings(cost: &[f32], rows: usize, cols: usize, max_cost: f32) -> Vec<(usize, f64)> {
        fn go(
            r: usize,
            used: &mut Vec<bool>,
            acc: (usize, f64),
            ctx: (&[f32], usize, usize, f32),
            out: &mut Vec<(usize, f64)>,
        ) {
            let (cost, rows, cols, max_cost) = ctx;
            if r == rows {
                out.push(acc);
                return;
            }
            go(r + 1, used, acc, ctx, out);
            for c in 0..cols {
                let v = cost[r * cols + c];
                if !used[c] && allowed(v, max_cost) {
                    used[c] = true;
                    go(r + 1, used, (acc.0 + 1, acc.1 + f64::from(v)), ctx, out);
                    used[c] = false;
                }
            }
        }
        let mut out = Vec::new();
        go(0, &mut vec![false; cols], (0, 0.0), (cost, rows, cols, max_cost), &mut out);
        out
    }

    fn random_matrix(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
        let quantized = rng.below(2) == 0; // many ties
        (0..rows * cols)
            .map(|_| match rng.below(10) {
                0 => f32::NAN,
                _ if quantized => rng.below(6) as f32 / 5.0,
                _ => rng.unit(),
            })
            .collect()
    }

    #[test]
    fn solve_matches_brute_force_on_random_matrices() {
        let mut rng = Rng(7);
        for _ in 0..3000 {
            let rows = rng.below(6) as usize;
            let cols = rng.below(6) as usize;
            let max_cost = [0.0, 0.3, 0.5, 0.8, 1.0, 2.0][rng.below(6) as usize];
            let cost = random_matrix(&mut rng, rows, cols);
            let a = solve(&cost, rows, cols, max_cost);
            let (k, total) = check_valid(&a, &cost, rows, cols, max_cost);
            let objective = total - k as f64 * f64::from(max_cost);
            let best = all_matchings(&cost, rows, cols, max_cost)
                .into_iter()
                .map(|(k, t)| t - k as f64 * f64::from(max_cost))
                .fold(f64::INFINITY, f64::min);
            assert!((objective - best).abs() < 1e-5, "{rows}x{cols} {cost:?} <= {max_cost}: {objective} vs {best}");
            // Maximal: nothing allowed is left between an unmatched row and an unmatched column.
            for &r in &a.unmatched_rows {
                for &c in &a.unmatched_cols {
                    assert!(!allowed(cost[r * cols + c], max_cost), "({r},{c}) could still be matched: {a:?}");
                }
            }
        }
    }

    #[test]
    fn max_matching_matches_brute_force_on_random_matrices() {
        let mut rng = Rng(11);
        for _ in 0..3000 {
            let rows = rng.below(6) as usize;
            let cols = rng.below(6) as usize;
            let max_cost = [0.0, 0.4, 0.7, 1.0][rng.below(4) as usize];
            let cost = random_matrix(&mut rng, rows, cols);
            let a = solve_max_matching(&cost, rows, cols, max_cost);
            let (k, total) = check_valid(&a, &cost, rows, cols, max_cost);
            let all = all_matchings(&cost, rows, cols, max_cost);
            let best_k = all.iter().map(|m| m.0).max().unwrap_or(0);
            let best_total = all.iter().filter(|m| m.0 == best_k).map(|m| m.1).fold(f64::INFINITY, f64::min);
            assert_eq!(k, best_k, "{rows}x{cols} {cost:?}: not maximum cardinality");
            assert!((total - best_total).abs() < 1e-5, "{rows}x{cols} {cost:?}: {total} vs {best_total}");
        }
    }

    #[test]
    fn threshold_semantics_differ_from_max_cardinality() {
        // Under a limit of 0.8 the cheap pair alone gains 0.8, the two others together only
        // 0.05 + 0.05: ByteTrack's rule keeps one pair, the max-cardinality rule takes two.
        let cost = [0.0, 0.75, 0.75, f32::NAN];
        let a = solve(&cost, 2, 2, 0.8);
        assert_eq!(a.matches, vec![(0, 0)]);
        assert_eq!(a.unmatched_rows, vec![1]);
        assert_eq!(a.unmatched_cols, vec![1]);
        let b = solve_max_matching(&cost, 2, 2, 0.8);
        assert_eq!(b.matches, vec![(0, 1), (1, 0)]);
        assert!(b.unmatched_rows.is_empty() && b.unmatched_cols.is_empty());
        // With a limit of 2.0 both pairs gain more together (1.25 + 1.25 > 2.0).
        assert_eq!(solve(&cost, 2, 2, 2.0).matches, vec![(0, 1), (1, 0)]);
    }

    #[test]
    fn rectangular_matrices_in_both_orientations() {
        // 2 rows x 4 columns: each row takes its cheapest distinct column.
        let cost = [0.9, 0.1, 0.5, 0.3, 0.2, 0.15, 0.9, 0.9];
        let a = solve(&cost, 2, 4, 1.0);
        assert_eq!(a.matches, vec![(0, 1), (1, 0)]);
        assert_eq!(a.unmatched_cols, vec![2, 3]);
        assert!(a.unmatched_rows.is_empty());
        // The transpose (4 rows x 2 columns) gives the transposed answer.
        let t: Vec<f32> = (0..8).map(|k| cost[(k % 2) * 4 + k / 2]).collect();
        let b = solve(&t, 4, 2, 1.0);
        assert_eq!(b.matches, vec![(0, 1), (1, 0)]);
        assert_eq!(b.unmatched_rows, vec![2, 3]);
        assert!(b.unmatched_cols.is_empty());
    }

    #[test]
    fn empty_and_all_forbidden_inputs() {
        let a = solve(&[], 0, 0, 1.0);
        assert_eq!(a, Assignment::default());
        let a = solve(&[], 3, 0, 1.0);
        assert_eq!(a.unmatched_rows, vec![0, 1, 2]);
        let a = solve(&[], 0, 2, 1.0);
        assert_eq!(a.unmatched_cols, vec![0, 1]);
        let a = solve_max_matching(&[2.0, f32::NAN, 3.0, f32::INFINITY], 2, 2, 1.0);
        assert!(a.matches.is_empty());
        assert_eq!((a.unmatched_rows, a.unmatched_cols), (vec![0, 1], vec![0, 1]));
    }

    #[test]
    fn infinite_limit_maximises_the_number_of_pairs() {
        let cost = [0.0, 0.75, 0.75, f32::NAN];
        assert_eq!(solve(&cost, 2, 2, f32::INFINITY).matches, vec![(0, 1), (1, 0)]);
        assert_eq!(solve_max_matching(&cost, 2, 2, f32::INFINITY).matches, vec![(0, 1), (1, 0)]);
        assert!(solve(&cost, 2, 2, f32::NAN).matches.is_empty());
    }

    #[test]
    fn pairs_exactly_at_the_limit_are_matched() {
        let a = solve(&[0.5, 0.9, 0.9, 0.5], 2, 2, 0.5);
        assert_eq!(a.matches, vec![(0, 0), (1, 1)]);
    }

    #[test]
    #[should_panic(expected = "rows * cols")]
    fn wrong_matrix_size_panics() {
        solve(&[0.0; 3], 2, 2, 1.0);
    }
}
