//! Fault round trip: a faulting thread touches the pages of a registered
//! region one by one while a handler thread serves each fault with one
//! ioctl (fault-around off), so every candidate does the same work:
//!
//! - ours: a `uffd_gmem::serve::Server` with one worker;
//! - raw libc: `poll` + `read` + `ioctl` (or a spinning non-blocking `read`);
//! - userfaultfd-rs 0.9 (feature `linux5_13`): the same loop on its `Uffd`
//!   (needs feature `bench-userfaultfd-rs`; without it its rows are
//!   reported as skipped).
//!
//! Kinds: MISSING + `UFFDIO_COPY` on anonymous memory, and MINOR +
//! `UFFDIO_CONTINUE` on shmem whose page cache is populated beforehand. For
//! MINOR, `Resolve::Continue` of serve always refreshes the page cache from
//! the page source (a 4 KiB copy through the alias mapping) before
//! `UFFDIO_CONTINUE`; the baselines do the same copy, so the work matches.
//!
//! Handler modes: sleeping in `poll`, and busy-polling (non-blocking `read`
//! in a spin loop). Placements: both threads on CPU 0, or the faulting
//! thread on CPU 0 and the handler on CPU 1. The metric is the faulting
//! thread's wall time for the whole region divided by the faults; each row's
//! note adds the per-fault p50/p99 (timestamps around every touch), which is
//! the steadier figure on a shared machine.
//!
//! Every pass registers a fresh userfaultfd (serve's page bitmaps are per
//! server), so each candidate pays the same setup outside the timed part.
//! Development knobs: `GMEM_BENCH_FILTER=<substring of a case>` runs the
//! matching cases only, `GMEM_BENCH_VERBOSE=1` prints every pass.

#[path = "harness/mod.rs"]
mod harness;

use harness::{Bench, Map, Target, Unit, raw};
use kvm_gmem_sys as sys;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uffd_gmem::serve::{PageSource, Region, Server};
use uffd_gmem::{Features, RegisterMode, Uffd};

const PAGE: usize = 4096;
/// A sample that takes longer than this is stuck: the process exits.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// MISSING + UFFDIO_COPY on anonymous memory.
    Missing,
    /// MINOR + UFFDIO_CONTINUE on shmem.
    Minor,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Missing => "MISSING+COPY anon",
            Kind::Minor => "MINOR+CONTINUE shmem",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// The handler sleeps in poll.
    Poll,
    /// The handler spins on a non-blocking read.
    Busy,
}

/// A candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Imp {
    Ours,
    Raw,
    #[cfg(feature = "bench-userfaultfd-rs")]
    Rs,
}

impl Imp {
    fn label(self) -> &'static str {
        match self {
            Imp::Ours => "ours",
            Imp::Raw => "raw",
            #[cfg(feature = "bench-userfaultfd-rs")]
            Imp::Rs => "userfaultfd-rs",
        }
    }
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// One kind's memory: the page source, the registered range and, for
/// MINOR, the shmem file and its unregistered alias.
struct Setup {
    kind: Kind,
    pages: usize,
    src: Arc<Vec<u8>>,
    dst: Map,
    alias: Option<Map>,
    _memfd: Option<OwnedFd>,
}

fn word(i: usize) -> u64 {
    (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555
}

impl Setup {
    fn new(kind: Kind, pages: usize) -> Setup {
        let len = pages * PAGE;
        let mut src = vec![0u8; len];
        for (i, p) in src.chunks_exact_mut(PAGE).enumerate() {
            for (k, w) in p.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&word(i * 512 + k).to_ne_bytes());
            }
        }
        let src = Arc::new(src);
        match kind {
            Kind::Missing => Setup {
                kind,
                pages,
                src,
                dst: Map::anon(len),
                alias: None,
                _memfd: None,
            },
            Kind::Minor => {
                // SAFETY: a NUL-terminated name and flags.
                let raw =
                    unsafe { libc::memfd_create(c"gmem-fault-rtt".as_ptr(), libc::MFD_CLOEXEC) };
                assert!(
                    raw >= 0,
                    "memfd_create: {}",
                    std::io::Error::last_os_error()
                );
                // SAFETY: memfd_create returned a new descriptor nobody owns.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: ftruncate on our descriptor.
                let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) };
                assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
                let alias = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
                // Populate the page cache (and the alias's page tables).
                // SAFETY: `src` is `len` readable bytes; the alias is `len`
                // writable bytes of a mapping no Rust reference points into.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), alias.addr as *mut u8, len) };
                let dst = Map::new(len, libc::MAP_SHARED, fd.as_raw_fd());
                Setup {
                    kind,
                    pages,
                    src,
                    dst,
                    alias: Some(alias),
                    _memfd: Some(fd),
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.pages * PAGE
    }

    fn features(&self) -> u64 {
        match self.kind {
            Kind::Missing => 0,
            Kind::Minor => sys::UFFD_FEATURE_MINOR_SHMEM,
        }
    }

    fn alias_addr(&self) -> usize {
        self.alias.as_ref().map_or(0, |a| a.addr)
    }
}

// ---------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
/// Milliseconds since `STARTED` after which the current sample is stuck (0:
/// disarmed).
static DEADLINE_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    STARTED.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn arm(d: Duration) {
    DEADLINE_MS.store(now_ms() + d.as_millis() as u64, Ordering::Release);
}

fn disarm() {
    DEADLINE_MS.store(0, Ordering::Release);
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
                        "fault_rtt: a sample took longer than {SAMPLE_DEADLINE:?}: a handler is \
                         stuck; exiting"
                    );
                    std::process::exit(2);
                }
            }
        })
        .expect("spawn the watchdog");
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// A running handler of one candidate.
enum Running {
    Ours(Server),
    Thread {
        stop: Arc<AtomicBool>,
        wake: OwnedFd,
        thread: JoinHandle<u64>,
    },
}

impl Running {
    /// Stops the handler; returns the faults it served.
    fn stop(self) -> u64 {
        match self {
            Running::Ours(server) => {
                let stats = server.shutdown().expect("serve: shutdown");
                assert!(
                    stats.errors.is_empty(),
                    "serve reported errors: {:?}",
                    stats.errors
                );
                stats.faults
            }
            Running::Thread { stop, wake, thread } => {
                stop.store(true, Ordering::Release);
                let one: u64 = 1;
                // SAFETY: writes the 8 bytes of `one` to our eventfd.
                unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
                thread.join().expect("a baseline handler panicked")
            }
        }
    }
}

/// What a baseline handler needs to resolve a fault at `addr`.
#[derive(Clone, Copy)]
struct Work {
    kind: Kind,
    dst: usize,
    src: usize,
    alias: usize,
}

impl Work {
    /// The page-cache refresh of a MINOR fault: the same 4 KiB copy serve's
    /// `Resolve::Continue` with an alias does.
    fn refresh(&self, off: usize) {
        // SAFETY: `off` is a page offset inside the region: the source holds
        // it, and the alias is a writable shared mapping of the whole file.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.src + off) as *const u8,
                (self.alias + off) as *mut u8,
                PAGE,
            )
        };
    }
}

/// The raw libc handler: poll + read + ioctl (or a spinning read).
fn raw_handler(fd: OwnedFd, wake: i32, stop: &AtomicBool, wait: Wait, t: Work) -> u64 {
    let uffd = fd.as_raw_fd();
    let mut msgs = [sys::uffd_msg::default(); 64];
    let mut served = 0;
    loop {
        match wait {
            Wait::Poll => {
                if !raw::poll_both(uffd, wake) {
                    break;
                }
            }
            Wait::Busy => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        // SAFETY: `msgs` is a writable buffer of its size.
        let n = unsafe { libc::read(uffd, msgs.as_mut_ptr().cast(), size_of_val(&msgs)) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    std::hint::spin_loop();
                    continue;
                }
                _ => panic!("read(userfaultfd): {e}"),
            }
        }
        for m in &msgs[..n as usize / size_of::<sys::uffd_msg>()] {
            if m.event != sys::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            // SAFETY: a PAGEFAULT record carries the pagefault member.
            let addr = unsafe { m.arg.pagefault.address } as usize & !(PAGE - 1);
            let off = addr - t.dst;
            let (r, what) = match t.kind {
                Kind::Missing => {
                    let mut a = sys::uffdio_copy {
                        dst: addr as u64,
                        src: (t.src + off) as u64,
                        len: PAGE as u64,
                        mode: 0,
                        copy: 0,
                    };
                    // SAFETY: UFFDIO_COPY takes a uffdio_copy; the source
                    // page is readable and the destination registered.
                    let r = unsafe { libc::ioctl(uffd, sys::UFFDIO_COPY as _, &mut a) };
                    (r, "UFFDIO_COPY")
                }
                Kind::Minor => {
                    t.refresh(off);
                    let mut a = sys::uffdio_continue {
                        range: sys::uffdio_range {
                            start: addr as u64,
                            len: PAGE as u64,
                        },
                        mode: 0,
                        mapped: 0,
                    };
                    // SAFETY: UFFDIO_CONTINUE takes a uffdio_continue; the
                    // range is registered MINOR and its page is cached.
                    let r = unsafe { libc::ioctl(uffd, sys::UFFDIO_CONTINUE as _, &mut a) };
                    (r, "UFFDIO_CONTINUE")
                }
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EEXIST) {
                    let mut range = sys::uffdio_range {
                        start: addr as u64,
                        len: PAGE as u64,
                    };
                    // SAFETY: UFFDIO_WAKE takes a uffdio_range.
                    unsafe { libc::ioctl(uffd, sys::UFFDIO_WAKE as _, &mut range) };
                } else {
                    panic!("{what} at {addr:#x}: {e}");
                }
            }
            served += 1;
        }
    }
    drop(fd);
    served
}

/// The userfaultfd-rs handler: the same loop on its API.
#[cfg(feature = "bench-userfaultfd-rs")]
fn rs_handler(uffd: userfaultfd::Uffd, wake: i32, stop: &AtomicBool, wait: Wait, t: Work) -> u64 {
    let mut buf = userfaultfd::EventBuffer::new(64);
    let mut served = 0;
    loop {
        match wait {
            Wait::Poll => {
                if !raw::poll_both(uffd.as_raw_fd(), wake) {
                    break;
                }
            }
            Wait::Busy => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        let mut any = false;
        for ev in uffd
            .read_events(&mut buf)
            .expect("userfaultfd-rs: read_events")
        {
            any = true;
            let userfaultfd::Event::Pagefault { addr, .. } = ev.expect("userfaultfd-rs: event")
            else {
                continue;
            };
            let addr = addr as usize & !(PAGE - 1);
            let off = addr - t.dst;
            match t.kind {
                Kind::Missing => {
                    // SAFETY: the source page is readable; the destination
                    // is registered MISSING on this userfaultfd.
                    let r = unsafe {
                        uffd.copy(
                            (t.src + off) as *const libc::c_void,
                            addr as *mut libc::c_void,
                            PAGE,
                            true,
                        )
                    };
                    match r {
                        Ok(_) => {}
                        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                            uffd.wake(addr as *mut libc::c_void, PAGE)
                                .expect("userfaultfd-rs: wake");
                        }
                        Err(e) => panic!("userfaultfd-rs: copy at {addr:#x}: {e}"),
                    }
                }
                Kind::Minor => {
                    t.refresh(off);
                    uffd.r#continue(addr as *mut libc::c_void, PAGE, true)
                        .expect("userfaultfd-rs: continue");
                }
            }
            served += 1;
        }
        if !any && wait == Wait::Busy {
            std::hint::spin_loop();
        }
    }
    served
}

fn start(imp: Imp, s: &Setup, wait: Wait) -> Running {
    let len = s.len();
    let t = Work {
        kind: s.kind,
        dst: s.dst.addr,
        src: s.src.as_ptr() as usize,
        alias: s.alias_addr(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let wake = raw::eventfd();
    let wake_raw = wake.as_raw_fd();
    match imp {
        Imp::Ours => {
            let features = Features::from_bits_retain(s.features());
            let uffd = Uffd::builder()
                .non_blocking(true)
                .require_features(features)
                .create()
                .expect("uffd-gmem: Uffd::builder().create()");
            let mode = match s.kind {
                Kind::Missing => RegisterMode::MISSING,
                Kind::Minor => RegisterMode::MINOR,
            };
            let range = t.dst as u64..(t.dst + len) as u64;
            // SAFETY: a mapping of this bench that no Rust reference points
            // into; it outlives the server (stopped at the end of the sample).
            unsafe { uffd.register(range, mode) }.expect("uffd-gmem: UFFDIO_REGISTER");
            let region = Region::new(t.dst as u64, len as u64);
            let region = match s.kind {
                Kind::Missing => region.resolve_copy(),
                // SAFETY: the alias is a writable shared mapping of the same
                // memfd, unregistered, mapped for the whole bench.
                Kind::Minor => unsafe { region.continue_via_alias(t.alias as u64) },
            };
            let source: Arc<dyn PageSource> = s.src.clone();
            let server = Server::builder(uffd)
                .region(region)
                .source_arc(source)
                .fault_around(0)
                .workers(1)
                .busy_poll(wait == Wait::Busy)
                .spawn()
                .expect("serve: spawn");
            Running::Ours(server)
        }
        Imp::Raw => {
            let fd = raw::uffd(s.features());
            let mode = match s.kind {
                Kind::Missing => sys::UFFDIO_REGISTER_MODE_MISSING,
                Kind::Minor => sys::UFFDIO_REGISTER_MODE_MINOR,
            };
            let mut reg = sys::uffdio_register {
                range: sys::uffdio_range {
                    start: t.dst as u64,
                    len: len as u64,
                },
                mode,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER takes a uffdio_register; the range is a
            // mapping of this bench no Rust reference points into.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut reg) };
            assert_eq!(r, 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
            let st = stop.clone();
            let thread = std::thread::Builder::new()
                .name("raw-handler".into())
                .spawn(move || raw_handler(fd, wake_raw, &st, wait, t))
                .expect("spawn the raw handler");
            Running::Thread { stop, wake, thread }
        }
        #[cfg(feature = "bench-userfaultfd-rs")]
        Imp::Rs => {
            let uffd = userfaultfd::UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(userfaultfd::FeatureFlags::from_bits_retain(s.features()))
                .create()
                .expect("userfaultfd-rs: UffdBuilder::create");
            let mode = match s.kind {
                Kind::Missing => userfaultfd::RegisterMode::MISSING,
                Kind::Minor => userfaultfd::RegisterMode::MINOR,
            };
            uffd.register_with_mode(t.dst as *mut libc::c_void, len, mode)
                .expect("userfaultfd-rs: register");
            let st = stop.clone();
            let thread = std::thread::Builder::new()
                .name("rs-handler".into())
                .spawn(move || rs_handler(uffd, wake_raw, &st, wait, t))
                .expect("spawn the userfaultfd-rs handler");
            Running::Thread { stop, wake, thread }
        }
    }
}

// ---------------------------------------------------------------------------
// One pass
// ---------------------------------------------------------------------------

/// Runs one pass of `imp` over the whole region; returns µs per fault and
/// appends the per-touch latencies (ns) to `lat`.
fn pass(imp: Imp, s: &Setup, wait: Wait, handler_cpu: usize, lat: &mut Vec<u32>) -> f64 {
    s.dst.zap();
    arm(SAMPLE_DEADLINE);
    // The handler's threads inherit the affinity of the thread that starts
    // them; the faulting thread (this one) then moves to CPU 0.
    harness::pin_to(handler_cpu);
    let running = start(imp, s, wait);
    harness::pin_to(0);
    let base = s.dst.addr;
    lat.reserve(s.pages);
    let mut sink = 0u64;
    let t0 = Instant::now();
    let mut prev = t0;
    for i in 0..s.pages {
        // SAFETY: inside the registered mapping, which no Rust reference
        // points into; the read faults and waits for the handler.
        sink ^= unsafe { std::ptr::read_volatile((base + i * PAGE) as *const u64) };
        let now = Instant::now();
        lat.push((now - prev).as_nanos().min(u32::MAX as u128) as u32);
        prev = now;
    }
    let elapsed = prev - t0;
    let served = running.stop();
    disarm();
    std::hint::black_box(sink);
    assert_eq!(
        served, s.pages as u64,
        "{imp:?} {:?} {wait:?}: served {served} faults for {} pages",
        s.kind, s.pages
    );
    for i in (0..s.pages).step_by(61) {
        // SAFETY: mapped by the handler; no Rust reference points into it.
        let v = unsafe { std::ptr::read_volatile((base + i * PAGE) as *const u64) };
        assert_eq!(
            v,
            word(i * 512),
            "{imp:?} {:?}: wrong contents in page {i}",
            s.kind
        );
    }
    elapsed.as_secs_f64() * 1e6 / s.pages as f64
}

fn us(ns: f64) -> f64 {
    ns / 1000.0
}

fn lat_quantiles(lat: &[u32]) -> (f64, f64) {
    let v: Vec<f64> = lat.iter().map(|&x| f64::from(x)).collect();
    (
        us(harness::quantile(&v, 0.5)),
        us(harness::quantile(&v, 0.99)),
    )
}

fn main() {
    start_watchdog();
    let mut bench = Bench::new("fault_rtt");
    let pages = harness::size(4096, 256);
    let samples = harness::size(21, 3);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !harness::pin_to(0) {
        bench.note("cannot pin to CPU 0: placements are not enforced");
    }
    let uffd = harness::userfaultfd();
    bench.note(
        "serve's Resolve::Continue always refreshes the page cache from the page source \
         (a 4 KiB copy through the alias) before UFFDIO_CONTINUE; the MINOR baselines do the \
         same copy so that every candidate does the same work",
    );
    bench.note(
        "busy-poll with both threads on one CPU is measured, not skipped: it completes in \
         bounded time here because the woken faulting thread preempts the spinning handler \
         (a watchdog ends the run if any pass exceeds 60 s)",
    );
    for kind in [Kind::Missing, Kind::Minor] {
        let setup = Setup::new(kind, pages);
        for wait in [Wait::Poll, Wait::Busy] {
            for (handler_cpu, placement) in [(0usize, "same CPU"), (1, "2 CPUs")] {
                let skip = match &uffd {
                    Err(why) => Some(why.clone()),
                    Ok(()) if handler_cpu >= cpus => {
                        Some(format!("needs 2 CPUs, this host has {cpus}"))
                    }
                    Ok(()) => None,
                };
                run_case(
                    &mut bench,
                    &setup,
                    wait,
                    handler_cpu,
                    placement,
                    samples,
                    skip,
                );
            }
        }
    }
    bench.finish();
}

fn run_case(
    bench: &mut Bench,
    setup: &Setup,
    wait: Wait,
    handler_cpu: usize,
    placement: &str,
    samples: usize,
    skip: Option<String>,
) {
    let mode = match wait {
        Wait::Poll => "poll",
        Wait::Busy => "busy-poll",
    };
    let case = format!("fault RTT {}, {mode}, {placement}", setup.kind.label());
    if let Some(f) = std::env::var_os("GMEM_BENCH_FILTER")
        && !case.contains(f.to_string_lossy().as_ref())
    {
        return;
    }
    let ours_name = format!(
        "serve::Server, 1 worker{}",
        if wait == Wait::Busy {
            ", busy_poll"
        } else {
            ""
        }
    );
    let raw_row = (
        format!("raw libc ({mode} + read + ioctl)"),
        Target::min(1.0 / 1.02, "ours <= 1.02x raw"),
    );
    let rs_row = (
        format!("userfaultfd-rs 0.9 ({mode} + read_events + ioctl)"),
        Target::min(1.0, "ours <= userfaultfd-rs"),
    );
    if let Some(why) = skip {
        bench.skip_vs(&case, &ours_name, &[raw_row, rs_row], &why);
        return;
    }
    // The candidates: ours, raw, and userfaultfd-rs where it is built.
    let imps = [
        Imp::Ours,
        Imp::Raw,
        #[cfg(feature = "bench-userfaultfd-rs")]
        Imp::Rs,
    ];
    let baselines = [
        raw_row,
        #[cfg(feature = "bench-userfaultfd-rs")]
        rs_row,
    ];
    let mut lats = vec![Vec::new(); imps.len()];
    let mut passes: Vec<_> = imps
        .iter()
        .zip(&mut lats)
        .map(|(&imp, lat)| move || pass(imp, setup, wait, handler_cpu, lat))
        .collect();
    let mut refs: Vec<&mut dyn FnMut() -> f64> = passes
        .iter_mut()
        .map(|f| f as &mut dyn FnMut() -> f64)
        .collect();
    let r = harness::interleaved(samples, &mut refs);
    let verbose = std::env::var_os("GMEM_BENCH_VERBOSE").is_some();
    if verbose {
        eprintln!("{case}: passes (µs/fault) {imps:?}: {r:.2?}");
    }
    let quantiles = imps
        .iter()
        .zip(&lats)
        .map(|(imp, lat)| {
            let (p50, p99) = lat_quantiles(lat);
            format!("{} {p50:.2}/{p99:.2}", imp.label())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let note = format!(
        "median of {samples} interleaved passes over {} pages (one fault each, fault-around off; \
         µs/fault = faulting thread's wall time / faults); faulting thread on CPU 0, handler on \
         CPU {handler_cpu}; per-fault p50/p99 µs (all passes incl. warm-up): {quantiles}",
        setup.pages
    );
    if verbose {
        eprintln!("  {note}");
    }
    bench.rows_vs(&case, &ours_name, Unit::UsPerOp, &baselines, &r, &note);
    #[cfg(not(feature = "bench-userfaultfd-rs"))]
    bench.skip_vs(&case, &ours_name, &[rs_row], harness::RS_SKIPPED);
}
