//! `gmem-matrix`: what `scripts/kernel-lane.sh` runs after the guest.
//!
//! ```text
//! gmem-matrix merge --docs FILE --out FILE --date YYYY-MM-DD --host-log FILE
//!                   --lane-log FILE --lane-label TEXT --lane-about TEXT [--check]
//! gmem-matrix skips --log FILE --required NAME,NAME,...
//! ```
//!
//! `merge` builds this run's columns (the lane's from its serial log, this
//! machine's from the host log), prints how they differ from `--docs`, and
//! writes the docs with them merged in to `--out` (the lane's column
//! replaces the docs' lane of the same lane id, the word after `lane`
//! in `--lane-label`; this host's replaces its own; either is added if the
//! docs lack it; other columns are kept). It fails when the run lacks a
//! result, and with `--check` when this lane's column or the rows differ; a
//! host difference is a notice, and other lanes are not
//! compared.
//!
//! `skips` prints the `SKIP` lines per executable of a serial log, and fails
//! when one names a `--required` capability.

use gmem_matrix::host::Host;
use gmem_matrix::matrix::{Matrix, RunLog, compare, merge};
use gmem_matrix::skips::{per_executable, summarize};
use std::collections::BTreeMap;
use std::process::ExitCode;

const USAGE: &str =
    "usage: gmem-matrix merge --docs FILE --out FILE --date YYYY-MM-DD --host-log FILE
                          --lane-log FILE --lane-label TEXT --lane-about TEXT [--check]
       gmem-matrix skips --log FILE --required NAME,NAME,...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("merge") => options(&args[1..], &["--check"]).and_then(|o| merge_cmd(&o)),
        Some("skips") => options(&args[1..], &[]).and_then(|o| skips_cmd(&o)),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(true)
        }
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gmem-matrix: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--name value` pairs, and the `flags` (value "") that were given.
fn options(args: &[String], flags: &[&str]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let value = if flags.contains(&name.as_str()) {
            String::new()
        } else {
            it.next().ok_or(format!("{name} needs a value"))?.clone()
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

fn get<'a>(o: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, String> {
    o.get(name)
        .map(String::as_str)
        .ok_or(format!("{name} is missing\n{USAGE}"))
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))
}

fn merge_cmd(o: &BTreeMap<String, String>) -> Result<bool, String> {
    let docs_path = get(o, "--docs")?;
    let date = get(o, "--date")?;
    let check = o.contains_key("--check");
    let docs = match std::fs::read_to_string(docs_path) {
        Ok(text) => Matrix::parse(&text).map_err(|e| format!("{docs_path}: {e}"))?,
        Err(e) => {
            println!("notice: {docs_path} cannot be read ({e}): comparing with an empty matrix");
            Matrix::default()
        }
    };
    let host_log = RunLog::read(&read(get(o, "--host-log")?)?);
    let release = host_log.kernel.clone().unwrap_or_else(|| {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        r.trim().to_owned()
    });
    let host = Host::probe(&release);
    let mut run = Matrix::default();
    let lane_log = RunLog::read(&read(get(o, "--lane-log")?)?);
    let (label, about) = (get(o, "--lane-label")?, get(o, "--lane-about")?);
    run.add_run(label, date, about, lane_log);
    run.add_run(&host.label(), date, &host.about(), host_log);

    let mut ok = true;
    for p in run.problems() {
        println!("error: this run: {p}");
        ok = false;
    }
    let diff = compare(&docs, &run);
    if diff.lane.is_empty() {
        println!("{docs_path}: the lane and its rows match this run");
    }
    let word = if check { "error" } else { "notice" };
    for d in &diff.lane {
        println!("{word}: {docs_path} differs from this run (lane): {d}");
    }
    for d in &diff.host {
        println!("notice: {docs_path} differs from this run (this host; not a failure): {d}");
    }
    if !diff.lane.is_empty() || !diff.host.is_empty() {
        println!(
            "(scripts/kernel-lane.sh --update-docs records this run: commit docs/kernel-matrix.md)"
        );
    }
    ok &= !check || diff.lane.is_empty();

    let out = get(o, "--out")?;
    std::fs::write(out, merge(&docs, &run).render()).map_err(|e| format!("writing {out}: {e}"))?;
    println!(
        "wrote {out} (this run merged into {docs_path}; this host is `{}`)",
        host.label()
    );
    Ok(ok)
}

fn skips_cmd(o: &BTreeMap<String, String>) -> Result<bool, String> {
    let log = read(get(o, "--log")?)?;
    let required: Vec<&str> = get(o, "--required")?
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let (text, offending) = summarize(&per_executable(&log), &required);
    println!(
        "{:<40} {:>3}  capabilities named",
        "SKIP lines per executable", "n"
    );
    print!("{text}");
    for line in &offending {
        println!("error: a required capability was skipped: {line}");
    }
    Ok(offending.is_empty())
}
