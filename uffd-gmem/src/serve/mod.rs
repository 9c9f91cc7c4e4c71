//! Fault serving: the building block of a snapshot-restore or post-copy
//! handler.
//!
//! A [`Server`] owns a userfaultfd whose ranges a VMM registered, a table of
//! [`Region`]s (where each range lives in the VMM, and where its contents
//! live in a [`PageSource`]), and `N` worker threads that resolve faults:
//!
//! - **MISSING → `UFFDIO_COPY`** from the source ([`Resolve::Copy`]), or
//!   **fill the page cache, then `UFFDIO_CONTINUE`** ([`Resolve::Continue`],
//!   for shmem or guest_memfd registered MINOR: the page cache is filled
//!   through a second mapping or with `pwrite`), or **zero-copy**:
//!   `UFFDIO_CONTINUE` alone where the page cache already holds the
//!   snapshot ([`Backing::Prefilled`], [`Region::continue_prefilled`]:
//!   `MAP_SHARED`, or `MAP_PRIVATE` clones of one snapshot; no page source
//!   needed). A populated-page bitmap decides: a page already filled is
//!   only continued or woken.
//! - **Fault-around**: after the faulting page (served first, so the
//!   faulting thread resumes at once) the rest of a window is filled. The
//!   window is aligned for random access and grows forward along
//!   sequential streaks, up to 8× the configured size, clipped to the region.
//! - **Prefetch** of a recorded working set (source offsets, e.g. from
//!   [`Stats::working_set`] of an earlier run), or of everything, in a
//!   background thread that yields to live faults.
//! - The pitfalls handled once: `EAGAIN` while the address space changes
//!   (deferred, retried after reading events, dropped with an error after a
//!   timeout); `EEXIST` (the faulter is woken with `UFFDIO_WAKE`); duplicate
//!   and late faults on filled pages (woken, not refilled; under
//!   `RemovePolicy::ZeroOnNextFault` answered again, which a page still
//!   mapped refuses with `EEXIST`); `REMOVE` (unregister, or zero on the next
//!   fault); `UNMAP` and `REMAP` followed.
//! - **Waking**: sleeping workers wait in `poll` on the userfaultfd, or, with
//!   [`WakePolicy::Exclusive`], each in its own epoll where the userfaultfd
//!   is added `EPOLLEXCLUSIVE` (one worker woken per fault; measured against
//!   the default in [`WakePolicy`]); or, with [`ServerBuilder::busy_poll`],
//!   they spin.
//! - [`Stats`]: faults, pages, per-thread counters; with
//!   [`ServerBuilder::record`] a latency histogram and the fault log; errors
//!   are collected, never panicked on; [`Server::shutdown`] stops and joins
//!   every thread.
//!
//! The module's parts, each readable whole: `source` (page sources),
//! `config` (regions and policies), `stats` (what a server reports),
//! `state` (per-region bookkeeping, no system calls), `fill` (resolving one
//! fault) and `worker` (the threads and their event loop).
//!
//! # Examples
//!
//! Serving guest memory from a snapshot file:
//!
//! ```
//! use uffd_gmem::serve::{MappedFile, Region, Server};
//! use uffd_gmem::{HostMapping, RegisterMode, Uffd};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let Ok(uffd) = Uffd::builder().create() else {
//!     return Ok(()); // no userfaultfd here
//! };
//! let page = uffd_gmem::page_size() as usize;
//! let path = std::env::temp_dir().join(format!("uffd-gmem-serve-{}.snap", std::process::id()));
//! std::fs::write(&path, vec![0x3cu8; 4 * page])?;
//! let snapshot = MappedFile::open(&path)?;
//! std::fs::remove_file(&path)?;
//! let guest = HostMapping::anonymous(4 * page)?;
//! uffd.register_mapping(&guest, RegisterMode::MISSING)?;
//! let region = Region::new(guest.addr(), 4 * page as u64);
//! let server = Server::builder(uffd).region(region).source(snapshot).spawn()?;
//! let mut b = [0u8; 1];
//! guest.read_at(2 * page as u64, &mut b)?; // faults, filled from the file
//! assert_eq!(b[0], 0x3c);
//! assert!(server.shutdown()?.errors.is_empty());
//! # Ok(())
//! # }
//! ```

mod config;
mod fill;
mod source;
mod state;
mod stats;
mod sync;
mod worker;

pub use config::{Backing, Region, RemovePolicy, Resolve};
pub use source::{MappedFile, PageSource};
pub use stats::{Histogram, ServeError, Stats};

use crate::error::{Error, Result};
use crate::sys;
use crate::uffd::Uffd;
use source::io_err;
use state::RegionState;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use worker::{Config, Setup, Shared};

/// How sleeping workers are woken for the shared userfaultfd's events.
///
/// Measured on a 2-CPU host whose cross-CPU wake costs about 56 µs (a
/// same-CPU fault round trip, 4 µs): with two faulting threads, waking every
/// worker served about twice the faults per second of waking one
/// (`benches/scaling.rs`, rows (c) and (d)), because the worker on the
/// faulting thread's CPU then takes the fault; the restore benchmark's
/// stalls did not differ beyond noise. [`WakePolicy::All`] is therefore the
/// default; [`WakePolicy::Exclusive`] is for many workers on hosts where
/// cross-CPU wakes are cheap and every idle worker waking on every event
/// costs more than locality saves: measure with both.
///
/// # Examples
///
/// ```
/// use uffd_gmem::serve::{Region, Server, WakePolicy};
/// use uffd_gmem::{HostMapping, RegisterMode, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// assert_eq!(WakePolicy::default(), WakePolicy::All);
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::anonymous(8 * page as usize)?;
/// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
/// let server = Server::builder(uffd)
///     .region(Region::new(mem.addr(), 8 * page))
///     .source(vec![2u8; 8 * page as usize])
///     .workers(4)
///     .wake_policy(WakePolicy::Exclusive) // one worker woken per fault
///     .spawn()?;
/// let mut all = vec![0u8; 8 * page as usize];
/// mem.read_at(0, &mut all)?;
/// assert!(all.iter().all(|&b| b == 2));
/// assert_eq!(server.shutdown()?.pages_copied, 8);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WakePolicy {
    /// Every sleeping worker wakes on every event (`poll` on the
    /// userfaultfd); all but one find nothing to read. The default.
    #[default]
    All,
    /// One worker per event: each worker sleeps in its own epoll, where the
    /// userfaultfd is added with `EPOLLEXCLUSIVE`, so the kernel wakes one
    /// sleeping worker per fault instead of all of them (Linux 4.5).
    Exclusive,
}

/// Builds a [`Server`]; see [`Server::builder`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use uffd_gmem::serve::{Region, Server};
/// use uffd_gmem::{HostMapping, RegisterMode, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::anonymous(8 * page as usize)?;
/// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
/// let builder = Server::builder(uffd)
///     .region(Region::new(mem.addr(), 8 * page))
///     .source(vec![5u8; 8 * page as usize])
///     .fault_around(4 * page) // a fault fills its 4-page window
///     .eagain_timeout(Duration::from_secs(1));
/// assert!(format!("{builder:?}").contains(&format!("fault_around: {}", 4 * page)));
/// let server = builder.spawn()?;
/// mem.read_at(0, &mut [0u8; 1])?; // one fault, then the rest of its window
/// for _ in 0..1000 {
///     if server.stats().pages_copied == 4 {
///         break;
///     }
///     std::thread::sleep(Duration::from_millis(5));
/// }
/// assert_eq!(server.shutdown()?.pages_copied, 4);
/// # Ok(())
/// # }
/// ```
#[must_use = "a builder does nothing until spawn() is called"]
pub struct ServerBuilder {
    uffd: Uffd,
    regions: Vec<Region>,
    source: Option<Arc<dyn PageSource>>,
    resolve: Resolve,
    fault_around: u64,
    workers: usize,
    prefetch: Vec<u64>,
    prefetch_all: bool,
    eagain_timeout: Duration,
    remove: RemovePolicy,
    record: bool,
    busy_poll: bool,
    wake_policy: WakePolicy,
    watch: Option<OwnedFd>,
    page_size: Option<u64>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("regions", &self.regions)
            .field("fault_around", &self.fault_around)
            .field("workers", &self.workers)
            .field("busy_poll", &self.busy_poll)
            .field("wake_policy", &self.wake_policy)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Adds a region.
    pub fn region(mut self, region: Region) -> Self {
        self.regions.push(region);
        self
    }

    /// The page source (required unless every region is
    /// [`Backing::Prefilled`]).
    pub fn source(mut self, source: impl PageSource + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// A shared page source.
    pub fn source_arc(mut self, source: Arc<dyn PageSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// The default resolution for regions that do not set one
    /// ([`Resolve::Copy`] unless changed).
    pub fn resolve(mut self, resolve: Resolve) -> Self {
        self.resolve = resolve;
        self
    }

    /// The fault-around window in bytes (0 or one page: the faulting page
    /// only). Rounded down to a power-of-two number of pages.
    pub fn fault_around(mut self, bytes: u64) -> Self {
        self.fault_around = bytes;
        self
    }

    /// Worker threads (default 1).
    ///
    /// # Examples
    ///
    /// ```
    /// # use uffd_gmem::serve::{Region, Server};
    /// # use uffd_gmem::{HostMapping, RegisterMode, Uffd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let builder = Server::builder(uffd).region(Region::new(page, page)).source(vec![0u8; page as usize]);
    /// let e = builder.workers(0).spawn().unwrap_err(); // at least one
    /// assert!(e.to_string().contains("workers"), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Source offsets to fill in the background, in order.
    ///
    /// # Examples
    ///
    /// Pages filled before the guest asks for them fault no more:
    ///
    /// ```
    /// # use uffd_gmem::serve::{Region, Server};
    /// # use uffd_gmem::{HostMapping, RegisterMode, Uffd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let mem = HostMapping::anonymous(4 * page as usize)?;
    /// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
    /// let server = Server::builder(uffd)
    ///     .region(Region::new(mem.addr(), 4 * page))
    ///     .source(vec![3u8; 4 * page as usize])
    ///     .prefetch(vec![2 * page, 0]) // e.g. `Stats::working_set` of a run
    ///     .spawn()?;
    /// for _ in 0..1000 {
    ///     if server.stats().pages_prefetched == 2 {
    ///         break;
    ///     }
    ///     std::thread::sleep(std::time::Duration::from_millis(5));
    /// }
    /// mem.read_at(2 * page, &mut [0u8; 8])?;
    /// assert_eq!(server.shutdown()?.faults, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn prefetch(mut self, working_set: Vec<u64>) -> Self {
        self.prefetch = working_set;
        self
    }

    /// After the working set, fill every remaining page in the background.
    pub fn prefetch_all(mut self, on: bool) -> Self {
        self.prefetch_all = on;
        self
    }

    /// How long a fault deferred on `EAGAIN` is retried (default 5 s).
    pub fn eagain_timeout(mut self, t: Duration) -> Self {
        self.eagain_timeout = t;
        self
    }

    /// What `REMOVE` does (default [`RemovePolicy::Unregister`]).
    pub fn on_remove(mut self, policy: RemovePolicy) -> Self {
        self.remove = policy;
        self
    }

    /// Record the fault log ([`Stats::fault_log`]) and the latency of each
    /// fault ([`Stats::latency`], [`Stats::max_latency`]). Off by default:
    /// the fault path then reads no clock.
    pub fn record(mut self, on: bool) -> Self {
        self.record = on;
        self
    }

    /// Workers spin on the userfaultfd instead of sleeping in `poll` (lowest
    /// latency, one busy core per worker).
    pub fn busy_poll(mut self, on: bool) -> Self {
        self.busy_poll = on;
        self
    }

    /// How sleeping workers are woken ([`WakePolicy::All`] unless changed;
    /// without effect with [`busy_poll`](Self::busy_poll)).
    pub fn wake_policy(mut self, policy: WakePolicy) -> Self {
        self.wake_policy = policy;
        self
    }

    /// Stop serving when `fd` (e.g. the socket to the VMM) hangs up
    /// (`POLLHUP`, or `POLLRDHUP`: the peer shut its end): the VMM is gone.
    /// The fd sleeps in the workers' `poll` set with the userfaultfd: no
    /// extra system call per event.
    pub fn stop_when_closed(mut self, fd: OwnedFd) -> Self {
        self.watch = Some(fd);
        self
    }

    /// The unit in which faults are resolved: the base page size by default;
    /// the huge page size for hugetlbfs regions (e.g. 2 MiB), where
    /// `UFFDIO_COPY` must cover whole huge pages.
    pub fn page_size(mut self, bytes: u64) -> Self {
        self.page_size = Some(bytes);
        self
    }

    /// Validates the configuration and starts the workers.
    ///
    /// # Examples
    ///
    /// ```
    /// # use uffd_gmem::serve::{Region, Server};
    /// # use uffd_gmem::{Error, Uffd};
    /// # fn main() -> uffd_gmem::Result<()> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// // Nothing runs until the configuration holds: here, no region.
    /// let e = Server::builder(uffd).source(vec![0u8; 4096]).spawn().unwrap_err();
    /// assert!(matches!(e, Error::Invalid { .. }), "{e}");
    /// assert!(e.to_string().contains("no region"), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the rule: a source is set unless every
    /// region is [`Backing::Prefilled`]; regions are non-empty, page
    /// aligned, do not overlap and (those that read it) lie inside the
    /// source; workers >= 1. [`Error::Kernel`] if the fd cannot be made
    /// non-blocking; [`Error::Io`] if a thread cannot be started.
    pub fn spawn(self) -> Result<Server> {
        let op = "serve::spawn";
        let base = kvm_gmem_sys::support::page_size();
        let page = self.page_size.unwrap_or(base);
        if !page.is_power_of_two() || !page.is_multiple_of(base) {
            return Err(Error::invalid(
                op,
                format!("page size {page:#x} must be a power of two and a multiple of {base:#x}"),
            ));
        }
        if self.workers == 0 {
            return Err(Error::invalid(op, "workers must be at least 1"));
        }
        if self.regions.is_empty() {
            return Err(Error::invalid(op, "no region was added"));
        }
        let source_len = self.source.as_ref().map(|s| s.len());
        config::validate(&self.regions, &self.resolve, page, source_len)?;
        // Only prefilled regions may lack a source (validated): they never
        // read it.
        let source = self
            .source
            .unwrap_or_else(|| Arc::new(Vec::<u8>::new()) as Arc<dyn PageSource>);
        sys::set_nonblocking(self.uffd.as_fd())
            .map_err(|e| Error::kernel("fcntl(O_NONBLOCK)", e))?;
        let wake = sys::eventfd().map_err(|e| Error::kernel("eventfd", e))?;
        let window_pages = (self.fault_around / page).max(1);
        let window_pages = 1u64 << (63 - window_pages.leading_zeros());
        let regions = self
            .regions
            .into_iter()
            .map(|r| {
                let resolve = r.resolve.unwrap_or_else(|| self.resolve.clone());
                RegionState::new(r.host, r.len, r.source_offset, resolve, page, window_pages)
            })
            .collect();
        let prefetching = !self.prefetch.is_empty() || self.prefetch_all;
        let shared = Arc::new(Shared::new(Setup {
            uffd: self.uffd,
            regions,
            source,
            cfg: Config {
                page,
                window_pages,
                eagain_timeout: self.eagain_timeout,
                remove: self.remove,
                record: self.record,
                busy_poll: self.busy_poll,
                wake_policy: self.wake_policy,
                prefetching,
            },
            wake,
            watch: self.watch,
            workers: self.workers,
        }));
        let mut threads = Vec::new();
        for i in 0..self.workers {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("uffd-serve-{i}"))
                .spawn(move || worker::worker(&s, i))
                .map_err(|e| io_err("spawn worker", e));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_threads(&shared, threads);
                    return Err(e);
                }
            }
        }
        if prefetching {
            let s = shared.clone();
            let list = self.prefetch;
            let all = self.prefetch_all;
            match std::thread::Builder::new()
                .name("uffd-prefetch".into())
                .spawn(move || worker::prefetcher(&s, &list, all))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_threads(&shared, threads);
                    return Err(io_err("spawn prefetcher", e));
                }
            }
        }
        Ok(Server { shared, threads })
    }
}

/// A running fault server. Dropping it stops and joins its threads, like
/// [`Server::shutdown`].
///
/// # Examples
///
/// A server that stops by itself when the VMM's socket closes:
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
/// use uffd_gmem::serve::{Region, Server};
/// use uffd_gmem::{HostMapping, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::anonymous(page as usize)?;
/// let (vmm, handler) = UnixStream::pair()?;
/// let server = Server::builder(uffd)
///     .region(Region::new(mem.addr(), page))
///     .source(vec![0u8; page as usize])
///     .stop_when_closed(handler.into())
///     .spawn()?;
/// assert!(!server.is_stopped());
/// drop(vmm); // the VMM exits
/// assert!(server.wait_timeout(Duration::from_secs(10)));
/// assert!(server.shutdown()?.stopped_because.is_some());
/// # Ok(())
/// # }
/// ```
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A builder serving faults of `uffd` (made non-blocking on spawn).
    ///
    /// # Examples
    ///
    /// Two regions of one snapshot, fault-around and a background fill of
    /// the rest (the crate's front page has the whole program):
    ///
    /// ```
    /// use uffd_gmem::serve::{Region, Server};
    /// use uffd_gmem::{HostMapping, RegisterMode, Uffd};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().non_blocking(true).create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let (low, high) = (HostMapping::anonymous(8 * page as usize)?, HostMapping::anonymous(8 * page as usize)?);
    /// uffd.register_mapping(&low, RegisterMode::MISSING)?;
    /// uffd.register_mapping(&high, RegisterMode::MISSING)?;
    /// let snapshot = vec![7u8; 16 * page as usize];
    /// let server = Server::builder(uffd)
    ///     .region(Region::new(low.addr(), 8 * page))
    ///     .region(Region::new(high.addr(), 8 * page).source_offset(8 * page))
    ///     .source(snapshot)
    ///     .fault_around(4 * page)
    ///     .prefetch_all(true)
    ///     .workers(2)
    ///     .spawn()?;
    /// let mut b = [0u8; 1];
    /// high.read_at(5 * page, &mut b)?;
    /// assert_eq!(b[0], 7);
    /// let stats = server.shutdown()?;
    /// assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(uffd: Uffd) -> ServerBuilder {
        ServerBuilder {
            uffd,
            regions: Vec::new(),
            source: None,
            resolve: Resolve::Copy,
            fault_around: 0,
            workers: 1,
            prefetch: Vec::new(),
            prefetch_all: false,
            eagain_timeout: Duration::from_secs(5),
            remove: RemovePolicy::Unregister,
            record: false,
            busy_poll: false,
            wake_policy: WakePolicy::All,
            watch: None,
            page_size: None,
        }
    }

    /// A snapshot of the statistics so far.
    ///
    /// # Examples
    ///
    /// ```
    /// # use uffd_gmem::serve::{Region, Server};
    /// # use uffd_gmem::{HostMapping, RegisterMode, Uffd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let mem = HostMapping::anonymous(page as usize)?;
    /// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
    /// let source = vec![1u8; page as usize];
    /// let server = Server::builder(uffd).region(Region::new(mem.addr(), page)).source(source).spawn()?;
    /// assert_eq!(server.stats().faults, 0);
    /// mem.read_at(0, &mut [0u8; 1])?;
    /// assert_eq!(server.stats().faults, 1); // while it runs
    /// # Ok(())
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Whether the server stopped by itself (the watched fd closed).
    ///
    /// # Examples
    ///
    /// ```
    /// # use uffd_gmem::serve::{Region, Server};
    /// # use uffd_gmem::{HostMapping, RegisterMode, Uffd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let builder = Server::builder(uffd).region(Region::new(page, page)).source(vec![0u8; page as usize]);
    /// let server = builder.spawn()?;
    /// // Nothing watched: it stops only when told.
    /// assert!(!server.wait_timeout(std::time::Duration::from_millis(10)));
    /// assert!(!server.is_stopped());
    /// server.shutdown()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.shared.stopping()
    }

    /// Waits until the server stops by itself (see
    /// [`ServerBuilder::stop_when_closed`]) or `timeout` passes; returns
    /// whether it stopped.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.is_stopped() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.is_stopped()
    }

    /// Stops every thread, joins them, and returns the statistics.
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] if a worker panicked (its message is included).
    pub fn shutdown(mut self) -> Result<Stats> {
        let threads = std::mem::take(&mut self.threads);
        let panicked = stop_threads(&self.shared, threads);
        let stats = self.shared.stats();
        match panicked {
            Some(msg) => Err(Error::Protocol {
                op: "serve::shutdown",
                what: format!("a worker panicked: {msg}"),
            }),
            None => Ok(stats),
        }
    }

    /// The userfaultfd being served.
    ///
    /// # Examples
    ///
    /// Handing a range back to the kernel while serving:
    ///
    /// ```
    /// # use uffd_gmem::serve::{Region, Server};
    /// # use uffd_gmem::{HostMapping, RegisterMode, Uffd};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let mem = HostMapping::anonymous(page as usize)?;
    /// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
    /// let source = vec![1u8; page as usize];
    /// let server = Server::builder(uffd).region(Region::new(mem.addr(), page)).source(source).spawn()?;
    /// server.uffd().unregister(mem.range())?;
    /// let mut b = [9u8; 1];
    /// mem.read_at(0, &mut b)?; // the kernel's zero page, no fault
    /// assert_eq!((b[0], server.shutdown()?.faults), (0, 0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn uffd(&self) -> &Uffd {
        &self.shared.uffd
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let threads = std::mem::take(&mut self.threads);
        stop_threads(&self.shared, threads);
    }
}

fn stop_threads(shared: &Shared, threads: Vec<JoinHandle<()>>) -> Option<String> {
    shared.stop();
    let mut panicked = None;
    for t in threads {
        if let Err(p) = t.join() {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            panicked = Some(msg);
        }
    }
    panicked
}

// Keep the builder usable from other threads.
static_assertions::assert_impl_all!(Server: Send, Sync);
static_assertions::assert_impl_all!(ServerBuilder: Send);
