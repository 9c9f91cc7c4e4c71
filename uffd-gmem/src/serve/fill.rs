//! Resolving faults: one [`Claim`] filled with `UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE`, page cache + `UFFDIO_CONTINUE` or, where the page
//! cache is prefilled, `UFFDIO_CONTINUE` alone; a fault served
//! (its page first, then the fault-around window); and the one place that
//! issues an explicit `UFFDIO_WAKE`.
#![allow(unsafe_code)]

use super::config::{Backing, RemovePolicy, Resolve};
use super::state::{Claim, MAX_FILL, RegionState, Taken};
use super::stats::{Counters, ServeError, add};
use super::worker::Shared;
use crate::error::{Errno, Error};
use crate::event::FaultKind;
use crate::flags::Mode;
use crate::sys;
use std::ops::Range;
use std::os::fd::AsFd;

/// The ordinary wake: a fill ioctl issued without `MODE_DONTWAKE` wakes
/// every thread faulting in its range once the pages are mapped. That is
/// how nearly every faulter resumes; [`Shared::wake`] is for the few a fill
/// did not wake.
const WAKE_ON_FILL: Mode = Mode::empty();

/// How filling a claim (or serving a fault) ended: one meaning each.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fill {
    /// This many pages were filled (or found present) and their faulters
    /// woken; 0 when a fault needed only a wake or another fill has it.
    Done(u64),
    /// The kernel answered `EAGAIN` after this many pages: the address
    /// space is changing. Retry after reading events.
    Eagain(u64),
    /// A `REMOVE` touching the region is being applied: retry after it.
    Removing,
    /// No region holds the address (perhaps one a `REMAP` not yet applied
    /// names): retry after reading events.
    NoRegion,
    /// A `REMOVE` arrived while the source was read: abandoned, faulters
    /// woken to fault again.
    Abandoned,
    /// Failed: reported (or the range is gone: `ENOENT`).
    Failed,
}

impl Fill {
    /// Whether the fault is deferred and retried after reading events.
    pub(super) fn retry(&self) -> bool {
        matches!(self, Fill::Eagain(_) | Fill::Removing | Fill::NoRegion)
    }
}

impl Shared {
    /// `UFFDIO_WAKE` of `range`: the one explicit wake, for faulters that
    /// no fill will wake (protection faults, late faults on filled pages,
    /// the present page of an `EEXIST`, pages released unfilled).
    pub(super) fn wake(&self, c: &Counters, range: Range<u64>) {
        add(&c.wakes, 1);
        match self.uffd.wake(range.clone()) {
            Ok(()) => {}
            // The range was unregistered meanwhile (REMOVE, UNMAP).
            Err(e) if e.errno() == Some(Errno(libc::ENOENT)) => {}
            Err(e) => self.error("wake", Some(range), e),
        }
    }

    /// A fault on a page marked filled. Usually a late duplicate of a fault
    /// the fill already resolved: the page is mapped, and a wake lets the
    /// faulter go. Under [`RemovePolicy::ZeroOnNextFault`] the kernel drops
    /// a `REMOVE`d page beside the server's handling of the event, so it can
    /// drop a page after a fault on it was answered and marked filled (found
    /// by the loom model, `state/loom_model.rs`); that page is absent, and a
    /// wake alone would make it fault forever. There the fault is answered
    /// again as the dropped page must read (zeroes for a copied region, the
    /// page cache for a MINOR fault): a page still mapped answers `EEXIST`,
    /// nothing is written, and the wake follows.
    fn answer_filled(&self, c: &Counters, r: &RegionState, kind: FaultKind, page: Range<u64>) {
        if self.cfg.remove != RemovePolicy::ZeroOnNextFault {
            return self.wake(c, page);
        }
        let (answer, counter) = match (kind, &r.resolve) {
            (FaultKind::Minor, _) => (
                self.uffd.r#continue(page.clone(), WAKE_ON_FILL),
                &c.continued,
            ),
            (FaultKind::Missing, Resolve::Copy) => {
                (self.uffd.zeropage(page.clone(), WAKE_ON_FILL), &c.zeroed)
            }
            _ => return self.wake(c, page),
        };
        match answer {
            Ok(_) => add(counter, 1),
            Err(Error::Exists { .. }) => self.wake(c, page),
            Err(e) if e.errno() == Some(Errno(libc::ENOENT)) => {}
            Err(e) => self.error("fill", Some(page), e),
        }
    }

    /// Serves one fault: its page first (the faulter resumes at once), then
    /// the fault-around window when this worker filled the page.
    pub(super) fn serve_fault(
        &self,
        c: &Counters,
        r: Option<&RegionState>,
        addr: u64,
        kind: FaultKind,
        started: Option<std::time::Instant>,
        buf: &mut Vec<u8>,
    ) -> Fill {
        let Some(r) = r else { return Fill::NoRegion };
        let idx = (addr - r.host) / self.cfg.page;
        if self.cfg.record {
            super::worker::lock(&self.log).push(r.source_at(idx));
        }
        let page = r.span(idx..idx + 1);
        if matches!(kind, FaultKind::WriteProtect | FaultKind::ReadWriteProtect) {
            // The VMM's business: woken to fault again once it changes the
            // protection.
            self.wake(c, page);
            return Fill::Done(0);
        }
        // A MISSING fault on a prefilled region: the page cache lacks the
        // page (see `Backing::Prefilled`).
        let hole = kind == FaultKind::Missing && !r.resolve.reads_source();
        let result = match r.claim_page(idx) {
            Ok(claim) if hole => self.fill_hole(c, claim, buf),
            Ok(claim) => self.fill(c, claim, buf, false),
            Err(Taken::Filled) => {
                self.answer_filled(c, r, kind, page);
                Fill::Done(0)
            }
            // The fill holding it wakes this faulter.
            Err(Taken::InFlight) => Fill::Done(0),
        };
        if let Fill::Done(n) = result {
            if let Some(t) = started {
                self.record_latency(t.elapsed());
            }
            // Only a page filled here starts a window: a fault on a page
            // another fill claimed is the faulter catching up with it, and
            // would reset the sequential streak mid-stream.
            // Nor does a hole: its neighbours are likely holes too.
            if n > 0 && self.cfg.window_pages > 1 && !hole {
                let w = r.window(idx, self.cfg.window_pages);
                self.fill_range(c, r, w, buf, false);
            }
        }
        result
    }

    /// Fills every unclaimed page of `pages`, run by run (at most
    /// [`MAX_FILL`] bytes each: the kernel wakes a thread faulting on a
    /// claimed page only when the whole ioctl is done). Returns pages
    /// filled, or `None` when the address space is changing.
    pub(super) fn fill_range(
        &self,
        c: &Counters,
        r: &RegionState,
        pages: Range<u64>,
        buf: &mut Vec<u8>,
        prefetch: bool,
    ) -> Option<u64> {
        let max_run = (MAX_FILL / self.cfg.page).max(1);
        let mut total = 0;
        let mut at = pages.start;
        while !self.stopping() {
            let Some(claim) = r.claim_run(at, pages.end, max_run) else {
                break;
            };
            let run = claim.pages();
            at = run.end;
            let outcome = self.fill(c, claim, buf, prefetch);
            let n = match outcome {
                Fill::Done(n) | Fill::Eagain(n) => n,
                _ => 0,
            };
            if run.start + n < run.end && outcome != Fill::Abandoned {
                // Released unfilled: a fault on it while it was claimed was
                // taken for this fill and dropped; wake it to fault again.
                self.wake(c, r.span(run.start + n..run.end));
            }
            match outcome {
                Fill::Done(n) => total += n,
                Fill::Eagain(_) | Fill::Removing => return None,
                _ => return Some(total),
            }
        }
        Some(total)
    }

    /// Fills the claimed pages (from the source, or zeroes where the VMM
    /// dropped them) and marks them filled; the claim releases the rest.
    pub(super) fn fill(
        &self,
        c: &Counters,
        mut claim: Claim<'_>,
        buf: &mut Vec<u8>,
        prefetch: bool,
    ) -> Fill {
        let r = claim.region();
        let pages = claim.pages();
        let count = pages.end - pages.start;
        let span = r.span(pages.clone());
        let (addr, len) = (span.start, span.end - span.start);
        let src_off = r.source_at(pages.start);
        let zero = claim.zero();
        let epoch = r.remove_epoch();
        if !zero && r.remove_in_progress() {
            return Fill::Removing;
        }
        let prefilled = !r.resolve.reads_source();
        let outcome = match &r.resolve {
            // Zero-copy: the page cache holds the data. A page the VMM
            // dropped (`zero`) faulted MINOR, so the page cache still holds
            // it: mapped again as the kernel would (a punched page faults
            // MISSING and goes to `fill_hole`).
            Resolve::Continue(Backing::Prefilled) => {
                self.uffd.r#continue(span.clone(), WAKE_ON_FILL)
            }
            Resolve::Copy if zero => self.uffd.zeropage(span.clone(), WAKE_ON_FILL),
            Resolve::Copy => {
                let Some(ptr) = self.source_bytes(src_off, &span, buf) else {
                    return Fill::Failed;
                };
                if r.removed_since(epoch) {
                    return self.abandon(c, claim);
                }
                // SAFETY: `ptr` is valid for `len` bytes: the source's
                // mapping (valid while the server holds the source) or `buf`.
                unsafe { self.uffd.copy(addr, ptr, len, WAKE_ON_FILL) }
            }
            Resolve::Continue(backing) => {
                let src = if zero {
                    buf.clear();
                    buf.resize(len as usize, 0);
                    buf.as_ptr()
                } else {
                    let Some(p) = self.source_bytes(src_off, &span, buf) else {
                        return Fill::Failed;
                    };
                    p
                };
                if let Err(e) = self.fill_page_cache(r, backing, pages.start, src, len) {
                    self.report(e.at_source(src_off));
                    return Fill::Failed;
                }
                if !zero && r.removed_since(epoch) {
                    return self.abandon(c, claim);
                }
                self.uffd.r#continue(span.clone(), WAKE_ON_FILL)
            }
        };
        let counter = match (&r.resolve, zero) {
            (_, _) if prefilled => &c.continued,
            (_, true) => &c.zeroed,
            (Resolve::Copy, false) => &c.copied,
            (Resolve::Continue(_), false) => &c.continued,
        };
        let page = self.cfg.page;
        let filled = |done: u64| (done / page).min(count);
        match outcome {
            Ok(_) => {
                claim.settle(count, true);
                add(counter, count);
                if prefetch {
                    add(&c.prefetched, count);
                }
                Fill::Done(count)
            }
            Err(Error::Exists { done, .. }) => {
                // Pages before `done` were filled; the next one was present,
                // and its faulter (if any) is not woken by a failed fill.
                let n = filled(done);
                claim.settle(n + 1, false);
                add(counter, n);
                add(&c.eexist, 1);
                self.wake(c, r.span(pages.start + n..pages.start + n + 1));
                Fill::Done(n + 1)
            }
            Err(Error::Again { done, .. }) => {
                let n = filled(done);
                claim.settle(n, false);
                add(counter, n);
                if prefetch {
                    add(&c.prefetched, n);
                }
                Fill::Eagain(n)
            }
            // A prefilled page punched by a `REMOVE` that arrived since the
            // fill began (`EFAULT`: no page cache page to map): its faulter
            // faults again, MISSING.
            Err(_) if prefilled && r.removed_since(epoch) => self.abandon(c, claim),
            Err(e) => {
                match e.errno() {
                    // The VMM's address space is gone: nothing is left to serve.
                    Some(Errno(libc::ESRCH)) => {
                        self.stop_because("the VMM's address space is gone (ESRCH)");
                    }
                    // The range was unmapped or unregistered meanwhile (an
                    // UNMAP, REMAP or REMOVE event being applied).
                    Some(Errno(libc::ENOENT)) => {}
                    _ => self.report(ServeError::new("fill", Some(span), e).at_source(src_off)),
                }
                Fill::Failed
            }
        }
    }

    /// A MISSING fault on a [`Backing::Prefilled`] region: the page cache
    /// lacks the page. Expected after a `REMOVE` punched it (the claim is
    /// [`zero`](Claim::zero)); otherwise reported, as the region's promise
    /// broken. Either way answered with zeroes, by `UFFDIO_COPY` (which,
    /// unlike `UFFDIO_ZEROPAGE`, works on hugetlbfs too), so that the
    /// faulter resumes as the kernel would have resumed it over a hole.
    fn fill_hole(&self, c: &Counters, mut claim: Claim<'_>, buf: &mut Vec<u8>) -> Fill {
        let r = claim.region();
        let span = r.span(claim.pages());
        if !claim.zero() {
            let what = "a MISSING fault on a region whose page cache was said to be prefilled \
                        (Backing::Prefilled): the page cache lacks the page; answered with zeroes"
                .to_string();
            self.report(
                ServeError::new(
                    "fill",
                    Some(span.clone()),
                    Error::Protocol { op: "serve", what },
                )
                .at_source(r.source_at(claim.pages().start)),
            );
        }
        let len = span.end - span.start;
        buf.clear();
        buf.resize(len as usize, 0);
        // SAFETY: `buf` is valid for `len` bytes.
        match unsafe { self.uffd.copy(span.start, buf.as_ptr(), len, WAKE_ON_FILL) } {
            Ok(_) => {
                claim.settle(1, true);
                add(&c.zeroed, 1);
                Fill::Done(1)
            }
            // Present meanwhile (another thread's fault was resolved first).
            Err(Error::Exists { .. }) => {
                claim.settle(1, false);
                add(&c.eexist, 1);
                self.wake(c, span);
                Fill::Done(1)
            }
            Err(Error::Again { .. }) => Fill::Eagain(0),
            Err(e) if e.errno() == Some(Errno(libc::ENOENT)) => Fill::Failed,
            Err(e) if e.errno() == Some(Errno(libc::ESRCH)) => {
                self.stop_because("the VMM's address space is gone (ESRCH)");
                Fill::Failed
            }
            Err(e) => {
                self.report(ServeError::new("fill", Some(span), e));
                Fill::Failed
            }
        }
    }

    /// A `REMOVE` touching the region arrived since the fill began: the VMM
    /// may have dropped these pages after the fault was raised, and copying
    /// the source's bytes now would bring one back behind its back. The
    /// claim is released and the faulters woken, to fault again once the
    /// REMOVE is applied.
    fn abandon(&self, c: &Counters, claim: Claim<'_>) -> Fill {
        let span = claim.region().span(claim.pages());
        drop(claim);
        self.wake(c, span);
        Fill::Abandoned
    }

    /// A pointer to `span`'s bytes at source offset `off`: the source's own
    /// memory, or `buf` filled with `read_at`. `None` after reporting a
    /// failed read.
    fn source_bytes(&self, off: u64, span: &Range<u64>, buf: &mut Vec<u8>) -> Option<*const u8> {
        let len = span.end - span.start;
        if let Some(p) = self.source.as_ptr(off, len) {
            return Some(p);
        }
        buf.resize(len as usize, 0);
        match self.source.read_at(off, &mut buf[..len as usize]) {
            Ok(()) => Some(buf.as_ptr()),
            Err(e) => {
                let io = Error::Io {
                    op: "PageSource::read_at",
                    source: e,
                };
                self.report(
                    ServeError::new("page source read", Some(span.clone()), io).at_source(off),
                );
                None
            }
        }
    }

    /// Writes `len` bytes at `src` into the page cache of pages from
    /// `first` of a `Continue` region.
    fn fill_page_cache(
        &self,
        r: &RegionState,
        backing: &Backing,
        first: u64,
        src: *const u8,
        len: u64,
    ) -> Result<(), ServeError> {
        let delta = r.addr(first) - r.host;
        let len = len as usize;
        match backing {
            // Filled before the server started; `fill` never calls here.
            Backing::Prefilled => Ok(()),
            Backing::Alias { addr } => {
                let dst = (addr + delta) as *mut u8;
                // SAFETY: the alias covers the region and nothing references
                // it (the `continue_via_alias` contract); `src` is `buf` or
                // the source's `as_ptr`, valid for `len` bytes (that contract
                // again). The two do not overlap: the alias is a shared file
                // mapping, the source a private mapping or our buffer.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
                Ok(())
            }
            Backing::Pwrite { fd, offset } => {
                let host = r.addr(first);
                let cache_err =
                    |e| ServeError::new("page cache fill", Some(host..host + len as u64), e);
                let mut written = 0usize;
                while written < len {
                    let at = offset + delta + written as u64;
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
                        // A guest_memfd with GUEST_MEMFD_FLAG_WRITE never
                        // overwrites a page that holds data: the page at
                        // `at` is in the page cache already (written by a
                        // KVM userfault handler, or faulted in), which is
                        // what UFFDIO_CONTINUE needs. On to the next page.
                        Err(Errno(libc::EEXIST | libc::ENOSPC)) => {
                            written = len.min(written + (r.page - at % r.page) as usize);
                        }
                        Err(e) => return Err(cache_err(Error::kernel("pwrite", e))),
                    }
                }
                Ok(())
            }
        }
    }
}
