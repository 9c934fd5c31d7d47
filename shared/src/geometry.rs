//! Plane geometry for the traffic analytics: projective transforms and camera calibration (image
//! pixels <-> ground-plane metres), count-line crossings and zones. `f64` throughout, no I/O.
//!
//! # Coordinates
//!
//! A [`Point`] is `[x, y]`. Image points are pixels with the origin at the top-left corner and `y`
//! growing *downwards*; ground points are metres in any right-handed plane frame (`y` up). The
//! orientation conventions of [`side`] and [`polygon_area`] are stated for a `y`-up frame and flip
//! on screen, as each function documents.
//!
//! # Calibration
//!
//! [`Homography::from_correspondences`] is the normalised direct linear transform (Hartley): both
//! point sets are translated to their centroid and scaled to a mean distance of `sqrt 2`, the
//! homogeneous system `A h = 0` is solved in the least-squares sense (`|h| = 1`) through the
//! smallest right singular vector of `A`, found by a one-sided Jacobi SVD (exact for 4 points,
//! least squares for more), and the result is denormalised. Before fitting, each point set is
//! checked to contain 4 points in general position (see [`CalibrationError::Degenerate`]).
//! [`Calibration::fit`] adds the inverse and the reprojection error in both directions.

/// A point in the plane: `[x, y]`.
pub type Point = [f64; 2];

/// Two points of one set closer than this fraction of the set's extent (bounding-box diagonal)
/// coincide.
pub const COINCIDENT_TOLERANCE: f64 = 1e-9;
/// Three points of one set whose triangle is lower than this fraction of the set's extent
/// (bounding-box diagonal) are nearly collinear: about 1.5 px in a 1280x720 picture, 5 cm over a
/// 50 m stretch of road.
pub const COLLINEAR_TOLERANCE: f64 = 1e-3;
/// `|w|` below this is on the horizon line of a [`Homography`]: the point has no finite image.
pub const HORIZON_EPSILON: f64 = 1e-12;

/// Above this many points, the exhaustive search for 4 points in general position (only reached
/// for nearly degenerate sets) is skipped.
const EXHAUSTIVE_SEARCH_MAX_POINTS: usize = 64;
/// A determinant this small relative to the product of the row norms (Hadamard's bound) is singular.
const SINGULAR_RATIO: f64 = 1e-14;
/// A normalised DLT solution whose determinant ratio is below this is singular.
const SINGULAR_RATIO_NORMALISED: f64 = 1e-12;

/// Why a set of correspondences gives no calibration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    /// Fewer than 4 pairs, or the two point lists differ in length (`given` is then the shorter
    /// length, the number of complete pairs).
    #[error("a calibration needs at least 4 point pairs with as many image as ground points; got {given} pairs")]
    TooFewPoints {
        /// Number of complete pairs given.
        given: usize,
    },
    /// Two points of one set coincide, or the set holds no 4 points in general position (no three
    /// of them nearly collinear; tolerances [`COINCIDENT_TOLERANCE`] and [`COLLINEAR_TOLERANCE`]).
    /// `set` is `"image"` or `"ground"` from [`Calibration::fit`], `"source"` or `"destination"`
    /// from [`Homography::from_correspondences`]; `detail` names the point indices.
    #[error("degenerate {set} points: {detail}")]
    Degenerate {
        /// Which point set.
        set: &'static str,
        /// What is wrong, with the point indices (0-based).
        detail: String,
    },
    /// The fitted transform is numerically singular (not invertible), or maps one of the fitted
    /// points onto its horizon line.
    #[error("the fitted transform is numerically singular")]
    Singular,
    /// A coordinate of the image or ground point at `index` is NaN or infinite.
    #[error("point pair {index} has a coordinate that is not a finite number")]
    NotFinite {
        /// Index of the first pair with a non-finite coordinate.
        index: usize,
    },
}

/// A 3x3 projective transform, row-major, mapping `(x, y, 1)`.
///
/// Homographies are defined up to scale; the ones built here are scaled so that `h[2][2] = 1`
/// where that entry is not (nearly) zero.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Homography(pub [[f64; 3]; 3]);

impl Homography {
    /// The identity transform.
    pub const IDENTITY: Homography = Homography([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);

    /// Maps a point. `None` when the point lies on (or numerically at: `|w| <` [`HORIZON_EPSILON`])
    /// the horizon line `w = 0`, or when the input or the result is not finite. Points behind the
    /// horizon (`w` of the other sign than at the calibration points) are mapped all the same.
    pub fn apply(&self, p: Point) -> Option<Point> {
        let h = &self.0;
        let w = h[2][0] * p[0] + h[2][1] * p[1] + h[2][2];
        let off_horizon = w.abs() >= HORIZON_EPSILON; // false for a NaN `w` too
        if !off_horizon {
            return None;
        }
        let x = (h[0][0] * p[0] + h[0][1] * p[1] + h[0][2]) / w;
        let y = (h[1][0] * p[0] + h[1][1] * p[1] + h[1][2]) / w;
        finite([x, y]).then_some([x, y])
    }

    /// The inverse transform (adjugate over determinant, then scaled so that `h[2][2] = 1` where
    /// possible). `None` when the matrix is not finite or numerically singular: `|det|` below
    /// `1e-14` times the product of its row norms.
    pub fn inverse(&self) -> Option<Homography> {
        let h = &self.0;
        if !h.iter().flatten().all(|v| v.is_finite()) {
            return None;
        }
        let det = det3(h);
        let bound: f64 = h.iter().map(norm3).product();
        let regular = det.abs() > SINGULAR_RATIO * bound;
        if !regular {
            return None;
        }
        let mut inv = [[0.0; 3]; 3];
        for (r, row) in inv.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                // inv[r][c] = cofactor(c, r) / det
                let (r0, r1) = others(c);
                let (c0, c1) = others(r);
                let minor = h[r0][c0] * h[r1][c1] - h[r0][c1] * h[r1][c0];
                let sign = if (r + c) % 2 == 0 { 1.0 } else { -1.0 };
                *v = sign * minor / det;
            }
        }
        Homography(inv).normalised()
    }

    /// The transform that applies `self` first, then `next`.
    pub fn then(&self, next: &Homography) -> Homography {
        Homography(mul3(&next.0, &self.0))
    }

    /// Direct linear transform from `>= 4` correspondences `src[i] -> dst[i]`, with Hartley
    /// normalisation of both sets; exact for 4 points, least squares (algebraic error in the
    /// normalised frames) for more. The result is scaled so that `h[2][2] = 1` where possible.
    ///
    /// Errors: [`CalibrationError::TooFewPoints`] for fewer than 4 pairs or lists of different
    /// lengths, [`CalibrationError::NotFinite`] for NaN or infinite coordinates,
    /// [`CalibrationError::Degenerate`] (set `"source"` or `"destination"`) when two points of a
    /// set coincide or a set holds no 4 points in general position, and
    /// [`CalibrationError::Singular`] when the solution is not unique or not invertible.
    pub fn from_correspondences(src: &[Point], dst: &[Point]) -> Result<Homography, CalibrationError> {
        fit_dlt(src, dst, ("source", "destination")).map(|fit| fit.forward)
    }

    /// Scales so that `h[2][2] = 1` where that entry is not negligible, else to unit Frobenius
    /// norm. `None` if the result is not finite or zero.
    fn normalised(self) -> Option<Homography> {
        let h = self.0;
        let norm = h.iter().map(norm3).fold(0.0, f64::hypot);
        if !norm.is_finite() || norm == 0.0 {
            return None;
        }
        let scale = if h[2][2].abs() > 1e-10 * norm { h[2][2] } else { norm };
        let out = h.map(|row| row.map(|v| v / scale));
        out.iter().flatten().all(|v| v.is_finite()).then_some(Homography(out))
    }
}

/// Calibration of a camera: image pixels -> ground plane metres, and back.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Image pixels to ground metres.
    pub image_to_ground: Homography,
    /// Ground metres to image pixels: the inverse of `image_to_ground`.
    pub ground_to_image: Homography,
    /// How well the fit reproduces the calibration points.
    pub reprojection: ReprojectionError,
}

/// Reprojection error of a [`Calibration`] over its own calibration points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReprojectionError {
    /// Mean over points of `|H(image_i) - ground_i|`, in metres.
    pub mean_m: f64,
    /// Largest `|H(image_i) - ground_i|`, in metres.
    pub max_m: f64,
    /// Index of the worst point (the one with `max_m`; the first of equals).
    pub worst: usize,
    /// Mean over points of `|H^-1(ground_i) - image_i|`, in pixels.
    pub mean_px: f64,
}

impl Calibration {
    /// Fits image -> ground from pairs (`image[i]` px, `ground[i]` m), computes the inverse and the
    /// reprojection error in both directions. With exactly 4 pairs the fit is exact and the error
    /// is 0 up to rounding; it means something from 5 pairs on.
    ///
    /// Errors as [`Homography::from_correspondences`], with the sets named `"image"` and
    /// `"ground"`; [`CalibrationError::Singular`] also when a calibration point maps onto the
    /// horizon line of the fit.
    pub fn fit(image: &[Point], ground: &[Point]) -> Result<Calibration, CalibrationError> {
        let fit = fit_dlt(image, ground, ("image", "ground"))?;
        let (h, inv) = (fit.forward, fit.inverse);
        let mut sum_m = 0.0;
        let mut max_m = 0.0;
        let mut worst = 0;
        let mut sum_px = 0.0;
        for (i, (&im, &gr)) in image.iter().zip(ground).enumerate() {
            let err_m = distance(h.apply(im).ok_or(CalibrationError::Singular)?, gr);
            sum_m += err_m;
            if err_m > max_m {
                max_m = err_m;
                worst = i;
            }
            sum_px += distance(inv.apply(gr).ok_or(CalibrationError::Singular)?, im);
        }
        let n = image.len() as f64;
        let reprojection = ReprojectionError { mean_m: sum_m / n, max_m, worst, mean_px: sum_px / n };
        Ok(Calibration { image_to_ground: h, ground_to_image: inv, reprojection })
    }

    /// Image pixel -> ground metres; `None` on or numerically at the horizon line.
    pub fn to_ground(&self, p: Point) -> Option<Point> {
        self.image_to_ground.apply(p)
    }

    /// Ground metres -> image pixel; `None` where the ground point has no finite image.
    pub fn to_image(&self, g: Point) -> Option<Point> {
        self.ground_to_image.apply(g)
    }

    /// Metres per pixel at an image point: the mean of the ground distances covered by a step of
    /// 1 px in `x` and in `y` from `p`. `None` off the plane (at or near the horizon).
    pub fn metres_per_pixel(&self, p: Point) -> Option<f64> {
        let g = self.to_ground(p)?;
        let gx = self.to_ground([p[0] + 1.0, p[1]])?;
        let gy = self.to_ground([p[0], p[1] + 1.0])?;
        Some((distance(g, gx) + distance(g, gy)) / 2.0)
    }
}

/// Which side of the directed line `a -> b` the point `p` lies on: twice the signed area of the
/// triangle `a, b, p`. In a `y`-up frame (ground metres) `> 0` is left of `a -> b`
/// (counter-clockwise), `< 0` right, `0` on the line. In image coordinates (`y` down) the picture
/// is mirrored: `> 0` is on the right-hand side of `a -> b` as seen on screen (clockwise).
pub fn side(a: Point, b: Point, p: Point) -> f64 {
    (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
}

/// Proper or touching intersection of the segments `p1-p2` and `q1-q2`: `Some(t)` with `t` in
/// `[0, 1]` the parameter along `p1 -> p2` where they meet (`p1 + t (p2 - p1)`); `None` when they
/// do not meet, and when they are parallel or collinear (even overlapping) or one is a point.
pub fn segment_intersection(p1: Point, p2: Point, q1: Point, q2: Point) -> Option<f64> {
    let r = sub(p2, p1);
    let s = sub(q2, q1);
    let denom = cross(r, s);
    if denom == 0.0 || !denom.is_finite() {
        return None;
    }
    let qp = sub(q1, p1);
    let t = cross(qp, s) / denom;
    let u = cross(qp, r) / denom;
    ((0.0..=1.0).contains(&t) && (0.0..=1.0).contains(&u)).then_some(t)
}

/// Where a movement crosses a count line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Crossing {
    /// Index of the crossed segment: `line[segment] -> line[segment + 1]`.
    pub segment: usize,
    /// Parameter along the movement `from -> to` (in `[0, 1]`) of the crossing point.
    pub t: f64,
    /// `+1` when `to` is on the left of the segment ([`side`] `> 0`), `-1` when on the right.
    pub sign: i8,
}

/// Where the movement `from -> to` crosses the polyline `line` (`>= 2` points) first, i.e. at the
/// smallest `t` along the movement (lowest segment index among equals).
///
/// The rule, per segment: a crossing needs `from` strictly on one side of the segment's line
/// ([`side`] `!= 0`), `to` strictly on the other side, and the movement to meet the segment itself.
/// A movement that ends exactly on the line, or starts on it, is no crossing. So a track that
/// stands on the line and jitters produces no crossings; the caller keeps the track's last position
/// that was strictly off the line and passes it as `from`, so that leaving the line on the other
/// side later counts once, and returning to the same side counts nothing. A movement through an
/// interior vertex of the polyline is judged by the first segment (by index) that it meets there.
pub fn polyline_crossing(line: &[Point], from: Point, to: Point) -> Option<Crossing> {
    let mut best: Option<Crossing> = None;
    for (segment, pair) in line.windows(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        let (s_from, s_to) = (side(a, b, from), side(a, b, to));
        let strictly_opposite = (s_from > 0.0 && s_to < 0.0) || (s_from < 0.0 && s_to > 0.0);
        if !strictly_opposite {
            continue;
        }
        let Some(t) = segment_intersection(from, to, a, b) else { continue };
        if best.is_none_or(|c| t < c.t) {
            best = Some(Crossing { segment, t, sign: if s_to > 0.0 { 1 } else { -1 } });
        }
    }
    best
}

/// Even-odd (ray casting) point-in-polygon test; the polygon is closed implicitly (last point to
/// first). Points on an edge or a vertex (within a relative `1e-12` of the edge length) count as
/// inside. Polygons of fewer than 3 points contain nothing.
pub fn polygon_contains(poly: &[Point], p: Point) -> bool {
    if poly.len() < 3 {
        return false;
    }
    let mut inside = false;
    let mut prev = poly[poly.len() - 1];
    for &cur in poly {
        if on_segment(prev, cur, p) {
            return true;
        }
        if (cur[1] > p[1]) != (prev[1] > p[1]) {
            let x = cur[0] + (p[1] - cur[1]) * (prev[0] - cur[0]) / (prev[1] - cur[1]);
            if p[0] < x {
                inside = !inside;
            }
        }
        prev = cur;
    }
    inside
}

/// Signed area (shoelace formula) of the implicitly closed polygon: positive when its points run
/// counter-clockwise in a `y`-up frame, i.e. clockwise on screen in image coordinates. 0 for fewer
/// than 3 points.
pub fn polygon_area(poly: &[Point]) -> f64 {
    if poly.len() < 3 {
        return 0.0;
    }
    let mut prev = poly[poly.len() - 1];
    let mut twice = 0.0;
    for &cur in poly {
        twice += prev[0] * cur[1] - cur[0] * prev[1];
        prev = cur;
    }
    twice / 2.0
}

/// Whether the implicitly closed polygon is simple: at least 3 finite points, no zero-length
/// edge, no two non-adjacent edges that intersect or touch, and no two adjacent edges that fold
/// back onto each other (so three collinear points are not a polygon). Exact predicates, no
/// tolerance.
pub fn polygon_is_simple(poly: &[Point]) -> bool {
    let n = poly.len();
    if n < 3 || !poly.iter().all(|&p| finite(p)) {
        return false;
    }
    let edge = |i: usize| (poly[i], poly[(i + 1) % n]);
    for i in 0..n {
        let (a, b) = edge(i);
        let (_, c) = edge((i + 1) % n);
        if a == b {
            return false;
        }
        let (e1, e2) = (sub(b, a), sub(c, b));
        if cross(e1, e2) == 0.0 && dot(e1, e2) < 0.0 {
            return false;
        }
    }
    for i in 0..n {
        for j in i + 2..n {
            if i == 0 && j == n - 1 {
                continue; // adjacent through the closing edge
            }
            let ((a, b), (c, d)) = (edge(i), edge(j));
            if segments_touch(a, b, c, d) {
                return false;
            }
        }
    }
    true
}

/// Euclidean distance.
pub fn distance(a: Point, b: Point) -> f64 {
    (b[0] - a[0]).hypot(b[1] - a[1])
}

// ---------------------------------------------------------------------------------------------
// Fitting.

/// A fitted transform and its inverse, both computed from the normalised solution.
struct Fit {
    forward: Homography,
    inverse: Homography,
}

fn fit_dlt(src: &[Point], dst: &[Point], names: (&'static str, &'static str)) -> Result<Fit, CalibrationError> {
    let n = src.len();
    if n != dst.len() || n < 4 {
        return Err(CalibrationError::TooFewPoints { given: n.min(dst.len()) });
    }
    if let Some(index) = src.iter().zip(dst).position(|(&s, &d)| !finite(s) || !finite(d)) {
        return Err(CalibrationError::NotFinite { index });
    }
    check_general_position(src, names.0)?;
    check_general_position(dst, names.1)?;

    let (ts, ts_inv) = normalising_transform(src).ok_or(CalibrationError::Singular)?;
    let (td, td_inv) = normalising_transform(dst).ok_or(CalibrationError::Singular)?;
    let mut a: Vec<[f64; 9]> = Vec::with_capacity(2 * n);
    for (&s, &d) in src.iter().zip(dst) {
        let [x, y] = ts.apply(s).ok_or(CalibrationError::Singular)?;
        let [u, v] = td.apply(d).ok_or(CalibrationError::Singular)?;
        a.push([-x, -y, -1.0, 0.0, 0.0, 0.0, u * x, u * y, u]);
        a.push([0.0, 0.0, 0.0, -x, -y, -1.0, v * x, v * y, v]);
    }
    let svd = smallest_right_singular_vector(&mut a);
    // A second (near) null direction: the solution is not unique.
    let unique = svd.second > 1e-12 * svd.largest;
    if !unique {
        return Err(CalibrationError::Singular);
    }
    let h = svd.vector;
    let hn = [[h[0], h[1], h[2]], [h[3], h[4], h[5]], [h[6], h[7], h[8]]];
    let bound: f64 = hn.iter().map(norm3).product();
    let regular = det3(&hn).abs() > SINGULAR_RATIO_NORMALISED * bound;
    if !regular {
        return Err(CalibrationError::Singular);
    }
    let hn_inv = Homography(hn).inverse().ok_or(CalibrationError::Singular)?;
    // H = Td^-1 Hn Ts, H^-1 = Ts^-1 Hn^-1 Td.
    let forward = Homography(mul3(&td_inv.0, &mul3(&hn, &ts.0))).normalised();
    let inverse = Homography(mul3(&ts_inv.0, &mul3(&hn_inv.0, &td.0))).normalised();
    match (forward, inverse) {
        (Some(forward), Some(inverse)) => Ok(Fit { forward, inverse }),
        _ => Err(CalibrationError::Singular),
    }
}

/// Hartley normalisation: the similarity that moves the centroid to the origin and scales the mean
/// distance from it to `sqrt 2`, and its inverse. `None` if all points coincide.
fn normalising_transform(pts: &[Point]) -> Option<(Homography, Homography)> {
    let n = pts.len() as f64;
    let c = pts.iter().fold([0.0, 0.0], |acc, p| [acc[0] + p[0] / n, acc[1] + p[1] / n]);
    let mean = pts.iter().map(|&p| distance(p, c)).sum::<f64>() / n;
    if !mean.is_finite() || mean <= 0.0 {
        return None;
    }
    let s = std::f64::consts::SQRT_2 / mean;
    let t = Homography([[s, 0.0, -s * c[0]], [0.0, s, -s * c[1]], [0.0, 0.0, 1.0]]);
    let t_inv = Homography([[1.0 / s, 0.0, c[0]], [0.0, 1.0 / s, c[1]], [0.0, 0.0, 1.0]]);
    Some((t, t_inv))
}

struct NullVector {
    /// Unit right singular vector of the smallest singular value.
    vector: [f64; 9],
    /// Second smallest singular value.
    second: f64,
    /// Largest singular value.
    largest: f64,
}

/// One-sided (Hestenes) Jacobi SVD of the `m x 9` matrix `a` (destroyed): rotates pairs of columns
/// until all are orthogonal, accumulating the rotations in `V`; the singular values are then the
/// column norms and the right singular vectors the columns of `V`. Works for `m < 9` too (the
/// surplus columns go to zero).
fn smallest_right_singular_vector(a: &mut [[f64; 9]]) -> NullVector {
    let mut v = [[0.0; 9]; 9];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let mut rotated = false;
        for p in 0..9 {
            for q in p + 1..9 {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for row in a.iter() {
                    alpha += row[p] * row[p];
                    beta += row[q] * row[q];
                    gamma += row[p] * row[q];
                }
                if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for row in a.iter_mut().chain(v.iter_mut()) {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut sigma = [0.0; 9];
    for (j, s) in sigma.iter_mut().enumerate() {
        *s = a.iter().map(|row| row[j] * row[j]).sum::<f64>().sqrt();
    }
    let mut order: [usize; 9] = std::array::from_fn(|i| i);
    order.sort_by(|&x, &y| sigma[x].total_cmp(&sigma[y]));
    let smallest = order[0];
    NullVector { vector: std::array::from_fn(|i| v[i][smallest]), second: sigma[order[1]], largest: sigma[order[8]] }
}

/// Refuses a point set with coinciding points or without 4 points in general position.
fn check_general_position(pts: &[Point], set: &'static str) -> Result<(), CalibrationError> {
    let (mut lo, mut hi) = ([f64::INFINITY; 2], [f64::NEG_INFINITY; 2]);
    for p in pts {
        lo = [lo[0].min(p[0]), lo[1].min(p[1])];
        hi = [hi[0].max(p[0]), hi[1].max(p[1])];
    }
    let extent = distance(lo, hi);
    for (i, &p) in pts.iter().enumerate() {
        for (j, &q) in pts.iter().enumerate().skip(i + 1) {
            if distance(p, q) <= COINCIDENT_TOLERANCE * extent {
                let detail = format!("points {i} and {j} coincide (at {}, {})", p[0], p[1]);
                return Err(CalibrationError::Degenerate { set, detail });
            }
        }
    }
    find_general_position(pts, COLLINEAR_TOLERANCE * extent)
        .map(|_| ())
        .map_err(|detail| CalibrationError::Degenerate { set, detail })
}

/// Height of the triangle `a, b, c` over its longest side (0 when all three coincide).
fn triangle_height(a: Point, b: Point, c: Point) -> f64 {
    let longest = distance(a, b).max(distance(b, c)).max(distance(c, a));
    if longest > 0.0 { side(a, b, c).abs() / longest } else { 0.0 }
}

/// Checks that no three of the four points are nearly collinear; on failure, the first such triple.
fn in_general_position(pts: &[Point], q: [usize; 4], tol: f64) -> Result<(), [usize; 3]> {
    for (x, y, z) in [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)] {
        let triple = [q[x], q[y], q[z]];
        if triangle_height(pts[triple[0]], pts[triple[1]], pts[triple[2]]) < tol {
            return Err(triple);
        }
    }
    Ok(())
}

/// Finds 4 points of which no three are nearly collinear (triangle height `< tol`). Tries a large
/// triangle of the set plus each other point first, then each off-line point as a third corner
/// (`O(n^2)`), then, for up to [`EXHAUSTIVE_SEARCH_MAX_POINTS`] points, all quadruples. On failure,
/// a description naming the point indices.
fn find_general_position(pts: &[Point], tol: f64) -> Result<[usize; 4], String> {
    let n = pts.len();
    let farthest_from = |from: usize| {
        (0..n).max_by(|&x, &y| distance(pts[from], pts[x]).total_cmp(&distance(pts[from], pts[y]))).unwrap_or(from)
    };
    let i = farthest_from(0);
    let j = farthest_from(i);
    let base = distance(pts[i], pts[j]);
    let line_distance = |m: usize| if base > 0.0 { side(pts[i], pts[j], pts[m]).abs() / base } else { 0.0 };
    let off_line: Vec<usize> = (0..n).filter(|&m| line_distance(m) >= tol).collect();
    let list = |idx: &mut dyn Iterator<Item = usize>| idx.map(|m| m.to_string()).collect::<Vec<_>>().join(", ");
    match off_line.as_slice() {
        [] => return Err(format!("all points ({}) lie (nearly) on one line", list(&mut (0..n)))),
        [only] => {
            let on = list(&mut (0..n).filter(|m| m != only));
            return Err(format!(
                "points {on} lie (nearly) on one line and only point {only} is off it, so no 4 points are in general position"
            ));
        }
        _ => {}
    }
    let k = off_line.iter().copied().max_by(|&x, &y| line_distance(x).total_cmp(&line_distance(y))).unwrap_or(i);

    let mut first_failure: Option<[usize; 3]> = None;
    let mut try_base = |corner: [usize; 3]| {
        for m in (0..n).filter(|m| !corner.contains(m)) {
            let quad = [corner[0], corner[1], corner[2], m];
            match in_general_position(pts, quad, tol) {
                Ok(()) => return Some(quad),
                Err(triple) => {
                    first_failure.get_or_insert(triple);
                }
            }
        }
        None
    };
    if let Some(quad) = try_base([i, j, k]) {
        return Ok(quad);
    }
    for &c in off_line.iter().filter(|&&c| c != k) {
        for corner in [[i, j, c], [i, k, c], [j, k, c]] {
            if triangle_height(pts[corner[0]], pts[corner[1]], pts[corner[2]]) < tol {
                continue;
            }
            if let Some(quad) = try_base(corner) {
                return Ok(quad);
            }
        }
    }
    if n <= EXHAUSTIVE_SEARCH_MAX_POINTS {
        for a in 0..n {
            for b in a + 1..n {
                for c in b + 1..n {
                    if triangle_height(pts[a], pts[b], pts[c]) < tol {
                        continue;
                    }
                    for d in c + 1..n {
                        if in_general_position(pts, [a, b, c, d], tol).is_ok() {
                            return Ok([a, b, c, d]);
                        }
                    }
                }
            }
        }
    }
    let mut triple = first_failure.unwrap_or([i, j, k]);
    triple.sort_unstable();
    Err(format!(
        "points {}, {} and {} lie (nearly) on one line, and no 4 points are in general position",
        triple[0], triple[1], triple[2]
    ))
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn finite(p: Point) -> bool {
    p[0].is_finite() && p[1].is_finite()
}

fn sub(a: Point, b: Point) -> Point {
    [a[0] - b[0], a[1] - b[1]]
}

fn cross(a: Point, b: Point) -> f64 {
    a[0] * b[1] - a[1] * b[0]
}

fn dot(a: Point, b: Point) -> f64 {
    a[0] * b[0] + a[1] * b[1]
}

/// `p` on the closed segment `a-b`, within a relative `1e-12` of its length.
fn on_segment(a: Point, b: Point, p: Point) -> bool {
    let ab = sub(b, a);
    let ap = sub(p, a);
    let len2 = dot(ab, ab);
    if len2 == 0.0 {
        return p == a;
    }
    let along = dot(ap, ab);
    cross(ab, ap).abs() <= 1e-12 * len2 && along >= 0.0 && along <= len2
}

/// Sign of the orientation of `a, b, c`: 1 counter-clockwise (y up), -1 clockwise, 0 collinear.
fn orientation(a: Point, b: Point, c: Point) -> i8 {
    let s = side(a, b, c);
    if s > 0.0 {
        1
    } else if s < 0.0 {
        -1
    } else {
        0
    }
}

/// `c`, known collinear with `a-b`, lies within its bounding box.
fn within_box(a: Point, b: Point, c: Point) -> bool {
    c[0] >= a[0].min(b[0]) && c[0] <= a[0].max(b[0]) && c[1] >= a[1].min(b[1]) && c[1] <= a[1].max(b[1])
}

/// Closed segments `a-b` and `c-d` share at least one point (crossing, touching or overlapping).
fn segments_touch(a: Point, b: Point, c: Point, d: Point) -> bool {
    let (o1, o2) = (orientation(a, b, c), orientation(a, b, d));
    let (o3, o4) = (orientation(c, d, a), orientation(c, d, b));
    if o1 * o2 < 0 && o3 * o4 < 0 {
        return true;
    }
    (o1 == 0 && within_box(a, b, c))
        || (o2 == 0 && within_box(a, b, d))
        || (o3 == 0 && within_box(c, d, a))
        || (o4 == 0 && within_box(c, d, b))
}

fn norm3(r: &[f64; 3]) -> f64 {
    r[0].hypot(r[1]).hypot(r[2])
}

fn det3(h: &[[f64; 3]; 3]) -> f64 {
    h[0][0] * (h[1][1] * h[2][2] - h[1][2] * h[2][1]) - h[0][1] * (h[1][0] * h[2][2] - h[1][2] * h[2][0])
        + h[0][2] * (h[1][0] * h[2][1] - h[1][1] * h[2][0])
}

fn mul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|r| std::array::from_fn(|c| (0..3).map(|k| a[r][k] * b[k][c]).sum()))
}

/// The two indices of `0..3` other than `i`, in order.
fn others(i: usize) -> (usize, usize) {
    match i {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ground -> image transform of a pinhole camera 8 m above the ground at (-2, -5), looking
    /// along the road (+y) pitched 12 degrees down and yawed 4 degrees, focal length 1000 px,
    /// 1280x720 picture.
    fn road_camera() -> Homography {
        let (f, cx, cy) = (1000.0, 640.0, 360.0);
        let centre = [-2.0, -5.0, 8.0];
        let (pitch, yaw) = (12f64.to_radians(), 4f64.to_radians());
        let forward = [yaw.sin() * pitch.cos(), yaw.cos() * pitch.cos(), -pitch.sin()];
        let right = [yaw.cos(), -yaw.sin(), 0.0];
        let down = [
            forward[1] * right[2] - forward[2] * right[1],
            forward[2] * right[0] - forward[0] * right[2],
            forward[0] * right[1] - forward[1] * right[0],
        ];
        let rot = [right, down, forward];
        // Camera coordinates of ground point (X, Y, 0): X R[:,0] + Y R[:,1] - R C.
        let rc: [f64; 3] = std::array::from_fn(|r| (0..3).map(|k| rot[r][k] * centre[k]).sum());
        let m: [[f64; 3]; 3] = std::array::from_fn(|r| [rot[r][0], rot[r][1], -rc[r]]);
        let k = [[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]];
        Homography(mul3(&k, &m)).normalised().expect("camera matrix")
    }

    /// A 3 x 4 grid of ground points: three lane lines, 10 to 55 m ahead.
    fn road_ground_points() -> Vec<Point> {
        let mut pts = Vec::new();
        for y in [10.0, 25.0, 40.0, 55.0] {
            for x in [-5.25, -1.75, 1.75] {
                pts.push([x, y]);
            }
        }
        pts
    }

    /// Deterministic pseudo-noise in [-amplitude, amplitude].
    struct Noise(u64);
    impl Noise {
        fn next(&mut self, amplitude: f64) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            (2.0 * unit - 1.0) * amplitude
        }
    }

    fn map_all(h: &Homography, pts: &[Point]) -> Vec<Point> {
        pts.iter().map(|&p| h.apply(p).expect("maps")).collect()
    }

    fn assert_close(a: Point, b: Point, tol: f64) {
        assert!(distance(a, b) <= tol, "{a:?} vs {b:?}: {} > {tol}", distance(a, b));
    }

    #[test]
    fn camera_points_are_in_the_picture() {
        let g2i = road_camera();
        for g in road_ground_points() {
            let p = g2i.apply(g).expect("in front of the camera");
            assert!((0.0..1280.0).contains(&p[0]) && (0.0..720.0).contains(&p[1]), "{g:?} -> {p:?}");
        }
    }

    #[test]
    fn exact_four_point_homography_is_recovered() {
        // Real perspective: both h31 and h32 non-zero.
        let truth = Homography([[0.9, 0.12, 15.0], [-0.05, 1.1, -7.5], [2.0e-4, 8.0e-4, 1.0]]);
        let src = [[100.0, 650.0], [1180.0, 640.0], [900.0, 250.0], [350.0, 260.0]];
        let dst = map_all(&truth, &src);
        let fitted = Homography::from_correspondences(&src, &dst).expect("fit");
        assert!((fitted.0[2][2] - 1.0).abs() < 1e-12, "scaled to h33 = 1: {fitted:?}");
        for (r, row) in fitted.0.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert!((v - truth.0[r][c]).abs() <= 1e-9 * truth.0[r][c].abs().max(1e-3), "{fitted:?}");
            }
        }
        for p in [[0.0, 0.0], [640.0, 360.0], [1279.0, 719.0], [20.0, 700.0], [1000.0, 100.0]] {
            let (want, got) = (truth.apply(p).expect("truth"), fitted.apply(p).expect("fit"));
            assert_close(got, want, 1e-6 * want[0].hypot(want[1]).max(1.0));
        }
    }

    #[test]
    fn exact_road_calibration_maps_other_points() {
        let g2i = road_camera();
        let ground = [[-5.25, 10.0], [1.75, 10.0], [1.75, 55.0], [-5.25, 55.0]];
        let image = map_all(&g2i, &ground);
        let cal = Calibration::fit(&image, &ground).expect("fit");
        assert!(cal.reprojection.max_m < 1e-9 && cal.reprojection.mean_px < 1e-9, "{:?}", cal.reprojection);
        for g in [[0.0, 30.0], [-3.5, 17.0], [1.0, 70.0], [4.0, 8.0]] {
            let p = g2i.apply(g).expect("visible");
            assert_close(cal.to_ground(p).expect("on the plane"), g, 1e-6);
            assert_close(cal.to_image(g).expect("visible"), p, 1e-6);
        }
    }

    #[test]
    fn noisy_least_squares_beats_four_point_fits() {
        let g2i = road_camera();
        let i2g = g2i.inverse().expect("invertible");
        let ground = road_ground_points();
        let mut noise = Noise(7);
        let image: Vec<Point> =
            map_all(&g2i, &ground).iter().map(|p| [p[0] + noise.next(0.5), p[1] + noise.next(0.5)]).collect();
        let cal = Calibration::fit(&image, &ground).expect("fit");

        // The reported numbers are what they say.
        let errs_m: Vec<f64> =
            image.iter().zip(&ground).map(|(&p, &g)| distance(cal.to_ground(p).expect("maps"), g)).collect();
        let errs_px: Vec<f64> =
            image.iter().zip(&ground).map(|(&p, &g)| distance(cal.to_image(g).expect("maps"), p)).collect();
        let rep = cal.reprojection;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!((rep.mean_m - mean(&errs_m)).abs() < 1e-12, "{rep:?}");
        assert!((rep.mean_px - mean(&errs_px)).abs() < 1e-9, "{rep:?}");
        let max = errs_m.iter().copied().fold(0.0, f64::max);
        assert_eq!(rep.max_m, max);
        assert_eq!(errs_m[rep.worst], max);
        // Residuals at the level of the noise, not zero (least squares, not interpolation).
        assert!(rep.mean_px > 0.05 && rep.mean_px < 0.75, "{rep:?}");
        assert!(rep.mean_m > 0.0 && rep.mean_m < 0.1, "{rep:?}");
        assert!(rep.max_m >= rep.mean_m);

        // Error against the true transform over the road area, in metres.
        let probes: Vec<Point> =
            [-6.0, -3.0, 0.0, 2.5].iter().flat_map(|&x| [12.0, 20.0, 35.0, 50.0].map(|y| [x, y])).collect();
        let probe_px = map_all(&g2i, &probes);
        let true_error = |h: &Homography| {
            mean(
                &probe_px
                    .iter()
                    .map(|&p| distance(h.apply(p).expect("maps"), i2g.apply(p).expect("maps")))
                    .collect::<Vec<_>>(),
            )
        };
        let twelve = true_error(&cal.image_to_ground);
        let mut subsets = Vec::new();
        let n = ground.len();
        for a in 0..n {
            for b in a + 1..n {
                for c in b + 1..n {
                    for d in c + 1..n {
                        let idx = [a, b, c, d];
                        let (im, gr): (Vec<Point>, Vec<Point>) = idx.iter().map(|&i| (image[i], ground[i])).unzip();
                        if let Ok(h) = Homography::from_correspondences(&im, &gr) {
                            subsets.push(true_error(&h));
                        }
                    }
                }
            }
        }
        assert!(subsets.len() > 100, "{} usable subsets", subsets.len());
        subsets.sort_by(f64::total_cmp);
        let median = subsets[subsets.len() / 2];
        let better = subsets.iter().filter(|&&e| e > twelve).count();
        assert!(twelve < median / 2.0, "12-point fit {twelve} m vs median 4-point fit {median} m");
        assert!(better * 10 >= subsets.len() * 9, "12-point fit {twelve} m beats only {better} of {}", subsets.len());
    }

    #[test]
    fn degenerate_inputs_are_refused() {
        let ground = [[-5.0, 10.0], [5.0, 10.0], [5.0, 50.0], [-5.0, 50.0]];
        let image = [[200.0, 650.0], [1100.0, 650.0], [800.0, 250.0], [450.0, 250.0]];
        Calibration::fit(&image, &ground).expect("the good set fits");

        let degenerate = |r: Result<Calibration, CalibrationError>, want: &str| match r {
            Err(CalibrationError::Degenerate { set, detail }) => {
                assert_eq!(set, want, "{detail}");
                detail
            }
            other => panic!("expected Degenerate({want}), got {other:?}"),
        };

        // Three collinear image points (on the bottom row) plus one.
        let three = [[200.0, 650.0], [650.0, 650.0], [1100.0, 650.0], [640.0, 250.0]];
        let detail = degenerate(Calibration::fit(&three, &ground), "image");
        assert!(detail.contains('0') && detail.contains('1') && detail.contains('2'), "{detail}");
        // Nearly collinear: 0.2 px off the line over 900 px.
        let nearly = [[200.0, 650.0], [650.0, 650.2], [1100.0, 650.0], [640.0, 250.0]];
        degenerate(Calibration::fit(&nearly, &ground), "image");
        // Three collinear ground points.
        let ground3 = [[-5.0, 10.0], [0.0, 30.0], [5.0, 50.0], [-5.0, 50.0]];
        let detail = degenerate(Calibration::fit(&image, &ground3), "ground");
        assert!(detail.contains('0') && detail.contains('1') && detail.contains('2'), "{detail}");
        // Four collinear.
        let four = [[100.0, 700.0], [400.0, 550.0], [700.0, 400.0], [1000.0, 250.0]];
        let detail = degenerate(Calibration::fit(&four, &ground), "image");
        assert!(detail.contains("0, 1, 2, 3"), "{detail}");
        // Five points, four of them collinear: no 4 in general position.
        let five_img = [[100.0, 700.0], [400.0, 550.0], [700.0, 400.0], [1000.0, 250.0], [900.0, 650.0]];
        let five_gr = [[-5.0, 10.0], [5.0, 10.0], [5.0, 50.0], [-5.0, 50.0], [0.0, 30.0]];
        degenerate(Calibration::fit(&five_img, &five_gr), "image");
        // Duplicate points.
        let dup = [[200.0, 650.0], [1100.0, 650.0], [800.0, 250.0], [1100.0, 650.0], [450.0, 250.0]];
        let dup_gr = [[-5.0, 10.0], [5.0, 10.0], [5.0, 50.0], [6.0, 12.0], [-5.0, 50.0]];
        let detail = degenerate(Calibration::fit(&dup, &dup_gr), "image");
        assert!(detail.contains("1 and 3") && detail.contains("coincide"), "{detail}");
        // Fewer than 4, and lists of different lengths.
        assert_eq!(Calibration::fit(&image[..3], &ground[..3]), Err(CalibrationError::TooFewPoints { given: 3 }));
        assert_eq!(Calibration::fit(&image, &ground[..3]), Err(CalibrationError::TooFewPoints { given: 3 }));
        assert_eq!(Calibration::fit(&[], &[]), Err(CalibrationError::TooFewPoints { given: 0 }));
        // NaN and infinity.
        let mut nan = image;
        nan[2][1] = f64::NAN;
        assert_eq!(Calibration::fit(&nan, &ground), Err(CalibrationError::NotFinite { index: 2 }));
        let mut inf = ground;
        inf[3][0] = f64::INFINITY;
        assert_eq!(Calibration::fit(&image, &inf), Err(CalibrationError::NotFinite { index: 3 }));
        // The generic fit names its sets source / destination.
        assert!(matches!(
            Homography::from_correspondences(&four, &ground),
            Err(CalibrationError::Degenerate { set: "source", .. })
        ));
        assert!(matches!(
            Homography::from_correspondences(&image, &ground3),
            Err(CalibrationError::Degenerate { set: "destination", .. })
        ));
    }

    #[test]
    fn grid_with_collinear_triples_is_fine() {
        // Many collinear triples (lane lines), but plenty of 4-point subsets in general position.
        let ground = road_ground_points();
        let image = map_all(&road_camera(), &ground);
        let cal = Calibration::fit(&image, &ground).expect("fit");
        assert!(cal.reprojection.max_m < 1e-8, "{:?}", cal.reprojection);
    }

    #[test]
    fn general_position_search() {
        let tol = 1e-3 * 15.0;
        let check = |pts: &[Point]| {
            let q = find_general_position(pts, tol).expect("4 points in general position");
            assert!(in_general_position(pts, q, tol).is_ok(), "{q:?}");
        };
        // Two lines through a common point (a V): no large triangle of the set plus a fourth point
        // works with the first base; the fallbacks find two points on each line.
        check(&[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [0.0, 3.0], [0.0, 5.0]]);
        check(&[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]);
        // Four collinear plus one: refused, naming the lone point.
        let err = find_general_position(&[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [3.0, 4.0]], tol)
            .expect_err("degenerate");
        assert!(err.contains("0, 1, 2, 3") && err.contains("only point 4"), "{err}");
        // ... also when the lone point is an end of the longest pair.
        let err = find_general_position(&[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [40.0, 30.0]], tol)
            .expect_err("degenerate");
        assert!(err.contains("no 4 points"), "{err}");
    }

    #[test]
    fn errors_read_well() {
        let e = CalibrationError::Degenerate { set: "image", detail: "points 1 and 3 coincide (at 1, 2)".into() };
        assert_eq!(e.to_string(), "degenerate image points: points 1 and 3 coincide (at 1, 2)");
        assert!(CalibrationError::TooFewPoints { given: 3 }.to_string().contains("got 3 pairs"));
        assert!(CalibrationError::NotFinite { index: 5 }.to_string().contains("pair 5"));
    }

    #[test]
    fn inverse_round_trip() {
        let g2i = road_camera();
        let i2g = g2i.inverse().expect("invertible");
        let product = g2i.then(&i2g).normalised().expect("finite");
        for (r, row) in product.0.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "{product:?}");
            }
        }
        for g in [[0.0, 20.0], [-7.0, 60.0], [3.0, 9.0]] {
            assert_close(i2g.apply(g2i.apply(g).expect("visible")).expect("on the plane"), g, 1e-9);
        }
        let ground = road_ground_points();
        let cal = Calibration::fit(&map_all(&g2i, &ground), &ground).expect("fit");
        for p in [[640.0, 700.0], [100.0, 500.0], [1200.0, 300.0]] {
            assert_close(cal.to_image(cal.to_ground(p).expect("plane")).expect("image"), p, 1e-6);
        }
        assert_eq!(Homography([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]]).inverse(), None);
        assert_eq!(Homography([[f64::NAN, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).inverse(), None);
        assert_eq!(Homography::IDENTITY.inverse(), Some(Homography::IDENTITY));
    }

    #[test]
    fn horizon_points_do_not_map() {
        // w = 0.5 y - 1: the horizon is y = 2.
        let h = Homography([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, -1.0]]);
        assert_eq!(h.apply([3.0, 2.0]), None);
        assert!(h.apply([3.0, 4.0]).is_some());
        assert_eq!(h.apply([f64::NAN, 4.0]), None);
        let reprojection = ReprojectionError { mean_m: 0.0, max_m: 0.0, worst: 0, mean_px: 0.0 };
        let cal = Calibration { image_to_ground: h, ground_to_image: h, reprojection };
        assert_eq!(cal.metres_per_pixel([3.0, 1.0]), None); // y + 1 is on the horizon
        assert!(cal.metres_per_pixel([3.0, 10.0]).is_some());
    }

    #[test]
    fn metres_per_pixel_grows_with_distance() {
        let g2i = road_camera();
        let ground = road_ground_points();
        let cal = Calibration::fit(&map_all(&g2i, &ground), &ground).expect("fit");
        // Up the picture is farther from the camera.
        let column: Vec<f64> = [710.0, 600.0, 500.0, 400.0, 300.0, 250.0, 200.0, 160.0]
            .iter()
            .map(|&y| cal.metres_per_pixel([640.0, y]).expect("plane"))
            .collect();
        assert!(column.windows(2).all(|w| w[1] > w[0]), "{column:?}");
        assert!(column[7] > 20.0 * column[0], "{column:?}");
        // A near-camera pixel covers centimetres.
        assert!(column[0] > 0.005 && column[0] < 0.05, "{column:?}");
    }

    #[test]
    fn side_of_line() {
        let (a, b) = ([0.0, 0.0], [10.0, 0.0]);
        assert!(side(a, b, [5.0, 1.0]) > 0.0);
        assert!(side(a, b, [5.0, -1.0]) < 0.0);
        assert_eq!(side(a, b, [20.0, 0.0]), 0.0);
        assert!(side(b, a, [5.0, 1.0]) < 0.0);
    }

    #[test]
    fn segment_intersections() {
        let t = segment_intersection([0.0, 0.0], [10.0, 10.0], [0.0, 10.0], [10.0, 0.0]).expect("X");
        assert!((t - 0.5).abs() < 1e-12);
        let t = segment_intersection([0.0, 0.0], [4.0, 0.0], [1.0, -1.0], [1.0, 1.0]).expect("crosses");
        assert!((t - 0.25).abs() < 1e-12);
        // Touching at an end of either segment.
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [4.0, -1.0], [4.0, 1.0]), Some(1.0));
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [2.0, 0.0], [2.0, 3.0]), Some(0.5));
        // Short of each other.
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [5.0, -1.0], [5.0, 1.0]), None);
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [2.0, 0.5], [2.0, 3.0]), None);
        // Parallel, collinear overlapping, and a point.
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [0.0, 1.0], [4.0, 1.0]), None);
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [1.0, 0.0], [6.0, 0.0]), None);
        assert_eq!(segment_intersection([0.0, 0.0], [4.0, 0.0], [2.0, 0.0], [2.0, 0.0]), None);
    }

    #[test]
    fn polyline_crossings() {
        // A count line across the road in the picture: three segments, the middle one horizontal.
        let line = [[100.0, 380.0], [500.0, 400.0], [800.0, 400.0], [1200.0, 430.0]];
        let down = polyline_crossing(&line, [600.0, 300.0], [600.0, 500.0]).expect("crosses");
        let up = polyline_crossing(&line, [600.0, 500.0], [600.0, 300.0]).expect("crosses");
        assert_eq!((down.segment, up.segment), (1, 1));
        assert_eq!(down.sign, -up.sign);
        assert!((down.t - 0.5).abs() < 1e-12 && (up.t - 0.5).abs() < 1e-12);
        // Moving down the picture ends below this left-to-right line: side > 0, which on screen
        // (y down) is the right-hand side of the segment's direction.
        assert_eq!(down.sign, 1);
        // Across the first and the last segment too.
        let first = polyline_crossing(&line, [300.0, 500.0], [300.0, 300.0]).expect("first");
        assert_eq!((first.segment, first.sign), (0, -1));
        let last = polyline_crossing(&line, [1000.0, 300.0], [1000.0, 600.0]).expect("last");
        assert_eq!((last.segment, last.sign), (2, 1));

        // Ending exactly on the line, starting on it, or jittering along it: no crossing.
        assert_eq!(polyline_crossing(&line, [600.0, 300.0], [600.0, 400.0]), None);
        assert_eq!(polyline_crossing(&line, [600.0, 400.0], [600.0, 500.0]), None);
        assert_eq!(polyline_crossing(&line, [600.0, 400.0], [650.0, 400.0]), None);
        // The caller's last strictly-off position to the position past the line: one crossing.
        assert!(polyline_crossing(&line, [600.0, 300.0], [650.0, 450.0]).is_some());
        // Parallel to a segment, and past the end of the polyline: nothing.
        assert_eq!(polyline_crossing(&line, [550.0, 350.0], [750.0, 350.0]), None);
        assert_eq!(polyline_crossing(&line, [1250.0, 300.0], [1250.0, 600.0]), None);
        assert_eq!(polyline_crossing(&line[..1], [600.0, 300.0], [600.0, 500.0]), None);

        // A zigzag crossed twice by one movement: the first crossing along the movement counts.
        let zigzag = [[0.0, 0.0], [10.0, 10.0], [20.0, 0.0]];
        let c = polyline_crossing(&zigzag, [18.0, 5.0], [2.0, 5.0]).expect("crosses");
        assert_eq!(c.segment, 1);
        assert!((c.t - 3.0 / 16.0).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn polygons() {
        let square = [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]];
        assert!(polygon_contains(&square, [5.0, 5.0]));
        assert!(!polygon_contains(&square, [15.0, 5.0]));
        assert!(!polygon_contains(&square, [5.0, -0.001]));
        // Edges and vertices are inside.
        assert!(polygon_contains(&square, [10.0, 5.0]));
        assert!(polygon_contains(&square, [5.0, 0.0]));
        assert!(polygon_contains(&square, [0.0, 0.0]));
        assert!(polygon_contains(&square, [10.0, 10.0]));
        // A slanted edge.
        let tri = [[0.0, 0.0], [1280.0, 0.0], [0.0, 720.0]];
        assert!(polygon_contains(&tri, [640.0, 360.0]));
        assert!(!polygon_contains(&tri, [640.1, 360.1]));

        // L-shape (concave): the notch is outside.
        let l = [[0.0, 0.0], [10.0, 0.0], [10.0, 4.0], [4.0, 4.0], [4.0, 10.0], [0.0, 10.0]];
        assert!(polygon_contains(&l, [8.0, 2.0]));
        assert!(polygon_contains(&l, [2.0, 8.0]));
        assert!(polygon_contains(&l, [2.0, 2.0]));
        assert!(!polygon_contains(&l, [7.0, 7.0]));
        assert!(polygon_contains(&l, [7.0, 4.0])); // on the inner edge
        assert!(polygon_contains(&l, [4.0, 4.0])); // the reflex vertex
        assert!(!polygon_contains(&l, [4.0, 11.0]));
        // A ray through a vertex (y = 4 from the left) must not double count.
        assert!(polygon_contains(&l, [1.0, 4.0]));
        assert!(!polygon_contains(&l, [-1.0, 4.0]));

        // Fewer than 3 points contain nothing.
        assert!(!polygon_contains(&square[..2], [5.0, 0.0]));
        assert!(!polygon_contains(&[], [0.0, 0.0]));

        assert_eq!(polygon_area(&square), 100.0);
        let reversed: Vec<Point> = square.iter().rev().copied().collect();
        assert_eq!(polygon_area(&reversed), -100.0);
        assert_eq!(polygon_area(&l), 64.0);
        assert_eq!(polygon_area(&square[..2]), 0.0);

        let bow_tie = [[0.0, 0.0], [10.0, 10.0], [10.0, 0.0], [0.0, 10.0]];
        assert!(!polygon_is_simple(&bow_tie));
        assert!(polygon_is_simple(&square));
        assert!(polygon_is_simple(&reversed));
        assert!(polygon_is_simple(&l));
        assert!(polygon_is_simple(&tri));
        // A redundant vertex in the middle of an edge is fine.
        assert!(polygon_is_simple(&[[0.0, 0.0], [5.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]]));
        // Not simple: a vertex touching another edge, a spike folding back, a repeated vertex,
        // collinear points, too few points, NaN.
        assert!(!polygon_is_simple(&[[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [5.0, 0.0], [0.0, 10.0]]));
        assert!(!polygon_is_simple(&[[0.0, 0.0], [10.0, 0.0], [15.0, 0.0], [10.0, 0.0], [10.0, 10.0]]));
        assert!(!polygon_is_simple(&[[0.0, 0.0], [10.0, 0.0], [10.0, 0.0], [10.0, 10.0]]));
        assert!(!polygon_is_simple(&[[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]]));
        assert!(!polygon_is_simple(&square[..2]));
        assert!(!polygon_is_simple(&[[0.0, 0.0], [10.0, 0.0], [f64::NAN, 10.0]]));
    }

    #[test]
    fn distances() {
        assert_eq!(distance([0.0, 0.0], [3.0, 4.0]), 5.0);
        assert_eq!(distance([1.0, 1.0], [1.0, 1.0]), 0.0);
    }

    fn well_spread(q: &[Point; 4]) -> bool {
        let extent = q.iter().flat_map(|&a| q.iter().map(move |&b| distance(a, b))).fold(0.0, f64::max);
        [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
            .iter()
            .all(|&(a, b, c)| triangle_height(q[a], q[b], q[c]) > 0.02 * extent)
    }

    /// Four points, one in each quadrant of the `w x h` rectangle at `origin` (clockwise from the
    /// top-left), each anywhere in its quadrant but for a margin of a tenth of the rectangle around
    /// the centre lines: mostly convex, some concave.
    fn quad(origin: Point, w: f64, h: f64) -> impl Strategy<Value = [Point; 4]> {
        prop::array::uniform4((0.0..0.4f64, 0.0..0.4f64)).prop_map(move |cells| {
            let offsets = [[0.0, 0.0], [0.6, 0.0], [0.6, 0.6], [0.0, 0.6]];
            std::array::from_fn(|k| {
                let (u, v) = cells[k];
                [origin[0] + (offsets[k][0] + u) * w, origin[1] + (offsets[k][1] + v) * h]
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn four_point_fit_is_exact(
            src in quad([0.0, 0.0], 1280.0, 720.0),
            dst in quad([-20.0, 0.0], 40.0, 80.0),
        ) {
            prop_assume!(well_spread(&src) && well_spread(&dst));
            let h = Homography::from_correspondences(&src, &dst).expect("fit");
            let scale = dst.iter().flat_map(|&a| dst.iter().map(move |&b| distance(a, b))).fold(0.0, f64::max);
            for (s, d) in src.iter().zip(&dst) {
                let got = h.apply(*s).expect("maps");
                prop_assert!(distance(got, *d) <= 1e-6 * scale, "{:?} -> {:?}, want {:?}", s, got, d);
            }
            let inv = h.inverse().expect("invertible");
            for (s, d) in src.iter().zip(&dst) {
                let back = inv.apply(*d).expect("maps back");
                prop_assert!(distance(back, *s) <= 1e-6 * 1280.0, "{:?} -> {:?}, want {:?}", d, back, s);
            }
        }
    }
}
