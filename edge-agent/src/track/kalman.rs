//! Constant-velocity Kalman filter on a box, ByteTrack/DeepSORT style, in seconds.
//!
//! State `[cx, cy, a, h, vcx, vcy, va, vh]`: box centre (pixels), aspect ratio `w / h`, height
//! (pixels) and their rates of change **per second**; the measurement is `[cx, cy, a, h]`.
//!
//! # Model
//!
//! - Transition over `dt` seconds: `x' = x + dt · v`, `v' = v`.
//! - Process noise: independent random walks on every component, so its variance grows linearly
//!   with `dt`: `Q(dt) = Q₀ · dt / T₀`, where `Q₀` is ByteTrack's per-frame noise and
//!   `T₀ =` [`NOMINAL_FRAME_S`] (10 fps). At `dt = T₀` one prediction is exactly one ByteTrack
//!   step, and two predictions of `dt/2` add the same process noise as one of `dt`, so dropped
//!   frames and irregular frame times only change how much time the filter accounts for.
//! - Standard deviations scale with the box height `h` (ByteTrack's weights
//!   [`STD_WEIGHT_POSITION`] = 1/20 and [`STD_WEIGHT_VELOCITY`] = 1/160 per nominal frame; the
//!   velocity ones are divided by `T₀` to be per second):
//!   - position `σ_p = h/20` (centre, height; aspect `0.01`), velocity `σ_v = h/160 / T₀`
//!     (aspect rate `1e-5 / T₀`), both per `T₀` of elapsed time;
//!   - measurement `h/20` for centre and height, `0.1` for the aspect ratio;
//!   - initial state `2 σ_p` for the box, `10 σ_v` for the unknown velocities.
//!
//! All arithmetic is `f64` on fixed-size arrays; the update solves with a 4×4 Cholesky factor of
//! the innovation covariance.

/// Standard deviation of position per nominal frame, as a fraction of the box height.
pub const STD_WEIGHT_POSITION: f64 = 1.0 / 20.0;
/// Standard deviation of velocity per nominal frame, as a fraction of the box height.
pub const STD_WEIGHT_VELOCITY: f64 = 1.0 / 160.0;
/// The frame interval the noise weights are calibrated for (10 fps).
pub const NOMINAL_FRAME_S: f64 = 0.1;

/// Heights below this (pixels) are treated as this when scaling noise, so noise stays positive.
const MIN_NOISE_HEIGHT: f64 = 1.0;

type Mat8 = [[f64; 8]; 8];

/// A box tracked by a constant-velocity Kalman filter (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct BoxKalman {
    mean: [f64; 8],
    cov: Mat8,
}

impl BoxKalman {
    /// A filter at `measurement` (`[cx, cy, a, h]`) with zero velocity and ByteTrack's initial
    /// uncertainty.
    pub fn new(measurement: [f32; 4]) -> Self {
        let z = measurement.map(f64::from);
        let (p, v) = noise_std(z[3]);
        let std = [2.0 * p, 2.0 * p, 1e-2, 2.0 * p, 10.0 * v, 10.0 * v, 1e-5 / NOMINAL_FRAME_S, 10.0 * v];
        let mut cov = [[0.0; 8]; 8];
        for (i, s) in std.iter().enumerate() {
            cov[i][i] = s * s;
        }
        Self { mean: [z[0], z[1], z[2], z[3], 0.0, 0.0, 0.0, 0.0], cov }
    }

    /// A filter at the box `[x1, y1, x2, y2]`.
    pub fn from_bbox(bbox: [f32; 4]) -> Self {
        Self::new(bbox_to_xyah(bbox))
    }

    /// Advances the state by `dt_s` seconds (negative or non-finite values count as 0).
    pub fn predict(&mut self, dt_s: f32) {
        let dt = f64::from(dt_s);
        if !(dt > 0.0 && dt.is_finite()) {
            return;
        }
        for i in 0..4 {
            self.mean[i] += dt * self.mean[i + 4];
        }
        let mut f = identity::<8>();
        for (i, row) in f.iter_mut().take(4).enumerate() {
            row[i + 4] = dt;
        }
        let mut cov = mul(&mul(&f, &self.cov), &transpose(&f));
        let (p, v) = noise_std(self.mean[3]);
        let std = [p, p, 1e-2, p, v, v, 1e-5 / NOMINAL_FRAME_S, v];
        let scale = dt / NOMINAL_FRAME_S;
        for (i, s) in std.iter().enumerate() {
            cov[i][i] += s * s * scale;
        }
        self.cov = cov;
    }

    /// Corrects the state with a measured `[cx, cy, a, h]`. Should the innovation covariance not
    /// be positive definite (a state corrupted by non-finite input), the filter restarts at the
    /// measurement.
    pub fn update(&mut self, measurement: [f32; 4]) {
        let z = measurement.map(f64::from);
        let (p, _) = noise_std(self.mean[3]);
        let r = [p * p, p * p, 1e-2, p * p];
        // With H = [I 0]: S = P[..4][..4] + R and H P = the first four rows of P.
        let hp: [[f64; 8]; 4] = [self.cov[0], self.cov[1], self.cov[2], self.cov[3]];
        let mut s = [[0.0; 4]; 4];
        for (i, row) in s.iter_mut().enumerate() {
            row.copy_from_slice(&hp[i][..4]);
            row[i] += r[i];
        }
        let Some(l) = cholesky(&s) else {
            *self = Self::new(measurement);
            return;
        };
        // Kᵀ = S⁻¹ H P (S is symmetric), so K y = (Kᵀ)ᵀ y and K S Kᵀ = K H P.
        let kt = cholesky_solve(&l, &hp);
        let innovation: [f64; 4] = std::array::from_fn(|i| z[i] - self.mean[i]);
        for (j, m) in self.mean.iter_mut().enumerate() {
            *m += (0..4).map(|i| kt[i][j] * innovation[i]).sum::<f64>();
        }
        for (a, row) in self.cov.iter_mut().enumerate() {
            for (b, p) in row.iter_mut().enumerate() {
                *p -= (0..4).map(|i| kt[i][a] * hp[i][b]).sum::<f64>();
            }
        }
        // Keep the covariance exactly symmetric despite rounding.
        for a in 0..8 {
            for b in a + 1..8 {
                let avg = 0.5 * (self.cov[a][b] + self.cov[b][a]);
                self.cov[a][b] = avg;
                self.cov[b][a] = avg;
            }
        }
        if !self.mean.iter().all(|v| v.is_finite()) {
            *self = Self::new(measurement);
        }
    }

    /// Corrects the state with a measured box `[x1, y1, x2, y2]`.
    pub fn update_bbox(&mut self, bbox: [f32; 4]) {
        self.update(bbox_to_xyah(bbox));
    }

    /// Stops the height from changing on its own (ByteTrack does this while a track is lost, so
    /// an unobserved box does not shrink or grow without bound).
    pub fn freeze_height_rate(&mut self) {
        self.mean[7] = 0.0;
    }

    /// The state mean `[cx, cy, a, h, vcx, vcy, va, vh]`, rates per second.
    pub fn mean(&self) -> &[f64; 8] {
        &self.mean
    }

    /// The state covariance.
    pub fn covariance(&self) -> &[[f64; 8]; 8] {
        &self.cov
    }

    /// The estimated box `[x1, y1, x2, y2]` (zero-size rather than inverted if the state has a
    /// negative height or aspect).
    pub fn bbox(&self) -> [f32; 4] {
        let [cx, cy, a, h, ..] = self.mean;
        let h = h.max(0.0);
        let w = (a * h).max(0.0);
        [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v as f32)
    }

    /// The estimated centre velocity `[vx, vy]` in pixels per second.
    pub fn velocity(&self) -> [f32; 2] {
        [self.mean[4] as f32, self.mean[5] as f32]
    }
}

/// `[x1, y1, x2, y2]` to `[cx, cy, w / h, h]` (the box must have a positive height).
pub fn bbox_to_xyah(b: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    [b[0] + w / 2.0, b[1] + h / 2.0, w / h, h]
}

/// Position and velocity (per second) standard deviations for a box of height `h`.
fn noise_std(h: f64) -> (f64, f64) {
    let h = if h.is_finite() { h.max(MIN_NOISE_HEIGHT) } else { MIN_NOISE_HEIGHT };
    (STD_WEIGHT_POSITION * h, STD_WEIGHT_VELOCITY * h / NOMINAL_FRAME_S)
}

fn identity<const N: usize>() -> [[f64; N]; N] {
    let mut m = [[0.0; N]; N];
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    m
}

/// `a · b` for an `N×K` and a `K×M` matrix.
fn mul<const N: usize, const K: usize, const M: usize>(a: &[[f64; K]; N], b: &[[f64; M]; K]) -> [[f64; M]; N] {
    let mut out = [[0.0; M]; N];
    for (out_row, a_row) in out.iter_mut().zip(a) {
        for (&a_ik, b_row) in a_row.iter().zip(b) {
            for (o, &b_kj) in out_row.iter_mut().zip(b_row) {
                *o += a_ik * b_kj;
            }
        }
    }
    out
}

fn transpose<const N: usize, const M: usize>(a: &[[f64; M]; N]) -> [[f64; N]; M] {
    std::array::from_fn(|j| std::array::from_fn(|i| a[i][j]))
}

/// Lower-triangular `L` with `L Lᵀ = a`, or `None` when `a` is not (numerically) symmetric
/// positive definite.
fn cholesky<const N: usize>(a: &[[f64; N]; N]) -> Option<[[f64; N]; N]> {
    let mut l = [[0.0; N]; N];
    for i in 0..N {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            let v = a[i][j] - dot;
            if i == j {
                if !(v > 0.0 && v.is_finite()) {
                    return None;
                }
                l[i][i] = v.sqrt();
            } else {
                l[i][j] = v / l[j][j];
            }
        }
    }
    Some(l)
}

/// `X` with `L Lᵀ X = b`: forward substitution with `L`, then backward with `Lᵀ`, a whole row of
/// `X` at a time.
fn cholesky_solve<const N: usize, const M: usize>(l: &[[f64; N]; N], b: &[[f64; M]; N]) -> [[f64; M]; N] {
    let mut x = *b;
    for i in 0..N {
        for k in 0..i {
            let (factor, xk) = (l[i][k], x[k]);
            x[i].iter_mut().zip(xk).for_each(|(v, w)| *v -= factor * w);
        }
        let d = l[i][i];
        x[i].iter_mut().for_each(|v| *v /= d);
    }
    for i in (0..N).rev() {
        for k in i + 1..N {
            let (factor, xk) = (l[k][i], x[k]);
            x[i].iter_mut().zip(xk).for_each(|(v, w)| *v -= factor * w);
        }
        let d = l[i][i];
        x[i].iter_mut().for_each(|v| *v /= d);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(cx: f64, cy: f64, w: f64, h: f64) -> [f32; 4] {
        [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v as f32)
    }

    fn assert_symmetric_positive(cov: &Mat8) {
        for (a, row) in cov.iter().enumerate() {
            for (b, &v) in row.iter().enumerate() {
                assert_eq!(v, cov[b][a], "asymmetric at ({a},{b})");
            }
        }
        assert!(cholesky(cov).is_some(), "covariance not positive definite: {cov:?}");
    }

    #[test]
    fn constant_velocity_is_learned() {
        // 40x80 box moving at (+60, -25) px/s, measured exactly at 10 fps.
        let (vx, vy) = (60.0, -25.0);
        let at = |t: f64| boxed(100.0 + vx * t, 300.0 + vy * t, 40.0, 80.0);
        let mut kf = BoxKalman::from_bbox(at(0.0));
        let mut errors = Vec::new();
        for k in 1..=40 {
            kf.predict(0.1);
            kf.update_bbox(at(f64::from(k) * 0.1));
            let v = kf.velocity();
            errors.push(((f64::from(v[0]) - vx).powi(2) + (f64::from(v[1]) - vy).powi(2)).sqrt());
        }
        assert!(errors[2] > 5.0, "velocity should start unknown: {errors:?}");
        assert!(errors[39] < 0.5, "velocity did not converge: {errors:?}");
        assert!(errors[39] < errors[9] && errors[9] < errors[2], "{errors:?}");
        let b = kf.bbox();
        let truth = at(4.0);
        assert!(b.iter().zip(truth).all(|(a, t)| (a - t).abs() < 0.5), "{b:?} vs {truth:?}");
    }

    #[test]
    fn irregular_frame_times_are_learned_too() {
        let v = 120.0;
        let at = |t: f64| boxed(50.0 + v * t, 200.0, 60.0, 60.0);
        let mut kf = BoxKalman::from_bbox(at(0.0));
        let mut t = 0.0;
        for dt in [0.1, 0.3, 0.05, 0.4, 0.1, 0.2, 0.1, 0.1, 0.5, 0.1, 0.1, 0.3, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1] {
            t += dt;
            kf.predict(dt as f32);
            kf.update_bbox(at(t));
        }
        assert!((f64::from(kf.velocity()[0]) - v).abs() < 3.0, "{:?}", kf.velocity());
        assert!(f64::from(kf.velocity()[1]).abs() < 1.0);
    }

    #[test]
    fn longer_predictions_move_further_and_grow_uncertainty() {
        let mut kf = BoxKalman::from_bbox(boxed(100.0, 100.0, 50.0, 100.0));
        for k in 1..=20 {
            kf.predict(0.1);
            kf.update_bbox(boxed(100.0 + 10.0 * f64::from(k), 100.0, 50.0, 100.0)); // 100 px/s
        }
        let x0 = kf.mean()[0];
        let (mut short, mut long) = (kf.clone(), kf.clone());
        short.predict(0.1);
        long.predict(0.3);
        let (d_short, d_long) = (short.mean()[0] - x0, long.mean()[0] - x0);
        assert!(d_short > 9.0 && d_long > 29.0, "{d_short} {d_long}");
        assert!((d_long / d_short - 3.0).abs() < 1e-6);
        for i in 0..8 {
            assert!(long.covariance()[i][i] > short.covariance()[i][i], "variance {i} did not grow");
        }
    }

    #[test]
    fn process_noise_matches_bytetrack_at_the_nominal_rate() {
        // From the initial state, one nominal step gives ByteTrack's per-frame variances:
        // position (2σp)² + (10σv)²·(velocity per frame) + σp², velocity (10σv)² + σv².
        let h = 100.0;
        let mut kf = BoxKalman::new([50.0, 50.0, 0.5, h as f32]);
        kf.predict(NOMINAL_FRAME_S as f32);
        let (p, v) = (h / 20.0, h / 160.0);
        let pos = 4.0 * p * p + 100.0 * v * v + p * p;
        let vel_per_frame = 100.0 * v * v + v * v;
        let got_pos = kf.covariance()[0][0];
        let got_vel = kf.covariance()[4][4] * NOMINAL_FRAME_S * NOMINAL_FRAME_S;
        assert!((got_pos - pos).abs() < 1e-4 * pos, "{got_pos} vs {pos}");
        assert!((got_vel - vel_per_frame).abs() < 1e-4 * vel_per_frame, "{got_vel} vs {vel_per_frame}");
        // Two half steps add the same noise as one full step, the position coupling aside.
        let mut halves = BoxKalman::new([50.0, 50.0, 0.5, h as f32]);
        halves.predict(0.05);
        halves.predict(0.05);
        assert!((halves.covariance()[4][4] - kf.covariance()[4][4]).abs() < 1e-9);
    }

    #[test]
    fn zero_or_invalid_dt_changes_nothing() {
        let mut kf = BoxKalman::from_bbox([10.0, 10.0, 50.0, 90.0]);
        kf.predict(0.1);
        kf.update_bbox([12.0, 10.0, 52.0, 90.0]);
        let before = kf.clone();
        kf.predict(0.0);
        kf.predict(-1.0);
        kf.predict(f32::NAN);
        assert_eq!(kf, before);
    }

    #[test]
    fn covariance_stays_symmetric_positive_definite() {
        let mut seed = 0x1234_5678_u64;
        let mut noise = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let mut kf = BoxKalman::from_bbox(boxed(300.0, 200.0, 30.0, 60.0));
        assert_symmetric_positive(kf.covariance());
        let mut t = 0.0;
        for step in 0..500 {
            let dt = 0.02 + 0.3 * (noise() + 0.5);
            t += dt;
            kf.predict(dt as f32);
            assert_symmetric_positive(kf.covariance());
            if step % 7 != 3 {
                let h = 60.0 + 10.0 * noise();
                kf.update_bbox(boxed(300.0 + 40.0 * t + 5.0 * noise(), 200.0 + 5.0 * noise(), h * 0.5, h));
                assert_symmetric_positive(kf.covariance());
            }
        }
        assert!((f64::from(kf.velocity()[0]) - 40.0).abs() < 15.0, "{:?}", kf.velocity());
    }

    #[test]
    fn cholesky_solve_inverts() {
        let s = [[4.0, 1.0, 0.5, 0.0], [1.0, 3.0, 0.2, 0.1], [0.5, 0.2, 2.0, 0.3], [0.0, 0.1, 0.3, 1.0]];
        let l = cholesky(&s).unwrap_or_else(|| panic!("positive definite"));
        let x = cholesky_solve(&l, &identity::<4>());
        let back = mul(&s, &x);
        for (i, row) in back.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(cholesky(&[[1.0, 2.0], [2.0, 1.0]]).is_none());
    }
}
