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
//!   through a second mapping or with `pwrite`). A populated-page bitmap
//!   decides: a page already filled is only continued or woken.
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
//!   and late faults on filled pages (woken, not refilled); `REMOVE`
//!   (unregister, or zero on the next fault); `UNMAP` and `REMAP` followed.
//! - [`Stats`]: faults, pages, a latency histogram, the fault log; errors
//!   are collected, never panicked on; [`Server::shutdown`] stops and joins
//!   every thread.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::event::{Event, FaultKind};
use crate::flags::Mode;
use crate::sys;
use crate::uffd::{EventBuffer, Uffd};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where page contents come from.
pub trait PageSource: Send + Sync {
    /// The source's length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    ///
    /// # Errors
    ///
    /// Any I/O error, or `UnexpectedEof` for a short read; the server reports
    /// it and leaves the fault unresolved.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// A pointer to `len` bytes at `offset`, when the source is memory that
    /// stays mapped while the server runs (zero-copy `UFFDIO_COPY`).
    ///
    /// The pointer must be valid for reads of `len` bytes for as long as the
    /// server runs. The server hands it to `UFFDIO_COPY` and `pwrite` (the
    /// kernel checks it: a bad pointer is an `EFAULT`), and, for regions
    /// resolved through an alias mapping, copies from it in userspace: that
    /// use is covered by the `unsafe` contract of
    /// [`Region::continue_via_alias`].
    fn as_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let _ = (offset, len);
        None
    }
}

/// A snapshot file mapped read-only (`MAP_PRIVATE`): the usual page source.
///
/// As with any mapped file, the file must not shrink while it is mapped:
/// reading a page past a new end raises SIGBUS in the copy that reads it.
/// Snapshot files are written once, before restore; do not truncate one
/// that a server is reading.
#[derive(Debug)]
pub struct MappedFile {
    ptr: *const u8,
    len: u64,
    _file: File,
}

// SAFETY: the mapping is read-only (PROT_READ) and owned by this handle,
// which unmaps it only on drop; the crate never writes through it and forms
// no reference into it, only reads it (the kernel in UFFDIO_COPY, or copies
// into caller buffers), so moving the handle across threads is sound.
unsafe impl Send for MappedFile {}
// SAFETY: as for Send: shared access is concurrent reads of read-only memory.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Opens and maps `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming `open`; [`Error::Kernel`] naming `mmap`.
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(|e| io_err("open(snapshot)", e))?;
        MappedFile::from_file(file)
    }

    /// Maps an open file.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming `fstat`; [`Error::Kernel`] naming `mmap`;
    /// [`Error::Invalid`] for an empty file.
    pub fn from_file(file: File) -> Result<MappedFile> {
        let len = file
            .metadata()
            .map_err(|e| io_err("fstat(snapshot)", e))?
            .len();
        if len == 0 {
            return Err(Error::invalid(
                "mmap(snapshot)",
                "the snapshot file is empty",
            ));
        }
        let ptr = sys::mmap_read_only(file.as_fd(), len as usize)
            .map_err(|e| Error::kernel("mmap(snapshot)", e))?;
        Ok(MappedFile {
            ptr,
            len,
            _file: file,
        })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `from_file`; no pointer into it outlives
        // the server, which holds this source in an Arc.
        unsafe { sys::munmap(self.ptr, self.len as usize) };
    }
}

impl PageSource for MappedFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let ptr = self
            .as_ptr(offset, buf.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        // SAFETY: `as_ptr` checked `offset + buf.len()` lies inside the
        // mapping, which is readable while `self` lives (file not shrunk: see
        // the type's docs); `buf` is a distinct, writable Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn as_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        // SAFETY: `offset <= end <= self.len`, so the result stays inside
        // (or one past) the mapping made in `from_file`.
        (end <= self.len).then(|| unsafe { self.ptr.add(offset as usize) })
    }
}

impl PageSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let ptr = PageSource::as_ptr(self, offset, buf.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        // SAFETY: `as_ptr` checked `offset + buf.len()` is inside the vector,
        // which `&self` keeps alive and unchanged; `buf` is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn as_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        (end <= self.as_slice().len() as u64).then(|| self[offset as usize..].as_ptr())
    }
}

fn io_err(op: &'static str, source: std::io::Error) -> Error {
    Error::Io { op, source }
}

/// How a region's faults are resolved.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Resolve {
    /// `UFFDIO_COPY` from the source (MISSING registration; anonymous or
    /// shmem memory).
    Copy,
    /// Fill the page cache, then `UFFDIO_CONTINUE` (MINOR registration on
    /// shmem or guest_memfd).
    Continue(Backing),
}

/// How the page cache of a [`Resolve::Continue`] region is filled.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Backing {
    /// Writes through a second, unregistered shared mapping of the same file
    /// in this process, at `addr` + (fault − region start).
    ///
    /// Built only by the `unsafe` [`Region::continue_via_alias`], whose
    /// contract makes `addr` valid (the variant is `#[non_exhaustive]` so
    /// that safe code elsewhere cannot build one with any address).
    #[non_exhaustive]
    Alias {
        /// The alias mapping's start for this region.
        addr: u64,
    },
    /// `pwrite` to the file at `offset` + (fault − region start) (shmem;
    /// guest_memfd with the RFC write() support).
    Pwrite {
        /// The file.
        fd: Arc<OwnedFd>,
        /// The file offset of the region's start.
        offset: u64,
    },
}

/// One range the VMM registered: where it lives, where its contents are.
#[derive(Clone, Debug)]
pub struct Region {
    host: u64,
    len: u64,
    source_offset: u64,
    gpa: Option<u64>,
    resolve: Option<Resolve>,
}

impl Region {
    /// `len` bytes at `host` in the VMM's address space.
    pub fn new(host: u64, len: u64) -> Region {
        Region {
            host,
            len,
            source_offset: 0,
            gpa: None,
            resolve: None,
        }
    }

    /// Where the region's contents start in the page source.
    pub fn source_offset(mut self, offset: u64) -> Region {
        self.source_offset = offset;
        self
    }

    /// The region's guest physical address (informational; reported in
    /// statistics and errors).
    pub fn gpa(mut self, gpa: u64) -> Region {
        self.gpa = Some(gpa);
        self
    }

    /// Resolve this region's faults with `UFFDIO_COPY` (overrides the
    /// server's default).
    pub fn resolve_copy(mut self) -> Region {
        self.resolve = Some(Resolve::Copy);
        self
    }

    /// Resolve with `UFFDIO_CONTINUE`, filling the page cache with `pwrite`
    /// on `fd` at `offset` + (fault − start).
    pub fn continue_via_pwrite(mut self, fd: Arc<OwnedFd>, offset: u64) -> Region {
        self.resolve = Some(Resolve::Continue(Backing::Pwrite { fd, offset }));
        self
    }

    /// Resolve with `UFFDIO_CONTINUE`, filling the page cache through the
    /// alias mapping at `addr`.
    ///
    /// # Safety
    ///
    /// `addr .. addr + len` must be a writable shared mapping, in this
    /// process, of the same file as the registered range, not registered
    /// with a userfaultfd, and it must stay mapped while the server runs;
    /// no Rust reference may point into it (the server writes it with plain
    /// copies).
    ///
    /// The server copies into the alias, in userspace, from the page
    /// source's [`PageSource::as_ptr`] when it returns one: the server's
    /// source must return only pointers valid for reads of the requested
    /// length while the server runs (the crate's [`MappedFile`] and
    /// `Vec<u8>` do).
    pub unsafe fn continue_via_alias(mut self, addr: u64) -> Region {
        self.resolve = Some(Resolve::Continue(Backing::Alias { addr }));
        self
    }
}

/// What to do when the VMM drops pages of a region (`UFFD_EVENT_REMOVE`:
/// `MADV_DONTNEED`/`MADV_REMOVE`, e.g. balloon inflation).
///
/// Under either policy, a fill of the region that was in flight when the
/// `REMOVE` was read (its source already read, its copy not yet issued) is
/// abandoned and its faulters woken, and fills that start while the
/// `REMOVE` is applied wait for it: a page the VMM dropped is not filled
/// again with the source's bytes behind its back. (A copy issued in the
/// instant between the kernel handing the event to a worker and that
/// worker taking it in can still land; closing that window would take
/// serialising every event read against every copy.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemovePolicy {
    /// Unregister the range: later faults get fresh zero pages from the
    /// kernel without involving the server (works for every memory type).
    Unregister,
    /// Keep the range registered and answer its next faults with zero pages.
    ZeroOnNextFault,
}

/// A log2 latency histogram: bucket `i` counts resolutions that took
/// `[2^i, 2^(i+1))` nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Histogram {
    /// Counts per bucket.
    pub buckets: Vec<u64>,
}

impl Histogram {
    /// The value below which `q` (0..=1) of the samples fall (the upper
    /// bound of its log2 bucket), or `None` without samples. See
    /// [`Stats::latency_quantile`] for a bound clamped to the maximum seen.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(Duration::from_nanos(1u64 << (i + 1).min(63)));
            }
        }
        None
    }

    /// The number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One error a [`Server`] met while serving, recorded in [`Stats::errors`]
/// instead of stopping it: what the server was doing, the host addresses it
/// concerns, and the [`Error`].
///
/// Its `Display` reads `<op> <start>..<end>: <error>`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeError {
    /// What the server was doing: `"fill"` (resolving a fault or a
    /// fault-around or prefetch window), `"page source read"`,
    /// `"page cache fill"` (the `pwrite` of a `Continue` region),
    /// `"wake"`, `"REMOVE"`, `"event"` (a malformed event range),
    /// `"deferred fault"` (given up after
    /// [`ServerBuilder::eagain_timeout`]) or `"read events"`.
    pub op: &'static str,
    /// The host addresses concerned, when the error concerns some.
    pub range: Option<std::ops::Range<u64>>,
    /// Where `range`'s contents start in the page source, for errors
    /// reading or writing them.
    pub source_offset: Option<u64>,
    /// What went wrong (shared: `Stats` is `Clone`, [`Error`] is not).
    pub error: Arc<Error>,
}

impl ServeError {
    fn new(op: &'static str, range: Option<std::ops::Range<u64>>, error: Error) -> ServeError {
        ServeError {
            op,
            range,
            source_offset: None,
            error: Arc::new(error),
        }
    }

    fn at_source(mut self, offset: u64) -> ServeError {
        self.source_offset = Some(offset);
        self
    }
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.op)?;
        if let Some(r) = &self.range {
            write!(f, " {:#x}..{:#x}", r.start, r.end)?;
        }
        if let Some(off) = self.source_offset {
            write!(f, " (source offset {off:#x})")?;
        }
        write!(f, ": {}", self.error)
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.error)
    }
}

/// What a server did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Page-fault events read.
    pub faults: u64,
    /// Pages filled with `UFFDIO_COPY`.
    pub pages_copied: u64,
    /// Pages mapped with `UFFDIO_CONTINUE`.
    pub pages_continued: u64,
    /// Pages answered with zeroes (after `REMOVE`).
    pub pages_zeroed: u64,
    /// Pages filled by prefetch (included in the counts above).
    pub pages_prefetched: u64,
    /// `EEXIST` answers (already present; the faulter was woken).
    pub eexist: u64,
    /// Faults deferred on `EAGAIN`.
    pub eagain: u64,
    /// Explicit `UFFDIO_WAKE`s.
    pub wakes: u64,
    /// `REMOVE`, `UNMAP`, `REMAP`, `FORK` and unknown events.
    pub other_events: u64,
    /// Time from reading a fault to resolving its page.
    pub latency: Histogram,
    /// The longest such time.
    pub max_latency: Duration,
    /// Source offsets of faulting pages, in order (with
    /// [`ServerBuilder::record`]).
    pub fault_log: Vec<u64>,
    /// Errors met (the fault they concern is left to its timeout or the
    /// VMM), at most 1000.
    pub errors: Vec<ServeError>,
    /// Why the server stopped, when it stopped by itself.
    pub stopped_because: Option<String>,
}

impl Stats {
    /// [`Histogram::quantile`] of the latencies, clamped to the longest one
    /// seen (a bucket's upper bound can exceed it).
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        self.latency.quantile(q).map(|d| d.min(self.max_latency))
    }

    /// The recorded working set: distinct faulting source offsets in first
    /// touch order, for [`ServerBuilder::prefetch`] on the next run.
    pub fn working_set(&self) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        self.fault_log
            .iter()
            .copied()
            .filter(|o| seen.insert(*o))
            .collect()
    }
}

/// Builds a [`Server`]; see [`Server::builder`].
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
    watch: Option<OwnedFd>,
    page_size: Option<u64>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("regions", &self.regions)
            .field("fault_around", &self.fault_around)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Adds a region.
    pub fn region(mut self, region: Region) -> Self {
        self.regions.push(region);
        self
    }

    /// The page source (required).
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
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Source offsets to fill in the background, in order.
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

    /// Record the fault log ([`Stats::fault_log`]).
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

    /// Stop serving when `fd` (e.g. the socket to the VMM) hangs up or
    /// becomes readable with end-of-file: the VMM is gone.
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
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the rule: a source is set; regions are
    /// non-empty, page aligned, do not overlap and lie inside the source;
    /// workers >= 1. [`Error::Kernel`] if the fd cannot be made
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
        let source = self
            .source
            .ok_or_else(|| Error::invalid(op, "no page source was set"))?;
        if self.workers == 0 {
            return Err(Error::invalid(op, "workers must be at least 1"));
        }
        if self.regions.is_empty() {
            return Err(Error::invalid(op, "no region was added"));
        }
        let mut sorted: Vec<&Region> = self.regions.iter().collect();
        sorted.sort_by_key(|r| r.host);
        for (i, r) in sorted.iter().enumerate() {
            if r.len == 0
                || !r.host.is_multiple_of(page)
                || !r.len.is_multiple_of(page)
                || !r.source_offset.is_multiple_of(page)
            {
                return Err(Error::invalid(
                    op,
                    format!(
                        "region {:#x}+{:#x} (source offset {:#x}) must be non-empty and page aligned",
                        r.host, r.len, r.source_offset
                    ),
                ));
            }
            if r.host.checked_add(r.len).is_none() {
                return Err(Error::invalid(
                    op,
                    format!("region {:#x}+{:#x} overflows", r.host, r.len),
                ));
            }
            match r.source_offset.checked_add(r.len) {
                Some(end) if end <= source.len() => {}
                _ => {
                    return Err(Error::invalid(
                        op,
                        format!(
                            "region {:#x}+{:#x} reads source {:#x}..+{:#x}, past its length {:#x}",
                            r.host,
                            r.len,
                            r.source_offset,
                            r.len,
                            source.len()
                        ),
                    ));
                }
            }
            if let Some(next) = sorted.get(i + 1)
                && r.host + r.len > next.host
            {
                return Err(Error::invalid(
                    op,
                    format!("regions at {:#x} and {:#x} overlap", r.host, next.host),
                ));
            }
        }
        sys::set_nonblocking(self.uffd.as_fd())
            .map_err(|e| Error::kernel("fcntl(O_NONBLOCK)", e))?;
        let wake = sys::eventfd().map_err(|e| Error::kernel("eventfd", e))?;
        let window_pages = (self.fault_around / page).max(1);
        let window_pages = 1u64 << (63 - window_pages.leading_zeros());
        let regions = self
            .regions
            .into_iter()
            .map(|r| {
                let pages = r.len / page;
                let resolve = r.resolve.clone().unwrap_or_else(|| self.resolve.clone());
                RegionState {
                    host: r.host,
                    len: r.len,
                    source_offset: r.source_offset,
                    resolve,
                    active: true,
                    claimed: Bitmap::new(pages),
                    done: Bitmap::new(pages),
                    removed: Bitmap::new(pages),
                    next_seq: AtomicU64::new(u64::MAX),
                    window: AtomicU64::new(window_pages),
                    removes: AtomicU64::new(0),
                    removing: AtomicU64::new(0),
                    reset: RwLock::new(()),
                }
            })
            .map(Arc::new)
            .collect();
        let shared = Arc::new(Shared {
            uffd: self.uffd,
            regions: RwLock::new(regions),
            source,
            page,
            window_pages,
            eagain_timeout: self.eagain_timeout,
            remove: self.remove,
            record: self.record,
            busy_poll: self.busy_poll,
            stop: AtomicBool::new(false),
            wake,
            watch: self.watch,
            active_faults: AtomicUsize::new(0),
            deferred: Mutex::new(Vec::new()),
            counters: Counters::default(),
            latency: Mutex::new((vec![0; 64], Duration::ZERO)),
            log: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            stopped_because: Mutex::new(None),
        });
        let mut threads = Vec::new();
        for i in 0..self.workers {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("uffd-serve-{i}"))
                .spawn(move || worker(&s))
                .map_err(|e| io_err("spawn worker", e));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_threads(&shared, threads);
                    return Err(e);
                }
            }
        }
        if !self.prefetch.is_empty() || self.prefetch_all {
            let s = shared.clone();
            let list = self.prefetch;
            let all = self.prefetch_all;
            match std::thread::Builder::new()
                .name("uffd-prefetch".into())
                .spawn(move || prefetcher(&s, &list, all))
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
            watch: None,
            page_size: None,
        }
    }

    /// A snapshot of the statistics so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Whether the server stopped by itself (the watched fd closed).
    pub fn is_stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
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
    shared.stop.store(true, Ordering::Release);
    sys::eventfd_signal(shared.wake.as_fd());
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

/// The most one fill ioctl covers (512 KiB; one page where pages are
/// larger). A sequential window grows to 8x the fault-around size, and one
/// 4 MiB `UFFDIO_COPY` keeps a thread that faults on its pages waiting about
/// 1.5 ms; in 512 KiB pieces it waits for one piece.
const MAX_FILL: u64 = 512 << 10;

/// Atomic bit set over a region's pages.
struct Bitmap(Box<[AtomicU64]>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets bit `i`; returns whether it was already set.
    fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.0[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    fn clear(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_and(!(1u64 << (i % 64)), Ordering::AcqRel);
    }

    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }
}

struct RegionState {
    host: u64,
    len: u64,
    source_offset: u64,
    resolve: Resolve,
    active: bool,
    /// A worker took the page (fill in progress or done).
    claimed: Bitmap,
    /// The page is filled and mapped.
    done: Bitmap,
    /// Dropped by the VMM: the next fault gets zeroes.
    removed: Bitmap,
    /// The page index a sequential streak would fault next.
    next_seq: AtomicU64,
    /// The current window, in pages.
    window: AtomicU64,
    /// Bumped (first thing) by every `REMOVE` that touches the region, so
    /// that a fill which read its source before the REMOVE was handled
    /// does not then copy snapshot data over a page the VMM dropped.
    removes: AtomicU64,
    /// `REMOVE`s touching the region being applied right now: fills of
    /// source data wait (are deferred) until they are done.
    removing: AtomicU64,
    /// Held shared by a fill from its claim to its bookkeeping, and
    /// exclusively by the `ZeroOnNextFault` reset after `REMOVE`, so that a
    /// reset never lands between a fill's ioctl (which already woke the
    /// faulter, who may drop the page again at once) and its marking the
    /// page done, nor between a fault's claim check and its done check.
    reset: RwLock<()>,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    copied: AtomicU64,
    continued: AtomicU64,
    zeroed: AtomicU64,
    prefetched: AtomicU64,
    eexist: AtomicU64,
    eagain: AtomicU64,
    wakes: AtomicU64,
    other: AtomicU64,
}

struct Deferred {
    addr: u64,
    kind: FaultKind,
    started: Instant,
    deadline: Instant,
}

struct Shared {
    uffd: Uffd,
    regions: RwLock<Vec<Arc<RegionState>>>,
    source: Arc<dyn PageSource>,
    page: u64,
    window_pages: u64,
    eagain_timeout: Duration,
    remove: RemovePolicy,
    record: bool,
    busy_poll: bool,
    stop: AtomicBool,
    wake: OwnedFd,
    watch: Option<OwnedFd>,
    active_faults: AtomicUsize,
    deferred: Mutex<Vec<Deferred>>,
    counters: Counters,
    latency: Mutex<(Vec<u64>, Duration)>,
    log: Mutex<Vec<u64>>,
    errors: Mutex<Vec<ServeError>>,
    stopped_because: Mutex<Option<String>>,
}

/// How a fill attempt ended.
enum Fill {
    /// Filled (or found filled), faulter woken.
    Done,
    /// `EAGAIN`: retry after reading events.
    Again,
    /// Failed; reported.
    Failed,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Stops every worker, recording the first reason given.
    fn stop_because(&self, why: &str) {
        lock(&self.stopped_because).get_or_insert_with(|| why.into());
        self.stop.store(true, Ordering::Release);
        sys::eventfd_signal(self.wake.as_fd());
    }

    fn error(&self, op: &'static str, range: Option<std::ops::Range<u64>>, error: Error) {
        self.report(ServeError::new(op, range, error));
    }

    fn report(&self, error: ServeError) {
        let mut e = lock(&self.errors);
        if e.len() < 1000 {
            e.push(error);
        }
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let (buckets, max) = lock(&self.latency).clone();
        Stats {
            faults: c.faults.load(Ordering::Relaxed),
            pages_copied: c.copied.load(Ordering::Relaxed),
            pages_continued: c.continued.load(Ordering::Relaxed),
            pages_zeroed: c.zeroed.load(Ordering::Relaxed),
            pages_prefetched: c.prefetched.load(Ordering::Relaxed),
            eexist: c.eexist.load(Ordering::Relaxed),
            eagain: c.eagain.load(Ordering::Relaxed),
            wakes: c.wakes.load(Ordering::Relaxed),
            other_events: c.other.load(Ordering::Relaxed),
            latency: Histogram { buckets },
            max_latency: max,
            fault_log: lock(&self.log).clone(),
            errors: lock(&self.errors).clone(),
            stopped_because: lock(&self.stopped_because).clone(),
        }
    }

    fn record_latency(&self, d: Duration) {
        let ns = d.as_nanos().max(1) as u64;
        let b = (63 - ns.leading_zeros()) as usize;
        let mut l = lock(&self.latency);
        l.0[b] += 1;
        if d > l.1 {
            l.1 = d;
        }
    }

    fn find(&self, addr: u64) -> Option<Arc<RegionState>> {
        let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
        regions
            .iter()
            .find(|r| r.active && addr >= r.host && addr < r.host + r.len)
            .cloned()
    }

    fn wake_page(&self, addr: u64) {
        self.counters.wakes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.uffd.wake(addr..addr + self.page) {
            self.error("wake", Some(addr..addr + self.page), e);
        }
    }

    /// Fills `count` pages of `r` from page `first` (all claimed by the
    /// caller) and marks them done. Returns how it ended and how many
    /// pages were filled.
    fn fill(
        &self,
        r: &RegionState,
        first: u64,
        count: u64,
        buf: &mut Vec<u8>,
        prefetch: bool,
    ) -> (Fill, u64) {
        let page = self.page;
        let addr = r.host + first * page;
        let len = count * page;
        let zero = r.removed.get(first);
        let src_off = r.source_offset + first * page;
        let removes = r.removes.load(Ordering::SeqCst);
        if !zero && r.removing.load(Ordering::SeqCst) > 0 {
            // A REMOVE touching the region is being applied: retry after it
            // (as after EAGAIN), when the removed pages are known.
            for i in first..first + count {
                r.claimed.clear(i);
            }
            return (Fill::Again, 0);
        }
        let outcome = match &r.resolve {
            Resolve::Copy if zero => self.uffd.zeropage(addr..addr + len, Mode::empty()),
            Resolve::Copy => {
                let ptr = match self.source.as_ptr(src_off, len) {
                    Some(p) => p,
                    None => {
                        buf.resize(len as usize, 0);
                        if let Err(e) = self.source.read_at(src_off, &mut buf[..len as usize]) {
                            self.report(
                                ServeError::new(
                                    "page source read",
                                    Some(addr..addr + len),
                                    Error::Io {
                                        op: "PageSource::read_at",
                                        source: e,
                                    },
                                )
                                .at_source(src_off),
                            );
                            // Release the claims, or later faults on these
                            // pages are taken for fills in progress and never
                            // resolved.
                            for i in first..first + count {
                                r.claimed.clear(i);
                            }
                            return (Fill::Failed, 0);
                        }
                        buf.as_ptr()
                    }
                };
                if let Some(aborted) = self.removed_meanwhile(r, removes, first, count) {
                    return aborted;
                }
                // SAFETY: `ptr` is valid for `len` bytes: either the source's
                // mapping (valid while the server holds the source) or `buf`.
                unsafe { self.uffd.copy(addr, ptr, len, Mode::empty()) }
            }
            Resolve::Continue(backing) => {
                if let Err(err) = self.fill_page_cache(r, backing, first, count, zero, buf) {
                    self.report(err);
                    for i in first..first + count {
                        r.claimed.clear(i);
                    }
                    return (Fill::Failed, 0);
                }
                if !zero && let Some(aborted) = self.removed_meanwhile(r, removes, first, count) {
                    return aborted;
                }
                self.uffd.r#continue(addr..addr + len, Mode::empty())
            }
        };
        let counter = match (&r.resolve, zero) {
            (_, true) => &self.counters.zeroed,
            (Resolve::Copy, false) => &self.counters.copied,
            (Resolve::Continue(_), false) => &self.counters.continued,
        };
        match outcome {
            Ok(_) => {
                for i in first..first + count {
                    r.done.set(i);
                    r.removed.clear(i);
                }
                counter.fetch_add(count, Ordering::Relaxed);
                if prefetch {
                    self.counters.prefetched.fetch_add(count, Ordering::Relaxed);
                }
                (Fill::Done, count)
            }
            Err(Error::Exists { done, .. }) => {
                // Pages up to `done` were filled; the next one was present.
                let filled = done / page;
                for i in first..(first + filled + 1).min(first + count) {
                    r.done.set(i);
                }
                counter.fetch_add(filled, Ordering::Relaxed);
                self.counters.eexist.fetch_add(1, Ordering::Relaxed);
                // The present page's faulter (if any) is not woken by a failed fill.
                self.wake_page(addr + filled * page);
                // Release the rest so that later faults fill them.
                for i in (first + filled + 1)..first + count {
                    r.claimed.clear(i);
                }
                (Fill::Done, filled + 1)
            }
            Err(Error::Again { done, .. }) => {
                let filled = done / page;
                for i in first..first + filled {
                    r.done.set(i);
                }
                for i in first + filled..first + count {
                    r.claimed.clear(i);
                }
                counter.fetch_add(filled, Ordering::Relaxed);
                if prefetch {
                    self.counters
                        .prefetched
                        .fetch_add(filled, Ordering::Relaxed);
                }
                (Fill::Again, filled)
            }
            Err(e) => {
                for i in first..first + count {
                    r.claimed.clear(i);
                }
                match e.errno() {
                    // The VMM's address space is gone: nothing is left to serve.
                    Some(Errno(libc::ESRCH)) => {
                        self.stop_because("the VMM's address space is gone (ESRCH)");
                    }
                    // The range was unmapped or unregistered meanwhile (an
                    // UNMAP, REMAP or REMOVE event the workers are applying).
                    Some(Errno(libc::ENOENT)) => {}
                    _ => self.report(
                        ServeError::new("fill", Some(addr..addr + len), e).at_source(src_off),
                    ),
                }
                (Fill::Failed, 0)
            }
        }
    }

    /// Whether a `REMOVE` touching `r` arrived since a fill of `count` pages
    /// from `first` began (`removes` was read then): the pages may have been
    /// dropped by the VMM after the fault was raised, and copying the
    /// source's bytes now would bring back, after `MADV_DONTNEED` returned,
    /// a page the VMM dropped (the kernel no longer refuses the copy with
    /// `EAGAIN` once the event is read). The fill is then abandoned: its
    /// claims released and its faulters woken, to fault again once the
    /// REMOVE is applied (zeroes or, unregistered, the kernel's own page).
    fn removed_meanwhile(
        &self,
        r: &RegionState,
        removes: u64,
        first: u64,
        count: u64,
    ) -> Option<(Fill, u64)> {
        if r.removes.load(Ordering::SeqCst) == removes {
            return None;
        }
        for i in first..first + count {
            r.claimed.clear(i);
        }
        let (a, b) = (
            r.host + first * self.page,
            r.host + (first + count) * self.page,
        );
        match self.uffd.wake(a..b) {
            Ok(())
            | Err(Error::Kernel {
                errno: Errno(libc::ENOENT),
                ..
            }) => {}
            Err(e) => self.error("wake", Some(a..b), e),
        }
        Some((Fill::Failed, 0))
    }

    fn fill_page_cache(
        &self,
        r: &RegionState,
        backing: &Backing,
        first: u64,
        count: u64,
        zero: bool,
        buf: &mut Vec<u8>,
    ) -> std::result::Result<(), ServeError> {
        let page = self.page;
        let len = (count * page) as usize;
        let src_off = r.source_offset + first * page;
        let src: *const u8 = if zero {
            buf.clear();
            buf.resize(len, 0);
            buf.as_ptr()
        } else {
            match self.source.as_ptr(src_off, len as u64) {
                Some(p) => p,
                None => {
                    buf.resize(len, 0);
                    self.source.read_at(src_off, &mut buf[..len]).map_err(|e| {
                        let host = r.host + first * page;
                        ServeError::new(
                            "page source read",
                            Some(host..host + len as u64),
                            Error::Io {
                                op: "PageSource::read_at",
                                source: e,
                            },
                        )
                        .at_source(src_off)
                    })?;
                    buf.as_ptr()
                }
            }
        };
        match backing {
            Backing::Alias { addr } => {
                let dst = (addr + first * page) as *mut u8;
                // SAFETY: the alias covers the region and nothing references
                // it (the `continue_via_alias` contract); `src` is `buf` or
                // the source's `as_ptr`, valid for `len` bytes (that contract
                // again). The two do not overlap: the alias is a shared file
                // mapping, the source a private mapping or our buffer.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
                Ok(())
            }
            Backing::Pwrite { fd, offset } => {
                let host = r.host + first * page;
                let cache_err = |e| {
                    ServeError::new("page cache fill", Some(host..host + len as u64), e)
                        .at_source(src_off)
                };
                let mut written = 0usize;
                while written < len {
                    let at = offset + first * page + written as u64;
                    // SAFETY: `src + written` is valid for `len - written` bytes.
                    let n = unsafe { sys::pwrite(fd.as_fd(), src.add(written), len - written, at) };
                    match n {
                        Ok(0) => {
                            return Err(cache_err(Error::Io {
                                op: "pwrite",
                                source: std::io::ErrorKind::WriteZero.into(),
                            }));
                        }
                        Ok(n) => written += n,
                        Err(Errno(libc::EINTR)) => continue,
                        Err(e) => return Err(cache_err(Error::kernel("pwrite", e))),
                    }
                }
                Ok(())
            }
        }
    }

    /// Serves one fault: the faulting page first, then the window.
    fn serve_fault(&self, addr: u64, kind: FaultKind, started: Instant, buf: &mut Vec<u8>) -> Fill {
        let page = self.page;
        let addr = addr & !(page - 1);
        let Some(r) = self.find(addr) else {
            // Perhaps at an address a REMAP is about to name: its event was
            // read (which lets the VMM go on and fault there) but another
            // worker has not applied it yet. Retry after reading events, like
            // EAGAIN; given up (and reported) after the same timeout.
            return Fill::Again;
        };
        let idx = (addr - r.host) / page;
        if self.record {
            lock(&self.log).push(r.source_offset + idx * page);
        }
        if kind == FaultKind::WriteProtect || kind == FaultKind::ReadWriteProtect {
            // Protection faults are the VMM's business; wake so it re-faults
            // after the VMM changes protection.
            self.wake_page(addr);
            return Fill::Done;
        }
        let reset = r.reset.read().unwrap_or_else(|p| p.into_inner());
        let (result, filled_here) = if r.claimed.set(idx) {
            if r.done.get(idx) {
                // Late or duplicate fault on a filled page.
                self.wake_page(addr);
            }
            // Otherwise another worker is filling it and will wake the range.
            (Fill::Done, false)
        } else {
            (self.fill(&r, idx, 1, buf, false).0, true)
        };
        drop(reset);
        if let Fill::Done = result {
            self.record_latency(started.elapsed());
            // Only a page filled here starts a window: a fault on a page that
            // another fill claimed is the faulter catching up with that fill
            // (a window or prefetch in flight), and taking it for a new access
            // would reset the sequential streak (and its window) mid-stream.
            if filled_here {
                self.fault_around(&r, idx, buf);
            }
        }
        result
    }

    /// Fills the rest of the window around page `idx` of `r`.
    fn fault_around(&self, r: &RegionState, idx: u64, buf: &mut Vec<u8>) {
        let pages = r.len / self.page;
        let base = self.window_pages;
        if base <= 1 {
            return;
        }
        // A fault where the last window ended continues a streak: grow the
        // window forward; anything else starts over with an aligned window.
        let sequential = r.next_seq.load(Ordering::Relaxed) == idx;
        let (start, w) = if sequential {
            let w = (r.window.load(Ordering::Relaxed) * 2).min(base * 8);
            r.window.store(w, Ordering::Relaxed);
            (idx, w)
        } else {
            r.window.store(base, Ordering::Relaxed);
            (idx & !(base - 1), base)
        };
        let end = (start + w).min(pages);
        r.next_seq.store(end, Ordering::Relaxed);
        self.fill_range(r, start, end, buf, false);
    }

    /// Fills every unclaimed page in `[start, end)` of `r`, run by run.
    /// Returns pages filled, or `None` on `EAGAIN`.
    fn fill_range(
        &self,
        r: &RegionState,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
        prefetch: bool,
    ) -> Option<u64> {
        let mut i = start;
        let mut total = 0;
        while i < end {
            if r.claimed.get(i) || r.removed.get(i) || self.stop.load(Ordering::Relaxed) {
                i += 1;
                continue;
            }
            // Claim a run of unclaimed pages, at most MAX_FILL bytes: the
            // kernel wakes a thread faulting on a claimed page only when the
            // whole ioctl is done, so a run bounds how long a faulter waits
            // for a fill in flight.
            let reset = r.reset.read().unwrap_or_else(|p| p.into_inner());
            let first = i;
            let max_run = (MAX_FILL / self.page).max(1);
            while i < end && i - first < max_run && !r.removed.get(i) && !r.claimed.set(i) {
                i += 1;
            }
            if i == first {
                i += 1;
                continue;
            }
            let (outcome, n) = self.fill(r, first, i - first, buf, prefetch);
            drop(reset);
            if first + n < i {
                // Part of the run was released unfilled (EAGAIN, EEXIST, an
                // error). A fault on it that arrived while it was claimed was
                // taken for a fill in progress and dropped: wake those
                // faulters so that they fault again.
                let (a, b) = (r.host + (first + n) * self.page, r.host + i * self.page);
                if let Err(e) = self.uffd.wake(a..b) {
                    self.error("wake", Some(a..b), e);
                }
            }
            match (outcome, n) {
                (Fill::Done, n) => total += n,
                (Fill::Again, _) => return None,
                (Fill::Failed, _) => return Some(total),
            }
        }
        Some(total)
    }

    fn handle(&self, ev: Event<Uffd>, buf: &mut Vec<u8>) {
        match ev {
            Event::Pagefault { kind, address, .. } => {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                self.active_faults.fetch_add(1, Ordering::AcqRel);
                let started = Instant::now();
                if let Fill::Again = self.serve_fault(address, kind, started, buf) {
                    self.counters.eagain.fetch_add(1, Ordering::Relaxed);
                    lock(&self.deferred).push(Deferred {
                        addr: address,
                        kind,
                        started,
                        deadline: started + self.eagain_timeout,
                    });
                }
                self.active_faults.fetch_sub(1, Ordering::AcqRel);
            }
            Event::Remove { start, end } => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                self.on_remove(start, end);
            }
            Event::Unmap { start, end } => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                if self.plausible("UNMAP", start, end.checked_sub(start), None) {
                    self.on_unmap(start, end);
                }
            }
            Event::Remap { from, to, len } => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                if self.plausible("REMAP", from, Some(len), Some(to)) {
                    self.on_remap(from, to, len);
                }
            }
            Event::Fork { uffd } => {
                // The child is not served: closing its userfaultfd unregisters
                // the child's ranges, so its faults are filled normally.
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                drop(uffd);
            }
            _ => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether an `UNMAP` or `REMAP` event describes a range the kernel could
    /// report: `start .. start + len` (and its destination `to .. to + len`)
    /// inside the address space, and aligned to the serving page size where
    /// it cuts a region. The region arithmetic relies on both; only a record
    /// that did not come from the kernel can break them (a peer's forged
    /// "userfaultfd", see `Uffd::from_initialized`), and it is reported and
    /// ignored rather than trusted.
    fn plausible(&self, what: &'static str, start: u64, len: Option<u64>, to: Option<u64>) -> bool {
        let page = self.page;
        let end = len.and_then(|l| start.checked_add(l));
        let to_fits = match (to, len) {
            (Some(t), Some(l)) => t.checked_add(l).is_some(),
            _ => true,
        };
        let ok = match end {
            Some(end) if to_fits => {
                let touches = self
                    .regions
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .any(|r| start < r.host + r.len && r.host < end);
                !touches
                    || (start.is_multiple_of(page)
                        && end.is_multiple_of(page)
                        && to.is_none_or(|t| t.is_multiple_of(page)))
            }
            _ => false,
        };
        if !ok {
            self.error(
                "event",
                None,
                Error::Protocol {
                    op: what,
                    what: format!(
                        "event {start:#x} (length {len:?}, to {to:?}) is not a range the kernel \
                         reports (it overflows or is not aligned to the page size {page:#x}): \
                         ignored"
                    ),
                },
            );
        }
        ok
    }

    fn on_remove(&self, start: u64, end: u64) {
        let page = self.page;
        let regions: Vec<Arc<RegionState>> = self
            .regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for r in regions.iter().filter(|r| r.active) {
            let s = start.max(r.host);
            let e = end.min(r.host + r.len);
            if s >= e {
                continue;
            }
            // First: fills in flight see the REMOVE before they copy, and
            // new ones wait for it (see `removed_meanwhile`).
            r.removing.fetch_add(1, Ordering::SeqCst);
            r.removes.fetch_add(1, Ordering::SeqCst);
            match self.remove {
                RemovePolicy::Unregister => {
                    let s = s & !(page - 1);
                    let e = (e + page - 1) & !(page - 1);
                    match self.uffd.unregister(s..e) {
                        Ok(()) => {}
                        // ENOMEM: the VMM's address space is gone (it
                        // exited); nothing is left to serve.
                        Err(err) if err.errno() == Some(Errno(libc::ENOMEM)) => {
                            self.stop_because(
                                "the VMM's address space is gone (ENOMEM on UFFDIO_UNREGISTER)",
                            );
                        }
                        Err(err) => self.error("REMOVE", Some(s..e), err),
                    }
                    // Mark the pages filled so the server never touches them again.
                    for i in (s - r.host) / page..(e - r.host) / page {
                        r.claimed.set(i);
                        r.done.set(i);
                    }
                }
                RemovePolicy::ZeroOnNextFault => {
                    let (lo, hi) = ((s - r.host) / page, (e - r.host).div_ceil(page));
                    let reset = r.reset.write().unwrap_or_else(|p| p.into_inner());
                    for i in lo..hi {
                        r.removed.set(i);
                        r.done.clear(i);
                        r.claimed.clear(i);
                    }
                    drop(reset);
                    // A fault on these pages taken, before the reset, for a
                    // fill in progress is not woken by that fill (it woke its
                    // faulters before the pages were dropped): wake the range
                    // so that such a fault is raised again.
                    let (a, b) = (r.host + lo * page, r.host + hi * page);
                    if let Err(err) = self.uffd.wake(a..b) {
                        self.error("REMOVE", Some(a..b), err);
                    }
                }
            }
            r.removing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn on_unmap(&self, start: u64, end: u64) {
        let mut regions = self.regions.write().unwrap_or_else(|p| p.into_inner());
        let mut keep = Vec::new();
        for r in regions.drain(..) {
            let (s, e) = (r.host, r.host + r.len);
            if end <= s || start >= e {
                keep.push(r);
                continue;
            }
            // Keep the parts outside [start, end) as new regions with fresh state.
            for (a, b) in [(s, start.max(s).min(e)), (end.max(s).min(e), e)] {
                if a < b {
                    keep.push(Arc::new(sub_region(&r, a, b, self.page)));
                }
            }
        }
        *regions = keep;
    }

    fn on_remap(&self, from: u64, to: u64, len: u64) {
        let mut regions = self.regions.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for r in regions.drain(..) {
            let (s, e) = (r.host, r.host + r.len);
            if from + len <= s || from >= e {
                out.push(r);
                continue;
            }
            let (a, b) = (from.max(s), (from + len).min(e));
            if s < a {
                out.push(Arc::new(sub_region(&r, s, a, self.page)));
            }
            let mut moved = sub_region(&r, a, b, self.page);
            moved.host = to + (a - from);
            out.push(Arc::new(moved));
            if b < e {
                out.push(Arc::new(sub_region(&r, b, e, self.page)));
            }
        }
        *regions = out;
    }

    fn retry_deferred(&self, buf: &mut Vec<u8>) {
        let due: Vec<Deferred> = std::mem::take(&mut *lock(&self.deferred));
        let now = Instant::now();
        for d in due {
            if now > d.deadline {
                self.error(
                    "deferred fault",
                    // A forged fault record may name the top of the
                    // address space: no overflow.
                    Some(d.addr..d.addr.saturating_add(self.page)),
                    Error::Protocol {
                        op: "serve",
                        what: format!(
                            "the fault still got EAGAIN (or lay outside every region) after \
                             {:?}; given up",
                            self.eagain_timeout
                        ),
                    },
                );
                continue;
            }
            if let Fill::Again = self.serve_fault(d.addr, d.kind, d.started, buf) {
                lock(&self.deferred).push(d);
            }
        }
    }

    fn watch_closed(&self) -> bool {
        let Some(w) = &self.watch else { return false };
        let mut p = [sys::pollfd(w.as_fd(), libc::POLLIN | libc::POLLRDHUP)];
        if !matches!(sys::poll(&mut p, 0), Ok(1..)) {
            return false;
        }
        if p[0].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            return true;
        }
        // Readable: data or end-of-file. MSG_PEEK leaves any data in place.
        let mut b = [0u8; 1];
        sys::recv(w.as_fd(), &mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) == Ok(0)
    }
}

fn sub_region(r: &RegionState, a: u64, b: u64, page: u64) -> RegionState {
    let first = (a - r.host) / page;
    let pages = (b - a) / page;
    let copy_bits = |src: &Bitmap| {
        let m = Bitmap::new(pages);
        for i in 0..pages {
            if src.get(first + i) {
                m.set(i);
            }
        }
        m
    };
    RegionState {
        host: a,
        len: b - a,
        source_offset: r.source_offset + (a - r.host),
        resolve: match &r.resolve {
            Resolve::Continue(Backing::Alias { addr }) => Resolve::Continue(Backing::Alias {
                addr: addr + (a - r.host),
            }),
            Resolve::Continue(Backing::Pwrite { fd, offset }) => {
                Resolve::Continue(Backing::Pwrite {
                    fd: fd.clone(),
                    offset: offset + (a - r.host),
                })
            }
            other => other.clone(),
        },
        active: r.active,
        // Only filled pages stay claimed: a claim of a fill in flight belongs
        // to the old state (its bookkeeping goes there), and carried over it
        // would make every later fault on the page wait for that fill.
        claimed: copy_bits(&r.done),
        done: copy_bits(&r.done),
        removed: copy_bits(&r.removed),
        next_seq: AtomicU64::new(u64::MAX),
        window: AtomicU64::new(r.window.load(Ordering::Relaxed)),
        removes: AtomicU64::new(0),
        removing: AtomicU64::new(0),
        reset: RwLock::new(()),
    }
}

fn worker(s: &Shared) {
    let mut events = EventBuffer::with_capacity(64);
    let mut buf = Vec::new();
    while !s.stop.load(Ordering::Acquire) {
        if s.watch_closed() {
            s.stop_because("the VMM closed its end (the watched fd hung up)");
            break;
        }
        let pending = !lock(&s.deferred).is_empty();
        if !s.busy_poll {
            // Sleep without a timeout unless something needs a periodic
            // look: deferred faults (1 ms) or the watched fd (50 ms). Every
            // stop signals `wake`. A timeout arms and cancels an hrtimer on
            // every sleep, which costs about 0.25 µs per fault round trip.
            let timeout = if pending {
                1
            } else if s.watch.is_some() {
                50
            } else {
                -1
            };
            let mut p = [
                sys::pollfd(s.uffd.as_fd(), libc::POLLIN),
                sys::pollfd(s.wake.as_fd(), libc::POLLIN),
            ];
            // Errors (EINTR) only end the sleep early: the read below copes.
            let _ = sys::poll(&mut p, timeout);
        }
        match s.uffd.read_events(&mut events) {
            Ok(batch) => {
                // Handled straight from the reusable buffer: no allocation
                // per read on the fault path.
                for ev in batch {
                    s.handle(ev, &mut buf);
                }
            }
            Err(e) => {
                s.error("read events", None, e);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if pending {
            s.retry_deferred(&mut buf);
        }
        if s.busy_poll {
            std::hint::spin_loop();
        }
    }
}

fn prefetcher(s: &Shared, list: &[u64], all: bool) {
    let mut buf = Vec::new();
    let chunk_pages = s.window_pages.max(16);
    let yield_to_faults = |s: &Shared| {
        while s.active_faults.load(Ordering::Acquire) > 0 && !s.stop.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    };
    let region_of = |off: u64| -> Option<(Arc<RegionState>, u64)> {
        let regions = s.regions.read().unwrap_or_else(|p| p.into_inner());
        regions
            .iter()
            .find(|r| r.active && off >= r.source_offset && off < r.source_offset + r.len)
            .map(|r| (r.clone(), (off - r.source_offset) / s.page))
    };
    for &off in list {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        yield_to_faults(s);
        if let Some((r, idx)) = region_of(off) {
            let _ = s.fill_range(&r, idx, idx + 1, &mut buf, true);
        }
    }
    if !all {
        return;
    }
    let regions: Vec<Arc<RegionState>> =
        s.regions.read().unwrap_or_else(|p| p.into_inner()).clone();
    for r in regions {
        let pages = r.len / s.page;
        let mut i = 0;
        while i < pages {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            yield_to_faults(s);
            let end = (i + chunk_pages).min(pages);
            if s.fill_range(&r, i, end, &mut buf, true).is_none() {
                // EAGAIN: the address space is changing; let the workers read events.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            i = end;
        }
    }
}

// Keep the builder usable from other threads.
static_assertions::assert_impl_all!(Server: Send, Sync);
static_assertions::assert_impl_all!(ServerBuilder: Send);
