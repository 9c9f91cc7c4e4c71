//! `gmem-bench-report`: writes `BENCHMARKS.md` and the curves (SVG) from the
//! benchmarks' JSON records.
//!
//! ```text
//! gmem-bench-report [--results DIR] [--out FILE] [--svg FILE] [--allow-quick]
//! ```
//!
//! Defaults: `target/tmp/gmem-bench`, `BENCHMARKS.md`, `docs/bench-curves.svg`
//! (relative to the current directory; `scripts/bench.sh` runs it from the
//! repository root). Shrunken (`GMEM_BENCH_QUICK`) records are refused
//! unless `--allow-quick`: committed numbers come from full runs.

use gmem_bench_report::{Record, markdown, order, parse, svg};
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
    let mut results = PathBuf::from("target/tmp/gmem-bench");
    let mut out = PathBuf::from("BENCHMARKS.md");
    let mut svg_path = PathBuf::from("docs/bench-curves.svg");
    let mut allow_quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--results" => results = value("--results")?.into(),
            "--out" => out = value("--out")?.into(),
            "--svg" => svg_path = value("--svg")?.into(),
            "--allow-quick" => allow_quick = true,
            "-h" | "--help" => {
                println!(
                    "usage: gmem-bench-report [--results DIR] [--out FILE] [--svg FILE] [--allow-quick]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    let mut records = read_records(&results)?;
    if !allow_quick && let Some(q) = records.iter().find(|r| r.quick) {
        return Err(format!(
            "{} is a GMEM_BENCH_QUICK record: rerun without it, or pass --allow-quick",
            q.bench
        ));
    }
    order(&mut records);
    let series: Vec<_> = records.iter().flat_map(|r| r.series.clone()).collect();
    let svg_rel = match svg(&series) {
        Some(text) => {
            if let Some(dir) = svg_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            std::fs::write(&svg_path, text)
                .map_err(|e| format!("writing {}: {e}", svg_path.display()))?;
            println!("wrote {}", svg_path.display());
            Some(relative_to(&svg_path, &out))
        }
        None => None,
    };
    let md = markdown(&records, svg_rel.as_deref());
    std::fs::write(&out, md).map_err(|e| format!("writing {}: {e}", out.display()))?;
    println!(
        "wrote {} ({} bench targets, {} rows)",
        out.display(),
        records.len(),
        records.iter().map(|r| r.rows.len()).sum::<usize>()
    );
    Ok(())
}

fn read_records(dir: &Path) -> Result<Vec<Record>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "reading {}: {e} (run `cargo bench` first, or pass --results)",
            dir.display()
        )
    })?;
    let mut records = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            records.push(parse(&text).map_err(|e| format!("{}: {e}", path.display()))?);
        }
    }
    if records.is_empty() {
        return Err(format!("no *.json record in {}", dir.display()));
    }
    Ok(records)
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
