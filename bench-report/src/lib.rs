//! Turns the JSON records the benchmarks write (`benches/harness/mod.rs`,
//! one file per bench target) into `BENCHMARKS.md` and SVG plots of the
//! curves (restore progress, scaling). Every host keeps its last full run
//! ([`runs`]: one directory of records per host), and the report has one
//! section per host, newest first, each with its own summary. Rendering is
//! pure functions over parsed records; [`runs`] and `main.rs` do the file
//! handling.

pub mod runs;

use runs::{Host, Run};
use serde_json::Value;
use std::fmt::Write as _;

/// One bench target's record.
#[derive(Clone, Debug)]
pub struct Record {
    /// The bench target.
    pub bench: String,
    /// Whether it was a shrunken (`GMEM_BENCH_QUICK`) run.
    pub quick: bool,
    /// CPU, CPU count, kernel.
    pub machine: String,
    /// When it finished (UNIX seconds; absent in older records).
    pub unix_s: Option<u64>,
    /// Seconds the target ran.
    pub elapsed_s: f64,
    /// The comparisons.
    pub rows: Vec<Row>,
    /// The rows this host could not run.
    pub skipped: Vec<Skip>,
    /// The curves.
    pub series: Vec<Series>,
    /// Remarks.
    pub notes: Vec<String>,
}

/// One comparison.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case.
    pub case: String,
    /// The baseline's name.
    pub baseline: String,
    /// The baseline's value.
    pub baseline_value: f64,
    /// Ours: which implementation.
    pub ours: String,
    /// Ours: its value.
    pub ours_value: f64,
    /// The unit.
    pub unit: String,
    /// How many times better ours is (above 1: better).
    pub speedup: f64,
    /// The goal in words.
    pub target: Option<String>,
    /// An absolute goal: the largest acceptable value of ours (in `unit`);
    /// when set, `met` compares ours' value with it, not the speed-up.
    pub target_max_ours: Option<f64>,
    /// Whether the goal is met.
    pub met: Option<bool>,
    /// How it was measured.
    pub note: String,
}

/// A row that did not run on the host, and why.
#[derive(Clone, Debug)]
pub struct Skip {
    /// The case.
    pub case: String,
    /// The baseline's name.
    pub baseline: String,
    /// Ours: which implementation.
    pub ours: String,
    /// Why it did not run.
    pub reason: String,
}

/// One curve.
#[derive(Clone, Debug)]
pub struct Series {
    /// The plot it belongs to.
    pub plot: String,
    /// The curve's label.
    pub label: String,
    /// The x axis's label.
    pub x_label: String,
    /// The y axis's label.
    pub y_label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Parses one record; the error names what is missing.
pub fn parse(text: &str) -> Result<Record, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let bench = v
        .get("bench")
        .and_then(Value::as_str)
        .ok_or("no \"bench\" field")?
        .to_string();
    let rows = v
        .get("rows")
        .and_then(Value::as_array)
        .ok_or("no \"rows\" array")?
        .iter()
        .map(|r| Row {
            case: s(r, "case"),
            baseline: s(r, "baseline"),
            baseline_value: f(r, "baseline_value"),
            ours: s(r, "ours"),
            ours_value: f(r, "ours_value"),
            unit: s(r, "unit"),
            speedup: f(r, "speedup"),
            target: r.get("target").and_then(Value::as_str).map(str::to_string),
            target_max_ours: r.get("target_max_ours").and_then(Value::as_f64),
            met: r.get("met").and_then(Value::as_bool),
            note: s(r, "note"),
        })
        .collect();
    let series = v
        .get("series")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| Series {
                    plot: s(c, "plot"),
                    label: s(c, "label"),
                    x_label: s(c, "x_label"),
                    y_label: s(c, "y_label"),
                    points: c
                        .get("points")
                        .and_then(Value::as_array)
                        .map(|p| {
                            p.iter()
                                .filter_map(|xy| {
                                    let xy = xy.as_array()?;
                                    Some((xy.first()?.as_f64()?, xy.get(1)?.as_f64()?))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let skipped = v
        .get("skipped")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|k| Skip {
                    case: s(k, "case"),
                    baseline: s(k, "baseline"),
                    ours: s(k, "ours"),
                    reason: s(k, "reason"),
                })
                .collect()
        })
        .unwrap_or_default();
    let notes = v
        .get("notes")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok(Record {
        bench,
        quick: v.get("quick").and_then(Value::as_bool).unwrap_or(false),
        machine: s(&v, "machine"),
        unix_s: v.get("unix_s").and_then(Value::as_u64),
        elapsed_s: f(&v, "elapsed_s"),
        rows,
        skipped,
        series,
        notes,
    })
}

/// The order the sections appear in: the known targets first, then the
/// rest by name.
pub fn order(records: &mut [Record]) {
    const KNOWN: [&str; 5] = ["overhead", "populate", "fault_rtt", "restore", "scaling"];
    records.sort_by_key(|r| {
        (
            KNOWN
                .iter()
                .position(|k| *k == r.bench)
                .unwrap_or(KNOWN.len()),
            r.bench.clone(),
        )
    });
}

fn title(bench: &str) -> &str {
    match bench {
        "overhead" => "Wrapper overhead",
        "populate" => "Population of 1 GiB",
        "fault_rtt" => "Fault round trip",
        "restore" => "Lazy restore of a 1 GiB snapshot",
        "scaling" => "Scaling with faulting threads",
        other => other,
    }
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// `BENCHMARKS.md`: what it is, a summary line per host, then one section
/// per host (in the order given: newest first). `runs` names the directory
/// of the hosts' records; `svg` gives a host's plot path relative to the
/// Markdown file, when it has one.
pub fn markdown(hosts: &[Host], runs: &str, svg: &dyn Fn(&Host) -> Option<String>) -> String {
    let mut md = String::new();
    md.push_str("# Benchmarks\n\n");
    let _ = write!(
        md,
        "Generated by `scripts/bench.sh` (`cargo bench` over the root package's bench targets, \
         then `cargo run -p gmem-bench-report`); do not edit by hand. Every row is ours against \
         one baseline, measured in the same process run, interleaved. **Speed-up** is how many \
         times better ours is: baseline / ours for times, ours / baseline for throughputs; \
         above 1 is better. A target is a minimum speed-up, except an absolute one (e.g. a \
         longest stall of at most 1000 µs), which bounds ours' value whatever the baseline's; \
         a row against a bound (e.g. the bulk `UFFDIO_COPY` bound of a restore) has the bound \
         as its baseline, so ours <= 1.0x the bound is a speed-up of at least 1.\n\n\
         Each host (CPU model, CPU count, kernel release) keeps its last full run, newest \
         first; its records are in `{runs}/<host>/`. Compare rows within a host, not across \
         hosts. A row the host could not run is listed as skipped, with the reason.\n\n"
    );
    md.push_str("| host | last full run | targets met | rows | skipped |\n");
    md.push_str("| --- | --- | --- | ---: | ---: |\n");
    for h in hosts {
        let (run, targets, rows, skipped) = match &h.run {
            Run::Records(records) => {
                let t = Tally::of(records);
                (
                    h.date.clone(),
                    format!("{} of {}", t.met, t.with_target),
                    t.rows.to_string(),
                    t.skipped.to_string(),
                )
            }
            Run::Archived { markdown, .. } => (
                format!("{} (archived)", h.date),
                markdown
                    .lines()
                    .find_map(|l| l.strip_prefix("Targets: ")?.strip_suffix(" met."))
                    .unwrap_or("–")
                    .to_string(),
                "–".into(),
                "–".into(),
            ),
        };
        let _ = writeln!(
            md,
            "| {} | {run} | {targets} | {rows} | {skipped} |",
            cell(&h.machine)
        );
    }
    md.push('\n');
    for h in hosts {
        let _ = writeln!(md, "## {}\n", h.machine);
        match &h.run {
            Run::Records(records) => {
                host_section(&mut md, h, records, runs, svg(h).as_deref());
            }
            Run::Archived { source, markdown } => {
                let _ = writeln!(
                    md,
                    "Archived run of {}: {source}. Carried over verbatim (`{runs}/{}/{}`); \
                     the next full run on this host replaces it.\n\n{markdown}\n",
                    h.date,
                    h.slug,
                    runs::ARCHIVE
                );
            }
        }
    }
    let end = md.trim_end().len();
    md.truncate(end);
    md.push('\n');
    md
}

/// Counts over a host's records.
struct Tally {
    rows: usize,
    with_target: usize,
    met: usize,
    skipped: usize,
}

impl Tally {
    fn of(records: &[Record]) -> Tally {
        let rows = records.iter().flat_map(|r| &r.rows);
        Tally {
            rows: rows.clone().count(),
            with_target: rows.clone().filter(|r| r.met.is_some()).count(),
            met: rows.filter(|r| r.met == Some(true)).count(),
            skipped: records.iter().map(|r| r.skipped.len()).sum(),
        }
    }
}

/// A host's summary (targets, misses, skips by reason), then a table per
/// bench target.
fn host_section(md: &mut String, h: &Host, records: &[Record], runs: &str, svg: Option<&str>) {
    let t = Tally::of(records);
    let _ = writeln!(
        md,
        "Last full run: {} (records: `{runs}/{}/`).\n",
        if h.date.is_empty() {
            "date unknown"
        } else {
            &h.date
        },
        h.slug
    );
    let _ = writeln!(
        md,
        "Targets: {} of {} met. Rows: {} measured, {} skipped.\n",
        t.met, t.with_target, t.rows, t.skipped
    );
    let missed: Vec<&Row> = records
        .iter()
        .flat_map(|r| &r.rows)
        .filter(|r| r.met == Some(false))
        .collect();
    if !missed.is_empty() {
        md.push_str("Missed:\n\n");
        for r in &missed {
            let got = match r.target_max_ours {
                Some(_) => format!("ours {} {}", num(r.ours_value), r.unit),
                None => format!("speed-up {}", num(r.speedup)),
            };
            let _ = writeln!(
                md,
                "- {} (ours {}, vs {}): {got}, goal {}",
                cell(&r.case),
                cell(&r.ours),
                cell(&r.baseline),
                cell(r.target.as_deref().unwrap_or(""))
            );
        }
        md.push('\n');
        if let Some(text) = &h.analysis {
            let _ = writeln!(
                md,
                "Why (the measured cause of each miss; `{runs}/{}/{}`):\n",
                h.slug,
                runs::ANALYSIS
            );
            md.push_str(text.trim_end());
            md.push_str("\n\n");
        }
    }
    let mut reasons: Vec<(&str, usize)> = Vec::new();
    for k in records.iter().flat_map(|r| &r.skipped) {
        match reasons.iter_mut().find(|(r, _)| *r == k.reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((&k.reason, 1)),
        }
    }
    if !reasons.is_empty() {
        md.push_str("Skipped on this host, by reason:\n\n");
        for (reason, n) in reasons {
            let _ = writeln!(md, "- {}: {n} row(s)", cell(reason));
        }
        md.push('\n');
    }
    for rec in records {
        bench_section(md, rec, svg);
    }
}

/// One bench target's table, how each row was measured, its skipped rows
/// and notes.
fn bench_section(md: &mut String, rec: &Record, svg: Option<&str>) {
    let _ = writeln!(
        md,
        "### {} (`{}`{}, {:.0} s)\n",
        title(&rec.bench),
        rec.bench,
        if rec.quick {
            ", GMEM_BENCH_QUICK: shrunken run"
        } else {
            ""
        },
        rec.elapsed_s
    );
    if !rec.rows.is_empty() {
        md.push_str(
            "| case | baseline | baseline value | ours | ours value | unit | speed-up | target | met |\n",
        );
        md.push_str("| --- | --- | ---: | --- | ---: | --- | ---: | --- | --- |\n");
    }
    for r in &rec.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {}x | {} | {} |",
            cell(&r.case),
            cell(&r.baseline),
            num(r.baseline_value),
            cell(&r.ours),
            num(r.ours_value),
            cell(&r.unit),
            num(r.speedup),
            cell(r.target.as_deref().unwrap_or("")),
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        );
    }
    let noted: Vec<&Row> = rec.rows.iter().filter(|r| !r.note.is_empty()).collect();
    if !noted.is_empty() {
        md.push_str("\nHow each row was measured:\n\n");
        for r in noted {
            let _ = writeln!(
                md,
                "- {} / {}: {}",
                cell(&r.case),
                cell(&r.baseline),
                cell(&r.note)
            );
        }
    }
    if !rec.skipped.is_empty() {
        md.push_str("\nSkipped on this host:\n\n");
        for k in &rec.skipped {
            let _ = writeln!(
                md,
                "- {} (ours {}, vs {}): {}",
                cell(&k.case),
                cell(&k.ours),
                cell(&k.baseline),
                cell(&k.reason)
            );
        }
    }
    if !rec.notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in &rec.notes {
            let _ = writeln!(md, "- {}", cell(n));
        }
    }
    if !rec.series.is_empty()
        && let Some(svg) = svg
    {
        let _ = writeln!(md, "\n![{} curves]({svg})", title(&rec.bench));
    }
    md.push('\n');
}

const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" step for about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let digits = (-step.log10()).ceil() as usize;
        format!("{v:.digits$}")
    }
}

/// One SVG with `caption` on top (the host) and a panel per plot id (in
/// first-seen order), each with its curves, axes, ticks and a legend.
/// `None` when there is no curve.
pub fn svg(series: &[Series], caption: &str) -> Option<String> {
    let mut plots: Vec<&str> = Vec::new();
    for c in series {
        if !plots.contains(&c.plot.as_str()) {
            plots.push(&c.plot);
        }
    }
    if plots.is_empty() {
        return None;
    }
    let (pw, ph) = (420.0, 300.0);
    let (ml, mr, mt, mb) = (70.0, 15.0, 30.0, 95.0);
    let width = pw * plots.len() as f64;
    let mut out = String::new();
    // The caption's line above the panels.
    let cap = 22.0;
    let height = ph + cap;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="8" y="16" font-size="12">{}</text>"#,
        esc(caption)
    );
    let _ = writeln!(out, r#"<g transform="translate(0,{cap})">"#);
    for (i, plot) in plots.iter().enumerate() {
        let curves: Vec<&Series> = series.iter().filter(|c| c.plot == *plot).collect();
        let x0 = i as f64 * pw;
        let (xmax, ymax) = curves
            .iter()
            .flat_map(|c| &c.points)
            .fold((0f64, 0f64), |(a, b), (x, y)| (a.max(*x), b.max(*y)));
        let xmax = if xmax > 0.0 { xmax } else { 1.0 };
        let ymax = if ymax > 0.0 { ymax } else { 1.0 };
        let (iw, ih) = (pw - ml - mr, ph - mt - mb);
        let px = |x: f64| x0 + ml + x / xmax * iw;
        let py = |y: f64| mt + ih - y / ymax * ih;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
            x0 + ml + iw / 2.0,
            esc(plot)
        );
        let _ = writeln!(
            out,
            r##"<rect x="{}" y="{mt}" width="{iw}" height="{ih}" fill="none" stroke="#444"/>"##,
            x0 + ml
        );
        for (max, horizontal) in [(xmax, true), (ymax, false)] {
            let step = tick_step(max, 5.0);
            let mut v = 0.0;
            while v <= max * 1.0001 {
                if horizontal {
                    let x = px(v);
                    let _ = writeln!(
                        out,
                        r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                        mt,
                        mt + ih,
                        mt + ih + 14.0,
                        tick_label(v, step)
                    );
                } else {
                    let y = py(v);
                    let _ = writeln!(
                        out,
                        r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                        x0 + ml,
                        x0 + ml + iw,
                        x0 + ml - 4.0,
                        y + 4.0,
                        tick_label(v, step)
                    );
                }
                v += step;
            }
        }
        if let Some(c) = curves.first() {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x0 + ml + iw / 2.0,
                mt + ih + 30.0,
                esc(&c.x_label)
            );
            let _ = writeln!(
                out,
                r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"#,
                x0 + 14.0,
                mt + ih / 2.0,
                esc(&c.y_label)
            );
        }
        for (j, c) in curves.iter().enumerate() {
            let color = PALETTE[j % PALETTE.len()];
            let pts: Vec<String> = c
                .points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
                pts.join(" ")
            );
            let ly = mt + ih + 46.0 + 14.0 * j as f64;
            let _ = writeln!(
                out,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                x0 + ml,
                x0 + ml + 18.0,
                x0 + ml + 22.0,
                ly + 4.0,
                esc(&c.label)
            );
        }
    }
    out.push_str("</g>\n</svg>\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = r#"{"bench":"restore","quick":false,"machine":"AMD EPYC, 2 CPUs, Linux 6.18.44","unix_s":1796000000,"elapsed_s":12.5,
      "rows":[{"case":"sequential | 1 GiB","baseline":"firecracker","baseline_value":4000,"ours":"serve","ours_value":300,"unit":"ms","higher_is_better":false,"speedup":13.333,"target":">= 10x","target_min_speedup":10,"met":true,"note":"fault-around 512 KiB"},
              {"case":"random","baseline":"firecracker","baseline_value":2700,"ours":"serve","ours_value":600,"unit":"ms","higher_is_better":false,"speedup":4.5,"target":">= 6x","target_min_speedup":6,"met":false,"note":""},
              {"case":"max stall","baseline":"firecracker","baseline_value":100,"ours":"serve","ours_value":null,"unit":"µs/op","higher_is_better":false,"speedup":null,"target":null,"target_min_speedup":null,"met":null,"note":""}],
      "series":[{"plot":"restore-sequential","label":"baseline","x_label":"s","y_label":"pages","points":[[0,0],[1.5,100],[4,262144]]},
                {"plot":"restore-sequential","label":"serve <&>","x_label":"s","y_label":"pages","points":[[0,0],[0.3,262144]]},
                {"plot":"restore-random","label":"serve","x_label":"s","y_label":"pages","points":[]}],
      "skipped":[{"case":"working set","baseline":"firecracker","ours":"serve","reason":"no userfaultfd"}],
      "notes":["snapshot in /var/tmp, page cache warm"]}"#;

    fn host(machine: &str, date: &str, records: Vec<Record>) -> Host {
        Host {
            machine: machine.into(),
            date: date.into(),
            slug: runs::slug(machine),
            run: Run::Records(records),
            analysis: None,
        }
    }

    #[test]
    fn a_hosts_analysis_follows_its_misses() {
        let mut h = host(
            "AMD EPYC, 2 CPUs, Linux 6.18.44",
            "",
            vec![parse(FIXTURE).unwrap()],
        );
        h.analysis = Some("- random: the copy itself bounds it.\n".into());
        let Run::Records(records) = &h.run else {
            unreachable!()
        };
        let mut md = String::new();
        host_section(&mut md, &h, records, "bench-report/runs", None);
        let missed = md.find("Missed:").expect("a miss is listed");
        let why = md
            .find("Why (the measured cause")
            .expect("the analysis is shown");
        assert!(missed < why, "{md}");
        assert!(md.contains("- random: the copy itself bounds it."), "{md}");
        assert!(
            md.contains("`bench-report/runs/amd-epyc-2-cpus-linux-6.18.44/analysis.md`"),
            "{md}"
        );
    }

    #[test]
    fn parses_and_renders_every_field() {
        let rec = parse(FIXTURE).unwrap();
        assert_eq!(rec.bench, "restore");
        assert_eq!(rec.rows.len(), 3);
        assert_eq!(rec.rows[1].met, Some(false));
        assert!(rec.rows[2].ours_value.is_nan());
        assert_eq!(rec.series[0].points.len(), 3);
        assert_eq!(rec.unix_s, Some(1_796_000_000));
        assert_eq!(rec.skipped.len(), 1);
        let h = host(&rec.machine, "2026-12-01 10:00 UTC", vec![rec.clone()]);
        let md = markdown(&[h], "runs", &|_| Some("docs/restore.svg".into()));
        assert!(md.contains("## AMD EPYC, 2 CPUs, Linux 6.18.44\n"), "{md}");
        assert!(
            md.contains("Targets: 1 of 2 met. Rows: 3 measured, 1 skipped."),
            "{md}"
        );
        assert!(md.contains("- random (ours serve, vs firecracker): speed-up 4.500, goal >= 6x"));
        assert!(md.contains("| sequential \\| 1 GiB | firecracker | 4000 | serve | 300 | ms | 13.3x | >= 10x | yes |"), "{md}");
        assert!(md.contains("| – | µs/op | –x |  |  |"), "{md}");
        assert!(md.contains("snapshot in /var/tmp, page cache warm"));
        assert!(md.contains("![Lazy restore of a 1 GiB snapshot curves](docs/restore.svg)"));
        assert!(
            md.contains("- working set (ours serve, vs firecracker): no userfaultfd"),
            "{md}"
        );
        assert!(md.contains("- no userfaultfd: 1 row(s)"), "{md}");
        let svg = svg(&rec.series, "AMD EPYC <host>").unwrap();
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("serve &lt;&amp;&gt;"));
        assert!(svg.contains(">restore-random<"));
        assert!(svg.contains(">AMD EPYC &lt;host&gt;</text>"));
    }

    #[test]
    fn hosts_stand_side_by_side_each_with_its_summary() {
        let intel = "Intel(R) Xeon(R) Processor, 2 CPUs, Linux 6.18.44-fc-v1252";
        let mut missed = parse(FIXTURE).unwrap();
        missed.machine = intel.into();
        let mut met = parse(FIXTURE).unwrap();
        met.rows.truncate(1);
        met.skipped.clear();
        let archive = runs::parse_archive(
            "<!-- gmem-bench-report archive\nmachine: Old Box, 4 CPUs, Linux 6.1\n\
             date: 2025-01-02 03:04 UTC\nsource: BENCHMARKS.md of commit abc\n-->\n\
             Targets: 7 of 9 met.\n\n### Old table\n\n| a |\n",
        )
        .unwrap();
        let mut hosts = vec![
            Host {
                slug: "old-box".into(),
                ..archive
            },
            host(&met.machine.clone(), "2026-11-30 08:00 UTC", vec![met]),
            host(intel, "2026-12-05 14:00 UTC", vec![missed]),
        ];
        runs::sort_newest_first(&mut hosts);
        let md = markdown(&hosts, "bench-report/runs", &|_| None);
        let at = |s: &str| md.find(s).unwrap_or_else(|| panic!("{s:?} not in {md}"));
        // Newest first, each host under its own heading with its own summary.
        let (i, a, o) = (
            at(&format!("## {intel}\n")),
            at("## AMD EPYC, 2 CPUs, Linux 6.18.44\n"),
            at("## Old Box, 4 CPUs, Linux 6.1\n"),
        );
        assert!(i < a && a < o, "{md}");
        assert_eq!(
            md.matches("Targets: 1 of 2 met. Rows: 3 measured, 1 skipped.")
                .count(),
            1
        );
        assert_eq!(
            md.matches("Targets: 1 of 1 met. Rows: 1 measured, 0 skipped.")
                .count(),
            1
        );
        assert!(at("Targets: 1 of 2 met.") > i && at("Targets: 1 of 2 met.") < a);
        assert!(md.contains(&format!(
            "| {intel} | 2026-12-05 14:00 UTC | 1 of 2 | 3 | 1 |"
        )));
        assert!(
            md.contains(
                "| Old Box, 4 CPUs, Linux 6.1 | 2025-01-02 03:04 UTC (archived) | 7 of 9 | – | – |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "(records: `bench-report/runs/intel-xeon-processor-2-cpus-linux-6.18.44-fc-v1252/`)"
            ),
            "{md}"
        );
        // The archive is carried over as it is, with its origin.
        assert!(md.contains("Archived run of 2025-01-02 03:04 UTC: BENCHMARKS.md of commit abc."));
        assert!(
            md.ends_with("Targets: 7 of 9 met.\n\n### Old table\n\n| a |\n"),
            "{md}"
        );
    }

    #[test]
    fn restore_and_scaling_goals_render_from_the_records() {
        // As benches/restore.rs and benches/scaling.rs write them: a stall
        // row with an absolute goal (better than its baseline, yet missed),
        // a row against the bulk bound (bound / ours), zero-copy against
        // COPY mode, serve's pool against one uffd per thread.
        let rec = parse(
            r#"{"bench":"restore","quick":false,"machine":"m","rows":[
              {"case":"restore 1024 MiB, random, other CPU: max stall of the vCPU","baseline":"Firecracker example handler","baseline_value":8000,"ours":"serve COPY","ours_value":1500,"unit":"µs/op","higher_is_better":false,"speedup":5.333,"target":"ours <= 1000 µs (absolute)","target_min_speedup":null,"target_max_ours":1000,"met":false,"note":""},
              {"case":"restore 1024 MiB, random, same CPU: against the bulk bound","baseline":"bulk bound","baseline_value":350,"ours":"serve COPY","ours_value":400,"unit":"ms","higher_is_better":false,"speedup":0.875,"target":"ours <= 1.0x the bulk bound","target_min_speedup":1,"target_max_ours":null,"met":false,"note":""},
              {"case":"restore 1024 MiB, random, same CPU: zero-copy (MAP_SHARED) vs COPY","baseline":"serve COPY","baseline_value":400,"ours":"zero-copy","ours_value":100,"unit":"ms","higher_is_better":false,"speedup":4,"target":"zero-copy >= 2x faster than COPY mode","target_min_speedup":2,"target_max_ours":null,"met":true,"note":""},
              {"case":"fault throughput, 2 faulting thread(s)","baseline":"(b) uffd per thread","baseline_value":200000,"ours":"(c) serve","ours_value":180000,"unit":"ops/s","higher_is_better":true,"speedup":0.9,"target":"serve's pool >= 0.95x one uffd per thread","target_min_speedup":0.95,"target_max_ours":null,"met":false,"note":""}],
              "skipped":[{"case":"restore 1024 MiB, random, other CPU: until all touched pages correct","baseline":"b","ours":"o","reason":"needs 2 CPUs (handlers on another CPU than the vCPU); this process may run on 1 CPU(s) ([0])"}]}"#,
        )
        .unwrap();
        assert_eq!(rec.rows[0].target_max_ours, Some(1000.0));
        assert_eq!(rec.rows[1].target_max_ours, None);
        let h = host("m", "2026-12-06 10:00 UTC", vec![rec]);
        let md = markdown(&[h], "runs", &|_| None);
        assert!(
            md.contains("Targets: 1 of 4 met. Rows: 4 measured, 1 skipped."),
            "{md}"
        );
        assert!(
            md.contains(
                "- restore 1024 MiB, random, other CPU: max stall of the vCPU (ours serve COPY, \
                 vs Firecracker example handler): ours 1500 µs/op, goal ours <= 1000 µs \
                 (absolute)"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| restore 1024 MiB, random, same CPU: against the bulk bound | bulk bound | 350 \
                 | serve COPY | 400 | ms | 0.875x | ours <= 1.0x the bulk bound | **no** |"
            ),
            "{md}"
        );
        assert!(md.contains("| 4.000x | zero-copy >= 2x faster than COPY mode | yes |"));
        assert!(md.contains(
            "(ours (c) serve, vs (b) uffd per thread): speed-up 0.900, goal serve's pool >= \
             0.95x one uffd per thread"
        ));
        assert!(md.contains("- needs 2 CPUs (handlers on another CPU than the vCPU)"));
    }

    #[test]
    fn bad_records_are_refused_with_the_reason() {
        assert!(parse("{").unwrap_err().starts_with("not JSON"));
        assert_eq!(parse("{\"rows\":[]}").unwrap_err(), "no \"bench\" field");
        assert_eq!(parse("{\"bench\":\"x\"}").unwrap_err(), "no \"rows\" array");
        assert!(svg(&[], "host").is_none());
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(262144.0, 5.0), 50000.0);
        assert_eq!(tick_step(4.1, 5.0), 1.0);
        assert_eq!(tick_step(0.35, 5.0), 0.05);
        assert_eq!(tick_label(0.05, 0.05), "0.05");
    }

    #[test]
    fn known_targets_come_first() {
        let mut recs: Vec<Record> = ["zeta", "scaling", "restore", "overhead"]
            .iter()
            .map(|b| parse(&format!("{{\"bench\":\"{b}\",\"rows\":[]}}")).unwrap())
            .collect();
        order(&mut recs);
        let names: Vec<&str> = recs.iter().map(|r| r.bench.as_str()).collect();
        assert_eq!(names, ["overhead", "restore", "scaling", "zeta"]);
    }
}
