//! A loom model of the claim / fill / `REMOVE` protocol, over one page of a
//! real [`RegionState`]: every interleaving (within a preemption bound) of
//! faulting threads, fills and a `REMOVE`, checking that no page is filled
//! twice, none is left unserved, and no source data is put back into a
//! page the VMM dropped.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p uffd-gmem --lib --release
//! loom`.
//!
//! The bookkeeping is the real one (`claim_page`, `claim_run`, [`Claim`]'s
//! `zero`/`settle`/drop, `remove_epoch`, `remove_in_progress`,
//! `removed_since`, `page_range`, `begin_remove`, `hand_to_kernel`,
//! `reset_removed`). The kernel is simulated ([`Kernel`]), and the steps
//! that live in `fill.rs` and `worker.rs` rather than in `state.rs` are
//! replicated here, in the same order, each naming the lines it mirrors.
//!
//! Two assumptions of the model, both the residual window that
//! [`RemovePolicy`](crate::serve::RemovePolicy)'s documentation admits:
//! the worker reading the `REMOVE` event and its `begin_remove` are one
//! instant, and so are a fill's `removed_since` check and its ioctl (the
//! model holds the simulated page's lock across both). Without the second
//! the model finds a copy landing after the `MADV_DONTNEED`: a fill
//! preempted between its check and its `UFFDIO_COPY` while the whole
//! `REMOVE` goes by.

use super::super::config::Resolve;
use super::{Claim, RegionState, Taken};
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
use loom::thread;

const P: u64 = 4096;
/// The region's one page.
const PAGE: u64 = 0;

/// What the simulated page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Absent,
    Source,
    Zero,
}

/// The kernel's side of the one page: its contents, its userfaultfd
/// registration and wait queue, and the `REMOVE` in progress.
#[derive(Debug)]
struct Page {
    content: Content,
    registered: bool,
    /// `mmap_changing`: a `REMOVE` is queued and not yet read (fills get
    /// `EAGAIN`).
    changing: bool,
    /// The worker read the `REMOVE` (the VMM's `MADV_DONTNEED` proceeds).
    read: bool,
    /// The `MADV_DONTNEED` dropped the page.
    zapped: bool,
    /// Successful fill ioctls since the page was last dropped.
    fills: u32,
    /// Fill ioctls that found the page present (`EEXIST`).
    eexist: u32,
    /// Source data was copied in after the `MADV_DONTNEED`.
    stale: bool,
    /// Wakes of the page's wait queue (fill ioctls and `UFFDIO_WAKE`).
    wakes: u64,
}

/// The ioctl's answer.
#[derive(Debug, PartialEq, Eq)]
enum Io {
    Ok,
    Exists,
    Again,
    NoEnt,
}

struct Kernel {
    page: Mutex<Page>,
    queue: Condvar,
}

impl Kernel {
    fn new() -> Kernel {
        Kernel {
            page: Mutex::new(Page {
                content: Content::Absent,
                registered: true,
                changing: false,
                read: false,
                zapped: false,
                fills: 0,
                eexist: 0,
                stale: false,
                wakes: 0,
            }),
            queue: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Page> {
        self.page.lock().unwrap()
    }

    /// `UFFDIO_COPY` (`Source`) or `UFFDIO_ZEROPAGE` (`Zero`) without
    /// `MODE_DONTWAKE`, on the locked page.
    fn ioctl(&self, p: &mut Page, what: Content) -> Io {
        if !p.registered {
            return Io::NoEnt;
        }
        if p.changing {
            return Io::Again;
        }
        if p.content != Content::Absent {
            p.eexist += 1;
            return Io::Exists;
        }
        p.content = what;
        p.fills += 1;
        p.stale |= what == Content::Source && p.zapped;
        p.wakes += 1;
        self.queue.notify_all();
        Io::Ok
    }

    /// `UFFDIO_WAKE`.
    fn wake(&self) {
        self.lock().wakes += 1;
        self.queue.notify_all();
    }

    /// A vCPU touches the page: `None` when it needs no server (present,
    /// or unregistered: the kernel maps a zero page itself), else the fault
    /// is raised and the thread queued, at this many wakes.
    fn touch(&self) -> Option<u64> {
        let mut p = self.lock();
        if !p.registered && p.content == Content::Absent {
            p.content = Content::Zero;
        }
        (p.content == Content::Absent).then_some(p.wakes)
    }

    /// The faulting vCPU sleeps until woken (it was queued at `seen`
    /// wakes, or the range is unregistered); whether it then finds the page
    /// present (else it touches it again). A faulter no one wakes is a
    /// deadlock loom reports.
    fn sleep(&self, seen: u64) -> bool {
        let mut p = self.lock();
        while p.registered && p.wakes == seen {
            p = self.queue.wait(p).unwrap();
        }
        p.content != Content::Absent
    }
}

/// `fill.rs`'s `Fill`, the outcomes the model reaches.
#[derive(Debug, PartialEq, Eq)]
enum Fill {
    Done(u64),
    Eagain(u64),
    Removing,
    Abandoned,
    Failed,
}

impl Fill {
    /// `Fill::retry` (fill.rs).
    fn retry(&self) -> bool {
        matches!(self, Fill::Eagain(_) | Fill::Removing)
    }
}

/// `Shared::fill` (fill.rs) for `Resolve::Copy`, in its order: `zero`,
/// the epoch, the `removing` check, the source read (nothing here), the
/// `removed_since` check, the ioctl, then settling on its answer.
fn fill(k: &Kernel, mut claim: Claim<'_>) -> Fill {
    let r = claim.region();
    let zero = claim.zero(); // let zero = claim.zero();
    let epoch = r.remove_epoch(); // let epoch = r.remove_epoch();
    // if !zero && r.remove_in_progress() { return Fill::Removing; }
    if !zero && r.remove_in_progress() {
        return Fill::Removing;
    }
    // (The source read: `self.source_bytes(..)`.) Then, one instant with
    // the ioctl (the model's assumption, see the module's documentation):
    let mut p = k.lock();
    let io = if zero {
        // Resolve::Copy if zero => self.uffd.zeropage(span, WAKE_ON_FILL)
        k.ioctl(&mut p, Content::Zero)
    } else {
        // if r.removed_since(epoch) { return self.abandon(c, claim); }
        if r.removed_since(epoch) {
            drop(p);
            // `abandon`: the claim released, then its faulters woken.
            drop(claim);
            k.wake();
            return Fill::Abandoned;
        }
        // unsafe { self.uffd.copy(addr, ptr, len, WAKE_ON_FILL) }
        k.ioctl(&mut p, Content::Source)
    };
    drop(p);
    match io {
        // Ok(_) => { claim.settle(count, true); .. Fill::Done(count) }
        Io::Ok => {
            claim.settle(1, true);
            Fill::Done(1)
        }
        // Err(Error::Exists { done, .. }) => { claim.settle(n + 1, false);
        // .. self.wake(..); Fill::Done(n + 1) }
        Io::Exists => {
            claim.settle(1, false);
            k.wake();
            Fill::Done(1)
        }
        // Err(Error::Again { done, .. }) => { claim.settle(n, false); .. }
        Io::Again => {
            claim.settle(0, false);
            Fill::Eagain(0)
        }
        // ENOENT: the range was unregistered meanwhile.
        Io::NoEnt => Fill::Failed,
    }
}

/// `Shared::serve_fault` (fill.rs) on a missing fault, without the
/// fault-around window (one page).
fn serve_fault(k: &Kernel, r: &RegionState, policy: Policy) -> Fill {
    match r.claim_page(PAGE) {
        Ok(claim) => fill(k, claim),
        // `Err(Taken::Filled) => { self.answer_filled(..) }`: a wake, but
        // under ZeroOnNextFault first the zero fill again (`EEXIST`, then
        // the wake, where the page is still mapped).
        Err(Taken::Filled) => {
            if let Policy::ZeroOnNextFault = policy {
                let mut p = k.lock();
                let io = k.ioctl(&mut p, Content::Zero);
                drop(p);
                if io == Io::Exists {
                    k.wake();
                }
            } else {
                k.wake();
            }
            Fill::Done(0)
        }
        // The fill holding it wakes this faulter.
        Err(Taken::InFlight) => Fill::Done(0),
    }
}

/// A vCPU touching the page and a worker handling its faults: a fault to
/// retry (`Fill::retry`) is deferred and retried after events
/// (worker.rs `handle` / `retry_deferred`); the vCPU sleeps until woken
/// and faults again while the page is still missing.
fn fault(k: &Kernel, r: &RegionState, policy: Policy) {
    while let Some(seen) = k.touch() {
        while serve_fault(k, r, policy).retry() {
            thread::yield_now();
        }
        if k.sleep(seen) {
            return;
        }
    }
}

/// Both `RemovePolicy` variants.
#[derive(Clone, Copy, Debug)]
enum Policy {
    Unregister,
    ZeroOnNextFault,
}

/// `Shared::on_remove` (worker.rs) of the region's one page, in its order:
/// `page_range`, `begin_remove` (read with the event: the model's
/// assumption), the policy's step, the guard dropped.
fn on_remove(k: &Kernel, r: &RegionState, policy: Policy, zap: Zap) {
    let Some(pages) = r.page_range(r.host, r.host + r.len) else {
        unreachable!("the REMOVE covers the page");
    };
    let removing = {
        let mut p = k.lock();
        p.changing = false;
        p.read = true;
        let removing = r.begin_remove();
        k.queue.notify_all();
        removing
    };
    if zap == Zap::BeforePolicy {
        let mut p = k.lock();
        while !p.zapped {
            p = k.queue.wait(p).unwrap();
        }
    }
    match policy {
        Policy::Unregister => {
            // self.uffd.unregister(span): later ioctls get ENOENT; the
            // kernel wakes the range's faulters.
            k.lock().registered = false;
            k.queue.notify_all();
            r.hand_to_kernel(pages);
        }
        Policy::ZeroOnNextFault => {
            r.reset_removed(pages);
            k.wake();
        }
    }
    drop(removing);
}

fn region() -> RegionState {
    RegionState::new(0x10_0000, P, 0, Resolve::Copy, P, 1)
}

/// Runs `f` under loom, every interleaving with at most `bound`
/// preemptions; prints how many there were (`--nocapture`).
fn check(name: &str, bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = runs.clone();
    let start = std::time::Instant::now();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    let runs = runs.load(std::sync::atomic::Ordering::Relaxed);
    println!("{name}: {runs} interleavings in {:?}", start.elapsed());
}

/// (a) Two faults on one page: filled exactly once (one ioctl, no
/// `EEXIST`), both faulters served.
#[test]
fn loom_two_faults_one_fill() {
    check("two faults, one fill", 3, || {
        let s = Arc::new((Kernel::new(), region()));
        let t = {
            let s = s.clone();
            thread::spawn(move || fault(&s.0, &s.1, Policy::Unregister))
        };
        fault(&s.0, &s.1, Policy::Unregister);
        t.join().unwrap();
        let (k, r) = &*s;
        let p = k.lock();
        assert_eq!(p.content, Content::Source);
        assert_eq!((p.fills, p.eexist), (1, 0), "{:?}", *p);
        assert!(r.done.get(PAGE) && r.claimed.get(PAGE));
    });
}

/// When the VMM's `MADV_DONTNEED` drops the page, relative to the worker
/// applying the `REMOVE`: after the worker read the event it runs on its
/// own (mm/madvise.c zaps once `userfaultfd_remove` returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zap {
    /// Any time after the read.
    AfterRead,
    /// After the read, before the policy's step (`unregister`,
    /// `reset_removed`).
    BeforePolicy,
}

/// (b) A fault racing a `REMOVE` of its page: after both, and a fault
/// after the `REMOVE`, the page holds zeroes (both policies: the kernel's
/// zero page once unregistered, the server's `UFFDIO_ZEROPAGE` otherwise),
/// never source data copied after the `MADV_DONTNEED`; the bookkeeping
/// agrees with the page (filled only if present); every fault served.
fn fill_races_remove(policy: Policy, zap: Zap) {
    check(
        &format!("fill races REMOVE ({policy:?}, {zap:?})"),
        2,
        move || {
            let s = Arc::new((Kernel::new(), region()));
            let faulter = {
                let s = s.clone();
                thread::spawn(move || fault(&s.0, &s.1, policy))
            };
            // The VMM's MADV_DONTNEED: the event queued (`mmap_changing`), ...
            s.0.lock().changing = true;
            let worker = {
                let s = s.clone();
                thread::spawn(move || on_remove(&s.0, &s.1, policy, zap))
            };
            // ... once read, the page dropped.
            {
                let mut p = s.0.lock();
                while !p.read {
                    p = s.0.queue.wait(p).unwrap();
                }
                p.content = Content::Absent;
                p.zapped = true;
                p.fills = 0;
                s.0.queue.notify_all();
            }
            faulter.join().unwrap();
            worker.join().unwrap();
            let (k, r) = &*s;
            {
                let p = k.lock();
                assert!(!p.stale, "source data put back after the REMOVE: {:?}", *p);
                // The page may be marked filled and yet dropped (the drop
                // ran after a fault's answer): the fault below must still be
                // served (`answer_filled`), or loom reports it never woken.
            }
            // A fault after the REMOVE.
            fault(k, r, policy);
            let p = k.lock();
            assert!(!p.stale, "source data put back after the REMOVE: {:?}", *p);
            assert_eq!(p.content, Content::Zero, "{policy:?}: {:?}", *p);
            assert!(p.fills <= 1, "{:?}", *p);
        },
    );
}

#[test]
fn loom_fill_races_remove_unregister() {
    fill_races_remove(Policy::Unregister, Zap::AfterRead);
}

#[test]
fn loom_fill_races_remove_zero_on_next_fault_zap_first() {
    fill_races_remove(Policy::ZeroOnNextFault, Zap::BeforePolicy);
}

/// The same with the page dropped after `reset_removed`: a fault served
/// in between (`UFFDIO_ZEROPAGE`, settled) leaves the page marked filled
/// once the `MADV_DONTNEED` drops it, and every later fault on it is only
/// woken (`Taken::Filled`) to fault again, for ever.
#[test]
fn loom_fill_races_remove_zero_on_next_fault() {
    fill_races_remove(Policy::ZeroOnNextFault, Zap::AfterRead);
}

/// (c) A claim released unsettled (a fault-around or prefetch fill whose
/// source read failed) racing a fault on the page: the fault is served
/// (by its own fill, or woken by the release to fault again), once.
#[test]
fn loom_released_claim_then_fault() {
    check("released claim, then a fault", 3, || {
        let s = Arc::new((Kernel::new(), region()));
        let prefetch = {
            let s = s.clone();
            thread::spawn(move || {
                let (k, r) = &*s;
                // `Shared::fill_range` (fill.rs): claim a run, fill it ...
                let Some(claim) = r.claim_run(PAGE, PAGE + 1, 128) else {
                    return;
                };
                let run = claim.pages();
                // ... `let Some(ptr) = self.source_bytes(..) else { return
                // Fill::Failed }`: the claim dropped unsettled, ...
                drop(claim);
                // ... then `if run.start + n < run.end && outcome !=
                // Fill::Abandoned { self.wake(..) }`.
                if run.start < run.end {
                    k.wake();
                }
            })
        };
        fault(&s.0, &s.1, Policy::Unregister);
        prefetch.join().unwrap();
        let (k, r) = &*s;
        let p = k.lock();
        assert_eq!(p.content, Content::Source);
        assert_eq!((p.fills, p.eexist), (1, 0), "{:?}", *p);
        assert!(r.done.get(PAGE));
    });
}
