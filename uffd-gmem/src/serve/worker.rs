//! The threads: what they share, how a worker waits (`poll` on the
//! userfaultfd, or with `WakePolicy::Exclusive` one epoll per worker with the
//! userfaultfd added `EPOLLEXCLUSIVE`), the event loop, the events besides faults, deferred faults and the
//! prefetcher.

use super::WakePolicy;
use super::config::RemovePolicy;
use super::source::PageSource;
use super::state::{self, RegionState};
use super::stats::{Counters, Histogram, ServeError, Stats, add, bucket};
use crate::error::{Errno, Error};
use crate::event::{Event, FaultKind};
use crate::sys;
use crate::uffd::{EventBuffer, Uffd};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The regions, replaced whole by `UNMAP` and `REMAP` (and only by them).
pub(super) type Regions = Arc<[Arc<RegionState>]>;

/// A fault deferred on `EAGAIN` (or no region yet), retried after events.
struct Deferred {
    addr: u64,
    kind: FaultKind,
    started: Option<Instant>,
    deadline: Instant,
}

/// What the server's threads share.
pub(super) struct Shared {
    pub(super) uffd: Uffd,
    pub(super) regions: RwLock<Regions>,
    /// Bumped (under the `regions` write lock) whenever they are replaced:
    /// a worker's [`Cache`] checks it with one load per fault.
    pub(super) generation: AtomicU64,
    pub(super) source: Arc<dyn PageSource>,
    /// The settings, fixed at spawn.
    pub(super) cfg: Config,
    pub(super) stop: AtomicBool,
    /// Signalled on stop: wakes every sleeping worker.
    pub(super) wake: OwnedFd,
    pub(super) watch: Option<OwnedFd>,
    pub(super) active_faults: AtomicUsize,
    deferred: Mutex<Vec<Deferred>>,
    deferred_len: AtomicUsize,
    /// One shard per worker, then the prefetcher's.
    pub(super) counters: Box<[Counters]>,
    latency: Mutex<(Vec<u64>, Duration)>,
    pub(super) log: Mutex<Vec<u64>>,
    errors: Mutex<Vec<ServeError>>,
    stopped_because: Mutex<Option<String>>,
}

/// The server's settings, fixed at spawn (from the validated builder).
#[derive(Clone, Copy)]
pub(super) struct Config {
    /// The page size the regions are tracked in.
    pub(super) page: u64,
    /// The fault-around window, in pages (a power of two).
    pub(super) window_pages: u64,
    pub(super) eagain_timeout: Duration,
    pub(super) remove: RemovePolicy,
    /// Fault log and latencies (the fault path reads no clock without).
    pub(super) record: bool,
    pub(super) busy_poll: bool,
    pub(super) wake_policy: WakePolicy,
    /// A prefetcher runs: faults announce themselves in `active_faults`.
    pub(super) prefetching: bool,
}

/// What a `Shared` is built from (the validated builder).
pub(super) struct Setup {
    pub(super) uffd: Uffd,
    pub(super) regions: Vec<RegionState>,
    pub(super) source: Arc<dyn PageSource>,
    pub(super) cfg: Config,
    pub(super) wake: OwnedFd,
    pub(super) watch: Option<OwnedFd>,
    pub(super) workers: usize,
}

impl Shared {
    pub(super) fn new(s: Setup) -> Shared {
        Shared {
            uffd: s.uffd,
            regions: RwLock::new(s.regions.into_iter().map(Arc::new).collect()),
            generation: AtomicU64::new(0),
            source: s.source,
            cfg: s.cfg,
            stop: AtomicBool::new(false),
            wake: s.wake,
            watch: s.watch,
            active_faults: AtomicUsize::new(0),
            deferred: Mutex::new(Vec::new()),
            deferred_len: AtomicUsize::new(0),
            counters: (0..=s.workers).map(|_| Counters::default()).collect(),
            latency: Mutex::new((vec![0; 64], Duration::ZERO)),
            log: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            stopped_because: Mutex::new(None),
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Stops every thread and wakes the sleeping ones.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        sys::eventfd_signal(self.wake.as_fd());
    }

    /// Stops every thread, recording the first reason given.
    pub(super) fn stop_because(&self, why: &str) {
        lock(&self.stopped_because).get_or_insert_with(|| why.into());
        self.stop();
    }

    pub(super) fn error(&self, op: &'static str, range: Option<std::ops::Range<u64>>, e: Error) {
        self.report(ServeError::new(op, range, e));
    }

    pub(super) fn report(&self, error: ServeError) {
        let mut e = lock(&self.errors);
        if e.len() < 1000 {
            e.push(error);
        }
    }

    pub(super) fn stats(&self) -> Stats {
        let (buckets, max_latency) = lock(&self.latency).clone();
        let mut s = Stats {
            latency: Histogram { buckets },
            max_latency,
            fault_log: lock(&self.log).clone(),
            errors: lock(&self.errors).clone(),
            stopped_because: lock(&self.stopped_because).clone(),
            ..Stats::default()
        };
        Counters::sum_into(&self.counters, &mut s);
        s
    }

    pub(super) fn record_latency(&self, d: Duration) {
        let mut l = lock(&self.latency);
        l.0[bucket(d)] += 1;
        l.1 = l.1.max(d);
    }

    fn snapshot(&self) -> (u64, Regions) {
        let r = self.regions.read().unwrap_or_else(|p| p.into_inner());
        (self.generation.load(Ordering::Acquire), r.clone())
    }

    /// Replaces the regions (`UNMAP`, `REMAP`) and bumps the generation.
    fn replace_regions(&self, f: impl FnOnce(&[Arc<RegionState>]) -> Vec<Arc<RegionState>>) {
        let mut r = self.regions.write().unwrap_or_else(|p| p.into_inner());
        *r = f(&r).into();
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn handle(&self, c: &Counters, cache: &mut Cache, ev: Event<Uffd>, buf: &mut Vec<u8>) {
        match ev {
            Event::Pagefault { kind, address, .. } => {
                add(&c.faults, 1);
                if self.cfg.prefetching {
                    self.active_faults.fetch_add(1, Ordering::AcqRel);
                }
                let started = self.cfg.record.then(Instant::now);
                let addr = address & !(self.cfg.page - 1);
                let region = cache.find(self, addr);
                if self
                    .serve_fault(c, region, addr, kind, started, buf)
                    .retry()
                {
                    add(&c.eagain, 1);
                    let deadline = started.unwrap_or_else(Instant::now) + self.cfg.eagain_timeout;
                    self.defer(Deferred {
                        addr: address,
                        kind,
                        started,
                        deadline,
                    });
                }
                if self.cfg.prefetching {
                    self.active_faults.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Event::Remove { start, end } => {
                add(&c.other, 1);
                self.on_remove(c, cache.current(self), start, end);
            }
            Event::Unmap { start, end } => {
                add(&c.other, 1);
                if self.plausible(cache, "UNMAP", start, end.checked_sub(start), None) {
                    self.replace_regions(|r| state::unmap(r, start, end));
                }
            }
            Event::Remap { from, to, len } => {
                add(&c.other, 1);
                if self.plausible(cache, "REMAP", from, Some(len), Some(to)) {
                    self.replace_regions(|r| state::remap(r, from, to, len));
                }
            }
            // The child is not served: closing its userfaultfd unregisters
            // the child's ranges, so its faults are filled normally.
            Event::Fork { uffd } => {
                add(&c.other, 1);
                drop(uffd);
            }
            _ => add(&c.other, 1),
        }
    }

    fn defer(&self, d: Deferred) {
        let mut q = lock(&self.deferred);
        q.push(d);
        self.deferred_len.store(q.len(), Ordering::Relaxed);
    }

    fn retry_deferred(&self, c: &Counters, cache: &mut Cache, buf: &mut Vec<u8>) {
        let due = {
            let mut q = lock(&self.deferred);
            self.deferred_len.store(0, Ordering::Relaxed);
            std::mem::take(&mut *q)
        };
        let now = Instant::now();
        for d in due {
            if now > d.deadline {
                let what = format!(
                    "the fault still got EAGAIN (or lay outside every region) after {:?}; given up",
                    self.cfg.eagain_timeout
                );
                // A forged fault record may name the top of the address
                // space: no overflow.
                let range = d.addr..d.addr.saturating_add(self.cfg.page);
                let e = Error::Protocol { op: "serve", what };
                self.error("deferred fault", Some(range), e);
                continue;
            }
            let addr = d.addr & !(self.cfg.page - 1);
            let r = cache.find(self, addr);
            if self.serve_fault(c, r, addr, d.kind, d.started, buf).retry() {
                self.defer(d);
            }
        }
    }

    /// [`state::plausible`], reporting a record that is not.
    fn plausible(
        &self,
        cache: &mut Cache,
        what: &'static str,
        start: u64,
        len: Option<u64>,
        to: Option<u64>,
    ) -> bool {
        let page = self.cfg.page;
        if state::plausible(cache.current(self), page, start, len, to) {
            return true;
        }
        let what = format!(
            "{what} event {start:#x} (length {len:?}, to {to:?}) is not a range the kernel \
             reports (it overflows or is not aligned to the page size {page:#x}): ignored"
        );
        self.error("event", None, Error::Protocol { op: "serve", what });
        false
    }

    fn on_remove(&self, c: &Counters, regions: &[Arc<RegionState>], start: u64, end: u64) {
        for r in regions {
            let Some(pages) = r.page_range(start, end) else {
                continue;
            };
            let _removing = r.begin_remove();
            let span = r.span(pages.clone());
            match self.cfg.remove {
                RemovePolicy::Unregister => {
                    match self.uffd.unregister(span.clone()) {
                        Ok(()) => {}
                        // ENOMEM: the VMM's address space is gone (it exited).
                        Err(e) if e.errno() == Some(Errno(libc::ENOMEM)) => self.stop_because(
                            "the VMM's address space is gone (ENOMEM on UFFDIO_UNREGISTER)",
                        ),
                        Err(e) => self.error("REMOVE", Some(span), e),
                    }
                    r.hand_to_kernel(pages);
                }
                RemovePolicy::ZeroOnNextFault => {
                    r.reset_removed(pages);
                    // A fault on these pages taken, before the reset, for a
                    // fill in progress is not woken by that fill (it woke
                    // its faulters before the pages were dropped): wake the
                    // range so that such a fault is raised again.
                    self.wake(c, span);
                }
            }
        }
    }

    fn yield_to_faults(&self) {
        while self.active_faults.load(Ordering::Acquire) > 0 && !self.stopping() {
            std::thread::yield_now();
        }
    }
}

/// A thread's view of the regions: refreshed only when the generation
/// moved, so a fault costs one atomic load, no lock and no `Arc` clone.
pub(super) struct Cache {
    generation: u64,
    regions: Regions,
    last: usize,
}

impl Cache {
    pub(super) fn new(s: &Shared) -> Cache {
        let (generation, regions) = s.snapshot();
        Cache {
            generation,
            regions,
            last: 0,
        }
    }

    fn current(&mut self, s: &Shared) -> &[Arc<RegionState>] {
        if s.generation.load(Ordering::Acquire) != self.generation {
            (self.generation, self.regions) = s.snapshot();
            self.last = 0;
        }
        &self.regions
    }

    /// The region holding `addr`, the last one hit tried first.
    fn find(&mut self, s: &Shared, addr: u64) -> Option<&RegionState> {
        let last = self.last;
        let regions = self.current(s);
        if regions.get(last).is_some_and(|r| r.contains(addr)) {
            return Some(&self.regions[last]);
        }
        let i = regions.iter().position(|r| r.contains(addr))?;
        self.last = i;
        Some(&self.regions[i])
    }
}

const UFFD: u64 = 0;
const WAKE: u64 = 1;
const WATCH: u64 = 2;
/// Busy-poll turns between two looks at the watched fd.
const SPIN_WATCH_TURNS: u32 = 4096;

/// How a worker waits for events.
enum Waiter {
    /// Its own epoll: the userfaultfd added `EPOLLEXCLUSIVE` (the kernel
    /// wakes one of the sleeping workers per event), the stop eventfd and
    /// the watched fd added plainly (every worker sees them).
    Epoll(OwnedFd),
    /// `poll` on the same set: every sleeping worker wakes on every event.
    Poll,
    /// Busy poll: no sleep; the watched fd is looked at now and then.
    Spin(u32),
}

impl Waiter {
    fn new(s: &Shared) -> Waiter {
        if s.cfg.busy_poll {
            return Waiter::Spin(0);
        }
        if s.cfg.wake_policy == WakePolicy::All {
            return Waiter::Poll;
        }
        let ep = match sys::epoll_create() {
            Ok(ep) => ep,
            Err(e) => {
                s.error("epoll", None, Error::kernel("epoll_create1", e));
                return Waiter::Poll;
            }
        };
        let add = |fd, events, token| sys::epoll_add(ep.as_fd(), fd, events, token);
        let watch = s.watch.as_ref().map(|w| w.as_fd());
        let added = add(s.uffd.as_fd(), sys::EPOLL_IN_EXCLUSIVE, UFFD)
            .and_then(|()| add(s.wake.as_fd(), libc::EPOLLIN as u32, WAKE))
            .and_then(|()| watch.map_or(Ok(()), |w| add(w, libc::EPOLLRDHUP as u32, WATCH)));
        match added {
            Ok(()) => Waiter::Epoll(ep),
            Err(e) => {
                s.error("epoll", None, Error::kernel("epoll_ctl", e));
                Waiter::Poll
            }
        }
    }

    /// Sleeps until an event (or for 1 ms with deferred faults: a timeout
    /// arms an hrtimer, about 0.25 µs a sleep, so only then). Returns
    /// whether the watched fd hung up.
    fn wait(&mut self, s: &Shared, deferred: bool) -> bool {
        let timeout = if deferred { 1 } else { -1 };
        let hangup = (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) as u32;
        match self {
            Waiter::Epoll(ep) => {
                let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 3];
                // Errors (EINTR) only end the sleep early: the read copes.
                let n = sys::epoll_wait(ep.as_fd(), &mut evs, timeout).unwrap_or(0);
                evs[..n].iter().any(|e| {
                    let (events, token) = (e.events, e.u64);
                    token == WATCH && events & hangup != 0
                })
            }
            Waiter::Poll => {
                let uffd = sys::pollfd(s.uffd.as_fd(), libc::POLLIN);
                let wake = sys::pollfd(s.wake.as_fd(), libc::POLLIN);
                let Some(w) = &s.watch else {
                    let _ = sys::poll(&mut [uffd, wake], timeout);
                    return false;
                };
                let mut p = [uffd, wake, sys::pollfd(w.as_fd(), libc::POLLRDHUP)];
                let _ = sys::poll(&mut p, timeout);
                p[2].revents as u32 & hangup != 0
            }
            Waiter::Spin(turns) => {
                *turns += 1;
                let Some(w) = s.watch.as_ref().filter(|_| *turns >= SPIN_WATCH_TURNS) else {
                    return false;
                };
                *turns = 0;
                let mut p = [sys::pollfd(w.as_fd(), libc::POLLRDHUP)];
                matches!(sys::poll(&mut p, 0), Ok(1..)) && p[0].revents as u32 & hangup != 0
            }
        }
    }
}

/// A worker: wait, read a batch of events, handle each, retry deferred
/// faults; until stopped.
pub(super) fn worker(s: &Shared, id: usize) {
    let c = &s.counters[id];
    let mut events = EventBuffer::with_capacity(64);
    let mut buf = Vec::new();
    let mut cache = Cache::new(s);
    let mut waiter = Waiter::new(s);
    while !s.stopping() {
        let deferred = s.deferred_len.load(Ordering::Relaxed) > 0;
        if waiter.wait(s, deferred) {
            s.stop_because("the VMM closed its end (the watched fd hung up)");
            break;
        }
        match s.uffd.read_events(&mut events) {
            // Handled straight from the reusable buffer: no allocation per
            // read on the fault path.
            Ok(batch) => batch.for_each(|ev| s.handle(c, &mut cache, ev, &mut buf)),
            Err(e) => {
                s.error("read events", None, e);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if deferred {
            s.retry_deferred(c, &mut cache, &mut buf);
        }
        if s.cfg.busy_poll {
            std::hint::spin_loop();
        }
    }
}

/// Fills the working set `list` (source offsets), then with `all` every
/// page, in the background, yielding to live faults.
pub(super) fn prefetcher(s: &Shared, list: &[u64], all: bool) {
    let c = s.counters.last().expect("the prefetcher's shard");
    let mut buf = Vec::new();
    let mut cache = Cache::new(s);
    for &off in list {
        if s.stopping() {
            return;
        }
        s.yield_to_faults();
        let regions = cache.current(s);
        let holder = regions
            .iter()
            .find(|r| off >= r.source_offset && off - r.source_offset < r.len);
        if let Some(r) = holder {
            let idx = (off - r.source_offset) / s.cfg.page;
            let _ = s.fill_range(c, r, idx..idx + 1, &mut buf, true);
        }
    }
    if !all {
        return;
    }
    let chunk = s.cfg.window_pages.max(16);
    for r in cache.current(s).to_vec() {
        let mut i = 0;
        while i < r.pages() {
            if s.stopping() {
                return;
            }
            s.yield_to_faults();
            let end = (i + chunk).min(r.pages());
            if s.fill_range(c, &r, i..end, &mut buf, true).is_none() {
                // The address space is changing: let the workers read events.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            i = end;
        }
    }
}
