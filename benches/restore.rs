//! Lazy restore of a 1 GiB snapshot (`GMEM_BENCH_QUICK`: 64 MiB) into guest
//! memory, every candidate with its threads pinned, in two placements.
//!
//! The snapshot file is written once per bench run in `/var/tmp` (a disk
//! filesystem, not tmpfs), `fsync`ed, opened and unlinked at once (so it
//! is removed even if the bench fails); its page cache stays warm, and the
//! copying candidates' source mappings are populated (`MAP_POPULATE` /
//! `MADV_POPULATE_READ`) before any run, so disk reads and faults on the
//! source are excluded. The same bytes are also written into a shmem memfd
//! (the zero-copy candidates' snapshot, its page cache full).
//!
//! A faulting thread (the "vCPU", this process's main thread) reads the
//! first 8 bytes of each page in an access pattern, taking a timestamp after
//! every touch. A run's time is from the handler's start (thread spawn or
//! `Server::spawn`) to the completion of the last touch; afterwards the
//! handler is stopped, its userfaultfd closed, and every touched page is
//! compared whole with the snapshot (a page left missing would read as
//! zeroes): any difference panics. For the zero-copy candidates (whose
//! pages would read correctly from the page cache even unresolved) every
//! touched page must also be mapped (`/proc/self/pagemap`) before the
//! userfaultfd is closed, i.e. resolved by the handler.
//!
//! Placement (`sched_setaffinity`, for every candidate): the vCPU runs on
//! the first CPU this process may use, the handler threads either on the
//! same CPU ("same CPU") or on the second one ("other CPU"; reported as
//! skipped with fewer than 2 usable CPUs). Handler threads are created
//! while the creating thread is pinned to the handler CPU (they inherit
//! it), and serve's threads are pinned again by name after `spawn`.
//!
//! Candidates, interleaved per pattern and placement:
//! - Baseline: Firecracker's example on-demand handler algorithm, on libc:
//!   one thread, `poll` + `read` of one fault, one 4 KiB `UFFDIO_COPY` from
//!   the mapped file per fault, nothing else; guest memory anonymous
//!   `MAP_PRIVATE | MAP_NORESERVE`, registered MISSING.
//! - Ours, COPY mode: `uffd_gmem::serve::Server` over a `MappedFile` of the
//!   snapshot, same guest memory: fault-around 512 KiB (aligned for random
//!   faults, growing along sequential streaks), two workers, and for the
//!   working-set pattern `prefetch` of the recorded working set.
//! - The bulk bound: one thread (on the vCPU's CPU) resolves the same bytes
//!   with `UFFDIO_COPY` in 2 MiB chunks (`DONTWAKE`) into a fresh anonymous
//!   mapping registered MISSING, while nothing faults: the cost of the copy
//!   itself. Rows give ours against it as a speed-up, bound / ours (above 1
//!   would be faster than the bound).
//! - Zero-copy: guest memory is a fresh `MAP_SHARED` mapping
//!   (`HostMapping::file`) of the snapshot memfd, registered MINOR, served
//!   by `serve::Server` with `Region::continue_prefilled` and no page
//!   source: each fault is answered with `UFFDIO_CONTINUE` alone (no copy:
//!   the page cache already holds the data), with COPY mode's
//!   configuration (fault-around, workers, and for the working-set pattern
//!   `prefetch` of the recorded working set).
//! - Zero-copy, private: the same over a `MAP_PRIVATE` mapping of the memfd
//!   (clones of one snapshot); skipped with the errno where the kernel
//!   refuses MINOR registration or `UFFDIO_CONTINUE` on it.
//!
//! Stalls: the time of each touch (most take well under a microsecond). The
//! quantiles are taken over the touches that stalled (over 2 µs: they waited
//! on a fault) and over all touches. Every touch over 200 µs is attributed:
//! the vCPU's and the handler threads' schedstat `run_delay` (time runnable
//! but waiting for a CPU) over its interval is read, outside the timed
//! touches, so a note can say how much of the worst stalls is CPU
//! contention. The goal is a longest stall of at most 1 ms.
//!
//! Knobs for investigation (not used by a plain run):
//! `GMEM_BENCH_RESTORE_OURS=window=262144,workers=1,all=1,busy=0` changes
//! ours' configuration; `GMEM_BENCH_RESTORE_EXPLORE="cfg;cfg;..."` runs only
//! those configurations of ours against each other, interleaved, and prints
//! one line per pattern, placement and configuration.
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

use harness::{Bench, Row, Series, Target, Unit, interleaved, median, quantile, raw};
use kvm_gmem_sys as sys;
use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uffd_gmem::serve::{MappedFile, PageSource, Region, Server, Stats};
use uffd_gmem::{Event, Features, HostMapping, Mode, RegisterMode, Uffd};

const PAGE: usize = 4096;
/// A touch that took longer than this waited on a fault (a touch of a
/// present page takes well under a microsecond, a userfaultfd round trip
/// several).
const STALL_NS: u32 = 2_000;
/// Progress is sampled for the plot every this many touches.
const PROGRESS_EVERY: usize = 1024;
/// Pages per working-set cluster (64 KiB).
const CLUSTER: usize = 16;
/// The bulk bound's `UFFDIO_COPY` size.
const CHUNK: usize = 2 << 20;
/// The goal for the longest stall of the vCPU, µs.
const STALL_GOAL_US: f64 = 1000.0;

/// The baseline of the time rows, and of the stall rows.
const BASELINE_TIME: &str = "Firecracker example handler (libc, 1 thread, 4 KiB COPY per fault)";
const BASELINE_STALL: &str = "Firecracker example handler";
const BULK: &str = "bulk bound: 1 thread, UFFDIO_COPY 2 MiB chunks, no faults";
const ZC_SHARED: &str = "zero-copy: serve, MAP_SHARED memfd registered MINOR, \
                         Region::continue_prefilled (UFFDIO_CONTINUE only, no source), COPY \
                         mode's fault_around, workers and prefetch";
const ZC_PRIVATE: &str = "zero-copy: serve, MAP_PRIVATE memfd registered MINOR, \
                          Region::continue_prefilled (UFFDIO_CONTINUE only, no source), COPY \
                          mode's fault_around, workers and prefetch";

fn main() {
    let size = harness::size(1 << 30, 64 << 20);
    let samples = harness::size(4, 2);
    let mut bench = Bench::new("restore");
    let cfg = OursConfig::from_env();
    let mib = size >> 20;
    let allowed = harness::allowed_cpus();
    if let Err(why) = harness::userfaultfd() {
        for pattern in Pattern::ALL {
            for placement in Placement::ALL {
                let c = Cases::new(mib, pattern, placement);
                c.skip_all(&mut bench, &cfg.label(pattern == Pattern::WorkingSet), &why);
            }
        }
        bench.finish();
        return;
    }

    let t = Instant::now();
    let snap = Snapshot::create(size);
    let source: Arc<dyn PageSource> = snap.page_source();
    let zc = ZeroCopySnap::create(&snap);
    let zc_shared = zc.probe(true);
    let zc_private = zc.probe(false);
    bench.note(format!(
        "restore: snapshot of {} MiB written to /var/tmp, fsynced, unlinked once open, page \
         cache warm, source mappings populated before the runs (disk reads excluded), and \
         written into a shmem memfd for the zero-copy candidates; set up in {:.1} s; COPY-mode \
         guest memory is a fresh anonymous MAP_PRIVATE|MAP_NORESERVE mapping registered MISSING \
         per run, zero-copy guest memory a fresh mapping of the memfd registered MINOR per run; \
         every touched page is compared whole with the snapshot after each run (zero-copy: and \
         must be mapped before the userfaultfd is closed); {samples} measured runs per candidate, \
         pattern and placement, interleaved after a warm-up; medians. Placement: the vCPU is \
         pinned to CPU {}, the handler threads to the same CPU or to CPU {} (sched_setaffinity); \
         the machine's CPUs are shared with other jobs, so figures are noisy",
        size >> 20,
        t.elapsed().as_secs_f64(),
        allowed[0],
        allowed
            .get(1)
            .map_or("(none: other-CPU rows skipped)".into(), |c| c.to_string()),
    ));
    bench.note(
        "ratios: speed-up = baseline / ours for times (above 1: ours faster). Against the bulk \
         bound the row's baseline is the bound, so speed-up = bound ms / ours ms and the goal \
         ours <= 1.0x the bound is a speed-up >= 1.0; zero-copy rows have serve's COPY mode as \
         their baseline (goal >= 2x faster); the stall rows' goal is absolute (ours <= 1000 µs), \
         their baseline the Firecracker handler's longest stall for reference",
    );
    for (what, r) in [("MAP_SHARED", &zc_shared), ("MAP_PRIVATE", &zc_private)] {
        match r {
            Ok(()) => bench.note(format!(
                "zero-copy {what}: MINOR registration and UFFDIO_CONTINUE on a {what} mapping of \
                 the shmem memfd work on this kernel (probed on one page)"
            )),
            Err(e) => bench.note(format!("zero-copy {what}: not available: {e}")),
        }
    }
    let pages = size / PAGE;
    if let Ok(list) = std::env::var("GMEM_BENCH_RESTORE_EXPLORE") {
        explore(&snap, &source, pages, samples, &list, &allowed);
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
            let place = Placement::SameCpu.place(&allowed).expect("one CPU");
            let rec = run_ours(
                &snap,
                &source,
                &order[..hot],
                &rec_cfg,
                Vec::new(),
                true,
                place,
            );
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
                 same CPU, hot set only: {} pages, {} faults, {:.0} ms)",
                prefetch.len(),
                stats.faults,
                rec.total.as_secs_f64() * 1e3
            );
        }
        for placement in Placement::ALL {
            let cases = Cases::new(mib, pattern, placement);
            let ours_label = cfg.label(pattern == Pattern::WorkingSet);
            let place = match placement.place(&allowed) {
                Ok(p) => p,
                Err(why) => {
                    cases.skip_all(&mut bench, &ours_label, &why);
                    continue;
                }
            };
            let m = measure(
                &snap,
                &source,
                &zc,
                &order,
                &cfg,
                &prefetch,
                place,
                samples,
                zc_shared.is_ok(),
                zc_private.is_ok(),
            );
            report(
                &mut bench,
                &cases,
                pattern,
                placement,
                place,
                &ours_label,
                &m,
                &pattern_note,
                order.len(),
                (&zc_shared, &zc_private),
            );
        }
    }
    harness::pin_tid_to_set(0, &allowed);
    drop(source);
    drop(zc);
    drop(snap);
    bench.finish();
}

// ---------------------------------------------------------------------------
// One pattern and placement
// ---------------------------------------------------------------------------

/// The rows' cases of one pattern and placement.
struct Cases {
    time: String,
    bulk: String,
    zc_shared: String,
    zc_private: String,
    stall: String,
    stall_zc: String,
}

impl Cases {
    fn new(mib: usize, pattern: Pattern, placement: Placement) -> Cases {
        let p = format!(
            "restore {mib} MiB, {}, {}",
            pattern.name(),
            placement.name()
        );
        Cases {
            time: format!("{p}: until all touched pages correct"),
            bulk: format!("{p}: against the bulk bound"),
            zc_shared: format!("{p}: zero-copy (MAP_SHARED) vs COPY"),
            zc_private: format!("{p}: zero-copy (MAP_PRIVATE) vs COPY"),
            stall: format!("{p}: max stall of the vCPU"),
            stall_zc: format!("{p}: max stall of the vCPU, zero-copy"),
        }
    }

    /// Skips every row, for `why`.
    fn skip_all(&self, bench: &mut Bench, ours: &str, why: &str) {
        bench.skip(&self.time, BASELINE_TIME, ours, why);
        bench.skip(&self.bulk, BULK, ours, why);
        bench.skip(&self.zc_shared, ours, ZC_SHARED, why);
        bench.skip(&self.zc_private, ours, ZC_PRIVATE, why);
        bench.skip(&self.stall, BASELINE_STALL, ours, why);
        bench.skip(&self.stall_zc, BASELINE_STALL, ZC_SHARED, why);
    }
}

/// The runs of one pattern and placement: per candidate its times (ms, in
/// run order, warm-up dropped) and its runs.
struct Measured {
    base_ms: Vec<f64>,
    ours_ms: Vec<f64>,
    bulk_ms: Vec<f64>,
    zc_ms: Vec<f64>,
    zcp_ms: Vec<f64>,
    base: Vec<RunResult>,
    ours: Vec<RunResult>,
    zc: Vec<RunResult>,
    zcp: Vec<RunResult>,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    snap: &Snapshot,
    source: &Arc<dyn PageSource>,
    zc: &ZeroCopySnap,
    order: &[u32],
    cfg: &OursConfig,
    prefetch: &[u64],
    place: Place,
    samples: usize,
    shared_ok: bool,
    private_ok: bool,
) -> Measured {
    let runs: [RefCell<Vec<RunResult>>; 4] = Default::default();
    let [base_runs, ours_runs, zc_runs, zcp_runs] = &runs;
    let ms = |r: RunResult, out: &RefCell<Vec<RunResult>>| {
        let v = r.total.as_secs_f64() * 1e3;
        out.borrow_mut().push(r);
        v
    };
    let mut baseline = || ms(run_baseline(snap, order, place), base_runs);
    let mut ours = || {
        ms(
            run_ours(snap, source, order, cfg, prefetch.to_vec(), false, place),
            ours_runs,
        )
    };
    let mut bulk = || run_bulk(snap, place).as_secs_f64() * 1e3;
    let zero_copy = |shared| run_zero_copy(snap, zc, order, cfg, prefetch.to_vec(), shared, place);
    let mut zero = || ms(zero_copy(true), zc_runs);
    let mut zero_p = || ms(zero_copy(false), zcp_runs);
    let mut cands: Vec<&mut dyn FnMut() -> f64> = vec![&mut baseline, &mut ours, &mut bulk];
    if shared_ok {
        cands.push(&mut zero);
    }
    if private_ok {
        cands.push(&mut zero_p);
    }
    let mut v = interleaved(samples, &mut cands).into_iter();
    let mut next = || v.next().unwrap_or_default();
    let (base_ms, ours_ms, bulk_ms) = (next(), next(), next());
    let zc_ms = if shared_ok { next() } else { Vec::new() };
    let zcp_ms = if private_ok { next() } else { Vec::new() };
    drop(cands);
    // Drop the warm-up runs.
    let [base, ours, zc, zcp] = runs.map(|r| {
        let mut r = r.into_inner();
        if !r.is_empty() {
            r.remove(0);
        }
        r
    });
    Measured {
        base_ms,
        ours_ms,
        bulk_ms,
        zc_ms,
        zcp_ms,
        base,
        ours,
        zc,
        zcp,
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    bench: &mut Bench,
    cases: &Cases,
    pattern: Pattern,
    placement: Placement,
    place: Place,
    ours_label: &str,
    m: &Measured,
    pattern_note: &str,
    touches: usize,
    (zc_shared, zc_private): (&Result<(), String>, &Result<(), String>),
) {
    let where_ = format!(
        "vCPU on CPU {}, handler threads on CPU {}",
        place.vcpu, place.handler
    );
    let (b_ms, o_ms, bulk_ms) = (median(&m.base_ms), median(&m.ours_ms), median(&m.bulk_ms));
    let b_st = StallSummary::of(&m.base);
    let o_st = StallSummary::of(&m.ours);
    let stats = m
        .ours
        .iter()
        .filter_map(|r| r.stats.as_ref())
        .collect::<Vec<_>>();
    let serve_note = serve_summary(&stats);
    let target = match pattern {
        Pattern::Sequential => Target::min(10.0, "ours >= 10x faster than the baseline"),
        _ => Target::min(6.0, "ours >= 6x faster than the baseline"),
    };
    bench.row(Row {
        case: cases.time.clone(),
        baseline: BASELINE_TIME.into(),
        baseline_value: b_ms,
        ours: ours_label.into(),
        ours_value: o_ms,
        unit: Unit::Ms,
        target: Some(target),
        note: format!(
            "{where_}; {touches} touches ({}); ms from handler start to the last touch's \
             completion, median of {} (ours {}, baseline {}); ours: {serve_note}{pattern_note}",
            pattern.describe(),
            m.ours_ms.len(),
            fmt_list(&m.ours_ms),
            fmt_list(&m.base_ms),
        ),
    });
    bench.row(Row {
        case: cases.bulk.clone(),
        baseline: BULK.into(),
        baseline_value: bulk_ms,
        ours: ours_label.into(),
        ours_value: o_ms,
        unit: Unit::Ms,
        target: Some(Target::min(1.0, "ours <= 1.0x the bulk bound")),
        note: format!(
            "{where_}; speed-up = bound / ours = {:.3} (ours takes {:.2}x the bound); the bound: \
             every page of the snapshot copied by one thread (pinned to the vCPU's CPU) with \
             UFFDIO_COPY in 2 MiB chunks into a fresh anonymous mapping registered MISSING, \
             nothing faulting, ms of the copy loop, median of {} ({}) interleaved with the \
             other candidates; zero-copy (MAP_SHARED) against the same bound: {}",
            bulk_ms / o_ms,
            o_ms / bulk_ms,
            m.bulk_ms.len(),
            fmt_list(&m.bulk_ms),
            if m.zc_ms.is_empty() {
                "not run".to_string()
            } else {
                let z = median(&m.zc_ms);
                format!("{z:.0} ms, {:.2}x the bound", z / bulk_ms)
            },
        ),
    });
    for (case, label, ms, runs, probe) in [
        (&cases.zc_shared, ZC_SHARED, &m.zc_ms, &m.zc, zc_shared),
        (&cases.zc_private, ZC_PRIVATE, &m.zcp_ms, &m.zcp, zc_private),
    ] {
        if let Err(why) = probe {
            bench.skip(case, ours_label, label, why);
            continue;
        }
        let st = StallSummary::of(runs);
        bench.row(Row {
            case: case.clone(),
            baseline: ours_label.into(),
            baseline_value: o_ms,
            ours: label.into(),
            ours_value: median(ms),
            unit: Unit::Ms,
            target: Some(Target::min(2.0, "zero-copy >= 2x faster than COPY mode")),
            note: format!(
                "{where_}; the snapshot's bytes sit in the memfd's page cache (written once, \
                 before the runs); per run a fresh mapping of it, registered MINOR, and a \
                 serve::Server without a page source, its region continue_prefilled: each fault \
                 UFFDIO_CONTINUE of the faulting page, then of the rest of its fault-around \
                 window, configured as COPY mode ({ours_label}); median of {} ({}), COPY mode's \
                 {}; serve: {}; max stall {:.0} µs, {}",
                ms.len(),
                fmt_list(ms),
                fmt_list(&m.ours_ms),
                zc_summary(runs),
                st.max_us,
                st.describe(),
            ),
        });
    }
    let mut stall_row = |case: &String, ours: &str, st: &StallSummary, runs: usize| {
        bench.row(Row {
            case: case.clone(),
            baseline: BASELINE_STALL.into(),
            baseline_value: b_st.max_us,
            ours: ours.into(),
            ours_value: st.max_us,
            unit: Unit::UsPerOp,
            target: Some(Target::at_most(STALL_GOAL_US, "ours <= 1000 µs (absolute)")),
            note: format!(
                "{where_}; the longest single touch over all {runs} measured runs; less the CPU \
                 waits over its interval (schedstat run_delay of the vCPU and the handler \
                 threads), ours' longest is {:.0} µs, the baseline's {:.0} µs. Per-touch times \
                 over the touches that stalled (> {} µs, i.e. waited on a fault), pooled over the \
                 runs: ours {}; baseline {}. Over all touches: ours p50 {:.2} µs, p99 {:.1} µs; \
                 baseline p50 {:.2} µs, p99 {:.1} µs. CPU waits: ours {}; baseline {}",
                st.max_unexplained_us,
                b_st.max_unexplained_us,
                STALL_NS / 1000,
                st.describe(),
                b_st.describe(),
                st.all_p50_us,
                st.all_p99_us,
                b_st.all_p50_us,
                b_st.all_p99_us,
                st.cpu_wait(),
                b_st.cpu_wait(),
            ),
        });
    };
    stall_row(&cases.stall, ours_label, &o_st, m.ours.len());
    match zc_shared {
        Ok(()) => stall_row(
            &cases.stall_zc,
            ZC_SHARED,
            &StallSummary::of(&m.zc),
            m.zc.len(),
        ),
        Err(why) => bench.skip(&cases.stall_zc, BASELINE_STALL, ZC_SHARED, why),
    }
    let plot = format!(
        "restore-{}-{}",
        pattern.name().replace(' ', "-"),
        placement.name().replace(' ', "-")
    );
    for (label, runs) in [
        ("baseline: Firecracker example handler".to_string(), &m.base),
        (format!("ours: {ours_label}"), &m.ours),
        ("zero-copy (MAP_SHARED)".to_string(), &m.zc),
    ] {
        if runs.is_empty() {
            continue;
        }
        bench.series(Series {
            plot: plot.clone(),
            label,
            x_label: "seconds since start".into(),
            y_label: "pages restored (touched pages done)".into(),
            points: median_run(runs).progress.clone(),
        });
    }
}

/// Compares configurations of ours (`;`-separated, as for
/// `GMEM_BENCH_RESTORE_OURS`) with each other, interleaved, without the
/// baseline, and prints one line per pattern, placement and configuration.
fn explore(
    snap: &Snapshot,
    source: &Arc<dyn PageSource>,
    pages: usize,
    samples: usize,
    list: &str,
    allowed: &[usize],
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
        for placement in Placement::ALL {
            let Ok(place) = placement.place(allowed) else {
                continue;
            };
            let runs: Vec<RefCell<Vec<RunResult>>> =
                cfgs.iter().map(|_| Default::default()).collect();
            let mut fns: Vec<Box<dyn FnMut() -> f64 + '_>> = cfgs
                .iter()
                .zip(&runs)
                .map(|(cfg, out)| {
                    let (order, prefetch) = (&order, &prefetch);
                    Box::new(move || {
                        let r = run_ours(snap, source, order, cfg, prefetch.clone(), false, place);
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
                    "EXPLORE {:<11} {:<9} {:<48} ms {} (median {:.0}); max stall {:.0} µs (less \
                     CPU waits {:.0}); {}; {}; {}",
                    pattern.name(),
                    placement.name(),
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
}

// ---------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------

/// Where the handler threads run relative to the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    /// On the vCPU's CPU.
    SameCpu,
    /// On another CPU.
    OtherCpu,
}

/// The CPUs of one run.
#[derive(Clone, Copy, Debug)]
struct Place {
    vcpu: usize,
    handler: usize,
}

impl Placement {
    const ALL: [Placement; 2] = [Placement::SameCpu, Placement::OtherCpu];

    fn name(self) -> &'static str {
        match self {
            Placement::SameCpu => "same CPU",
            Placement::OtherCpu => "other CPU",
        }
    }

    /// The CPUs, from those this process may run on (ascending); `Err` says
    /// why the placement cannot be had.
    fn place(self, allowed: &[usize]) -> Result<Place, String> {
        let first = *allowed.first().ok_or("no CPU in the affinity mask")?;
        match self {
            Placement::SameCpu => Ok(Place {
                vcpu: first,
                handler: first,
            }),
            Placement::OtherCpu => match allowed.get(1) {
                Some(&second) => Ok(Place {
                    vcpu: first,
                    handler: second,
                }),
                None => Err(format!(
                    "needs 2 CPUs (handlers on another CPU than the vCPU); this process may run \
                     on {} CPU(s) ({allowed:?})",
                    allowed.len()
                )),
            },
        }
    }
}

impl Place {
    /// Pins the calling thread to the handler CPU (threads it creates now
    /// inherit it).
    fn enter_handler(&self) {
        assert!(
            harness::pin_to(self.handler),
            "sched_setaffinity(CPU {})",
            self.handler
        );
    }

    /// Pins the calling thread (the vCPU) to the vCPU's CPU.
    fn enter_vcpu(&self) {
        assert!(
            harness::pin_to(self.vcpu),
            "sched_setaffinity(CPU {})",
            self.vcpu
        );
    }
}

// ---------------------------------------------------------------------------
// Configuration of ours
// ---------------------------------------------------------------------------

/// How ours is configured. The default is what a VMM would run on this
/// machine: fault-around 512 KiB, two workers sleeping in `poll` (busy
/// polling would take both CPUs from the vCPU), no background fill of
/// everything (`prefetch_all` competes with the faults for the 2 CPUs and
/// made every pattern slower). `GMEM_BENCH_RESTORE_OURS` (e.g.
/// `window=262144,workers=1,all=1,busy=0`) overrides it for investigation.
#[derive(Clone, Debug)]
struct OursConfig {
    /// `fault_around` in bytes.
    window: u64,
    workers: usize,
    /// `prefetch_all`: fill every remaining page in the background.
    prefetch_all: bool,
    busy_poll: bool,
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
        };
        for kv in s.split(',').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').expect("key=value");
            let n: u64 = v.parse().expect("a number");
            match k {
                "window" => c.window = n,
                "workers" => c.workers = n as usize,
                "all" => c.prefetch_all = n != 0,
                "busy" => c.busy_poll = n != 0,
                _ => panic!("unknown configuration key {k}"),
            }
        }
        c
    }

    fn label(&self, working_set: bool) -> String {
        format!(
            "serve COPY: fault_around {} KiB (adaptive), {} worker(s){}{}{}",
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

impl Pattern {
    const ALL: [Pattern; 3] = [Pattern::Sequential, Pattern::Random, Pattern::WorkingSet];

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
        verify_pages(self.addr, self.len, snap, pages, who);
    }
}

/// Compares every page in `pages` of the `len` bytes at `addr` (guest
/// memory no other thread accesses any more, no userfaultfd registered)
/// with the snapshot.
fn verify_pages(addr: u64, len: usize, snap: &Snapshot, pages: &[u32], who: &str) {
    // SAFETY: a mapping of `len` bytes owned by the caller; no other thread
    // accesses it any more (the vCPU is this thread, the handler has
    // stopped) and nothing changes it while the slice lives.
    let g = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
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

impl Touches {
    /// The run's result, timed from `t0`.
    fn result(self, t0: Instant, stats: Option<Stats>) -> RunResult {
        RunResult {
            total: self.end - t0,
            per_touch: self.per_touch,
            progress: self.progress,
            slow: self.slow,
            run_delay: self.run_delay,
            handler_delay: self.handler_delay,
            stats,
        }
    }
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
    place: Place,
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
    place.enter_handler();
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
    // serve's threads inherited the handler CPU; pin them by name as well,
    // in case a thread was started by another one.
    harness::pin_threads("uffd-", place.handler);
    place.enter_vcpu();
    let t = touch(guest.addr, order, t0, "uffd-");
    let stats = server.shutdown().expect("Server::shutdown");
    assert!(
        stats.errors.is_empty(),
        "serve reported errors: {:?}",
        stats.errors
    );
    guest.verify(snap, order, "ours");
    t.result(t0, Some(stats))
}

fn serve_summary(stats: &[&Stats]) -> String {
    let n = stats.len().max(1) as f64;
    let avg = |f: &dyn Fn(&Stats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>() as f64 / n;
    // Timed runs leave serve's latency clock off (`record(false)`, the
    // fast path); the vCPU's stalls above are the latency that counts.
    let latency = match stats.iter().filter_map(|s| s.latency_quantile(0.99)).max() {
        Some(p99) => {
            let worst = stats
                .iter()
                .map(|s| s.max_latency)
                .max()
                .unwrap_or_default();
            format!("serve's own fault-to-resolution latency p99 <= {p99:?}, max {worst:?}")
        }
        None => "serve's own latency not recorded (record(false))".to_string(),
    };
    format!(
        "per run on average {:.0} faults read, {:.0} pages copied ({:.0} prefetched), {:.0} \
         EEXIST; {latency}",
        avg(&|s| s.faults),
        avg(&|s| s.pages_copied),
        avg(&|s| s.pages_prefetched),
        avg(&|s| s.eexist),
    )
}

// ---------------------------------------------------------------------------
// Zero-copy: MINOR + UFFDIO_CONTINUE on a memfd whose page cache is full
// ---------------------------------------------------------------------------

/// The snapshot's bytes in a shmem memfd (its page cache full), owned by a
/// shared mapping of it that nothing registers.
struct ZeroCopySnap {
    mem: HostMapping,
}

impl ZeroCopySnap {
    fn create(snap: &Snapshot) -> ZeroCopySnap {
        let mem = HostMapping::memfd("gmem-bench-restore-snapshot", snap.len)
            .expect("HostMapping::memfd");
        let fd = mem.memfd_fd().expect("a memfd mapping").as_raw_fd();
        let src = snap.bytes();
        let mut done = 0;
        while done < src.len() {
            let n = (1 << 20).min(src.len() - done);
            // SAFETY: `src[done..done + n]` is readable; pwrite only reads it.
            let w =
                unsafe { libc::pwrite(fd, src[done..].as_ptr().cast(), n, done as libc::off_t) };
            assert!(
                w > 0,
                "pwrite(snapshot memfd): {}",
                std::io::Error::last_os_error()
            );
            done += w as usize;
        }
        ZeroCopySnap { mem }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.mem.memfd_fd().expect("a memfd mapping")
    }

    /// A fresh mapping of the whole memfd (no page mapped yet) and a
    /// userfaultfd with it registered MINOR.
    fn guest(&self, len: usize, shared: bool) -> Result<(HostMapping, Uffd), String> {
        let what = if shared { "MAP_SHARED" } else { "MAP_PRIVATE" };
        let map = HostMapping::file(self.fd(), 0, len, shared)
            .map_err(|e| format!("mmap of the memfd, {what}: {e}"))?;
        let uffd = Uffd::builder()
            .non_blocking(true)
            .require_features(Features::MINOR_SHMEM)
            .create()
            .map_err(|e| format!("userfaultfd with MINOR_SHMEM: {e}"))?;
        uffd.register_mapping(&map, RegisterMode::MINOR)
            .map_err(|e| {
                format!(
                    "UFFDIO_REGISTER MINOR on a {what} shmem mapping refused on Linux {}: {e}",
                    harness::kernel_release()
                )
            })?;
        Ok((map, uffd))
    }

    /// Whether MINOR registration and `UFFDIO_CONTINUE` work on a `shared`
    /// or private mapping of the memfd: one page, touched by a thread,
    /// continued here.
    fn probe(&self, shared: bool) -> Result<(), String> {
        harness::userfaultfd()?;
        let (map, uffd) = self.guest(PAGE, shared)?;
        let want = {
            let mut w = [0u8; 8];
            // SAFETY: the memfd's own unregistered mapping, at least a page.
            unsafe { std::ptr::copy_nonoverlapping(self.mem.as_ptr(), w.as_mut_ptr(), 8) };
            u64::from_ne_bytes(w)
        };
        let base = map.addr();
        std::thread::scope(|s| {
            let toucher = s.spawn(|| {
                let mut b = [0u8; 8];
                map.read_at(0, &mut b).map(|()| u64::from_ne_bytes(b))
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut result = Err("no MINOR fault arrived within 10 s".to_string());
            'wait: while Instant::now() < deadline {
                if !uffd
                    .poll_readable(Duration::from_millis(100))
                    .map_err(|e| e.to_string())?
                {
                    continue;
                }
                while let Some(ev) = uffd.read_event().map_err(|e| e.to_string())? {
                    if let Event::Pagefault { .. } = ev {
                        result = uffd
                            .r#continue(base..base + PAGE as u64, Mode::empty())
                            .map(drop)
                            .map_err(|e| {
                                format!(
                                    "UFFDIO_CONTINUE on a {} shmem mapping refused on Linux {}: \
                                     {e}",
                                    if shared { "MAP_SHARED" } else { "MAP_PRIVATE" },
                                    harness::kernel_release()
                                )
                            });
                        break 'wait;
                    }
                }
            }
            if result.is_err() {
                // Let the toucher go: unregistered, the page maps from the
                // page cache.
                let _ = uffd.unregister(map.range());
            }
            let got = toucher.join().expect("the probe's toucher panicked");
            result?;
            match got {
                Ok(v) if v == want => Ok(()),
                Ok(v) => Err(format!(
                    "read {v:#x} through the mapping, expected {want:#x}"
                )),
                Err(e) => Err(format!("read through the mapping: {e}")),
            }
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn run_zero_copy(
    snap: &Snapshot,
    zc: &ZeroCopySnap,
    order: &[u32],
    cfg: &OursConfig,
    prefetch: Vec<u64>,
    shared: bool,
    place: Place,
) -> RunResult {
    let (map, uffd) = zc.guest(snap.len, shared).expect("zero-copy guest memory");
    let (base, len) = (map.addr(), map.len());
    place.enter_handler();
    let t0 = Instant::now();
    let mut b = Server::builder(uffd)
        .region(Region::new(base, len as u64).continue_prefilled())
        .fault_around(cfg.window)
        .workers(cfg.workers)
        .busy_poll(cfg.busy_poll);
    if !prefetch.is_empty() {
        b = b.prefetch(prefetch);
    }
    if cfg.prefetch_all {
        b = b.prefetch_all(true);
    }
    let server = b.spawn().expect("Server::spawn (zero-copy)");
    harness::pin_threads("uffd-", place.handler);
    place.enter_vcpu();
    let t = touch(base, order, t0, "uffd-");
    let what = if shared { "MAP_SHARED" } else { "MAP_PRIVATE" };
    // Every touched page was resolved by the server: it is mapped (pagemap
    // bit 63) while the userfaultfd is still open (the server holds it).
    let missing = unmapped_pages(base, len, order);
    assert_eq!(
        missing, 0,
        "zero-copy ({what}): {missing} touched pages are not mapped"
    );
    let stats = server.shutdown().expect("Server::shutdown");
    assert!(
        stats.errors.is_empty(),
        "serve (zero-copy, {what}) reported errors: {:?}",
        stats.errors
    );
    assert!(stats.faults > 0, "zero-copy ({what}): serve saw no fault");
    assert_eq!(
        (stats.pages_copied, stats.pages_zeroed),
        (0, 0),
        "zero-copy ({what}): serve copied"
    );
    verify_pages(base, len, snap, order, "zero-copy");
    let r = t.result(t0, Some(stats));
    drop(map);
    r
}

/// How many of the pages of `order` are not mapped in the mapping at `base`
/// (`/proc/self/pagemap`, bit 63: present).
fn unmapped_pages(base: u64, len: usize, order: &[u32]) -> usize {
    use std::os::unix::fs::FileExt;
    let f = File::open("/proc/self/pagemap").expect("open /proc/self/pagemap");
    let pages = len / PAGE;
    let mut raw = vec![0u8; pages * 8];
    let mut got = 0;
    while got < raw.len() {
        let n = f
            .read_at(&mut raw[got..], (base / PAGE as u64) * 8 + got as u64)
            .expect("read /proc/self/pagemap");
        assert!(n > 0, "short read of /proc/self/pagemap");
        got += n;
    }
    order
        .iter()
        .filter(|&&p| {
            let e = u64::from_ne_bytes(raw[p as usize * 8..p as usize * 8 + 8].try_into().unwrap());
            e >> 63 == 0
        })
        .count()
}

fn zc_summary(runs: &[RunResult]) -> String {
    let z: Vec<&Stats> = runs.iter().filter_map(|r| r.stats.as_ref()).collect();
    let n = z.len().max(1) as f64;
    let avg = |f: &dyn Fn(&Stats) -> u64| z.iter().map(|s| f(s)).sum::<u64>() as f64 / n;
    format!(
        "per run on average {:.0} faults read, {:.0} pages continued ({:.0} prefetched), {:.0} \
         copied, {:.0} EEXIST",
        avg(&|s| s.faults),
        avg(&|s| s.pages_continued),
        avg(&|s| s.pages_prefetched),
        avg(&|s| s.pages_copied),
        avg(&|s| s.eexist)
    )
}

// ---------------------------------------------------------------------------
// The bulk bound
// ---------------------------------------------------------------------------

/// Copies the whole snapshot into a fresh anonymous mapping registered
/// MISSING with `UFFDIO_COPY` in [`CHUNK`]s, one thread on the vCPU's CPU,
/// nothing faulting; returns the copy loop's time, after checking every
/// page.
fn run_bulk(snap: &Snapshot, place: Place) -> Duration {
    place.enter_vcpu();
    let guest = Guest::new(snap.len);
    let uffd = raw::uffd(0);
    raw::register(
        &uffd,
        guest.addr as usize,
        guest.len,
        sys::UFFDIO_REGISTER_MODE_MISSING,
    );
    let t0 = Instant::now();
    let mut off = 0usize;
    while off < snap.len {
        let n = CHUNK.min(snap.len - off);
        let mut c = sys::uffdio_copy {
            dst: guest.addr + off as u64,
            src: snap.ptr as u64 + off as u64,
            len: n as u64,
            mode: sys::UFFDIO_COPY_MODE_DONTWAKE,
            copy: 0,
        };
        // SAFETY: the request encodes `uffdio_copy`; `src` points at `n`
        // readable bytes of the snapshot mapping, `dst` at registered guest
        // memory nothing references.
        let r = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut c) };
        if r == 0 {
            off += n;
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) if c.copy > 0 => off += c.copy as usize,
            Some(libc::EAGAIN | libc::EINTR) => {}
            e => panic!("bulk UFFDIO_COPY at offset {off:#x}: errno {e:?}"),
        }
    }
    let d = t0.elapsed();
    drop(uffd);
    let all: Vec<u32> = (0..(snap.len / PAGE) as u32).collect();
    guest.verify(snap, &all, "bulk bound");
    d
}

// ---------------------------------------------------------------------------
// The baseline: Firecracker's example handler, on libc
// ---------------------------------------------------------------------------

fn run_baseline(snap: &Snapshot, order: &[u32], place: Place) -> RunResult {
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
    place.enter_handler();
    let t0 = Instant::now();
    let handler = std::thread::Builder::new()
        .name("fc-example-handler".into())
        .spawn(move || baseline_handler(ufd, sfd, src, host, len))
        .expect("spawn the handler");
    place.enter_vcpu();
    let t = touch(guest.addr, order, t0, "fc-example");
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one` to the eventfd.
    unsafe { libc::write(stop.as_fd().as_raw_fd(), (&one as *const u64).cast(), 8) };
    let faults = handler.join().expect("the handler panicked");
    assert!(faults > 0);
    drop(uffd);
    drop(stop);
    guest.verify(snap, order, "baseline");
    t.result(t0, None)
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
