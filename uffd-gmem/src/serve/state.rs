//! Per-region state, pure bookkeeping (no system calls): which pages are
//! claimed by a fill, filled, or dropped by the VMM; the [`Claim`] guard;
//! the fault-around window; `REMOVE` epochs; and the arithmetic that splits
//! and moves regions on `UNMAP` and `REMAP`.

use super::config::{Backing, Resolve};
use super::sync::{AtomicU64, Ordering, RwLock, RwLockReadGuard};
use std::ops::Range;
use std::sync::Arc;

/// The most one fill ioctl covers (512 KiB; one page where pages are
/// larger). A sequential window grows to 8x the fault-around size, and one
/// 4 MiB `UFFDIO_COPY` keeps a thread that faults on its pages waiting about
/// 1.5 ms; in 512 KiB pieces it waits for one piece.
pub(super) const MAX_FILL: u64 = 512 << 10;

/// Atomic bit set over a region's pages.
pub(super) struct Bitmap(Box<[AtomicU64]>);

impl Bitmap {
    pub(super) fn new(bits: u64) -> Bitmap {
        Bitmap((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    /// Sets bit `i`; returns whether it was already set.
    pub(super) fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.0[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    pub(super) fn clear(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_and(!(1u64 << (i % 64)), Ordering::AcqRel);
    }

    pub(super) fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }

    /// A bitmap of `pages` bits copied from bits `first..first + pages`.
    fn slice(&self, first: u64, pages: u64) -> Bitmap {
        let m = Bitmap::new(pages);
        for i in (0..pages).filter(|i| self.get(first + i)) {
            m.set(i);
        }
        m
    }
}

/// One region as the server tracks it.
pub(super) struct RegionState {
    pub(super) host: u64,
    pub(super) len: u64,
    pub(super) source_offset: u64,
    pub(super) resolve: Resolve,
    pub(super) page: u64,
    /// A fill took the page (in progress or done).
    claimed: Bitmap,
    /// The page is filled and mapped.
    done: Bitmap,
    /// Dropped by the VMM: the next fault gets zeroes.
    removed: Bitmap,
    /// The page index a sequential streak would fault next.
    next_seq: AtomicU64,
    /// The current window, in pages.
    window: AtomicU64,
    /// Bumped (first thing) by every `REMOVE` that touches the region: a
    /// fill that read its source before sees the change and abandons.
    removes: AtomicU64,
    /// `REMOVE`s being applied right now: fills of source data wait.
    removing: AtomicU64,
    /// Held shared by every [`Claim`], exclusively by the `ZeroOnNextFault`
    /// reset: a reset never lands between a fill's ioctl (which woke the
    /// faulter, who may drop the page again at once) and its marking the
    /// page done, nor between a fault's claim check and its done check.
    reset: RwLock<()>,
}

/// Why a page could not be claimed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Taken {
    /// It is filled: a late or duplicate fault, to be woken.
    Filled,
    /// Another fill holds it and will wake its faulters.
    InFlight,
}

/// Pages `first..end` of a region taken for one fill. Whatever the fill did
/// not [`settle`](Claim::settle) is released when the claim is dropped, so
/// that later faults fill it: every way out of a fill releases, by
/// construction.
pub(super) struct Claim<'a> {
    r: &'a RegionState,
    first: u64,
    end: u64,
    settled: u64,
    _reset: RwLockReadGuard<'a, ()>,
}

impl<'a> Claim<'a> {
    pub(super) fn region(&self) -> &'a RegionState {
        self.r
    }

    /// The claimed pages.
    pub(super) fn pages(&self) -> Range<u64> {
        self.first..self.end
    }

    /// Whether the pages are to be answered with zeroes (dropped by the VMM
    /// under [`RemovePolicy::ZeroOnNextFault`](super::RemovePolicy)).
    pub(super) fn zero(&self) -> bool {
        self.r.removed.get(self.first)
    }

    /// Marks the first `n` pages filled (no longer dropped, when
    /// `mapped_here`: this fill mapped them); they stay claimed.
    pub(super) fn settle(&mut self, n: u64, mapped_here: bool) {
        let n = n.min(self.end - self.first);
        for i in self.first + self.settled..self.first + n {
            self.r.done.set(i);
            if mapped_here {
                self.r.removed.clear(i);
            }
        }
        self.settled = self.settled.max(n);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        for i in self.first + self.settled..self.end {
            self.r.claimed.clear(i);
        }
    }
}

/// Marks a region's `REMOVE` as being applied while it lives.
pub(super) struct Removing<'a>(&'a RegionState);

impl Drop for Removing<'_> {
    fn drop(&mut self) {
        self.0.removing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RegionState {
    pub(super) fn new(
        host: u64,
        len: u64,
        source_offset: u64,
        resolve: Resolve,
        page: u64,
        window_pages: u64,
    ) -> RegionState {
        let pages = len / page;
        RegionState {
            host,
            len,
            source_offset,
            resolve,
            page,
            claimed: Bitmap::new(pages),
            done: Bitmap::new(pages),
            removed: Bitmap::new(pages),
            next_seq: AtomicU64::new(u64::MAX),
            window: AtomicU64::new(window_pages),
            removes: AtomicU64::new(0),
            removing: AtomicU64::new(0),
            reset: RwLock::new(()),
        }
    }

    pub(super) fn pages(&self) -> u64 {
        self.len / self.page
    }

    pub(super) fn contains(&self, addr: u64) -> bool {
        addr >= self.host && addr - self.host < self.len
    }

    /// The host address of page `idx`.
    pub(super) fn addr(&self, idx: u64) -> u64 {
        self.host + idx * self.page
    }

    /// The host addresses of pages `p`.
    pub(super) fn span(&self, p: Range<u64>) -> Range<u64> {
        self.addr(p.start)..self.addr(p.end)
    }

    /// The source offset of page `idx`.
    pub(super) fn source_at(&self, idx: u64) -> u64 {
        self.source_offset + idx * self.page
    }

    fn reset_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.reset.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims page `idx` for a fill.
    pub(super) fn claim_page(&self, idx: u64) -> Result<Claim<'_>, Taken> {
        let reset = self.reset_guard();
        if !self.claimed.set(idx) {
            return Ok(self.claim(idx, idx + 1, reset));
        }
        if self.done.get(idx) {
            Err(Taken::Filled)
        } else {
            Err(Taken::InFlight)
        }
    }

    /// Claims the first run of unclaimed pages, not dropped by the VMM, in
    /// `from..end`, at most `max` long; `None` when there is none.
    pub(super) fn claim_run(&self, from: u64, end: u64, max: u64) -> Option<Claim<'_>> {
        let free = |i: u64| !self.claimed.get(i) && !self.removed.get(i);
        let mut i = from;
        while i < end {
            if !free(i) {
                i += 1;
                continue;
            }
            let reset = self.reset_guard();
            let first = i;
            while i < end && i - first < max && !self.removed.get(i) && !self.claimed.set(i) {
                i += 1;
            }
            if i > first {
                return Some(self.claim(first, i, reset));
            }
            i += 1;
        }
        None
    }

    fn claim<'a>(&'a self, first: u64, end: u64, reset: RwLockReadGuard<'a, ()>) -> Claim<'a> {
        Claim {
            r: self,
            first,
            end,
            settled: 0,
            _reset: reset,
        }
    }

    /// The rest of the fault-around window of a fault on page `idx` that
    /// this server filled (`base` pages configured, a power of two): a
    /// fault where the last window ended continues a streak and doubles the
    /// window forward (up to 8x `base`); any other starts over with an
    /// aligned window of `base` pages. Clipped to the region.
    pub(super) fn window(&self, idx: u64, base: u64) -> Range<u64> {
        let sequential = self.next_seq.load(Ordering::Relaxed) == idx;
        let (start, w) = if sequential {
            let w = (self.window.load(Ordering::Relaxed) * 2).min(base * 8);
            (idx, w)
        } else {
            (idx & !(base - 1), base)
        };
        self.window.store(w, Ordering::Relaxed);
        let end = (start + w).min(self.pages());
        self.next_seq.store(end, Ordering::Relaxed);
        start..end
    }

    /// Pages `start..end` (host addresses) clipped to the region, rounded
    /// out to whole pages; `None` when they do not meet.
    pub(super) fn page_range(&self, start: u64, end: u64) -> Option<Range<u64>> {
        let (s, e) = (start.max(self.host), end.min(self.host + self.len));
        (s < e).then(|| (s - self.host) / self.page..(e - self.host).div_ceil(self.page))
    }

    /// Starts applying a `REMOVE`: fills in flight see it before they copy
    /// ([`removed_since`](Self::removed_since)) and new ones wait for it
    /// ([`remove_in_progress`](Self::remove_in_progress)) until the guard
    /// drops.
    pub(super) fn begin_remove(&self) -> Removing<'_> {
        self.removing.fetch_add(1, Ordering::SeqCst);
        self.removes.fetch_add(1, Ordering::SeqCst);
        Removing(self)
    }

    /// The `REMOVE` epoch, read when a fill begins.
    pub(super) fn remove_epoch(&self) -> u64 {
        self.removes.load(Ordering::SeqCst)
    }

    /// Whether a `REMOVE` touching the region arrived since `epoch`.
    pub(super) fn removed_since(&self, epoch: u64) -> bool {
        self.removes.load(Ordering::SeqCst) != epoch
    }

    pub(super) fn remove_in_progress(&self) -> bool {
        self.removing.load(Ordering::SeqCst) > 0
    }

    /// `REMOVE` under `Unregister`: pages `p` are the kernel's now; marked
    /// filled so that the server never touches them again.
    pub(super) fn hand_to_kernel(&self, p: Range<u64>) {
        for i in p {
            self.claimed.set(i);
            self.done.set(i);
        }
    }

    /// `REMOVE` under `ZeroOnNextFault`: pages `p` are unfilled and answered
    /// with zeroes next; excluded from every claim while it runs.
    pub(super) fn reset_removed(&self, p: Range<u64>) {
        let _reset = self.reset.write().unwrap_or_else(|e| e.into_inner());
        for i in p {
            self.removed.set(i);
            self.done.clear(i);
            self.claimed.clear(i);
        }
    }

    /// A fresh region for `a..b` (host addresses, inside this one), carrying
    /// over which pages are filled and dropped.
    fn sub(&self, a: u64, b: u64) -> RegionState {
        let (first, pages, delta) = (
            (a - self.host) / self.page,
            (b - a) / self.page,
            a - self.host,
        );
        let resolve = match &self.resolve {
            Resolve::Continue(Backing::Alias { addr }) => {
                Resolve::Continue(Backing::Alias { addr: addr + delta })
            }
            Resolve::Continue(Backing::Pwrite { fd, offset }) => {
                Resolve::Continue(Backing::Pwrite {
                    fd: fd.clone(),
                    offset: offset + delta,
                })
            }
            other => other.clone(),
        };
        let mut r = RegionState::new(
            a,
            b - a,
            self.source_offset + delta,
            resolve,
            self.page,
            self.window.load(Ordering::Relaxed),
        );
        // Only filled pages stay claimed: a claim of a fill in flight belongs
        // to the old state (its bookkeeping goes there), and carried over it
        // would make every later fault on the page wait for that fill.
        r.claimed = self.done.slice(first, pages);
        r.done = self.done.slice(first, pages);
        r.removed = self.removed.slice(first, pages);
        r
    }
}

/// The regions after `UNMAP` of `start..end`: the parts outside it stay,
/// as fresh regions.
pub(super) fn unmap(regions: &[Arc<RegionState>], start: u64, end: u64) -> Vec<Arc<RegionState>> {
    let mut keep = Vec::new();
    for r in regions {
        let (s, e) = (r.host, r.host + r.len);
        if end <= s || start >= e {
            keep.push(r.clone());
            continue;
        }
        for (a, b) in [(s, start.max(s).min(e)), (end.max(s).min(e), e)] {
            if a < b {
                keep.push(Arc::new(r.sub(a, b)));
            }
        }
    }
    keep
}

/// The regions after `REMAP` of `from..from + len` to `to`: the moved part
/// follows, the rest stays.
pub(super) fn remap(
    regions: &[Arc<RegionState>],
    from: u64,
    to: u64,
    len: u64,
) -> Vec<Arc<RegionState>> {
    let mut out = Vec::new();
    for r in regions {
        let (s, e) = (r.host, r.host + r.len);
        if from + len <= s || from >= e {
            out.push(r.clone());
            continue;
        }
        let (a, b) = (from.max(s), (from + len).min(e));
        if s < a {
            out.push(Arc::new(r.sub(s, a)));
        }
        let mut moved = r.sub(a, b);
        moved.host = to + (a - from);
        out.push(Arc::new(moved));
        if b < e {
            out.push(Arc::new(r.sub(b, e)));
        }
    }
    out
}

/// Whether an `UNMAP` or `REMAP` record describes a range the kernel could
/// report: `start .. start + len` (and its destination `to .. to + len`)
/// inside the address space, and aligned to `page` where it cuts a region.
/// [`unmap`] and [`remap`] rely on both; only a record that did not come
/// from the kernel can break them (a peer's forged "userfaultfd", see
/// `Uffd::from_initialized`).
pub(super) fn plausible(
    regions: &[Arc<RegionState>],
    page: u64,
    start: u64,
    len: Option<u64>,
    to: Option<u64>,
) -> bool {
    let Some(end) = len.and_then(|l| start.checked_add(l)) else {
        return false;
    };
    if let (Some(t), Some(l)) = (to, len)
        && t.checked_add(l).is_none()
    {
        return false;
    }
    let touches = regions
        .iter()
        .any(|r| start < r.host + r.len && r.host < end);
    !touches
        || (start.is_multiple_of(page)
            && end.is_multiple_of(page)
            && to.is_none_or(|t| t.is_multiple_of(page)))
}

#[cfg(all(test, loom))]
mod loom_model;

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    fn region(host: u64, pages: u64) -> RegionState {
        RegionState::new(host, pages * P, 0x10_0000, Resolve::Copy, P, 4)
    }

    #[test]
    fn bitmap() {
        let b = Bitmap::new(130);
        assert!(!b.set(129));
        assert!(b.set(129));
        assert!(b.get(129) && !b.get(128) && !b.get(1));
        b.clear(129);
        assert!(!b.get(129));
        b.set(64);
        b.set(66);
        let s = b.slice(64, 3);
        assert!(s.get(0) && !s.get(1) && s.get(2));
    }

    #[test]
    fn claim_releases_what_it_did_not_settle() {
        let r = region(0x1000_0000, 16);
        {
            let c = r.claim_page(3).unwrap();
            assert_eq!(c.pages(), 3..4);
            assert_eq!(r.claim_page(3).err(), Some(Taken::InFlight));
            drop(c);
        }
        // Released: claimable again.
        let mut c = r.claim_page(3).unwrap();
        c.settle(1, true);
        drop(c);
        assert_eq!(r.claim_page(3).err(), Some(Taken::Filled));
        // A run settled in part releases the rest.
        let mut c = r.claim_run(4, 10, 128).unwrap();
        assert_eq!(c.pages(), 4..10);
        c.settle(2, false);
        drop(c);
        assert_eq!(r.claim_page(5).err(), Some(Taken::Filled));
        assert!(r.claim_page(6).is_ok());
    }

    #[test]
    fn claim_run_skips_claimed_and_removed_and_caps() {
        let r = region(0, 16);
        // (The reset excludes claims: done before any is held.)
        r.reset_removed(5..6);
        let held = r.claim_page(2).unwrap();
        let a = r.claim_run(0, 16, 128).unwrap();
        assert_eq!(a.pages(), 0..2);
        let b = r.claim_run(2, 16, 128).unwrap();
        assert_eq!(b.pages(), 3..5);
        let c = r.claim_run(5, 16, 4).unwrap();
        assert_eq!(c.pages(), 6..10);
        assert!(r.claim_run(0, 5, 128).is_none());
        drop((held, a, b, c));
        assert_eq!(r.claim_run(0, 16, 128).unwrap().pages(), 0..5);
        // The dropped page is claimable one by one, to be zeroed.
        let z = r.claim_page(5).unwrap();
        assert!(z.zero());
    }

    #[test]
    fn window_grows_along_streaks() {
        let r = region(0, 64);
        assert_eq!(r.window(5, 4), 4..8);
        assert_eq!(r.window(8, 4), 8..16);
        assert_eq!(r.window(16, 4), 16..32);
        assert_eq!(r.window(32, 4), 32..64);
        // Capped at 8x, clipped to the region.
        assert_eq!(r.window(64, 4), 64..64);
        assert_eq!(r.window(1, 4), 0..4);
        assert_eq!(r.window(61, 4), 60..64);
    }

    #[test]
    fn remove_bookkeeping() {
        let r = region(0x10000, 8);
        assert_eq!(r.page_range(0, 0x10000 + P + 1), Some(0..2));
        assert_eq!(r.page_range(0x10000 + 8 * P, u64::MAX), None);
        let e = r.remove_epoch();
        let g = r.begin_remove();
        assert!(r.remove_in_progress() && r.removed_since(e));
        drop(g);
        assert!(!r.remove_in_progress());
        r.claim_page(0).unwrap().settle(1, true);
        r.reset_removed(0..1);
        let mut c = r.claim_page(0).unwrap();
        assert!(c.zero());
        c.settle(1, true);
        drop(c);
        assert!(!r.removed.get(0) && r.done.get(0));
        r.hand_to_kernel(2..4);
        assert_eq!(r.claim_page(3).err(), Some(Taken::Filled));
    }

    #[test]
    fn unmap_and_remap_split_regions() {
        let r = Arc::new(region(0x10000, 8));
        r.claim_page(6).unwrap().settle(1, true);
        let _in_flight = r.claim_page(1).unwrap();
        let out = unmap(std::slice::from_ref(&r), 0x10000 + 2 * P, 0x10000 + 4 * P);
        let spans: Vec<_> = out
            .iter()
            .map(|r| (r.host, r.len, r.source_offset))
            .collect();
        assert_eq!(
            spans,
            [
                (0x10000, 2 * P, 0x10_0000),
                (0x10000 + 4 * P, 4 * P, 0x10_0000 + 4 * P)
            ]
        );
        // Filled pages carry over; a fill in flight does not.
        assert_eq!(out[1].claim_page(2).err(), Some(Taken::Filled));
        assert!(out[0].claim_page(1).is_ok());
        let moved = remap(std::slice::from_ref(&r), 0x10000 + 6 * P, 0x90000, 2 * P);
        let spans: Vec<_> = moved
            .iter()
            .map(|r| (r.host, r.len, r.source_offset))
            .collect();
        assert_eq!(
            spans,
            [
                (0x10000, 6 * P, 0x10_0000),
                (0x90000, 2 * P, 0x10_0000 + 6 * P)
            ]
        );
        assert_eq!(moved[1].claim_page(0).err(), Some(Taken::Filled));
    }

    #[test]
    fn plausibility_of_records() {
        let rs = [Arc::new(region(0x10000, 8))];
        assert!(plausible(&rs, P, 0x10000, Some(P), None));
        assert!(!plausible(&rs, P, 0x10001, Some(P), None));
        assert!(!plausible(&rs, P, 0x10000, Some(P), Some(0x123)));
        // Elsewhere, alignment does not matter; overflow always does.
        assert!(plausible(&rs, P, 0x1, Some(3), Some(7)));
        assert!(!plausible(&rs, P, u64::MAX, Some(2), None));
        assert!(!plausible(&rs, P, 0x1, Some(2), Some(u64::MAX)));
        assert!(!plausible(&rs, P, 0x1, None, None));
    }
}
