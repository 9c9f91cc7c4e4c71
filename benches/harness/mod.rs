//! The benchmarks' shared harness: interleaved sampling of ours against the
//! baselines in the same process run, the speed-up ratio, targets, and the
//! JSON record `gmem-bench-report` turns into `BENCHMARKS.md` and the plot.
//!
//! Every bench target includes this file with
//! `#[path = "harness/mod.rs"] mod harness;` and ends with
//! [`Bench::finish`], which prints the table and writes
//! `$CARGO_TARGET_TMPDIR/gmem-bench/<bench>.json`.
//!
//! Conventions:
//! - A [`Row`] compares one implementation of ours with one baseline for one
//!   case. Its `speedup` is always "how many times better ours is": for a
//!   time, `baseline / ours`; for a throughput, `ours / baseline`. Above 1 is
//!   better, 1 is parity.
//! - A target is a minimum speed-up (`Target::min`), so "ours <= 1.03x the
//!   raw time" is `Target::min(1.0 / 1.03, "ours <= 1.03x raw")`.
//! - `GMEM_BENCH_QUICK=1` shrinks every case (for development and for CI's
//!   compile-and-smoke run); the committed numbers come from full runs.
//! - A row this host cannot run is never left out: [`Bench::skip`] records
//!   it with the reason ([`gmem_vm`], [`userfaultfd`] and [`RS_SKIPPED`] give
//!   the reasons shared by the targets), and the report lists it.

#![allow(dead_code)] // each bench target uses a part of the harness

pub mod raw;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Whether `GMEM_BENCH_QUICK` asks for a shrunken run.
pub fn quick() -> bool {
    std::env::var_os("GMEM_BENCH_QUICK").is_some_and(|v| !v.is_empty() && v != "0")
}

/// `full` normally, `small` under [`quick`].
pub fn size(full: usize, small: usize) -> usize {
    if quick() { small } else { full }
}

/// What a measured value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds per operation (lower is better).
    NsPerOp,
    /// Microseconds per operation (lower is better).
    UsPerOp,
    /// Milliseconds, total (lower is better).
    Ms,
    /// Gigabytes (10^9 bytes) per second (higher is better).
    GBps,
    /// Operations per second (higher is better).
    OpsPerSec,
}

impl Unit {
    /// Whether a larger value is better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Unit::GBps | Unit::OpsPerSec)
    }
    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Unit::NsPerOp => "ns/op",
            Unit::UsPerOp => "µs/op",
            Unit::Ms => "ms",
            Unit::GBps => "GB/s",
            Unit::OpsPerSec => "ops/s",
        }
    }
}

/// A minimum speed-up with the wording of the goal it encodes, or (for an
/// absolute goal such as "a stall of at most 1 ms") a largest acceptable
/// value of ours.
#[derive(Clone, Debug)]
pub struct Target {
    /// The least acceptable speed-up (NaN for an absolute goal).
    pub min_speedup: f64,
    /// An absolute goal: the largest acceptable value of ours, in the row's
    /// unit; when set, it alone decides whether the target is met.
    pub max_ours: Option<f64>,
    /// The goal in words, e.g. "ours <= 1.03x raw".
    pub text: String,
}

impl Target {
    /// A target of at least `min_speedup`.
    pub fn min(min_speedup: f64, text: impl Into<String>) -> Self {
        Self {
            min_speedup,
            max_ours: None,
            text: text.into(),
        }
    }

    /// An absolute goal: ours' value (in the row's unit, lower is better)
    /// at most `limit`, whatever the baseline's.
    pub fn at_most(limit: f64, text: impl Into<String>) -> Self {
        Self {
            min_speedup: f64::NAN,
            max_ours: Some(limit),
            text: text.into(),
        }
    }
}

/// One comparison: ours against one baseline for one case.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case, e.g. "create + close a guest_memfd (1 MiB)".
    pub case: String,
    /// The baseline's name, e.g. "raw libc".
    pub baseline: String,
    /// The baseline's value.
    pub baseline_value: f64,
    /// Ours: which implementation, e.g. "GuestMemfd::create".
    pub ours: String,
    /// Ours: its value.
    pub ours_value: f64,
    /// The values' unit.
    pub unit: Unit,
    /// The goal, if the issue sets one.
    pub target: Option<Target>,
    /// How it was measured (samples, placement, sizes).
    pub note: String,
}

impl Row {
    /// How many times better ours is (above 1: better).
    pub fn speedup(&self) -> f64 {
        if self.unit.higher_is_better() {
            self.ours_value / self.baseline_value
        } else {
            self.baseline_value / self.ours_value
        }
    }
    /// Whether the target (if any) is met.
    pub fn met(&self) -> Option<bool> {
        self.target.as_ref().map(|t| match t.max_ours {
            Some(limit) => self.ours_value <= limit,
            None => self.speedup() >= t.min_speedup,
        })
    }
}

/// A row that did not run on this host, and why.
#[derive(Clone, Debug)]
pub struct Skip {
    /// The case, as the row would name it.
    pub case: String,
    /// The baseline's name.
    pub baseline: String,
    /// Ours: which implementation.
    pub ours: String,
    /// Why it did not run, e.g. "KVM_CAP_GUEST_MEMFD = 0 on Linux 6.18.44".
    pub reason: String,
}

/// The reason of every userfaultfd-rs row in a build without the baseline.
pub const RS_SKIPPED: &str = "userfaultfd-rs baseline not built: run with --features \
     bench-userfaultfd-rs (needs libclang)";

/// A curve for the plot: `(x, y)` points, e.g. seconds against pages
/// restored.
#[derive(Clone, Debug)]
pub struct Series {
    /// The plot it belongs to, e.g. "restore-sequential".
    pub plot: String,
    /// The curve's label, e.g. "serve (fault-around)".
    pub label: String,
    /// The x axis's label.
    pub x_label: String,
    /// The y axis's label.
    pub y_label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// One bench target's results.
#[derive(Debug)]
pub struct Bench {
    name: &'static str,
    rows: Vec<Row>,
    skipped: Vec<Skip>,
    series: Vec<Series>,
    notes: Vec<String>,
    started: Instant,
}

impl Bench {
    /// Starts the bench target `name` (its file name).
    pub fn new(name: &'static str) -> Self {
        println!(
            "== bench {name}{} on {}",
            if quick() { " (GMEM_BENCH_QUICK)" } else { "" },
            machine()
        );
        Self {
            name,
            rows: Vec::new(),
            skipped: Vec::new(),
            series: Vec::new(),
            notes: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Records a row and prints it at once.
    pub fn row(&mut self, row: Row) {
        println!("{}", format_row(&row));
        self.rows.push(row);
    }

    /// Records a row that cannot run on this host, with the reason, and
    /// prints it at once.
    pub fn skip(
        &mut self,
        case: impl Into<String>,
        baseline: impl Into<String>,
        ours: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let s = Skip {
            case: case.into(),
            baseline: baseline.into(),
            ours: ours.into(),
            reason: reason.into(),
        };
        println!(
            "{:<52} SKIPPED ({} vs {}): {}",
            s.case, s.ours, s.baseline, s.reason
        );
        self.skipped.push(s);
    }

    /// Records a curve for the plot.
    pub fn series(&mut self, series: Series) {
        self.series.push(series);
    }

    /// Records one row per baseline of a case whose candidates ran in one
    /// [`interleaved`] call: `v[0]` holds ours' samples, `v[i + 1]` those of
    /// `baselines[i]` (its name and goal); each value is the median.
    pub fn rows_vs(
        &mut self,
        case: &str,
        ours: &str,
        unit: Unit,
        baselines: &[(String, Target)],
        v: &[Vec<f64>],
        note: &str,
    ) {
        assert_eq!(
            v.len(),
            baselines.len() + 1,
            "{case}: samples per candidate"
        );
        for ((name, target), b) in baselines.iter().zip(&v[1..]) {
            self.row(Row {
                case: case.into(),
                baseline: name.clone(),
                baseline_value: median(b),
                ours: ours.into(),
                ours_value: median(&v[0]),
                unit,
                target: Some(target.clone()),
                note: note.into(),
            });
        }
    }

    /// Skips every row [`Bench::rows_vs`] would record for these baselines.
    pub fn skip_vs(&mut self, case: &str, ours: &str, baselines: &[(String, Target)], why: &str) {
        for (name, _) in baselines {
            self.skip(case, name.as_str(), ours, why);
        }
    }

    /// Records a remark for the report (a caveat, how a case was set up).
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        println!("note: {note}");
        self.notes.push(note);
    }

    /// Prints the summary and writes the JSON record.
    pub fn finish(self) {
        let elapsed = self.started.elapsed();
        println!(
            "== {}: {} rows, {} skipped, in {:.1} s",
            self.name,
            self.rows.len(),
            self.skipped.len(),
            elapsed.as_secs_f64()
        );
        let missed: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.met() == Some(false))
            .collect();
        for r in &missed {
            println!(
                "target missed: {} vs {}: speed-up {:.3}, goal {}",
                r.case,
                r.baseline,
                r.speedup(),
                r.target.as_ref().map(|t| t.text.as_str()).unwrap_or("")
            );
        }
        let dir = results_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("warning: cannot create {}: {e}", dir.display());
            return;
        }
        let path = dir.join(format!("{}.json", self.name));
        let json = self.to_json(elapsed);
        match std::fs::write(&path, json) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("warning: cannot write {}: {e}", path.display()),
        }
    }

    fn to_json(&self, elapsed: Duration) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"bench\":{},\"quick\":{},\"machine\":{},\"unix_s\":{},\"elapsed_s\":{},\"rows\":[",
            json_str(self.name),
            quick(),
            json_str(&machine()),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            json_num(elapsed.as_secs_f64())
        );
        for (i, r) in self.rows.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"case\":{},\"baseline\":{},\"baseline_value\":{},\"ours\":{},\"ours_value\":{},\"unit\":{},\"higher_is_better\":{},\"speedup\":{},\"target\":{},\"target_min_speedup\":{},\"target_max_ours\":{},\"met\":{},\"note\":{}}}",
                json_str(&r.case),
                json_str(&r.baseline),
                json_num(r.baseline_value),
                json_str(&r.ours),
                json_num(r.ours_value),
                json_str(r.unit.label()),
                r.unit.higher_is_better(),
                json_num(r.speedup()),
                r.target
                    .as_ref()
                    .map_or("null".into(), |t| json_str(&t.text)),
                r.target
                    .as_ref()
                    .map_or("null".into(), |t| json_num(t.min_speedup)),
                r.target
                    .as_ref()
                    .and_then(|t| t.max_ours)
                    .map_or("null".into(), json_num),
                r.met().map_or("null".into(), |m| m.to_string()),
                json_str(&r.note)
            );
        }
        s.push_str("],\"skipped\":[");
        for (i, k) in self.skipped.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"case\":{},\"baseline\":{},\"ours\":{},\"reason\":{}}}",
                json_str(&k.case),
                json_str(&k.baseline),
                json_str(&k.ours),
                json_str(&k.reason)
            );
        }
        s.push_str("],\"series\":[");
        for (i, c) in self.series.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"plot\":{},\"label\":{},\"x_label\":{},\"y_label\":{},\"points\":[",
                json_str(&c.plot),
                json_str(&c.label),
                json_str(&c.x_label),
                json_str(&c.y_label)
            );
            for (j, (x, y)) in c.points.iter().enumerate() {
                if j > 0 {
                    s.push(',');
                }
                let _ = write!(s, "[{},{}]", json_num(*x), json_num(*y));
            }
            s.push_str("]}");
        }
        s.push_str("],\"notes\":[");
        for (i, n) in self.notes.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&json_str(n));
        }
        s.push_str("]}\n");
        s
    }
}

/// Where the JSON records go: `$CARGO_TARGET_TMPDIR/gmem-bench`.
pub fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gmem-bench")
}

fn format_row(r: &Row) -> String {
    let verdict = match r.met() {
        Some(true) => "  [target met]",
        Some(false) => "  [TARGET MISSED]",
        None => "",
    };
    format!(
        "{:<52} ours {:>11.3} {:<6} ({}) vs {} {:.3}: speed-up {:.3}x{}",
        r.case,
        r.ours_value,
        r.unit.label(),
        r.ours,
        r.baseline,
        r.baseline_value,
        r.speedup(),
        verdict
    )
}

/// The CPU model, the number of online CPUs and the kernel release.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} CPUs, Linux {}", online_cpus(), kernel_release())
}

/// The online CPUs, not this thread's affinity (a bench may have pinned it).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf takes an integer name and returns an integer.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// The kernel release, e.g. "6.18.44".
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------
// What this host can run
// ---------------------------------------------------------------------------

/// A VM for the guest_memfd cases and the guest_memfd flags it accepts,
/// which include `need`; `Err` says why those cases cannot run on this host
/// (for [`Bench::skip`]). The VM is a kvm-ioctls `VmFd` (a baseline of the
/// overhead target), which ours takes as it is (`kvm_gmem::VmOps`).
pub fn gmem_vm(
    need: kvm_gmem::GuestMemfdFlags,
) -> Result<(kvm_ioctls::VmFd, kvm_gmem::GuestMemfdFlags), String> {
    let on = || format!("on Linux {}", kernel_release());
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm ({e})"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed {} ({e})", on()))?;
    match kvm_gmem::VmOps::extension(&vm, kvm_gmem::Extension::GUEST_MEMFD) {
        Ok(v) if v > 0 => {}
        Ok(v) => return Err(format!("KVM_CAP_GUEST_MEMFD = {v} {}", on())),
        Err(e) => return Err(format!("KVM_CAP_GUEST_MEMFD unknown {}: {e}", on())),
    }
    let flags = kvm_gmem::VmOps::guest_memfd_flags(&vm)
        .map_err(|e| format!("KVM_CAP_GUEST_MEMFD_FLAGS unknown {}: {e}", on()))?;
    if !flags.contains(need) {
        return Err(format!(
            "guest_memfd without {need}: KVM_CAP_GUEST_MEMFD_FLAGS = {flags} {}",
            on()
        ));
    }
    Ok((vm, flags))
}

/// `Ok` when this process can create a userfaultfd; else why not (for
/// [`Bench::skip`]).
pub fn userfaultfd() -> Result<(), String> {
    uffd_gmem::Uffd::builder()
        .create()
        .map(drop)
        .map_err(|e| format!("no userfaultfd on Linux {}: {e}", kernel_release()))
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

// ---------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------

/// Runs each candidate `samples` times, interleaved (A B C A B C ...) so
/// drift and noise hit all of them alike, after one unrecorded warm-up round.
/// Each call of a candidate returns one measured value (its own unit). The
/// result holds every candidate's values in call order.
pub fn interleaved(samples: usize, candidates: &mut [&mut dyn FnMut() -> f64]) -> Vec<Vec<f64>> {
    for c in candidates.iter_mut() {
        let _ = c();
    }
    let mut out = vec![Vec::with_capacity(samples); candidates.len()];
    for _ in 0..samples {
        for (i, c) in candidates.iter_mut().enumerate() {
            out[i].push(c());
        }
    }
    out
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile of `v` (nearest rank; NaN when empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// The largest of `v` (NaN when empty).
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// Nanoseconds per call of `f`, over a batch of `batch` calls.
pub fn ns_per_op(batch: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..batch {
        f();
    }
    t.elapsed().as_nanos() as f64 / batch as f64
}

/// GB/s (10^9 bytes per second) of `bytes` moved in `d`.
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// The CPUs the calling thread may run on (its affinity mask), ascending;
/// every online CPU when the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set, which
    // sched_getaffinity fills; CPU_ISSET reads in bounds (i < CPU_SETSIZE).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..online_cpus()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| libc::CPU_ISSET(i, &set))
            .collect()
    }
}

/// Lets thread `tid` (0: the calling thread) run on `cpus` only (best
/// effort; false when refused).
pub fn pin_tid_to_set(tid: libc::pid_t, cpus: &[usize]) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set; CPU_SET writes in
    // bounds for cpu < CPU_SETSIZE, which is checked; sched_setaffinity only
    // reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return false;
            }
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Pins every thread of this process whose name starts with `prefix` to
/// `cpu`; returns how many were pinned.
pub fn pin_threads(prefix: &str, cpu: usize) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&tid| pin_tid_to_set(tid, &[cpu]))
        .count()
}

/// Pins the calling thread to `cpu` (best effort; false when refused).
pub fn pin_to(cpu: usize) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set; CPU_SET writes in
    // bounds for cpu < CPU_SETSIZE, which is checked.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// A mapping owned by a bench, with transparent huge pages off (one 4 KiB
/// fault per page), unmapped on drop. No Rust reference ever points into
/// it: only ioctls, volatile accesses and copies through raw pointers.
#[derive(Debug)]
pub struct Map {
    /// Its address.
    pub addr: usize,
    /// Its length in bytes.
    pub len: usize,
}

impl Map {
    /// `mmap(NULL, len, RW, flags, fd, 0)` and `MADV_NOHUGEPAGE`.
    pub fn new(len: usize, flags: i32, fd: i32) -> Map {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); it
        // replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "mmap of {len} bytes: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: advice on the mapping just made: 4 KiB pages, one fault each.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Map {
            addr: p as usize,
            len,
        }
    }

    /// An anonymous private mapping.
    pub fn anon(len: usize) -> Map {
        Map::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    /// Drops the page table entries: anonymous pages are freed, shmem pages
    /// stay in the page cache; the next access faults again.
    pub fn zap(&self) {
        // SAFETY: our own mapping, which no Rust reference points into.
        let r = unsafe {
            libc::madvise(
                self.addr as *mut libc::c_void,
                self.len,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(
            r,
            0,
            "madvise(DONTNEED): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Its address range.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.addr as u64..(self.addr + self.len) as u64
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the benches close every
        // userfaultfd registered on it before dropping it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
