//! What a server reports: [`Stats`], the latency [`Histogram`] and the
//! [`ServeError`]s it met; and the counters the threads keep (one shard per
//! thread: no cache line is written by two threads on the fault path).

use crate::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[cfg(doc)]
use super::{Server, ServerBuilder};

/// A log2 latency histogram: bucket `i` counts resolutions that took
/// `[2^i, 2^(i+1))` nanoseconds.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use uffd_gmem::serve::Histogram;
///
/// let mut h = Histogram::default();
/// assert_eq!(h.quantile(0.5), None); // no samples
/// h.buckets = vec![0; 12];
/// h.buckets[10] = 3; // three took 1024..2048 ns
/// h.buckets[11] = 1; // one took 2048..4096 ns
/// assert_eq!(h.count(), 4);
/// assert_eq!(h.quantile(0.5), Some(Duration::from_nanos(2048)));
/// assert_eq!(h.quantile(1.0), Some(Duration::from_nanos(4096)));
/// ```
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
///
/// # Examples
///
/// A page source that fails: the background fill reports it and goes on.
///
/// ```
/// use std::time::Duration;
/// use uffd_gmem::serve::{PageSource, Region, Server};
/// use uffd_gmem::{HostMapping, RegisterMode, Uffd};
///
/// struct Broken;
/// impl PageSource for Broken {
///     fn len(&self) -> u64 { 1 << 20 }
///     fn read_at(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
///         Err(std::io::ErrorKind::BrokenPipe.into())
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::anonymous(page as usize)?;
/// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
/// let region = Region::new(mem.addr(), page);
/// let server = Server::builder(uffd).region(region).source(Broken).prefetch_all(true).spawn()?;
/// for _ in 0..1000 {
///     if !server.stats().errors.is_empty() {
///         break;
///     }
///     std::thread::sleep(Duration::from_millis(5));
/// }
/// let stats = server.shutdown()?; // never touched: nothing waits on it
/// let e = &stats.errors[0];
/// assert_eq!(e.range, Some(mem.addr()..mem.addr() + page), "{e}");
/// assert!(e.to_string().starts_with(e.op));
/// # Ok(())
/// # }
/// ```
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
    pub(super) fn new(
        op: &'static str,
        range: Option<std::ops::Range<u64>>,
        error: Error,
    ) -> ServeError {
        ServeError {
            op,
            range,
            source_offset: None,
            error: Arc::new(error),
        }
    }

    pub(super) fn at_source(mut self, offset: u64) -> ServeError {
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
///
/// # Examples
///
/// Recording a run's working set, to prefetch it on the next:
///
/// ```
/// use uffd_gmem::serve::{Region, Server};
/// use uffd_gmem::{HostMapping, RegisterMode, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::anonymous(4 * page as usize)?;
/// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
/// let server = Server::builder(uffd)
///     .region(Region::new(mem.addr(), 4 * page))
///     .source(vec![1u8; 4 * page as usize])
///     .record(true)
///     .spawn()?;
/// mem.read_at(3 * page, &mut [0u8; 8])?;
/// mem.read_at(page, &mut [0u8; 8])?;
/// let stats = server.shutdown()?;
/// assert_eq!((stats.faults, stats.pages_copied), (2, 2));
/// assert_eq!(stats.working_set(), [3 * page, page]); // source offsets
/// assert!(stats.latency_quantile(0.99).unwrap() <= stats.max_latency);
/// # Ok(())
/// # }
/// ```
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
    /// Time from reading a fault to resolving its page (with
    /// [`ServerBuilder::record`]; without it the server reads no clock on
    /// the fault path and this stays empty).
    pub latency: Histogram,
    /// The longest such time (with [`ServerBuilder::record`]).
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

/// One thread's counters, on a cache line of its own. Plain relaxed adds:
/// only its thread writes a shard; [`Stats`] sums the shards.
#[derive(Default)]
#[repr(align(128))]
pub(super) struct Counters {
    pub(super) faults: AtomicU64,
    pub(super) copied: AtomicU64,
    pub(super) continued: AtomicU64,
    pub(super) zeroed: AtomicU64,
    pub(super) prefetched: AtomicU64,
    pub(super) eexist: AtomicU64,
    pub(super) eagain: AtomicU64,
    pub(super) wakes: AtomicU64,
    pub(super) other: AtomicU64,
}

/// Adds `n` to a counter of this thread's shard.
pub(super) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Sums `shards` into the counters of a [`Stats`].
    pub(super) fn sum_into(shards: &[Counters], s: &mut Stats) {
        let get = |f: fn(&Counters) -> &AtomicU64| -> u64 {
            shards.iter().map(|c| f(c).load(Ordering::Relaxed)).sum()
        };
        s.faults = get(|c| &c.faults);
        s.pages_copied = get(|c| &c.copied);
        s.pages_continued = get(|c| &c.continued);
        s.pages_zeroed = get(|c| &c.zeroed);
        s.pages_prefetched = get(|c| &c.prefetched);
        s.eexist = get(|c| &c.eexist);
        s.eagain = get(|c| &c.eagain);
        s.wakes = get(|c| &c.wakes);
        s.other_events = get(|c| &c.other);
    }
}

/// The log2 bucket of a latency.
pub(super) fn bucket(d: Duration) -> usize {
    let ns = d.as_nanos().clamp(1, u64::MAX as u128) as u64;
    (63 - ns.leading_zeros()) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_nanos(1)), 0);
        assert_eq!(bucket(Duration::from_nanos(1024)), 10);
        assert_eq!(bucket(Duration::from_nanos(2047)), 10);
        let mut h = Histogram {
            buckets: vec![0; 64],
        };
        assert_eq!(h.quantile(0.5), None);
        h.buckets[10] = 99;
        h.buckets[20] = 1;
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile(0.5), Some(Duration::from_nanos(2048)));
        assert_eq!(h.quantile(1.0), Some(Duration::from_nanos(1 << 21)));
    }

    #[test]
    fn shards_sum() {
        let shards: Vec<Counters> = (0..3).map(|_| Counters::default()).collect();
        for (i, c) in shards.iter().enumerate() {
            add(&c.faults, i as u64 + 1);
            add(&c.wakes, 1);
        }
        let mut s = Stats::default();
        Counters::sum_into(&shards, &mut s);
        assert_eq!((s.faults, s.wakes, s.pages_copied), (6, 3, 0));
        assert_eq!(std::mem::align_of::<Counters>(), 128);
    }

    #[test]
    fn working_set_dedups_in_order() {
        let s = Stats {
            fault_log: vec![3, 1, 3, 2, 1],
            ..Stats::default()
        };
        assert_eq!(s.working_set(), vec![3, 1, 2]);
    }
}
