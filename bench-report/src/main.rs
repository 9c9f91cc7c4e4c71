//! `gmem-bench-report`: keeps each host's last full run and writes
//! `BENCHMARKS.md` and the curves (one SVG per host) from all of them.
//!
//! ```text
//! gmem-bench-report [--results DIR] [--runs DIR] [--out FILE] [--svg-dir DIR] [--allow-quick]
//! ```
//!
//! With `--results` (a run's records, e.g. `target/tmp/gmem-bench` after
//! `cargo bench`), the run is first stored as its host's last run in
//! `<runs>/<host>/`, replacing only that host's previous one; without it
//! only the report is rewritten. Defaults: `bench-report/runs`,
//! `BENCHMARKS.md`, `docs/bench-curves` (relative to the current directory;
//! `scripts/bench.sh` runs it from the repository root). Shrunken
//! (`GMEM_BENCH_QUICK`) records are refused unless `--allow-quick`:
//! committed numbers come from full runs.

use gmem_bench_report::runs::{self, Run};
use gmem_bench_report::{markdown, svg};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gmem-bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut results: Option<PathBuf> = None;
    let mut runs_dir = PathBuf::from("bench-report/runs");
    let mut out = PathBuf::from("BENCHMARKS.md");
    let mut svg_dir = PathBuf::from("docs/bench-curves");
    let mut allow_quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--results" => results = Some(value("--results")?.into()),
            "--runs" => runs_dir = value("--runs")?.into(),
            "--out" => out = value("--out")?.into(),
            "--svg-dir" => svg_dir = value("--svg-dir")?.into(),
            "--allow-quick" => allow_quick = true,
            "-h" | "--help" => {
                println!(
                    "usage: gmem-bench-report [--results DIR] [--runs DIR] [--out FILE] \
                     [--svg-dir DIR] [--allow-quick]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if let Some(results) = &results {
        let dir = runs::store(results, &runs_dir, allow_quick)?;
        println!("stored the run as {}", dir.display());
    }
    let hosts = runs::load(&runs_dir)?;
    if hosts.is_empty() {
        return Err(format!(
            "no host's run in {} (pass --results)",
            runs_dir.display()
        ));
    }
    let mut svgs: HashMap<String, String> = HashMap::new();
    for h in &hosts {
        let Run::Records(records) = &h.run else {
            continue;
        };
        let series: Vec<_> = records.iter().flat_map(|r| r.series.clone()).collect();
        let Some(text) = svg(&series, &h.machine) else {
            continue;
        };
        std::fs::create_dir_all(&svg_dir)
            .map_err(|e| format!("creating {}: {e}", svg_dir.display()))?;
        let path = svg_dir.join(format!("{}.svg", h.slug));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        svgs.insert(h.slug.clone(), relative_to(&path, &out));
    }
    let runs_label = relative_to(&runs_dir, &out);
    let md = markdown(&hosts, &runs_label, &|h| svgs.get(&h.slug).cloned());
    std::fs::write(&out, md).map_err(|e| format!("writing {}: {e}", out.display()))?;
    println!("wrote {} ({} host(s))", out.display(), hosts.len());
    Ok(())
}

/// `target` as seen from the directory `from_file` lives in (both relative
/// to the current directory, as the defaults are).
fn relative_to(target: &Path, from_file: &Path) -> String {
    let base = from_file.parent().unwrap_or(Path::new(""));
    target
        .strip_prefix(base)
        .unwrap_or(target)
        .display()
        .to_string()
}
