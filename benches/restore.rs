//! Lazy restore of a 1 GiB snapshot (`GMEM_BENCH_QUICK`: 64 MiB) into
//! Firecracker-style guest memory (anonymous `MAP_PRIVATE | MAP_NORESERVE`,
//! registered MISSING with a fresh userfaultfd per run), served from the
//! snapshot file mapped read-only.
//!
//! The snapshot file is written once per bench run in `/var/tmp` (a disk
//! filesystem, not tmpfs), `fsync`ed, opened and unlinked at once (so it
//! is removed even if the bench fails); its page cache stays warm, and both
//! handlers' source mappings are populated (`MAP_POPULATE` /
//! `MADV_POPULATE_READ`) before any run, so disk reads and faults on the
//! source are excluded.
//!
//! A faulting thread (the "vCPU", this process's main thread) reads the
//! first 8 bytes of each page in an access pattern, taking a timestamp after
//! every touch. A run's time is from the handler's start (thread spawn or
//! `Server::spawn`) to the completion of the last touch; afterwards the
//! handler is stopped, its userfaultfd closed, and every touched page is
//! compared whole with the snapshot (a page left missing would read as
//! zeroes): any difference panics.
//!
//! - Baseline: Firecracker's example on-demand handler algorithm, on libc:
//!   one thread, `poll` + `read` of one fault, one 4 KiB `UFFDIO_COPY` from
//!   the mapped file per fault, nothing else.
//! - Ours: `uffd_gmem::serve::Server` over a `MappedFile` of the snapshot:
//!   fault-around 512 KiB (aligned for random faults, growing to 4 MiB along
//!   sequential streaks), two workers, and for the working-set pattern
//!   `prefetch` of the recorded working set (see `OursConfig`).
//!
//! Stalls: the time of each touch (most take well under a microsecond). The
//! quantiles are taken over the touches that stalled (over 2 µs: they waited
//! on a fault) and over all touches. Every touch over 200 µs is attributed:
//! the vCPU's and the handler threads' schedstat `run_delay` (time runnable
//! but waiting for a CPU) over its interval is read, outside the timed
//! touches, so a note can say how much of the worst stalls is CPU
//! contention (the machine has 2 CPUs, shared with other jobs).
//!
//! Knobs for investigation (not used by a plain run):
//! `GMEM_BENCH_RESTORE_OURS=window=262144,workers=1,all=1,busy=0,pin=1`
//! changes ours' configuration (`pin` puts the vCPU on CPU 1 and serve's
//! threads on CPU 0); `GMEM_BENCH_RESTORE_EXPLORE="cfg;cfg;..."` runs only
//! those configurations of ours against each other, interleaved, and prints
//! one line per pattern and configuration.
//!
//! Patterns (pages of 4 KiB, `N` in all):
//! - sequential: 0, 1, ..., N-1;
//! - random: a uniform random permutation of all N pages (fixed seed);
//! - working set: the snapshot is cut in 64 KiB clusters (16 pages); 10% of
//!   the clusters, picked with a fixed seed, are the hot set. The vCPU
//!   touches the hot clusters first, in a random order, each cluster's 16
//!   pages in ascending order; then every other page in a uniform random
//!   order. A recording run (serve with `record(true)`, fault-around off, one
//!   worker) first touches the hot set alone; its `Stats::working_set()` (the
//!   hot pages in first-touch order) is handed to the measured runs of ours
//!   as `prefetch`.

#[path = "harness/mod.rs"]
mod harness;

use harness::{Bench, Row, Series, Target, Unit, interleaved, median, quantile};
use kvm_gmem_sys as sys;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uffd_gmem::serve::{MappedFile, PageSource, Region, Server, Stats};
use uffd_gmem::{RegisterMode, Uffd};

const PAGE: usize = 4096;
/// A touch that took longer than this waited on a fault (a touch of a
/// present page takes well under a microsecond, a userfaultfd round trip
/// several).
const STALL_NS: u32 = 2_000;
/// Progress is sampled for the plot every this many touches.
const PROGRESS_EVERY: usize = 1024;
/// Pages per working-set cluster (64 KiB).
const CLUSTER: usize = 16;

fn main() {
    let size = harness::size(1 << 30, 64 << 20);
    let samples = harness::size(4, 2);
    let mut bench = Bench::new("restore");
    let cfg = OursConfig::from_env();
    let mib = size >> 20;
    if let Err(why) = harness::userfaultfd() {
        for pattern in Pattern::ALL {
            let ours = cfg.label(pattern == Pattern::WorkingSet);
            let [time, stall] = pattern.cases(mib);
            bench.skip(time, BASELINE_TIME, &ours, &why);
            bench.skip(stall, BASELINE_STALL, &ours, &why);
        }
        bench.finish();
        return;
    }

    let t = Instant::now();
    let snap = Snapshot::create(size);
    let source: Arc<dyn PageSource> = snap.page_source();
    bench.note(format!(
        "restore: snapshot of {} MiB written to /var/tmp, fsynced, unlinked once open, page \
         cache warm, source mappings populated before the runs (disk reads excluded), set up in \
         {:.1} s; guest memory is a fresh anonymous MAP_PRIVATE|MAP_NORESERVE mapping registered \
         MISSING per run; every touched page is compared whole with the snapshot after each run; \
         {samples} measured runs per implementation and pattern, interleaved after a warm-up; \
         medians; the machine's 2 CPUs are shared with other developers' jobs, so figures are \
         noisy",
        size >> 20,
        t.elapsed().as_secs_f64()
    ));
    let pages = size / PAGE;
    if let Ok(list) = std::env::var("GMEM_BENCH_RESTORE_EXPLORE") {
        explore(&snap, &source, pages, samples, &list);
        return;
    }

    for pattern in Pattern::ALL {
        let (order, hot) = pattern.order(pages);
        let mut prefetch = Vec::new();
        let mut pattern_note = String::new();
        if pattern == Pattern::WorkingSet {
            // The recording run: the hot set alone, every page faulting.
            let rec_cfg = OursConfig {
                window: 0,
                workers: 1,
                ..cfg.clone()
            };
            let rec = run_ours(&snap, &source, &order[..hot], &rec_cfg, Vec::new(), true);
            let stats = rec.stats.as_ref().expect("stats");
            prefetch = stats.working_set();
            let want: Vec<u64> = order[..hot]
                .iter()
                .map(|&p| p as u64 * PAGE as u64)
                .collect();
            assert_eq!(
                prefetch, want,
                "the recorded working set is not the hot set in touch order"
            );
            pattern_note = format!(
                "; working set recorded in a first run (record(true), fault-around off, 1 worker, \
                 hot set only: {} pages, {} faults, {:.0} ms)",
                prefetch.len(),
                stats.faults,
                rec.total.as_secs_f64() * 1e3
            );
        }

        let mut base_runs: Vec<RunResult> = Vec::new();
        let mut ours_runs: Vec<RunResult> = Vec::new();
        let mut baseline = || {
            let r = run_baseline(&snap, &order);
            let ms = r.total.as_secs_f64() * 1e3;
            base_runs.push(r);
            ms
        };
        let mut ours = || {
            let r = run_ours(&snap, &source, &order, &cfg, prefetch.clone(), false);
            let ms = r.total.as_secs_f64() * 1e3;
            ours_runs.push(r);
            ms
        };
        let v = interleaved(samples, &mut [&mut baseline, &mut ours]);
        // Drop the warm-up runs.
        base_runs.remove(0);
        ours_runs.remove(0);

        let name = pattern.name();
        let [time_case, stall_case] = pattern.cases(mib);
        let (b_ms, o_ms) = (median(&v[0]), median(&v[1]));
        let b_st = StallSummary::of(&base_runs);
        let o_st = StallSummary::of(&ours_runs);
        let stats = ours_runs
            .iter()
            .filter_map(|r| r.stats.as_ref())
            .collect::<Vec<_>>();
        let serve_note = serve_summary(&stats);
        let ours_label = cfg.label(pattern == Pattern::WorkingSet);
        let target = match pattern {
            Pattern::Sequential => Target::min(10.0, "ours >= 10x faster than the baseline"),
            _ => Target::min(6.0, "ours >= 6x faster than the baseline"),
        };
        bench.row(Row {
            case: time_case,
            baseline: BASELINE_TIME.into(),
            baseline_value: b_ms,
            ours: ours_label.clone(),
            ours_value: o_ms,
            unit: Unit::Ms,
            target: Some(target),
            note: format!(
                "{} touches ({}); ms from handler start to the last touch's completion, median \
                 of {} (ours {}, baseline {}); ours: {}{}",
                order.len(),
                pattern.describe(),
                v[1].len(),
                fmt_list(&v[1]),
                fmt_list(&v[0]),
                serve_note,
                pattern_note
            ),
        });
        let ok = o_st.max_us <= 1000.0;
        bench.row(Row {
            case: stall_case,
            baseline: BASELINE_STALL.into(),
            baseline_value: b_st.max_us,
            ours: ours_label.clone(),
            ours_value: o_st.max_us,
            unit: Unit::UsPerOp,
            target: None,
            note: format!(
                "the longest single touch over all {} measured runs; ours {:.0} µs {} the \
                 <= 1000 µs goal; less the CPU waits over its interval (schedstat run_delay of \
                 the vCPU and the handler threads), ours' longest is {:.0} µs, the baseline's \
                 {:.0} µs. Per-touch times over the touches that stalled (> {} µs, i.e. waited on a \
                 fault), pooled over the runs: ours {}; baseline {}. Over all touches: ours p50 \
                 {:.2} µs, p99 {:.1} µs; baseline p50 {:.2} µs, p99 {:.1} µs. CPU waits: ours \
                 {}; baseline {}",
                ours_runs.len(),
                o_st.max_us,
                if ok { "meets" } else { "MISSES" },
                o_st.max_unexplained_us,
                b_st.max_unexplained_us,
                STALL_NS / 1000,
                o_st.describe(),
                b_st.describe(),
                o_st.all_p50_us,
                o_st.all_p99_us,
                b_st.all_p50_us,
                b_st.all_p99_us,
                o_st.cpu_wait(),
                b_st.cpu_wait(),
            ),
        });
        let plot = format!("restore-{}", name.replace(' ', "-"));
        for (label, runs) in [
            (
                "baseline: Firecracker example handler".to_string(),
                &base_runs,
            ),
            (format!("ours: {ours_label}"), &ours_runs),
        ] {
            bench.series(Series {
                plot: plot.clone(),
                label,
                x_label: "seconds since start".into(),
                y_label: "pages restored (touched pages done)".into(),
                points: median_run(runs).progress.clone(),
            });
        }
    }
    drop(source);
    drop(snap);
    bench.finish();
}

/// Compares configurations of ours (`;`-separated, as for
/// `GMEM_BENCH_RESTORE_OURS`) with each other, interleaved, without the
/// baseline, and prints one line per pattern and configuration.
fn explore(
    snap: &Snapshot,
    source: &Arc<dyn PageSource>,
    pages: usize,
    samples: usize,
    list: &str,
) {
    let cfgs: Vec<OursConfig> = list.split(';').map(OursConfig::parse).collect();
    for pattern in Pattern::ALL {
        let (order, hot) = pattern.order(pages);
        let prefetch: Vec<u64> = if pattern == Pattern::WorkingSet {
            order[..hot]
                .iter()
                .map(|&p| p as u64 * PAGE as u64)
                .collect()
        } else {
            Vec::new()
        };
        let runs: Vec<std::cell::RefCell<Vec<RunResult>>> =
            cfgs.iter().map(|_| Default::default()).collect();
        let mut fns: Vec<Box<dyn FnMut() -> f64 + '_>> = cfgs
            .iter()
            .zip(&runs)
            .map(|(cfg, out)| {
                let (order, prefetch) = (&order, &prefetch);
                Box::new(move || {
                    let r = run_ours(snap, source, order, cfg, prefetch.clone(), false);
                    let ms = r.total.as_secs_f64() * 1e3;
                    out.borrow_mut().push(r);
                    ms
                }) as Box<dyn FnMut() -> f64>
            })
            .collect();
        let mut refs: Vec<&mut dyn FnMut() -> f64> = fns
            .iter_mut()
            .map(|f| &mut **f as &mut dyn FnMut() -> f64)
            .collect();
        let v = interleaved(samples, &mut refs);
        for ((cfg, out), ms) in cfgs.iter().zip(&runs).zip(&v) {
            let mut out = out.borrow_mut();
            out.remove(0);
            let st = StallSummary::of(&out);
            let stats = out
                .iter()
                .filter_map(|r| r.stats.as_ref())
                .collect::<Vec<_>>();
            println!(
                "EXPLORE {:<11} {:<48} ms {} (median {:.0}); max stall {:.0} µs (less CPU \
                 waits {:.0}); {}; {}; {}",
                pattern.name(),
                cfg.label(pattern == Pattern::WorkingSet),
                fmt_list(ms),
                median(ms),
                st.max_us,
                st.max_unexplained_us,
                st.describe(),
                st.cpu_wait(),
                serve_summary(&stats)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration of ours
// ---------------------------------------------------------------------------

/// How ours is configured. The default is what a VMM would run on this
/// machine: fault-around 512 KiB, two workers sleeping in `poll` (busy
/// polling would take both CPUs from the vCPU), no background fill of
/// everything (`prefetch_all` competes with the faults for the 2 CPUs and
/// made every pattern slower), threads left where the scheduler puts them.
/// `GMEM_BENCH_RESTORE_OURS` (e.g. `window=262144,workers=1,all=1,busy=0,
/// pin=1`) overrides it for investigation.
#[derive(Clone, Debug)]
struct OursConfig {
    /// `fault_around` in bytes.
    window: u64,
    workers: usize,
    /// `prefetch_all`: fill every remaining page in the background.
    prefetch_all: bool,
    busy_poll: bool,
    /// Pin the vCPU to CPU 1 and the server's threads to CPU 0.
    pin: bool,
}

impl OursConfig {
    fn from_env() -> OursConfig {
        OursConfig::parse(&std::env::var("GMEM_BENCH_RESTORE_OURS").unwrap_or_default())
    }

    /// The default, changed by `key=value` pairs separated by commas.
    fn parse(s: &str) -> OursConfig {
        let mut c = OursConfig {
            window: 512 << 10,
            workers: 2,
            prefetch_all: false,
            busy_poll: false,
            pin: false,
        };
        for kv in s.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').expect("key=value");
            let n: u64 = v.parse().expect("a number");
            match k {
                "window" => c.window = n,
                "workers" => c.workers = n as usize,
                "all" => c.prefetch_all = n != 0,
                "busy" => c.busy_poll = n != 0,
                "pin" => c.pin = n != 0,
                _ => panic!("unknown configuration key {k}"),
            }
        }
        c
    }

    fn label(&self, working_set: bool) -> String {
        format!(
            "serve: fault_around {} KiB (adaptive), {} worker(s){}{}{}{}",
            self.window >> 10,
            self.workers,
            if working_set {
                ", prefetch(recorded working set)"
            } else {
                ""
            },
            if self.prefetch_all {
                ", prefetch_all"
            } else {
                ""
            },
            if self.busy_poll { ", busy_poll" } else { "" },
            if self.pin { ", pinned" } else { "" },
        )
    }
}

// ---------------------------------------------------------------------------
// Patterns
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    Sequential,
    Random,
    WorkingSet,
}

/// The baseline of the time rows, and of the stall rows.
const BASELINE_TIME: &str = "Firecracker example handler (libc, 1 thread, 4 KiB COPY per fault)";
const BASELINE_STALL: &str = "Firecracker example handler";

impl Pattern {
    const ALL: [Pattern; 3] = [Pattern::Sequential, Pattern::Random, Pattern::WorkingSet];

    /// The cases of its two rows: the time to restore, the worst stall.
    fn cases(self, mib: usize) -> [String; 2] {
        let name = self.name();
        [
            format!("restore {mib} MiB, {name}: until all touched pages correct"),
            format!("restore {mib} MiB, {name}: max stall of the vCPU"),
        ]
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::WorkingSet => "working set",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Pattern::Sequential => "every page in ascending order",
            Pattern::Random => "a uniform random permutation of all pages, fixed seed",
            Pattern::WorkingSet => {
                "hot set = 10% of the 64 KiB clusters (fixed seed), touched first, clusters in \
                 random order, pages within a cluster ascending; then all other pages in \
                 uniform random order"
            }
        }
    }

    /// The touch order (page indices) and how many of its first entries
    /// are the hot set (working set only; 0 otherwise).
    fn order(self, pages: usize) -> (Vec<u32>, usize) {
        let all: Vec<u32> = (0..pages as u32).collect();
        match self {
            Pattern::Sequential => (all, 0),
            Pattern::Random => {
                let mut v = all;
                shuffle(&mut v, 0x5eed_0001);
                (v, 0)
            }
            Pattern::WorkingSet => {
                let clusters = pages / CLUSTER;
                let mut c: Vec<u32> = (0..clusters as u32).collect();
                shuffle(&mut c, 0x5eed_0002);
                let hot_clusters = &c[..clusters / 10];
                let mut is_hot = vec![false; pages];
                let mut v = Vec::with_capacity(pages);
                for &k in hot_clusters {
                    let first = k as usize * CLUSTER;
                    is_hot[first..first + CLUSTER].fill(true);
                    v.extend(first as u32..(first + CLUSTER) as u32);
                }
                let hot = v.len();
                let mut rest: Vec<u32> =
                    (0..pages as u32).filter(|&p| !is_hot[p as usize]).collect();
                shuffle(&mut rest, 0x5eed_0003);
                v.extend(rest);
                (v, hot)
            }
        }
    }
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// The snapshot
// ---------------------------------------------------------------------------

/// The snapshot file (already unlinked) and a populated read-only mapping
/// of it: the baseline's source and the reference for verification.
struct Snapshot {
    file: File,
    ptr: *const u8,
    len: usize,
}

impl Snapshot {
    fn create(len: usize) -> Snapshot {
        let path = std::path::PathBuf::from("/var/tmp")
            .join(format!("gmem-bench-restore-{}.snap", std::process::id()));
        let mut f = File::create(&path).expect("create the snapshot file in /var/tmp");
        let chunk = 8 << 20;
        let mut buf = vec![0u8; chunk];
        let mut word = 0u64;
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            for w in buf[..n].chunks_exact_mut(8) {
                w.copy_from_slice(&splitmix(0x736e_6170_0000_0000 ^ word).to_le_bytes());
                word += 1;
            }
            f.write_all(&buf[..n]).expect("write the snapshot");
            done += n;
        }
        f.sync_all().expect("fsync the snapshot");
        drop(f);
        let file = File::open(&path).expect("open the snapshot");
        std::fs::remove_file(&path).expect("unlink the snapshot");
        // SAFETY: a fresh read-only private mapping of a file we hold open,
        // populated now (as Firecracker's example handlers do).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap(snapshot)");
        Snapshot {
            file,
            ptr: p.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a read-only mapping of `len` bytes, alive while `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Ours' page source: serve's own `MappedFile` over the same file, its
    /// mapping populated like the baseline's.
    fn page_source(&self) -> Arc<dyn PageSource> {
        let m = MappedFile::from_file(self.file.try_clone().expect("dup the snapshot fd"))
            .expect("MappedFile");
        let p = m.as_ptr(0, self.len as u64).expect("the whole file");
        // SAFETY: advice on the MappedFile's own read-only mapping (the
        // whole of it); it only faults pages in and changes no contents.
        let r = unsafe { libc::madvise(p.cast_mut().cast(), self.len, libc::MADV_POPULATE_READ) };
        assert_eq!(r, 0, "MADV_POPULATE_READ on the page source");
        Arc::new(m)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), self.len) };
    }
}

/// Guest memory as Firecracker maps it.
struct Guest {
    addr: u64,
    len: usize,
}

impl Guest {
    fn new(len: usize) -> Guest {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap(guest memory)");
        Guest {
            addr: p as u64,
            len,
        }
    }

    /// Compares every page in `pages` with the snapshot. Call only once the
    /// handler is gone and its userfaultfd closed (a missing page then reads
    /// as zeroes instead of blocking).
    fn verify(&self, snap: &Snapshot, pages: &[u32], who: &str) {
        // SAFETY: our own mapping of `len` bytes; no other thread accesses
        // it any more (the vCPU is this thread, the handler has stopped).
        let g = unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) };
        let s = snap.bytes();
        for &p in pages {
            let o = p as usize * PAGE;
            if g[o..o + PAGE] != s[o..o + PAGE] {
                let got = u64::from_le_bytes(g[o..o + 8].try_into().unwrap());
                let want = u64::from_le_bytes(s[o..o + 8].try_into().unwrap());
                panic!(
                    "{who}: guest page {p} differs from the snapshot (first word {got:#x}, \
                     expected {want:#x})"
                );
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing uses it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

// ---------------------------------------------------------------------------
// The vCPU
// ---------------------------------------------------------------------------

struct RunResult {
    total: Duration,
    /// Per-touch time, ns, in touch order.
    per_touch: Vec<u32>,
    /// (seconds since the handler's start, touches done).
    progress: Vec<(f64, f64)>,
    /// Touches over [`SLOW_NS`].
    slow: Vec<Slow>,
    /// The vCPU's run_delay over the whole run, ns.
    run_delay: u64,
    /// The handler threads' run_delay over the run (summed), ns.
    handler_delay: u64,
    stats: Option<Stats>,
}

/// Pins this process's threads whose name starts with `prefix` to `cpu`.
fn pin_threads(prefix: &str, cpu: usize) {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for e in dir.filter_map(|e| e.ok()) {
        if !std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)) {
            continue;
        }
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET writes
        // in bounds (cpu < CPU_SETSIZE); sched_setaffinity reads the set.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Lets the calling thread run on every CPU again.
fn unpin() {
    // SAFETY: as in `pin_threads`, for the calling thread (tid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Touches slower than this are attributed: how much of them the vCPU
/// spent waiting for a CPU.
const SLOW_NS: u32 = 200_000;

/// A thread's scheduler statistics (`/proc/.../schedstat`: time on a CPU,
/// time runnable but waiting for one, slices), kept open.
struct SchedStat {
    file: File,
    /// The last value read (a thread that has exited reads as this).
    last: std::cell::Cell<u64>,
}

impl SchedStat {
    fn open(path: &std::path::Path) -> Option<SchedStat> {
        let s = SchedStat {
            file: File::open(path).ok()?,
            last: std::cell::Cell::new(0),
        };
        s.run_delay();
        Some(s)
    }

    /// The calling thread's.
    fn this_thread() -> Option<SchedStat> {
        SchedStat::open("/proc/thread-self/schedstat".as_ref())
    }

    /// Those of this process's threads whose name starts with `prefix`.
    fn threads(prefix: &str) -> Vec<SchedStat> {
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
            })
            .filter_map(|e| SchedStat::open(&e.path().join("schedstat")))
            .collect()
    }

    /// Nanoseconds the thread has spent runnable on a run queue, waiting
    /// for a CPU.
    fn run_delay(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 96];
        let n = self.file.read_at(&mut b, 0).unwrap_or(0);
        if let Some(v) = std::str::from_utf8(&b[..n])
            .ok()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
        {
            self.last.set(v);
        }
        self.last.get()
    }
}

struct Touches {
    end: Instant,
    per_touch: Vec<u32>,
    progress: Vec<(f64, f64)>,
    slow: Vec<Slow>,
    run_delay: u64,
    handler_delay: u64,
}

/// A touch over [`SLOW_NS`] and the CPU waits since the previous one.
#[derive(Clone, Copy)]
struct Slow {
    ns: u32,
    /// ns the vCPU spent runnable but not running (schedstat run_delay).
    vcpu_wait: u64,
    /// ns the handler threads spent so, summed.
    handler_wait: u64,
}

impl Slow {
    /// The part explained by no CPU wait, of the vCPU or of a handler.
    fn unexplained(&self) -> u64 {
        (self.ns as u64).saturating_sub(self.vcpu_wait + self.handler_wait)
    }
}

/// Reads the first word of every page in `order`, timing each touch.
/// `handler` is the name prefix of the threads that serve the faults (for
/// their scheduler statistics).
fn touch(base: u64, order: &[u32], t0: Instant, handler: &str) -> Touches {
    let sched = SchedStat::this_thread();
    let delay = || sched.as_ref().map_or(0, SchedStat::run_delay);
    let handlers = SchedStat::threads(handler);
    let handler_delay = || handlers.iter().map(SchedStat::run_delay).sum::<u64>();
    let mut per_touch = Vec::with_capacity(order.len());
    let mut progress = Vec::with_capacity(order.len() / PROGRESS_EVERY + 2);
    let mut slow = Vec::new();
    let first_delay = delay();
    let first_handler_delay = handler_delay();
    let mut last_delay = first_delay;
    let mut last_handler_delay = first_handler_delay;
    let mut sink = 0u64;
    let mut prev = Instant::now();
    progress.push(((prev - t0).as_secs_f64(), 0.0));
    for (i, &p) in order.iter().enumerate() {
        let addr = (base + p as u64 * PAGE as u64) as *const u64;
        // SAFETY: `addr` lies in the registered guest mapping, which stays
        // mapped for the run; a missing page blocks this thread until the
        // handler fills it.
        sink ^= unsafe { addr.read_volatile() };
        let mut now = Instant::now();
        let ns = (now - prev).as_nanos().min(u32::MAX as u128) as u32;
        per_touch.push(ns);
        if ns > SLOW_NS {
            let (d, h) = (delay(), handler_delay());
            slow.push(Slow {
                ns,
                vcpu_wait: d.saturating_sub(last_delay),
                handler_wait: h.saturating_sub(last_handler_delay),
            });
            (last_delay, last_handler_delay) = (d, h);
            // The read is not part of the next touch.
            now = Instant::now();
        }
        prev = now;
        if (i + 1) % PROGRESS_EVERY == 0 || i + 1 == order.len() {
            progress.push(((now - t0).as_secs_f64(), (i + 1) as f64));
        }
    }
    std::hint::black_box(sink);
    Touches {
        end: prev,
        per_touch,
        progress,
        slow,
        run_delay: delay().saturating_sub(first_delay),
        handler_delay: handler_delay().saturating_sub(first_handler_delay),
    }
}

// ---------------------------------------------------------------------------
// Ours
// ---------------------------------------------------------------------------

fn run_ours(
    snap: &Snapshot,
    source: &Arc<dyn PageSource>,
    order: &[u32],
    cfg: &OursConfig,
    prefetch: Vec<u64>,
    record: bool,
) -> RunResult {
    let guest = Guest::new(snap.len);
    let uffd = Uffd::builder()
        .non_blocking(true)
        .create()
        .expect("userfaultfd");
    // SAFETY: the guest mapping is ours, no reference points into it, and it
    // stays mapped until after the server (and with it the uffd) is gone.
    unsafe {
        uffd.register(
            guest.addr..guest.addr + guest.len as u64,
            RegisterMode::MISSING,
        )
    }
    .expect("UFFDIO_REGISTER MISSING");
    let t0 = Instant::now();
    let mut b = Server::builder(uffd)
        .region(Region::new(guest.addr, guest.len as u64))
        .source_arc(source.clone())
        .fault_around(cfg.window)
        .workers(cfg.workers)
        .busy_poll(cfg.busy_poll)
        .record(record);
    if !prefetch.is_empty() {
        b = b.prefetch(prefetch);
    }
    if cfg.prefetch_all {
        b = b.prefetch_all(true);
    }
    let server = b.spawn().expect("Server::spawn");
    if cfg.pin {
        pin_threads("uffd-", 0);
        harness::pin_to(1);
    }
    let t = touch(guest.addr, order, t0, "uffd-");
    let stats = server.shutdown().expect("Server::shutdown");
    if cfg.pin {
        unpin();
    }
    assert!(
        stats.errors.is_empty(),
        "serve reported errors: {:?}",
        stats.errors
    );
    guest.verify(snap, order, "ours");
    RunResult {
        total: t.end - t0,
        per_touch: t.per_touch,
        progress: t.progress,
        slow: t.slow,
        run_delay: t.run_delay,
        handler_delay: t.handler_delay,
        stats: Some(stats),
    }
}

fn serve_summary(stats: &[&Stats]) -> String {
    let n = stats.len().max(1) as f64;
    let avg = |f: &dyn Fn(&Stats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>() as f64 / n;
    let worst = stats
        .iter()
        .map(|s| s.max_latency)
        .max()
        .unwrap_or_default();
    let p99 = stats
        .iter()
        .filter_map(|s| s.latency_quantile(0.99))
        .max()
        .unwrap_or_default();
    format!(
        "per run on average {:.0} faults read, {:.0} pages copied ({:.0} prefetched), {:.0} \
         EEXIST; serve's own fault-to-resolution latency p99 <= {:?}, max {:?}",
        avg(&|s| s.faults),
        avg(&|s| s.pages_copied),
        avg(&|s| s.pages_prefetched),
        avg(&|s| s.eexist),
        p99,
        worst
    )
}

// ---------------------------------------------------------------------------
// The baseline: Firecracker's example handler, on libc
// ---------------------------------------------------------------------------

fn run_baseline(snap: &Snapshot, order: &[u32]) -> RunResult {
    let guest = Guest::new(snap.len);
    let uffd = harness::raw::uffd(0);
    let mut reg = sys::uffdio_register {
        range: sys::uffdio_range {
            start: guest.addr,
            len: guest.len as u64,
        },
        mode: sys::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: the request encodes `uffdio_register`; the range is our guest
    // mapping, which no reference points into and which stays mapped until
    // after the userfaultfd is closed.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut reg) };
    assert_eq!(r, 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
    // SAFETY: eventfd takes only integers.
    let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(stop >= 0, "eventfd");
    // SAFETY: eventfd returned a new descriptor that nobody else owns.
    let stop = unsafe { OwnedFd::from_raw_fd(stop) };
    let (ufd, sfd) = (uffd.as_raw_fd(), stop.as_raw_fd());
    let (src, host, len) = (snap.ptr as u64, guest.addr, guest.len as u64);
    let t0 = Instant::now();
    let handler = std::thread::Builder::new()
        .name("fc-example-handler".into())
        .spawn(move || baseline_handler(ufd, sfd, src, host, len))
        .expect("spawn the handler");
    let t = touch(guest.addr, order, t0, "fc-example");
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one` to the eventfd.
    unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
    let faults = handler.join().expect("the handler panicked");
    assert!(faults > 0);
    drop(uffd);
    drop(stop);
    guest.verify(snap, order, "baseline");
    RunResult {
        total: t.end - t0,
        per_touch: t.per_touch,
        progress: t.progress,
        slow: t.slow,
        run_delay: t.run_delay,
        handler_delay: t.handler_delay,
        stats: None,
    }
}

/// The handler's loop: `poll`, `read` one event, `UFFDIO_COPY` one page.
/// Returns the faults served when `stop` becomes readable.
fn baseline_handler(uffd: i32, stop: i32, src: u64, host: u64, len: u64) -> u64 {
    let mut faults = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR),
                "poll"
            );
            continue;
        }
        if fds[1].revents != 0 {
            return faults;
        }
        assert_eq!(
            fds[0].revents & libc::POLLERR,
            0,
            "POLLERR on the userfaultfd"
        );
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: an all-zero uffd_msg is a valid value.
        let mut msg: sys::uffd_msg = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<sys::uffd_msg>();
        // SAFETY: `msg` is writable for `size` bytes.
        let n = unsafe { libc::read(uffd, (&mut msg as *mut sys::uffd_msg).cast(), size) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                e => panic!("read(userfaultfd): errno {e:?}"),
            }
        }
        assert_eq!(n as usize, size, "short read from the userfaultfd");
        if msg.event != sys::UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let arg = msg.arg;
        // SAFETY: a PAGEFAULT message carries the `pagefault` member.
        let addr = unsafe { arg.pagefault.address } & !(PAGE as u64 - 1);
        assert!(
            addr >= host && addr < host + len,
            "fault outside guest memory"
        );
        loop {
            let mut copy = sys::uffdio_copy {
                dst: addr,
                src: src + (addr - host),
                len: PAGE as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: the request encodes `uffdio_copy`; `src` points at
            // PAGE readable bytes of the snapshot mapping, `dst` at a page
            // of the registered guest memory.
            let r = unsafe { libc::ioctl(uffd, sys::UFFDIO_COPY as _, &mut copy) };
            if r == 0 {
                break;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EEXIST) => break,
                Some(libc::EAGAIN | libc::EINTR) => continue,
                e => panic!("UFFDIO_COPY at {addr:#x}: errno {e:?}"),
            }
        }
        faults += 1;
    }
}

// ---------------------------------------------------------------------------
// Summaries
// ---------------------------------------------------------------------------

fn median_run(runs: &[RunResult]) -> &RunResult {
    let mut idx: Vec<usize> = (0..runs.len()).collect();
    idx.sort_by_key(|&i| runs[i].total);
    &runs[idx[(idx.len() - 1) / 2]]
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

struct StallSummary {
    /// The longest touch, µs.
    max_us: f64,
    /// The longest touch's CPU waits over its interval, µs: the vCPU's and
    /// the handler threads' (summed).
    max_vcpu_wait_us: f64,
    max_handler_wait_us: f64,
    /// The longest touch less every CPU wait over its interval, µs (a touch
    /// under [`SLOW_NS`] counts whole).
    max_unexplained_us: f64,
    /// Touches over 1 ms per run, and those of them that CPU waits explain
    /// at least half of.
    over_1ms: f64,
    over_1ms_cpu_bound: f64,
    /// CPU waits per run, ms: the vCPU's, the handler threads'.
    run_delay_ms: f64,
    handler_delay_ms: f64,
    stalled_per_run: f64,
    stalled_p50_us: f64,
    stalled_p99_us: f64,
    all_p50_us: f64,
    all_p99_us: f64,
}

impl StallSummary {
    fn of(runs: &[RunResult]) -> StallSummary {
        let all: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.per_touch.iter().map(|&ns| ns as f64 / 1e3))
            .collect();
        let stalled: Vec<f64> = all
            .iter()
            .copied()
            .filter(|&us| us > STALL_NS as f64 / 1e3)
            .collect();
        let n = runs.len().max(1) as f64;
        let slow: Vec<Slow> = runs.iter().flat_map(|r| r.slow.iter().copied()).collect();
        let worst = slow.iter().max_by_key(|s| s.ns).copied();
        let over: Vec<&Slow> = slow.iter().filter(|s| s.ns > 1_000_000).collect();
        let fast_max = runs
            .iter()
            .flat_map(|r| r.per_touch.iter().copied().filter(|&ns| ns <= SLOW_NS))
            .max()
            .unwrap_or(0) as u64;
        let unexplained = slow.iter().map(Slow::unexplained).max().unwrap_or(0);
        let us = |ns: u64| ns as f64 / 1e3;
        StallSummary {
            max_us: all.iter().copied().fold(0.0, f64::max),
            max_vcpu_wait_us: worst.map_or(0.0, |w| us(w.vcpu_wait.min(w.ns as u64))),
            max_handler_wait_us: worst.map_or(0.0, |w| us(w.handler_wait)),
            max_unexplained_us: us(unexplained.max(fast_max)),
            over_1ms: over.len() as f64 / n,
            over_1ms_cpu_bound: over
                .iter()
                .filter(|s| s.unexplained() * 2 <= s.ns as u64)
                .count() as f64
                / n,
            run_delay_ms: runs.iter().map(|r| r.run_delay).sum::<u64>() as f64 / n / 1e6,
            handler_delay_ms: runs.iter().map(|r| r.handler_delay).sum::<u64>() as f64 / n / 1e6,
            stalled_per_run: stalled.len() as f64 / n,
            stalled_p50_us: quantile(&stalled, 0.5),
            stalled_p99_us: quantile(&stalled, 0.99),
            all_p50_us: quantile(&all, 0.5),
            all_p99_us: quantile(&all, 0.99),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} stalled touches per run, p50 {:.1} µs, p99 {:.1} µs",
            self.stalled_per_run, self.stalled_p50_us, self.stalled_p99_us
        )
    }

    /// How much of the stalls CPU waits explain.
    fn cpu_wait(&self) -> String {
        format!(
            "worst touch {:.0} µs, over which the vCPU sat runnable waiting for a CPU {:.0} µs \
             and the handler threads {:.0} µs; longest touch not explained by CPU waits {:.0} \
             µs; {:.1} touches over 1 ms per run, {:.1} of them at least half CPU waits; per \
             run the vCPU waited {:.1} ms for a CPU, the handler threads {:.1} ms",
            self.max_us,
            self.max_vcpu_wait_us,
            self.max_handler_wait_us,
            self.max_unexplained_us,
            self.over_1ms,
            self.over_1ms_cpu_bound,
            self.run_delay_ms,
            self.handler_delay_ms
        )
    }
}
