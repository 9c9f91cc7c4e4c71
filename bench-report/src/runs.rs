//! The committed runs: one directory per host under `bench-report/runs/`
//! (the host is the records' `machine`: CPU model, CPU count and kernel
//! release), holding that host's last full run, the bench targets' JSON
//! records. A host whose records were never committed has `archive.md`
//! instead: its tables carried over from an older `BENCHMARKS.md`, under a
//! header naming the host, the date and the source.

use crate::{Record, order, parse};
use std::path::{Path, PathBuf};

/// The file of an archived run in a host's directory.
pub const ARCHIVE: &str = "archive.md";

/// Hand-written, in a host's directory: the measured cause of each missed
/// target of its last run, shown under the run's list of misses. A new full
/// run keeps it (`store` replaces only records): review it with the run.
pub const ANALYSIS: &str = "analysis.md";

/// One host's last run.
#[derive(Clone, Debug)]
pub struct Host {
    /// CPU model, CPU count and kernel release.
    pub machine: String,
    /// When the run finished, `YYYY-MM-DD HH:MM UTC` (empty when unknown).
    pub date: String,
    /// Its directory's name ([`slug`] of `machine`).
    pub slug: String,
    /// The run.
    pub run: Run,
    /// The host's [`ANALYSIS`] file, if it has one.
    pub analysis: Option<String>,
}

/// What a host's directory holds.
#[derive(Clone, Debug)]
pub enum Run {
    /// The bench targets' records, in report order.
    Records(Vec<Record>),
    /// Tables carried over verbatim (Markdown), and where they come from.
    Archived {
        /// Where the tables come from.
        source: String,
        /// The tables and notes.
        markdown: String,
    },
}

/// A host's directory name: `machine` in lower case, without `(R)` and
/// `(TM)`, every run of characters other than letters, digits and dots
/// turned into one `-`.
pub fn slug(machine: &str) -> String {
    let lower = machine
        .to_lowercase()
        .replace("(r)", "")
        .replace("(tm)", "");
    let mut out = String::new();
    for c in lower.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// `YYYY-MM-DD HH:MM UTC` of a UNIX time.
pub fn utc(unix_s: u64) -> String {
    let (days, secs) = (unix_s / 86_400, unix_s % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// The records (`*.json`) in `dir`, in report order.
pub fn read_records(dir: &Path) -> Result<Vec<Record>, String> {
    Ok(read_json(dir)?.into_iter().map(|(_, r, _)| r).collect())
}

/// Every `*.json` in `dir`: its path, the record and its text.
fn read_json(dir: &Path) -> Result<Vec<(PathBuf, Record, String)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let record = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            out.push((path, record, text));
        }
    }
    out.sort_by_key(|(p, ..)| p.clone());
    Ok(out)
}

/// Stores the run whose records are in `results` as its host's last run
/// under `runs`: the host's directory is emptied of records and archive,
/// then gets the records as they are; other hosts are left alone.
/// Refuses an empty run, records of several machines, and shrunken
/// (`GMEM_BENCH_QUICK`) records unless `allow_quick`. Returns the host's
/// directory.
pub fn store(results: &Path, runs: &Path, allow_quick: bool) -> Result<PathBuf, String> {
    let records = read_json(results)
        .map_err(|e| format!("{e} (run `cargo bench` first, or leave out --results)"))?;
    let Some((_, first, _)) = records.first() else {
        return Err(format!("no *.json record in {}", results.display()));
    };
    let machine = first.machine.clone();
    for (path, r, _) in &records {
        if r.machine != machine {
            return Err(format!(
                "{} is from {:?}, not {machine:?}: one run, one host",
                path.display(),
                r.machine
            ));
        }
        if r.quick && !allow_quick {
            return Err(format!(
                "{} is a GMEM_BENCH_QUICK record: rerun without it, or pass --allow-quick",
                path.display()
            ));
        }
    }
    let dir = runs.join(slug(&machine));
    if dir.exists() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".json") || name == ARCHIVE {
                std::fs::remove_file(&path)
                    .map_err(|e| format!("removing {}: {e}", path.display()))?;
            }
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for (_, r, text) in &records {
        let path = dir.join(format!("{}.json", r.bench));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(dir)
}

/// Every host under `runs` (a directory per host), newest run first.
pub fn load(runs: &Path) -> Result<Vec<Host>, String> {
    let entries =
        std::fs::read_dir(runs).map_err(|e| format!("reading {}: {e}", runs.display()))?;
    let mut hosts = Vec::new();
    for entry in entries {
        let dir = entry.map_err(|e| e.to_string())?.path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let archive = dir.join(ARCHIVE);
        let host = if archive.exists() {
            let text = std::fs::read_to_string(&archive)
                .map_err(|e| format!("reading {}: {e}", archive.display()))?;
            parse_archive(&text).map_err(|e| format!("{}: {e}", archive.display()))?
        } else {
            let mut records = read_records(&dir)?;
            let Some(first) = records.first() else {
                continue;
            };
            let machine = first.machine.clone();
            if let Some(r) = records.iter().find(|r| r.machine != machine) {
                return Err(format!(
                    "{}: {} is from {:?}, the others from {machine:?}",
                    dir.display(),
                    r.bench,
                    r.machine
                ));
            }
            let newest = records.iter().filter_map(|r| r.unix_s).max();
            order(&mut records);
            Host {
                date: newest.map(utc).unwrap_or_default(),
                slug: String::new(),
                machine,
                run: Run::Records(records),
                analysis: None,
            }
        };
        if slug(&host.machine) != name {
            return Err(format!(
                "{}: holds a run of {:?}, whose directory is {:?}",
                dir.display(),
                host.machine,
                slug(&host.machine)
            ));
        }
        let analysis = match std::fs::read_to_string(dir.join(ANALYSIS)) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("reading {}: {e}", dir.join(ANALYSIS).display())),
        };
        hosts.push(Host {
            slug: name.to_string(),
            analysis,
            ..host
        });
    }
    sort_newest_first(&mut hosts);
    Ok(hosts)
}

/// Newest run first (`date` sorts as text), then by machine.
pub fn sort_newest_first(hosts: &mut [Host]) {
    hosts.sort_by(|a, b| b.date.cmp(&a.date).then(a.machine.cmp(&b.machine)));
}

/// An archive: a header comment naming the host, the date and the source,
/// then the Markdown carried over.
///
/// ```text
/// <!-- gmem-bench-report archive
/// machine: AMD EPYC, 2 CPUs, Linux 6.18.44-fc-v782
/// date: 2026-11-23 12:43 UTC
/// source: BENCHMARKS.md of commit bb194aa
/// -->
/// ...
/// ```
pub fn parse_archive(text: &str) -> Result<Host, String> {
    let rest = text
        .strip_prefix("<!-- gmem-bench-report archive\n")
        .ok_or("does not start with \"<!-- gmem-bench-report archive\"")?;
    let (header, body) = rest
        .split_once("-->\n")
        .ok_or("no \"-->\" ends the header")?;
    let field = |key: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
            .map(str::to_string)
            .ok_or(format!("no \"{key}:\" line in the header"))
    };
    Ok(Host {
        machine: field("machine")?,
        date: field("date")?,
        slug: String::new(),
        run: Run::Archived {
            source: field("source")?,
            markdown: body.trim().to_string(),
        },
        analysis: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("gmem-bench-report-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(bench: &str, machine: &str, unix_s: u64, quick: bool) -> String {
        format!(
            r#"{{"bench":"{bench}","quick":{quick},"machine":"{machine}","unix_s":{unix_s},"elapsed_s":1,"rows":[],"skipped":[{{"case":"c","baseline":"b","ours":"o","reason":"r"}}]}}"#
        )
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    const AMD: &str = "AMD EPYC, 2 CPUs, Linux 6.18.44-fc-v782";
    const INTEL: &str = "Intel(R) Xeon(R) Processor, 2 CPUs, Linux 6.18.44-fc-v1252";

    #[test]
    fn slugs_and_dates() {
        assert_eq!(slug(AMD), "amd-epyc-2-cpus-linux-6.18.44-fc-v782");
        assert_eq!(
            slug(INTEL),
            "intel-xeon-processor-2-cpus-linux-6.18.44-fc-v1252"
        );
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400 + 3_660), "2000-02-29 01:01 UTC");
        assert_eq!(utc(1_796_478_240), "2026-12-05 13:44 UTC");
    }

    #[test]
    fn a_run_replaces_only_its_own_hosts_last_run() {
        let tmp = Scratch::new("store");
        let (results, runs) = (tmp.0.join("results"), tmp.0.join("runs"));
        // AMD's archived run, and a stale Intel run with a target since dropped.
        let amd = runs.join(slug(AMD));
        write(
            &amd,
            ARCHIVE,
            &format!(
                "<!-- gmem-bench-report archive\nmachine: {AMD}\ndate: 2026-11-23 12:43 UTC\n\
                 source: BENCHMARKS.md of commit bb194aa\n-->\n\nTargets: 19 of 28 met.\n"
            ),
        );
        let intel = runs.join(slug(INTEL));
        write(&intel, "gone.json", &record("gone", INTEL, 1, false));
        write(
            &results,
            "overhead.json",
            &record("overhead", INTEL, 1_796_478_240, false),
        );
        write(
            &results,
            "populate.json",
            &record("populate", INTEL, 1_796_478_300, false),
        );

        assert_eq!(store(&results, &runs, false).unwrap(), intel);
        let mut names: Vec<_> = std::fs::read_dir(&intel)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["overhead.json", "populate.json"]);
        assert!(amd.join(ARCHIVE).exists(), "another host's run was touched");

        let hosts = load(&runs).unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].machine, INTEL);
        assert_eq!(hosts[0].date, "2026-12-05 13:45 UTC");
        let Run::Records(records) = &hosts[0].run else {
            panic!("Intel's run is records")
        };
        let benches: Vec<&str> = records.iter().map(|r| r.bench.as_str()).collect();
        assert_eq!(benches, ["overhead", "populate"]);
        assert_eq!(records[0].skipped[0].reason, "r");
        assert_eq!(hosts[1].machine, AMD);
        assert!(matches!(hosts[1].run, Run::Archived { .. }));

        // AMD's first full run replaces its archive.
        let amd_results = tmp.0.join("amd-results");
        write(
            &amd_results,
            "restore.json",
            &record("restore", AMD, 1_796_500_000, false),
        );
        store(&amd_results, &runs, false).unwrap();
        assert!(!amd.join(ARCHIVE).exists());
        let hosts = load(&runs).unwrap();
        assert_eq!(hosts[0].machine, AMD, "newest first");
        assert!(matches!(hosts[0].run, Run::Records(_)));
    }

    #[test]
    fn mixed_quick_or_misplaced_runs_are_refused() {
        let tmp = Scratch::new("refuse");
        let (results, runs) = (tmp.0.join("results"), tmp.0.join("runs"));
        write(&results, "a.json", &record("a", INTEL, 1, false));
        write(&results, "b.json", &record("b", AMD, 1, false));
        let e = store(&results, &runs, false).unwrap_err();
        assert!(e.contains("one run, one host"), "{e}");

        std::fs::remove_file(results.join("b.json")).unwrap();
        write(&results, "a.json", &record("a", INTEL, 1, true));
        let e = store(&results, &runs, false).unwrap_err();
        assert!(e.contains("GMEM_BENCH_QUICK"), "{e}");
        store(&results, &runs, true).unwrap();

        write(
            &runs.join("wrong-place"),
            "a.json",
            &record("a", AMD, 1, false),
        );
        let e = load(&runs).unwrap_err();
        assert!(e.contains("whose directory is \"amd-epyc"), "{e}");
        assert!(store(&tmp.0.join("none"), &runs, false).is_err());
    }

    #[test]
    fn archives_name_their_host_date_and_source() {
        let h = parse_archive(
            "<!-- gmem-bench-report archive\nmachine: M, 1 CPUs, Linux 6\ndate: 2026-01-01 \
             00:00 UTC\nsource: S\n-->\n\nbody\n",
        )
        .unwrap();
        assert_eq!(
            (h.machine.as_str(), h.date.as_str()),
            ("M, 1 CPUs, Linux 6", "2026-01-01 00:00 UTC")
        );
        let Run::Archived { source, markdown } = h.run else {
            panic!("an archive")
        };
        assert_eq!((source.as_str(), markdown.as_str()), ("S", "body"));
        assert!(parse_archive("body").is_err());
        let e = parse_archive("<!-- gmem-bench-report archive\nmachine: M\n-->\n").unwrap_err();
        assert_eq!(e, "no \"date:\" line in the header");
    }
}
