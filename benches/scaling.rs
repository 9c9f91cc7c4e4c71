//! Fault throughput against the number of faulting threads: N threads each
//! touch their own disjoint chunk of an anonymous mapping registered MISSING,
//! and every fault is resolved with one `UFFDIO_COPY` of one 4 KiB page
//! (fault-around off). Three handler set-ups do the same work:
//!
//! - (a) one userfaultfd for all threads, one raw libc handler thread
//!   (`poll` + `read` + `UFFDIO_COPY`): the baseline;
//! - (b) one userfaultfd per faulting thread (registered on its chunk), each
//!   with its own raw libc handler thread;
//! - (c) a `uffd_gmem::serve::Server` on one userfaultfd with
//!   `min(N, CPUs)` workers.
//!
//! The metric is faults per second: all faults of a pass divided by the wall
//! time from the first faulting thread's start to the last one's end (the
//! threads start together at a barrier; handlers are started before and
//! stopped after the timed part). Faulting thread `i` is pinned to the
//! `i % CPUs`-th CPU this process may use (its affinity mask); handler
//! threads are not pinned. N runs over 1, 2, 4, 8, 16 up to the number of
//! usable CPUs (larger counts are reported as skipped with the reason): the
//! larger counts are meant for a 16-core machine and are never required in
//! CI.
//!
//! Rows per N: (b) and (c) against (a), and (c) against (b): serve's pool
//! on one userfaultfd against one userfaultfd per thread, goal at least
//! 0.95x the per-thread set-up's faults/s.
//!
//! Every pass checks the value each touch read and, afterwards, the first
//! 8 bytes of every touched page, and that the handlers served exactly one
//! fault per page. `GMEM_BENCH_VERBOSE=1` prints every pass.

#[path = "harness/mod.rs"]
mod harness;

use harness::{Bench, Map, Row, Series, Target, Unit, raw};
use kvm_gmem_sys as sys;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uffd_gmem::serve::{PageSource, Region, Server, WakePolicy};
use uffd_gmem::{RegisterMode, Uffd};

const PAGE: usize = 4096;
const THREADS: [usize; 5] = [1, 2, 4, 8, 16];
const SAMPLES: usize = 5;
/// A pass that takes longer than this is stuck: the process exits.
const PASS_DEADLINE: Duration = Duration::from_secs(60);

/// The handler set-ups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// (a) one userfaultfd, one raw handler.
    Shared,
    /// (b) one userfaultfd and one raw handler per faulting thread.
    PerThread,
    /// (c) serve's worker pool on one userfaultfd (default wake policy).
    Serve,
    /// (d) the same with `WakePolicy::Exclusive`: one worker woken per event.
    ServeExclusive,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Setup::Shared => "(a) shared uffd, 1 raw handler",
            Setup::PerThread => "(b) uffd per thread, raw handler each",
            Setup::Serve => "(c) serve::Server worker pool, 1 uffd",
            Setup::ServeExclusive => "(d) serve::Server worker pool, 1 uffd, WakePolicy::Exclusive",
        }
    }
}

/// The first 8 bytes of source page `i`.
fn word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// One thread count's memory: the page source and the registered range.
struct Mem {
    threads: usize,
    per_thread: usize,
    src: Arc<Vec<u8>>,
    dst: Map,
}

impl Mem {
    fn new(threads: usize, per_thread: usize) -> Mem {
        let pages = threads * per_thread;
        let mut src = vec![0u8; pages * PAGE];
        for (i, p) in src.chunks_exact_mut(PAGE).enumerate() {
            p[..8].copy_from_slice(&word(i).to_ne_bytes());
            p[PAGE - 8..].copy_from_slice(&(!word(i)).to_ne_bytes());
        }
        Mem {
            threads,
            per_thread,
            src: Arc::new(src),
            dst: Map::anon(pages * PAGE),
        }
    }

    fn pages(&self) -> usize {
        self.threads * self.per_thread
    }

    fn chunk_len(&self) -> usize {
        self.per_thread * PAGE
    }
}

// ---------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
/// Milliseconds since `STARTED` after which the current pass is stuck (0:
/// disarmed).
static DEADLINE_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    STARTED.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn start_watchdog() {
    let _ = STARTED.get_or_init(Instant::now);
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let d = DEADLINE_MS.load(Ordering::Acquire);
                if d != 0 && now_ms() > d {
                    eprintln!(
                        "scaling: a pass took longer than {PASS_DEADLINE:?}: a handler is \
                         stuck; exiting"
                    );
                    std::process::exit(2);
                }
            }
        })
        .expect("spawn the watchdog");
}

// ---------------------------------------------------------------------------
// Raw handlers
// ---------------------------------------------------------------------------

/// The raw libc handler: poll + read + UFFDIO_COPY of the page at the same
/// offset of the source (`src` and `dst` are the starts of the range this
/// userfaultfd covers). Returns the faults served.
fn raw_handler(fd: OwnedFd, wake: OwnedFd, dst: usize, src: usize) -> u64 {
    let uffd = fd.as_raw_fd();
    let mut msgs = [sys::uffd_msg::default(); 64];
    let mut served = 0;
    while raw::poll_both(uffd, wake.as_raw_fd()) {
        // SAFETY: `msgs` is a writable buffer of its size.
        let n = unsafe { libc::read(uffd, msgs.as_mut_ptr().cast(), size_of_val(&msgs)) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                _ => panic!("read(userfaultfd): {e}"),
            }
        }
        for m in &msgs[..n as usize / size_of::<sys::uffd_msg>()] {
            if m.event != sys::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            // SAFETY: a PAGEFAULT record carries the pagefault member.
            let addr = unsafe { m.arg.pagefault.address } as usize & !(PAGE - 1);
            let mut a = sys::uffdio_copy {
                dst: addr as u64,
                src: (src + (addr - dst)) as u64,
                len: PAGE as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY takes a uffdio_copy; the source page is
            // readable and the destination registered on this userfaultfd.
            let r = unsafe { libc::ioctl(uffd, sys::UFFDIO_COPY as _, &mut a) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EEXIST),
                    "UFFDIO_COPY at {addr:#x}: {e}"
                );
                let mut range = sys::uffdio_range {
                    start: addr as u64,
                    len: PAGE as u64,
                };
                // SAFETY: UFFDIO_WAKE takes a uffdio_range.
                unsafe { libc::ioctl(uffd, sys::UFFDIO_WAKE as _, &mut range) };
            }
            served += 1;
        }
    }
    served
}

/// A raw handler thread and the eventfd that stops it.
struct RawHandler {
    wake: OwnedFd,
    thread: JoinHandle<u64>,
}

impl RawHandler {
    fn start(dst: usize, len: usize, src: usize) -> RawHandler {
        let fd = raw::uffd(0);
        raw::register(&fd, dst, len, sys::UFFDIO_REGISTER_MODE_MISSING);
        let wake = raw::eventfd();
        // A second descriptor of the same eventfd, owned by the handler.
        let w = wake.try_clone().expect("dup(eventfd)");
        let thread = std::thread::Builder::new()
            .name("raw-handler".into())
            .spawn(move || raw_handler(fd, w, dst, src))
            .expect("spawn a raw handler");
        RawHandler { wake, thread }
    }

    /// Stops the handler (which closes its userfaultfd); returns the faults
    /// it served.
    fn stop(self) -> u64 {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one` to our eventfd.
        let r = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(r, 8, "write(eventfd): {}", std::io::Error::last_os_error());
        self.thread.join().expect("a raw handler panicked")
    }
}

/// The running handlers of one pass.
enum Running {
    Raw(Vec<RawHandler>),
    Serve(Server),
}

impl Running {
    fn start(setup: Setup, mem: &Mem, workers: usize) -> Running {
        let dst = mem.dst.addr;
        let src = mem.src.as_ptr() as usize;
        match setup {
            Setup::Shared => Running::Raw(vec![RawHandler::start(dst, mem.pages() * PAGE, src)]),
            Setup::PerThread => Running::Raw(
                (0..mem.threads)
                    .map(|t| {
                        let off = t * mem.chunk_len();
                        RawHandler::start(dst + off, mem.chunk_len(), src + off)
                    })
                    .collect(),
            ),
            Setup::Serve | Setup::ServeExclusive => {
                let len = mem.pages() * PAGE;
                let uffd = Uffd::builder()
                    .non_blocking(true)
                    .create()
                    .expect("uffd-gmem: Uffd::builder().create()");
                // SAFETY: a mapping of this bench that no Rust reference
                // points into; it outlives the server (stopped at the end of
                // the pass).
                unsafe { uffd.register(dst as u64..(dst + len) as u64, RegisterMode::MISSING) }
                    .expect("uffd-gmem: UFFDIO_REGISTER");
                let source: Arc<dyn PageSource> = mem.src.clone();
                let server = Server::builder(uffd)
                    .region(Region::new(dst as u64, len as u64).resolve_copy())
                    .source_arc(source)
                    .fault_around(0)
                    .workers(workers)
                    .wake_policy(if setup == Setup::ServeExclusive {
                        WakePolicy::Exclusive
                    } else {
                        WakePolicy::All
                    })
                    .spawn()
                    .expect("serve: spawn");
                Running::Serve(server)
            }
        }
    }

    /// Stops every handler; returns the faults served.
    fn stop(self) -> u64 {
        match self {
            Running::Raw(hs) => hs.into_iter().map(RawHandler::stop).sum(),
            Running::Serve(server) => {
                let stats = server.shutdown().expect("serve: shutdown");
                assert!(
                    stats.errors.is_empty(),
                    "serve reported errors: {:?}",
                    stats.errors
                );
                stats.faults
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One pass
// ---------------------------------------------------------------------------

/// Runs one pass of `setup`: every faulting thread touches each page of its
/// chunk once. Returns faults per second.
fn pass(setup: Setup, mem: &Mem, cpus: &[usize], workers: usize) -> f64 {
    mem.dst.zap();
    DEADLINE_MS.store(
        now_ms() + PASS_DEADLINE.as_millis() as u64,
        Ordering::Release,
    );
    let running = Running::start(setup, mem, workers);
    let barrier = Arc::new(Barrier::new(mem.threads));
    let faulters: Vec<JoinHandle<(Instant, Instant, usize)>> = (0..mem.threads)
        .map(|t| {
            let barrier = barrier.clone();
            let base = mem.dst.addr + t * mem.chunk_len();
            let first = t * mem.per_thread;
            let n = mem.per_thread;
            let cpu = cpus[t % cpus.len()];
            std::thread::Builder::new()
                .name(format!("faulter-{t}"))
                .spawn(move || {
                    harness::pin_to(cpu);
                    barrier.wait();
                    let mut wrong = 0;
                    let t0 = Instant::now();
                    for i in 0..n {
                        // SAFETY: inside the registered mapping, which no
                        // Rust reference points into; the read faults and
                        // waits for the handler.
                        let v = unsafe { std::ptr::read_volatile((base + i * PAGE) as *const u64) };
                        wrong += usize::from(v != word(first + i));
                    }
                    (t0, Instant::now(), wrong)
                })
                .expect("spawn a faulting thread")
        })
        .collect();
    let mut start: Option<Instant> = None;
    let mut end: Option<Instant> = None;
    for (t, h) in faulters.into_iter().enumerate() {
        let (t0, t1, wrong) = h.join().expect("a faulting thread panicked");
        assert_eq!(
            wrong, 0,
            "{setup:?}: thread {t} read {wrong} wrong first words"
        );
        start = Some(start.map_or(t0, |s| s.min(t0)));
        end = Some(end.map_or(t1, |e| e.max(t1)));
    }
    let served = running.stop();
    DEADLINE_MS.store(0, Ordering::Release);
    let pages = mem.pages();
    assert_eq!(
        served, pages as u64,
        "{setup:?}, {} threads: served {served} faults for {pages} pages",
        mem.threads
    );
    for i in 0..pages {
        let p = mem.dst.addr + i * PAGE;
        // SAFETY: mapped by the handler; no Rust reference points into it.
        let (head, tail) = unsafe {
            (
                std::ptr::read_volatile(p as *const u64),
                std::ptr::read_volatile((p + PAGE - 8) as *const u64),
            )
        };
        assert_eq!(head, word(i), "{setup:?}: wrong first word in page {i}");
        assert_eq!(tail, !word(i), "{setup:?}: wrong last word in page {i}");
    }
    let elapsed = end.expect("threads") - start.expect("threads");
    pages as f64 / elapsed.as_secs_f64()
}

fn main() {
    start_watchdog();
    let mut bench = Bench::new("scaling");
    let per_thread = harness::size(16384, 256);
    let allowed = harness::allowed_cpus();
    let cpus = allowed.len();
    let uffd = harness::userfaultfd();
    let case = |n: usize| format!("fault throughput, {n} faulting thread(s), MISSING+COPY anon");
    let setups = [
        Setup::Shared,
        Setup::PerThread,
        Setup::Serve,
        Setup::ServeExclusive,
    ];
    let mut points: [Vec<(f64, f64)>; 4] = Default::default();
    for n in THREADS {
        let skip = match &uffd {
            Err(why) => Some(why.clone()),
            Ok(()) if n > cpus => Some(format!(
                "needs {n} CPUs, this process may use {cpus} (the case is meant for a 16-core \
                 machine)"
            )),
            Ok(()) => None,
        };
        if let Some(why) = skip {
            for ours in &setups[1..] {
                bench.skip(case(n), Setup::Shared.label(), ours.label(), &why);
            }
            for ours in [Setup::Serve, Setup::ServeExclusive] {
                bench.skip(case(n), Setup::PerThread.label(), ours.label(), &why);
            }
            continue;
        }
        let mem = Mem::new(n, per_thread);
        let workers = n.min(cpus);
        let mut a = || pass(Setup::Shared, &mem, &allowed, workers);
        let mut b = || pass(Setup::PerThread, &mem, &allowed, workers);
        let mut c = || pass(Setup::Serve, &mem, &allowed, workers);
        let mut d = || pass(Setup::ServeExclusive, &mem, &allowed, workers);
        let r = harness::interleaved(SAMPLES, &mut [&mut a, &mut b, &mut c, &mut d]);
        if std::env::var_os("GMEM_BENCH_VERBOSE").is_some() {
            eprintln!(
                "{n} thread(s): passes (faults/s) a {:.0?} b {:.0?} c {:.0?} d {:.0?}",
                r[0], r[1], r[2], r[3]
            );
        }
        let med: Vec<f64> = r.iter().map(|v| harness::median(v)).collect();
        for (i, m) in med.iter().enumerate() {
            points[i].push((n as f64, *m));
        }
        let note = format!(
            "median of {SAMPLES} interleaved passes (after one warm-up round); {n} faulting \
             thread(s) x {per_thread} pages each (disjoint chunks, one 4 KiB UFFDIO_COPY per \
             fault, fault-around off); faults/s = all faults / wall time from the first thread's \
             start to the last one's end; faulting thread i pinned to CPU {allowed:?}[i % \
             {cpus}], handlers unpinned; handler threads: (a) 1, (b) {n}, (c) and (d) {workers} serve \
             worker(s), (c) WakePolicy::All (the default), (d) WakePolicy::Exclusive; medians \
             faults/s: (a) {:.0}, (b) {:.0}, (c) {:.0}, (d) {:.0}",
            med[0], med[1], med[2], med[3]
        );
        for (i, setup) in [(1, Setup::PerThread), (2, Setup::Serve)] {
            bench.row(Row {
                case: case(n),
                baseline: Setup::Shared.label().into(),
                baseline_value: med[0],
                ours: setup.label().into(),
                ours_value: med[i],
                unit: Unit::OpsPerSec,
                target: None,
                note: note.clone(),
            });
        }
        bench.row(Row {
            case: case(n),
            baseline: Setup::PerThread.label().into(),
            baseline_value: med[1],
            ours: Setup::Serve.label().into(),
            ours_value: med[2],
            unit: Unit::OpsPerSec,
            target: Some(Target::min(
                0.95,
                "serve's pool >= 0.95x one uffd per thread",
            )),
            note: format!(
                "{note}; serve's {workers} worker(s) on one userfaultfd against {n} userfaultfd(s) \
                 with a raw handler each, speed-up = (c) / (b)"
            ),
        });
        bench.row(Row {
            case: case(n),
            baseline: Setup::PerThread.label().into(),
            baseline_value: med[1],
            ours: Setup::ServeExclusive.label().into(),
            ours_value: med[3],
            unit: Unit::OpsPerSec,
            target: None,
            note: format!(
                "{note}; the wake policies compared: one worker woken per event (EPOLLEXCLUSIVE) \
                 against every worker (the default), speed-up = (d) / (b)"
            ),
        });
    }
    for (setup, pts) in setups.into_iter().zip(points) {
        bench.series(Series {
            plot: "scaling".into(),
            label: setup.label().into(),
            x_label: "faulting threads".into(),
            y_label: "faults/s".into(),
            points: pts,
        });
    }
    bench.finish();
}
