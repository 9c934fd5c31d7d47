//! Rollup arithmetic: the rows of one camera's bucket from its events (no I/O).

use std::collections::BTreeMap;

pub use crate::store::rollups::EventSample;

/// What identifies a series within a camera's bucket. Absent parts are empty strings (they are
/// part of a unique key in storage).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub line: String,
    pub zone: String,
    pub label: String,
    pub direction: String,
}

/// The figures of one series in one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupFigures {
    /// Crossings (crossing series) or road users that entered (occupancy series).
    pub count: u64,
    /// Crossings with a measured speed.
    pub speed_samples: u64,
    pub speed_mean_kmh: Option<f64>,
    /// 85th percentile (nearest rank) of the measured speeds.
    pub speed_p85_kmh: Option<f64>,
    /// Occupancy series: time-weighted mean fraction of frames with a road user in the zone.
    pub occupancy: Option<f64>,
}

/// The 85th percentile by nearest rank (the value at or below which 85% of the samples lie),
/// as traffic engineers quote it. `None` for no samples.
pub fn p85(speeds: &mut [f64]) -> Option<f64> {
    percentile(speeds, 0.85)
}

/// The `q` quantile (0 < q <= 1) by nearest rank; sorts `values`.
pub fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values.get(rank.clamp(1, values.len()) - 1).copied()
}

#[derive(Default)]
struct Acc {
    count: u64,
    speeds: Vec<f64>,
    occupied_weighted: f64,
    occupied_weight: f64,
}

/// The payload fields of `zone_occupancy` that the rollups use.
#[derive(serde::Deserialize)]
struct OccupancyPayload {
    interval_s: u32,
    occupied: f32,
    entered: u32,
}

/// The series of one bucket: line crossings by (line, class, direction), zone occupancy by zone.
/// Other kinds are ignored; an occupancy payload that does not parse is skipped.
pub fn compute(events: &[EventSample]) -> BTreeMap<SeriesKey, RollupFigures> {
    let mut acc: BTreeMap<SeriesKey, Acc> = BTreeMap::new();
    for e in events {
        match e.kind.as_str() {
            "line_crossing" => {
                let key = SeriesKey {
                    line: e.line.clone().unwrap_or_default(),
                    zone: String::new(),
                    label: e.label.clone().unwrap_or_default(),
                    direction: e.direction.clone().unwrap_or_default(),
                };
                let a = acc.entry(key).or_default();
                a.count += 1;
                if let Some(s) = e.speed_kmh.filter(|s| s.is_finite() && *s >= 0.0) {
                    a.speeds.push(s);
                }
            }
            "zone_occupancy" => {
                let Some(p) = e.payload.as_deref().and_then(|t| serde_json::from_str::<OccupancyPayload>(t).ok())
                else {
                    continue;
                };
                let key = SeriesKey {
                    line: String::new(),
                    zone: e.zone.clone().unwrap_or_default(),
                    label: String::new(),
                    direction: String::new(),
                };
                let a = acc.entry(key).or_default();
                a.count += u64::from(p.entered);
                let occupied = f64::from(p.occupied);
                if occupied.is_finite() {
                    let w = f64::from(p.interval_s.max(1));
                    a.occupied_weighted += occupied.clamp(0.0, 1.0) * w;
                    a.occupied_weight += w;
                }
            }
            _ => {}
        }
    }
    acc.into_iter()
        .map(|(key, mut a)| {
            let speed_samples = a.speeds.len() as u64;
            let speed_mean_kmh = (speed_samples > 0).then(|| a.speeds.iter().sum::<f64>() / speed_samples as f64);
            let speed_p85_kmh = p85(&mut a.speeds);
            let occupancy = (a.occupied_weight > 0.0).then(|| a.occupied_weighted / a.occupied_weight);
            (key, RollupFigures { count: a.count, speed_samples, speed_mean_kmh, speed_p85_kmh, occupancy })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crossing(line: &str, label: &str, dir: &str, speed: Option<f64>) -> EventSample {
        EventSample {
            kind: "line_crossing".into(),
            label: Some(label.into()),
            line: Some(line.into()),
            zone: None,
            direction: Some(dir.into()),
            speed_kmh: speed,
            payload: None,
        }
    }

    #[test]
    fn p85_is_the_nearest_rank() {
        // 20 speeds 1..=20: rank ceil(0.85 * 20) = 17.
        let mut v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(p85(&mut v), Some(17.0));
        assert_eq!(p85(&mut [42.0]), Some(42.0));
        assert_eq!(p85(&mut []), None);
        // 7 values: rank ceil(5.95) = 6.
        assert_eq!(p85(&mut [10.0, 70.0, 20.0, 60.0, 30.0, 50.0, 40.0]), Some(60.0));
    }

    #[test]
    fn crossings_group_by_line_class_and_direction_and_keep_unmeasured_ones_in_the_count() {
        let events = vec![
            crossing("north", "car", "in", Some(50.0)),
            crossing("north", "car", "in", Some(70.0)),
            crossing("north", "car", "in", None),
            crossing("north", "car", "out", Some(30.0)),
            crossing("north", "truck", "in", Some(40.0)),
            EventSample { kind: "wrong_way".into(), ..crossing("north", "car", "in", Some(90.0)) },
        ];
        let rows = compute(&events);
        assert_eq!(rows.len(), 3);
        let key = SeriesKey { line: "north".into(), zone: String::new(), label: "car".into(), direction: "in".into() };
        let car_in = &rows[&key];
        assert_eq!((car_in.count, car_in.speed_samples), (3, 2));
        assert_eq!(car_in.speed_mean_kmh, Some(60.0));
        assert_eq!(car_in.speed_p85_kmh, Some(70.0));
        assert_eq!(car_in.occupancy, None);
    }

    #[test]
    fn occupancy_is_time_weighted_and_entries_are_counted() {
        let occ = |interval: u32, occupied: f32, entered: u32| EventSample {
            kind: "zone_occupancy".into(),
            label: None,
            line: None,
            zone: Some("stop-bar".into()),
            direction: None,
            speed_kmh: None,
            payload: Some(
                serde_json::json!({"zone": "stop-bar", "interval_s": interval, "mean": 1.0, "max": 2,
                    "occupied": occupied, "entered": entered})
                .to_string(),
            ),
        };
        let mut broken = occ(10, 0.5, 1);
        broken.payload = Some("{not json".into());
        let rows = compute(&[occ(10, 0.5, 3), occ(30, 0.1, 2), broken]);
        let (key, figures) = rows.iter().next().expect("one series");
        assert_eq!((key.zone.as_str(), key.line.as_str()), ("stop-bar", ""));
        assert_eq!(figures.count, 5);
        let expected = (0.5 * 10.0 + 0.1_f32 as f64 * 30.0) / 40.0;
        assert!((figures.occupancy.expect("occupancy") - expected).abs() < 1e-9);
        assert_eq!(figures.speed_mean_kmh, None);
    }
}
