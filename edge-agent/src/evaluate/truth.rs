//! Truth files: what a person counted (or a loop detector, or a radar gun measured) on a
//! recording, as CSV a site engineer writes by hand.
//!
//! Both files have a header line naming their columns (any order, case-insensitive; extra columns
//! such as `note` are ignored), then one row per line. Blank lines and lines starting with `#` are
//! skipped, every field is trimmed; fields are separated by commas and cannot be quoted.
//!
//! - counts: `start,end,line,direction,class,count`: `count` road users of `class` crossed
//!   `line` in `direction` between `start` (included) and `end` (excluded);
//! - passes: `time,line,direction,speed_kmh`: a test vehicle crossed `line` in `direction` at
//!   `time`, at a known speed.
//!
//! Times are offsets from the start of the recording: `HH:MM:SS`, `H:MM:SS`, `MM:SS` or plain
//! seconds, the seconds with a fraction if wanted (`0:14:59.5`), kept to the millisecond.
//! `class` is a label (`car`, `truck`, `bus`, `motorcycle`, `bicycle`, `person`) or `*`: every
//! vehicle, i.e. [`VEHICLE_CLASSES`] (not bicycles, not people).
//!
//! Every problem of a file is reported at once, each with `file:line`.

use std::fmt;
use std::path::Path;

use its_shared::event::Direction;
use serde::Serialize;

/// The classes `*` stands for: motor vehicles.
pub const VEHICLE_CLASSES: [&str; 4] = ["car", "truck", "bus", "motorcycle"];
/// The classes a truth file may name.
pub const CLASSES: [&str; 6] = ["car", "truck", "bus", "motorcycle", "bicycle", "person"];
/// A test pass may be measured this fast at most (km/h): anything above is a typo.
const MAX_PASS_KMH: f64 = 300.0;

/// What a count row counts: one class, or every vehicle (`*`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClassFilter {
    /// `*`: [`VEHICLE_CLASSES`].
    Vehicles,
    Class(String),
}

impl ClassFilter {
    /// Whether a road user of `label` is counted by this filter.
    pub fn matches(&self, label: &str) -> bool {
        match self {
            Self::Vehicles => VEHICLE_CLASSES.contains(&label),
            Self::Class(c) => c == label,
        }
    }

    /// Whether a road user could be counted by both filters.
    fn overlaps(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Vehicles, Self::Vehicles) => true,
            (Self::Vehicles, Self::Class(c)) | (Self::Class(c), Self::Vehicles) => {
                VEHICLE_CLASSES.contains(&c.as_str())
            }
            (Self::Class(a), Self::Class(b)) => a == b,
        }
    }
}

impl fmt::Display for ClassFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vehicles => f.write_str("*"),
            Self::Class(c) => f.write_str(c),
        }
    }
}

impl Serialize for ClassFilter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One row of a counts file.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthCount {
    /// Line of the file (1-based), for messages.
    pub file_line: usize,
    /// Offsets from the start of the recording, milliseconds; `start` included, `end` excluded.
    pub start_ms: i64,
    pub end_ms: i64,
    pub line: String,
    pub direction: Direction,
    pub class: ClassFilter,
    pub count: u32,
}

/// One row of a passes file: a test vehicle of known speed.
#[derive(Debug, Clone, PartialEq)]
pub struct TestPass {
    pub file_line: usize,
    /// When it crossed the line, milliseconds from the start of the recording.
    pub t_ms: i64,
    pub line: String,
    pub direction: Direction,
    pub speed_kmh: f64,
}

/// One problem of a truth file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthIssue {
    pub file: String,
    /// 1-based; 0: the file as a whole.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for TruthIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

/// Every problem found in the truth files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TruthErrors {
    pub issues: Vec<TruthIssue>,
}

impl fmt::Display for TruthErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid truth file ({} problem(s)):", self.issues.len())?;
        for i in &self.issues {
            writeln!(f, "  {i}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TruthErrors {}

/// Collects the issues of one file.
struct Issues<'a> {
    file: &'a str,
    issues: Vec<TruthIssue>,
}

impl Issues<'_> {
    fn push(&mut self, line: usize, message: impl Into<String>) {
        self.issues.push(TruthIssue { file: self.file.to_string(), line, message: message.into() });
    }
}

/// A time offset: `HH:MM:SS`, `H:MM:SS`, `MM:SS` or seconds, the seconds possibly with a fraction;
/// milliseconds. `None` when it is none of these (or minutes or seconds after a colon are 60 or
/// more).
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() > 3 {
        return None;
    }
    let (&secs, whole) = parts.split_last()?;
    let seconds_ok = secs.chars().any(|c| c.is_ascii_digit())
        && secs.chars().all(|c| c.is_ascii_digit() || c == '.')
        && secs.chars().filter(|&c| c == '.').count() <= 1;
    if !seconds_ok {
        return None;
    }
    let secs: f64 = secs.parse().ok()?;
    if !whole.is_empty() && secs >= 60.0 {
        return None;
    }
    let mut total_s: i64 = 0;
    for (k, part) in whole.iter().enumerate() {
        if part.is_empty() || part.len() > 9 || !part.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let v: i64 = part.parse().ok()?;
        // Minutes after the hours are below 60; the leading field may be anything.
        if k > 0 && v >= 60 {
            return None;
        }
        total_s = (total_s + v) * 60;
    }
    let ms = total_s as f64 * 1000.0 + (secs * 1000.0).round();
    (ms.is_finite() && ms < 1e15).then_some(ms as i64)
}

/// A time offset as `H:MM:SS` (with milliseconds when it has any).
pub fn format_time(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let ms = ms.unsigned_abs();
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    if frac == 0 { format!("{sign}{h}:{m:02}:{s:02}") } else { format!("{sign}{h}:{m:02}:{s:02}.{frac:03}") }
}

/// The rows of a CSV table with the named columns, as `(file line, fields in the order of
/// `columns`)`; problems of the header and of the shape go to `issues`.
fn table<'t>(text: &'t str, columns: &[&str], issues: &mut Issues<'_>) -> Vec<(usize, Vec<&'t str>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines =
        text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    let Some((header_line, header)) = lines.next() else {
        issues.push(0, format!("no header and no rows; the first line must be `{}`", columns.join(",")));
        return Vec::new();
    };
    if header.contains(';') && !header.contains(',') {
        issues.push(header_line, "columns are separated by ';'; separate them by ',' (save as CSV with commas)");
        return Vec::new();
    }
    let names: Vec<String> = header.split(',').map(|h| h.trim().to_ascii_lowercase()).collect();
    let mut index = Vec::new();
    for c in columns {
        match names.iter().position(|n| n == c) {
            Some(i) => index.push(i),
            None => {
                issues.push(header_line, format!("no column {c:?} in the header; it must name `{}`", columns.join(",")))
            }
        }
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            issues.push(header_line, format!("column {n:?} appears twice in the header"));
        }
    }
    if index.len() != columns.len() {
        return Vec::new();
    }
    let mut rows = Vec::new();
    for (no, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != names.len() {
            issues.push(no, format!("{} field(s); the header has {}", fields.len(), names.len()));
            continue;
        }
        rows.push((no, index.iter().map(|&i| fields[i]).collect()));
    }
    if rows.is_empty() && issues.issues.is_empty() {
        issues.push(0, "no rows after the header");
    }
    rows
}

fn time_field(issues: &mut Issues<'_>, no: usize, column: &str, v: &str) -> Option<i64> {
    let t = parse_time(v);
    if t.is_none() {
        issues.push(
            no,
            format!("{column} {v:?} is not a time: write HH:MM:SS, MM:SS or seconds from the start of the recording"),
        );
    }
    t
}

fn line_field(issues: &mut Issues<'_>, no: usize, v: &str, scene_lines: &[String]) -> Option<String> {
    if scene_lines.iter().any(|l| l == v) {
        return Some(v.to_string());
    }
    let known = if scene_lines.is_empty() { "none".to_string() } else { scene_lines.join(", ") };
    issues.push(no, format!("line {v:?} is not a count line of the scene (its lines: {known})"));
    None
}

fn direction_field(issues: &mut Issues<'_>, no: usize, v: &str) -> Option<Direction> {
    match v.to_ascii_lowercase().as_str() {
        "in" => Some(Direction::In),
        "out" => Some(Direction::Out),
        _ => {
            issues.push(no, format!("direction {v:?} is not `in` or `out`"));
            None
        }
    }
}

/// Reads a counts file; `scene_lines` are the count lines of the scene. With `interval_ms`,
/// rows are compared in bins of that length (from the start of the recording): a row must then
/// lie within one bin.
pub fn read_counts(
    path: &Path,
    scene_lines: &[String],
    interval_ms: Option<i64>,
) -> Result<Vec<TruthCount>, TruthErrors> {
    let file = path.display().to_string();
    let text = read(path)?;
    parse_counts(&file, &text, scene_lines, interval_ms)
}

/// Reads a passes file; two passes on one line and direction must be more than `window_ms`
/// apart (else either could be matched to the other's crossing).
pub fn read_passes(path: &Path, scene_lines: &[String], window_ms: i64) -> Result<Vec<TestPass>, TruthErrors> {
    let file = path.display().to_string();
    let text = read(path)?;
    parse_passes(&file, &text, scene_lines, window_ms)
}

fn read(path: &Path) -> Result<String, TruthErrors> {
    std::fs::read_to_string(path).map_err(|e| TruthErrors {
        issues: vec![TruthIssue { file: path.display().to_string(), line: 0, message: format!("cannot be read: {e}") }],
    })
}

/// Parses a counts file's text (`file` names it in messages); see [`read_counts`].
pub fn parse_counts(
    file: &str,
    text: &str,
    scene_lines: &[String],
    interval_ms: Option<i64>,
) -> Result<Vec<TruthCount>, TruthErrors> {
    let mut issues = Issues { file, issues: Vec::new() };
    let columns = ["start", "end", "line", "direction", "class", "count"];
    let mut out = Vec::new();
    for (no, f) in table(text, &columns, &mut issues) {
        let start = time_field(&mut issues, no, "start", f[0]);
        let end = time_field(&mut issues, no, "end", f[1]);
        if let (Some(s), Some(e)) = (start, end)
            && e <= s
        {
            issues.push(no, format!("end {} is not after start {}", format_time(e), format_time(s)));
        }
        let line = line_field(&mut issues, no, f[2], scene_lines);
        let direction = direction_field(&mut issues, no, f[3]);
        let class = match f[4].to_ascii_lowercase().as_str() {
            "*" => Some(ClassFilter::Vehicles),
            c if CLASSES.contains(&c) => Some(ClassFilter::Class(c.to_string())),
            _ => {
                issues.push(
                    no,
                    format!(
                        "class {:?} is not one of {} or * (every vehicle: {})",
                        f[4],
                        CLASSES.join(", "),
                        VEHICLE_CLASSES.join(", ")
                    ),
                );
                None
            }
        };
        let count = match f[5].parse::<i64>() {
            Ok(n) if n < 0 => {
                issues.push(no, format!("count {n} is negative"));
                None
            }
            Ok(n) => match u32::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    issues.push(no, format!("count {n} is too large"));
                    None
                }
            },
            Err(_) => {
                issues.push(no, format!("count {:?} is not a whole number", f[5]));
                None
            }
        };
        if let (Some(start_ms), Some(end_ms), Some(line), Some(direction), Some(class), Some(count)) =
            (start, end, line, direction, class, count)
            && end_ms > start_ms
        {
            out.push(TruthCount { file_line: no, start_ms, end_ms, line, direction, class, count });
        }
    }
    for (i, a) in out.iter().enumerate() {
        for b in &out[..i] {
            let same = a.line == b.line && a.direction == b.direction && a.class.overlaps(&b.class);
            if same && a.start_ms < b.end_ms && b.start_ms < a.end_ms {
                issues.push(
                    a.file_line,
                    format!(
                        "overlaps line {} ({} {} {} from {} to {}): those road users would be counted twice",
                        b.file_line,
                        b.line,
                        b.direction.as_str(),
                        b.class,
                        format_time(b.start_ms),
                        format_time(b.end_ms)
                    ),
                );
            }
        }
        if let Some(bin) = interval_ms
            && a.start_ms.div_euclid(bin) != (a.end_ms - 1).div_euclid(bin)
        {
            let edge = (a.start_ms.div_euclid(bin) + 1) * bin;
            issues.push(
                a.file_line,
                format!(
                    "from {} to {} spans the boundary {} of the {} comparison intervals (--interval); split the row there",
                    format_time(a.start_ms),
                    format_time(a.end_ms),
                    format_time(edge),
                    format_time(bin)
                ),
            );
        }
    }
    if issues.issues.is_empty() { Ok(out) } else { Err(TruthErrors { issues: issues.issues }) }
}

/// Parses a passes file's text; see [`read_passes`].
pub fn parse_passes(
    file: &str,
    text: &str,
    scene_lines: &[String],
    window_ms: i64,
) -> Result<Vec<TestPass>, TruthErrors> {
    let mut issues = Issues { file, issues: Vec::new() };
    let mut out = Vec::new();
    for (no, f) in table(text, &["time", "line", "direction", "speed_kmh"], &mut issues) {
        let t = time_field(&mut issues, no, "time", f[0]);
        let line = line_field(&mut issues, no, f[1], scene_lines);
        let direction = direction_field(&mut issues, no, f[2]);
        let speed = match f[3].parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_PASS_KMH => Some(v),
            _ => {
                issues.push(
                    no,
                    format!("speed_kmh {:?} is not a speed in km/h above 0 and at most {MAX_PASS_KMH}", f[3]),
                );
                None
            }
        };
        if let (Some(t_ms), Some(line), Some(direction), Some(speed_kmh)) = (t, line, direction, speed) {
            out.push(TestPass { file_line: no, t_ms, line, direction, speed_kmh });
        }
    }
    for (i, a) in out.iter().enumerate() {
        for b in &out[..i] {
            if a.line == b.line && a.direction == b.direction && (a.t_ms - b.t_ms).abs() <= window_ms {
                issues.push(
                    a.file_line,
                    format!(
                        "within the match window ({} s) of the pass at line {} on the same line and direction: \
                         the two cannot be told apart",
                        window_ms as f64 / 1000.0,
                        b.file_line
                    ),
                );
            }
        }
    }
    if issues.issues.is_empty() { Ok(out) } else { Err(TruthErrors { issues: issues.issues }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Vec<String> {
        vec!["east".to_string(), "west".to_string()]
    }

    fn messages(r: Result<impl fmt::Debug, TruthErrors>) -> Vec<String> {
        r.expect_err("refused").issues.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn times_are_read_in_every_documented_form() {
        assert_eq!(parse_time("01:02:03"), Some(3_723_000));
        assert_eq!(parse_time("1:02:03"), Some(3_723_000));
        assert_eq!(parse_time("15:00"), Some(900_000));
        assert_eq!(parse_time("75:00"), Some(4_500_000), "leading minutes may exceed 59");
        assert_eq!(parse_time("900"), Some(900_000));
        assert_eq!(parse_time("12.25"), Some(12_250));
        assert_eq!(parse_time("0:14:59.5"), Some(899_500));
        assert_eq!(parse_time(" 0:00:00 "), Some(0));
        for bad in
            ["", "-5", "1:60:00", "1:00:60", "a:00", "1::00", "1:2:3:4", "1e3", "inf", "nan", "1.2.3", "0x10", ":30"]
        {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
        assert_eq!(format_time(3_723_000), "1:02:03");
        assert_eq!(format_time(899_500), "0:14:59.500");
    }

    #[test]
    fn a_counts_file_with_comments_blank_lines_and_any_column_order_is_read() {
        let text = "\u{feff}# manual count, 2025-05-12\n\
                    class, count, start, end, line, direction, note\n\
                    \n\
                    car, 12, 0:00, 15:00, east, in, sunny\n\
                    # the second quarter\n\
                    *, 30, 15:00, 30:00, east, IN, \n\
                    person, 0, 0, 1800, west, out, none seen\n";
        let rows = parse_counts("c.csv", text, &lines(), None).expect("valid");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].file_line, 4);
        assert_eq!((rows[0].start_ms, rows[0].end_ms, rows[0].count), (0, 900_000, 12));
        assert_eq!(rows[1].class, ClassFilter::Vehicles);
        assert_eq!(rows[1].direction, Direction::In);
        assert_eq!(rows[2].class, ClassFilter::Class("person".into()));
    }

    #[test]
    fn every_problem_of_a_counts_file_is_reported_with_its_line() {
        let text = "start,end,line,direction,class,count\n\
                    0:00,15:00,east,in,car,3\n\
                    0:00,1:60,east,in,car,3\n\
                    10:00,5:00,east,in,car,3\n\
                    0:00,15:00,north,in,car,3\n\
                    0:00,15:00,east,up,car,3\n\
                    0:00,15:00,east,in,tram,3\n\
                    0:00,15:00,east,out,car,-2\n\
                    0:00,15:00,east,out,car,2.5\n\
                    0:00,15:00,east,out\n\
                    5:00,10:00,east,in,car,1\n\
                    0:00,15:00,east,in,*,4\n\
                    0:00,15:00,east,in,person,4\n";
        let m = messages(parse_counts("c.csv", text, &lines(), None));
        let want = [
            "c.csv:3: end \"1:60\" is not a time",
            "c.csv:4: end 0:05:00 is not after start 0:10:00",
            "c.csv:5: line \"north\" is not a count line of the scene (its lines: east, west)",
            "c.csv:6: direction \"up\" is not `in` or `out`",
            "c.csv:7: class \"tram\" is not one of",
            "c.csv:8: count -2 is negative",
            "c.csv:9: count \"2.5\" is not a whole number",
            "c.csv:10: 4 field(s); the header has 6",
            "c.csv:11: overlaps line 2 (east in car from 0:00:00 to 0:15:00)",
            "c.csv:12: overlaps line 2",
            "c.csv:12: overlaps line 11",
        ];
        for w in want {
            assert!(m.iter().any(|s| s.starts_with(w) || s.contains(w)), "missing {w:?} in {m:#?}");
        }
        assert_eq!(m.len(), want.len(), "person and car do not overlap, nor * and person: {m:#?}");
    }

    #[test]
    fn headers_missing_wrong_or_separated_by_semicolons_are_explained() {
        let m = messages(parse_counts("c.csv", "0:00,15:00,east,in,car,3\n", &lines(), None));
        assert!(m[0].starts_with("c.csv:1: no column \"start\""), "{m:?}");
        let m = messages(parse_counts("c.csv", "start;end;line;direction;class;count\n", &lines(), None));
        assert!(m[0].contains("separated by ';'"), "{m:?}");
        let m = messages(parse_counts("c.csv", "# nothing\n\n", &lines(), None));
        assert!(m[0].starts_with("c.csv: no header"), "{m:?}");
        let m = messages(parse_counts("c.csv", "start,end,line,direction,class,count\n", &lines(), None));
        assert_eq!(m, vec!["c.csv: no rows after the header"]);
        let m = messages(parse_counts(
            "c.csv",
            "start,end,line,line,direction,class,count\n0,1,a,a,in,car,1\n",
            &lines(),
            None,
        ));
        assert!(m.iter().any(|s| s.contains("\"line\" appears twice")), "{m:?}");
    }

    #[test]
    fn with_an_interval_a_row_must_lie_within_one_bin() {
        let text = "start,end,line,direction,class,count\n\
                    0:00,15:00,east,in,car,3\n\
                    14:00,16:00,east,out,car,3\n\
                    15:00,16:00,east,in,car,3\n";
        let m = messages(parse_counts("c.csv", text, &lines(), Some(900_000)));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("c.csv:3: from 0:14:00 to 0:16:00 spans the boundary 0:15:00"), "{m:?}");
    }

    #[test]
    fn passes_are_read_and_their_problems_reported() {
        let text = "time,line,direction,speed_kmh\n0:30,east,in,50\n1:00.5,west,out,42.5\n";
        let p = parse_passes("p.csv", text, &lines(), 2000).expect("valid");
        assert_eq!(p[1].t_ms, 60_500);
        assert_eq!(p[1].speed_kmh, 42.5);
        let text = "time,line,direction,speed_kmh\n\
                    0:30,east,in,50\n\
                    0:31,east,in,50\n\
                    0:31,east,out,50\n\
                    x,east,in,50\n\
                    0:40,south,in,50\n\
                    0:50,east,in,-3\n\
                    0:55,east,in,fast\n";
        let m = messages(parse_passes("p.csv", text, &lines(), 2000));
        let want = [
            "p.csv:3: within the match window (2 s) of the pass at line 2",
            "p.csv:5: time \"x\" is not a time",
            "p.csv:6: line \"south\" is not a count line",
            "p.csv:7: speed_kmh \"-3\"",
            "p.csv:8: speed_kmh \"fast\"",
        ];
        for w in want {
            assert!(m.iter().any(|s| s.starts_with(w)), "missing {w:?} in {m:#?}");
        }
        assert_eq!(m.len(), want.len(), "{m:#?}");
    }

    #[test]
    fn an_unreadable_file_is_one_issue_naming_it() {
        let e = read_counts(Path::new("/nonexistent/counts.csv"), &lines(), None).expect_err("missing");
        assert_eq!(e.issues.len(), 1);
        assert!(e.to_string().contains("/nonexistent/counts.csv: cannot be read"), "{e}");
    }
}
