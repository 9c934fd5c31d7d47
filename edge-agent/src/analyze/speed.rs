//! Speed from a track's ground-plane positions.
//!
//! A box's bottom-centre jitters by a few pixels from frame to frame (the detector's box edges
//! move), and a pixel far from the camera is a lot of road; differencing two positions turns that
//! into absurd speeds (the 1,500 km/h readings users of other tools report). So a speed is the
//! slope of a least-squares line through all positions of a time window (x and y separately),
//! fitted twice: positions that sit further from the first fit than three median absolute
//! deviations (at least 0.25 m) are dropped as outliers (a box cut by the frame edge or merged
//! with a neighbour), then the line is fitted again. A window that is too short, covers too little
//! ground or yields more than the plausible maximum gives no speed at all.

use its_shared::geometry::Point;

/// One position of a track on the ground, metres, at stream time `t` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroundSample {
    pub t: f64,
    pub p: Point,
}

/// Velocity over a window, m/s, with how many samples it rests on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Velocity {
    pub v: [f64; 2],
    pub samples: usize,
}

impl Velocity {
    pub fn kmh(&self) -> f64 {
        (self.v[0] * self.v[0] + self.v[1] * self.v[1]).sqrt() * 3.6
    }
}

/// Least-squares slope and intercept of `ys` against `ts` (None when all `ts` are equal).
fn fit(ts: &[f64], ys: &[f64]) -> Option<(f64, f64)> {
    let n = ts.len() as f64;
    if ts.len() < 2 {
        return None;
    }
    let mt = ts.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let (mut sty, mut stt) = (0.0, 0.0);
    for (t, y) in ts.iter().zip(ys) {
        sty += (t - mt) * (y - my);
        stt += (t - mt) * (t - mt);
    }
    if stt <= 1e-12 {
        return None;
    }
    let slope = sty / stt;
    Some((slope, my - slope * mt))
}

fn fit_2d(samples: &[GroundSample]) -> Option<[(f64, f64); 2]> {
    let ts: Vec<f64> = samples.iter().map(|s| s.t).collect();
    let xs: Vec<f64> = samples.iter().map(|s| s.p[0]).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.p[1]).collect();
    Some([fit(&ts, &xs)?, fit(&ts, &ys)?])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The robust velocity of `samples` (any order of time is accepted, but they should be one
/// track's recent positions). `None` with fewer than 3 usable samples or no time span.
pub fn robust_velocity(samples: &[GroundSample]) -> Option<Velocity> {
    if samples.len() < 3 {
        return None;
    }
    let [(vx, bx), (vy, by)] = fit_2d(samples)?;
    let residual = |s: &GroundSample| {
        let (ex, ey) = (s.p[0] - (vx * s.t + bx), s.p[1] - (vy * s.t + by));
        (ex * ex + ey * ey).sqrt()
    };
    let mut res: Vec<f64> = samples.iter().map(residual).collect();
    let mad = median(&mut res);
    let limit = (3.0 * 1.4826 * mad).max(0.25);
    let kept: Vec<GroundSample> = samples.iter().copied().filter(|s| residual(s) <= limit).collect();
    if kept.len() < 3 {
        return None;
    }
    let [(vx, _), (vy, _)] = fit_2d(&kept)?;
    Some(Velocity { v: [vx, vy], samples: kept.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(speed_ms: f64, n: usize, fps: f64) -> Vec<GroundSample> {
        (0..n).map(|i| GroundSample { t: i as f64 / fps, p: [speed_ms * i as f64 / fps, 3.0] }).collect()
    }

    #[test]
    fn a_steady_vehicle_gets_its_speed() {
        let v = robust_velocity(&line(50.0 / 3.6, 15, 10.0)).expect("speed");
        assert!((v.kmh() - 50.0).abs() < 1e-6, "{}", v.kmh());
    }

    #[test]
    fn jitter_averages_out_and_a_wild_position_is_rejected() {
        let mut s = line(60.0 / 3.6, 15, 10.0);
        // ±0.3 m of box jitter, alternating.
        for (i, x) in s.iter_mut().enumerate() {
            x.p[0] += if i % 2 == 0 { 0.3 } else { -0.3 };
        }
        // One box merged with a neighbour: 8 m off. Differencing around it would read ~290 km/h.
        s[7].p[0] += 8.0;
        let v = robust_velocity(&s).expect("speed");
        assert!((v.kmh() - 60.0).abs() < 3.0, "{} km/h", v.kmh());
        assert_eq!(v.samples, 14, "the wild position was dropped");
    }

    #[test]
    fn too_few_positions_give_no_speed() {
        assert!(robust_velocity(&line(10.0, 2, 10.0)).is_none());
        let still = vec![GroundSample { t: 1.0, p: [0.0, 0.0] }; 5];
        assert!(robust_velocity(&still).is_none(), "no time span");
    }
}
