//! Concurrency stress: many threads populating and faulting the same memory
//! at once, within a few seconds.
//!
//! Each round maps two regions on one userfaultfd, both served by one
//! `Server` with fault-around (two workers, and a background prefetch of
//! everything on odd rounds): anonymous memory registered MISSING and
//! resolved with `UFFDIO_COPY`, and a shmem memfd registered MINOR and
//! resolved by filling the page cache through an alias mapping and
//! `UFFDIO_CONTINUE`. At the same time:
//!
//! - four toucher threads read every page of both regions, each in its own
//!   random order, so that they fault on the same pages at once and inside
//!   each other's fault-around windows;
//! - two copier threads `UFFDIO_COPY` random pages of the anonymous region
//!   directly, and two continuer threads write random pages of the shmem
//!   region through the alias and `UFFDIO_CONTINUE` them, racing the
//!   server: both sides meet `EEXIST`.
//!
//! Everyone writes the same bytes (the page source's), so afterwards every
//! byte of both regions must equal the source, the server must report no
//! error, and the direct fills no error but `EEXIST`. A round that does not
//! finish within its deadline drops the server (closing the userfaultfd
//! releases any stuck faulter) and fails. Without userfaultfd with
//! `MINOR_SHMEM` the test prints `SKIP` and passes, unless `CI=true`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use common::{
    MIB, Mem, fallocate, fill_pattern, memfd, page, read_page, register, shuffle, splitmix,
    uffd_or_skip, xorshift,
};
use uffd_gmem::serve::{Region, Server};
use uffd_gmem::{Error, Features, Mode, RegisterMode, Uffd};

/// Pages per region.
const PAGES: u64 = 1024;
/// Where the regions' contents start in the source (the shmem region's
/// follow the anonymous region's).
const SRC_OFF: u64 = MIB;
/// The time the rounds may take together (a round in flight finishes).
const BUDGET: Duration = Duration::from_secs(4);
const MAX_ROUNDS: u64 = 500;
/// One round's deadline.
const DEADLINE: Duration = Duration::from_secs(20);

/// The page source: [`fill_pattern`] from offset 0, as long as both
/// regions need.
fn source() -> Arc<Vec<u8>> {
    static S: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let mut v = vec![0u8; (SRC_OFF + 2 * PAGES * page()) as usize];
        fill_pattern(0, &mut v);
        Arc::new(v)
    })
    .clone()
}

/// Page indices `0..n` in a random order.
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    shuffle(&mut v, seed);
    v
}

/// What one round's threads report.
type Report = Result<String, String>;

#[derive(Clone, Copy)]
struct Layout {
    anon: u64,
    shm: u64,
    alias: u64,
    page: u64,
}

impl Layout {
    fn want(&self, shm: bool, i: u64) -> std::ops::Range<usize> {
        let off = SRC_OFF + if shm { PAGES * self.page } else { 0 } + i * self.page;
        off as usize..(off + self.page) as usize
    }
}

fn toucher(l: Layout, src: Arc<Vec<u8>>, seed: u64) -> Report {
    let mut buf = vec![0u8; l.page as usize];
    // Both regions interleaved, in this toucher's own order.
    for k in shuffled(2 * PAGES, seed) {
        let (shm, i) = (k % 2 == 1, k / 2);
        let base = if shm { l.shm } else { l.anon };
        // SAFETY: the round keeps both mappings until every thread reported.
        unsafe { read_page(base, i, &mut buf) };
        if buf[..] != src[l.want(shm, i)] {
            return Err(format!(
                "{} page {i} is wrong",
                if shm { "shmem" } else { "anon" }
            ));
        }
    }
    Ok("touched".into())
}

/// Direct `UFFDIO_COPY` (anonymous) or alias write + `UFFDIO_CONTINUE`
/// (shmem) of random pages until `stop`; returns how many met `EEXIST`.
fn direct(l: Layout, uffd: &Uffd, src: &[u8], shm: bool, seed: u64, stop: &AtomicBool) -> Report {
    let (mut filled, mut exists) = (0u64, 0u64);
    let mut s = seed | 1;
    while !stop.load(Ordering::Relaxed) {
        let i = xorshift(&mut s) % PAGES;
        let want = &src[l.want(shm, i)];
        let r = if shm {
            // SAFETY: the alias is a shared mapping of the same memfd, never
            // registered, alive for the round; every writer writes the same
            // bytes (the source's), so racing writers cannot corrupt it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    want.as_ptr(),
                    (l.alias + i * l.page) as *mut u8,
                    want.len(),
                )
            };
            let a = l.shm + i * l.page;
            uffd.r#continue(a..a + l.page, Mode::empty())
        } else {
            // SAFETY: `want` is valid for one page; the destination is a page
            // of the registered anonymous region.
            unsafe { uffd.copy(l.anon + i * l.page, want.as_ptr(), l.page, Mode::empty()) }
        };
        match r {
            Ok(_) => filled += 1,
            Err(Error::Exists { .. }) => exists += 1,
            Err(e) => return Err(format!("direct fill of page {i}: {e}")),
        }
    }
    Ok(format!(
        "{} filled={filled} eexist={exists}",
        if shm { "continue" } else { "copy" }
    ))
}

#[test]
fn serve_and_direct_fills_race_on_the_same_pages() {
    let test = "serve_and_direct_fills_race_on_the_same_pages";
    let features = Features::MINOR_SHMEM;
    if uffd_or_skip(test, features).is_none() {
        return;
    }
    let page = page();
    let len = PAGES * page;
    let src = source();
    let t0 = Instant::now();
    let (mut server_eexist, mut direct_eexist) = (0u64, 0u64);
    let mut round = 0;
    while round < MAX_ROUNDS && (round < 2 || t0.elapsed() < BUDGET) {
        let uffd = Uffd::builder()
            .non_blocking(true)
            .require_features(features)
            .create()
            .unwrap();
        let anon = Mem::anon(len);
        let fd = memfd(c"uffd-concurrency", len);
        fallocate(&fd, len);
        let shm = Mem::shared(&fd, len);
        let alias = Mem::shared(&fd, len);
        // Both mappings were made for this round; they are read and written
        // only through raw pointers and outlive the server.
        register(&uffd, &anon, RegisterMode::MISSING);
        register(&uffd, &shm, RegisterMode::MINOR);
        // SAFETY: `alias` is a writable shared mapping of the same memfd,
        // never registered, unmapped only after the server is shut down.
        let shm_region = unsafe {
            Region::new(shm.addr, len)
                .source_offset(SRC_OFF + len)
                .continue_via_alias(alias.addr)
        };
        let server = Server::builder(uffd)
            .region(
                Region::new(anon.addr, len)
                    .source_offset(SRC_OFF)
                    .resolve_copy(),
            )
            .region(shm_region)
            .source_arc(src.clone())
            .fault_around(64 * 1024)
            .workers(2)
            .prefetch_all(round % 2 == 1)
            .spawn()
            .expect("spawn");
        let server = Arc::new(server);
        let l = Layout {
            anon: anon.addr,
            shm: shm.addr,
            alias: alias.addr,
            page,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Report>();
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let (tx, src) = (tx.clone(), src.clone());
            let seed = splitmix(round * 16 + t);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("toucher-{t}"))
                    .spawn(move || {
                        let _ = tx.send(toucher(l, src, seed));
                    })
                    .unwrap(),
            );
        }
        for t in 0..4u64 {
            let (tx, src, server, stop) = (tx.clone(), src.clone(), server.clone(), stop.clone());
            let seed = splitmix(round * 16 + 8 + t);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("direct-{t}"))
                    .spawn(move || {
                        let _ = tx.send(direct(l, server.uffd(), &src, t % 2 == 1, seed, &stop));
                    })
                    .unwrap(),
            );
        }
        drop(tx);
        let deadline = Instant::now() + DEADLINE;
        let mut reports = Vec::new();
        let mut touched = 0;
        while reports.len() < 8 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => {
                    if matches!(&r, Ok(m) if m == "touched") {
                        touched += 1;
                        if touched == 4 {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    reports.push(r);
                }
                Err(_) => {
                    // Closing the userfaultfd releases any stuck faulter; the
                    // mappings are leaked rather than unmapped under it.
                    stop.store(true, Ordering::Relaxed);
                    let stats = server.stats();
                    drop(server);
                    std::mem::forget((anon, shm, alias));
                    panic!(
                        "round {round}: not done within {DEADLINE:?}: {reports:?}; server: \
                         faults={} errors={:?}",
                        stats.faults, stats.errors
                    );
                }
            }
        }
        for h in handles {
            h.join().unwrap();
        }
        let server = Arc::try_unwrap(server).expect("every thread is done");
        let s = server.shutdown().expect("shutdown");
        let failures: Vec<&String> = reports.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(failures.is_empty(), "round {round}: {failures:?}");
        assert!(
            s.errors.is_empty(),
            "round {round}: server errors: {:?}",
            s.errors
        );
        // Every byte of both regions.
        let mut buf = vec![0u8; page as usize];
        for (base, is_shm) in [(l.anon, false), (l.shm, true)] {
            for i in 0..PAGES {
                // SAFETY: both mappings are alive; every page is present now.
                unsafe { read_page(base, i, &mut buf) };
                assert!(
                    buf[..] == src[l.want(is_shm, i)],
                    "round {round}: {} page {i} differs after the race",
                    if is_shm { "shmem" } else { "anon" }
                );
            }
        }
        server_eexist += s.eexist;
        for m in reports.iter().flatten() {
            if let Some(n) = m.split("eexist=").nth(1) {
                direct_eexist += n.parse::<u64>().unwrap_or(0);
            }
        }
        eprintln!(
            "[concurrency] round {round}: faults={} copied={} continued={} prefetched={} \
             eexist={} wakes={}; {:?}",
            s.faults,
            s.pages_copied,
            s.pages_continued,
            s.pages_prefetched,
            s.eexist,
            s.wakes,
            reports
                .iter()
                .flatten()
                .filter(|m| *m != "touched")
                .collect::<Vec<_>>()
        );
        drop((anon, shm, alias, fd));
        round += 1;
    }
    eprintln!(
        "[concurrency] {round} rounds in {:?}: EEXIST met by the server {server_eexist} times, \
         by the direct fills {direct_eexist} times",
        t0.elapsed()
    );
    assert!(direct_eexist > 0, "the direct fills never raced the server");
}
