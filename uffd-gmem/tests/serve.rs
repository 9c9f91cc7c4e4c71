//! `uffd_gmem::serve::Server` against the real kernel.
//!
//! In-process tests register anonymous or shmem memory of this process and
//! fault on it from named "toucher" threads while the server's workers run
//! in the same process. Every byte read is compared with the page source
//! (a position-dependent pattern). Nothing can hang: the touchers report
//! through a channel read with a deadline; on timeout the server is dropped,
//! which closes the userfaultfd so that the kernel releases any stuck
//! faulter, and the test fails (leaking the mapping rather than unmapping it
//! under a thread that may still run).
//!
//! Fault-injection and address-space-event tests (a page source that fails,
//! `REMOVE`, `UNMAP`, `REMAP`) run the faulting side in a **child VMM**: this
//! test binary re-executed with the ignored `child_vmm` test as its only
//! test. The child maps its memory, creates and registers a userfaultfd and
//! sends it with Firecracker's handshake over a Unix socket; this process
//! adopts it and serves. The two talk in lines over the same socket; the
//! child is killed on every failure and timeout. The `*_repeatedly` and
//! `*_while_fault_around_is_in_flight` tests race `REMOVE`, `UNMAP` and
//! `REMAP` with fills in progress; the others let the server settle first.
//!
//! Every test takes one file-wide lock, so that thread and fd counts are not
//! disturbed by a parallel test. Without userfaultfd (neither
//! `/dev/userfaultfd` nor the system call) a test prints `SKIP <test>: <why>`
//! and passes, unless `CI=true`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::{
    ChildVmm, DEADLINE, KIB, MIB, Mem, PATTERN_LEN, TempDir, assert_no_server_threads, fallocate,
    fill_pattern, memfd, open_fds, page, pattern, read_page, register, serial, server_threads,
    shuffle, skip_capability, summary, uffd_or_skip, wait_until,
};
use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake};
use uffd_gmem::serve::{
    Backing, MappedFile, PageSource, Region, RemovePolicy, Resolve, Server, Stats,
};
use uffd_gmem::{Error, Features, HostMapping, RegisterMode, Uffd};

/// Where region contents start in the page source (regions never start at
/// source offset 0, so offsets are exercised).
const SRC_OFF: u64 = MIB;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Order {
    Sequential,
    Reverse,
    Random(u64),
}

fn order(pages: Range<u64>, o: Order) -> Vec<u64> {
    let mut v: Vec<u64> = pages.collect();
    match o {
        Order::Sequential => {}
        Order::Reverse => v.reverse(),
        Order::Random(seed) => shuffle(&mut v, seed),
    }
    v
}

/// A short description of how `got` differs from `want` (page `i`).
fn mismatch(i: u64, got: &[u8], want: &[u8]) -> String {
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    let zero = got.iter().all(|&b| b == 0);
    format!(
        "page {i}: first difference at byte {first} (got {:#04x}, want {:#04x}){}",
        got[first],
        want[first],
        if zero {
            "; the page reads as zeroes"
        } else {
            ""
        }
    )
}

/// Reads `pages` of the memory at `addr` in order and compares each with
/// `src` at `src_off` + page offset.
fn touch_and_verify(addr: u64, pages: &[u64], src: &[u8], src_off: u64) -> Result<u64, String> {
    let page = page();
    let mut buf = vec![0u8; page as usize];
    for &i in pages {
        // SAFETY: the runner keeps the mapping alive while touchers run.
        unsafe { read_page(addr, i, &mut buf) };
        let off = (src_off + i * page) as usize;
        let want = &src[off..off + page as usize];
        if buf != want {
            return Err(mismatch(i, &buf, want));
        }
    }
    Ok(pages.len() as u64)
}

/// Runs one toucher thread per entry of `orders` over the memory at `addr`,
/// then shuts the server down and returns its statistics. `keep` (the
/// mappings) is dropped after the shutdown, or leaked if a toucher is stuck.
fn serve_and_touch(
    label: &str,
    server: Server,
    keep: Vec<Mem>,
    addr: u64,
    src: Arc<Vec<u8>>,
    src_off: u64,
    orders: Vec<Vec<u64>>,
) -> Stats {
    let (tx, rx) = mpsc::channel();
    let n = orders.len();
    let mut handles = Vec::new();
    for (t, ord) in orders.into_iter().enumerate() {
        let tx = tx.clone();
        let src = src.clone();
        let h = std::thread::Builder::new()
            .name(format!("toucher-{t}"))
            .spawn(move || {
                let r = touch_and_verify(addr, &ord, &src, src_off);
                let _ = tx.send((t, r));
            })
            .expect("spawn toucher");
        handles.push(h);
    }
    drop(tx);
    let deadline = Instant::now() + DEADLINE;
    let mut done = 0;
    let mut failures = Vec::new();
    while done < n {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((t, r)) => {
                done += 1;
                if let Err(e) = r {
                    failures.push(format!("toucher {t}: {e}"));
                }
            }
            Err(_) => break,
        }
    }
    if done < n {
        let stats = server.stats();
        // Closing the userfaultfd makes the kernel release stuck faulters
        // (they then read zero pages and finish).
        drop(server);
        let grace = Instant::now() + Duration::from_secs(5);
        while done < n
            && rx
                .recv_timeout(grace.saturating_duration_since(Instant::now()))
                .is_ok()
        {
            done += 1;
        }
        if done < n {
            std::mem::forget(keep);
        } else {
            for h in handles {
                let _ = h.join();
            }
        }
        panic!(
            "{label}: {} of {n} faulting threads still blocked after {DEADLINE:?} (the server \
             hung); stats at the deadline: {}",
            n - done,
            summary(&stats)
        );
    }
    for h in handles {
        h.join().expect("toucher panicked");
    }
    let stats = server.shutdown().expect("shutdown");
    drop(keep);
    assert!(
        failures.is_empty(),
        "{label}: wrong contents: {failures:?}; {}",
        summary(&stats)
    );
    stats
}

/// Waits until the server's counters stop moving (fault-around and
/// prefetch done).
fn quiesce(server: &Server) {
    let mut last = None;
    let mut stable = 0;
    let settled = wait_until(Duration::from_secs(10), || {
        let s = server.stats();
        let key = (
            s.faults,
            s.pages_copied,
            s.pages_continued,
            s.pages_zeroed,
            s.eagain,
        );
        if last == Some(key) {
            stable += 1;
        } else {
            stable = 0;
            last = Some(key);
        }
        std::thread::sleep(Duration::from_millis(10));
        stable >= 3
    });
    assert!(
        settled,
        "the server never went quiet: {}",
        summary(&server.stats())
    );
}

fn assert_clean(label: &str, s: &Stats) {
    assert!(s.errors.is_empty(), "{label}: errors: {}", summary(s));
    // Latencies are timed with `record(true)`, which also fills the log.
    assert!(
        s.latency.count() > 0 || s.faults == 0 || s.fault_log.is_empty(),
        "{label}: no latency samples: {}",
        summary(s)
    );
}

// ---------------------------------------------------------------------------
// In-process: MISSING + UFFDIO_COPY
// ---------------------------------------------------------------------------

/// 32 MiB, sequential and random order, workers 1 and 2.
fn fault_around_matrix(test: &str, fault_around: u64) {
    let _g = serial();
    let page = page();
    let len = 32 * MIB;
    let pages = len / page;
    let src = pattern();
    for workers in [1usize, 2] {
        for ord in [
            Order::Sequential,
            Order::Random(0x5eed ^ fault_around ^ workers as u64),
        ] {
            let Some(uffd) = uffd_or_skip(test, Features::empty()) else {
                return;
            };
            let mem = Mem::anon(len);
            register(&uffd, &mem, RegisterMode::MISSING);
            let label = format!("{test} workers={workers} {ord:?}");
            let server = Server::builder(uffd)
                .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
                .source_arc(src.clone())
                .fault_around(fault_around)
                .workers(workers)
                .spawn()
                .expect("spawn");
            let addr = mem.addr;
            let t0 = Instant::now();
            let s = serve_and_touch(
                &label,
                server,
                vec![mem],
                addr,
                src.clone(),
                SRC_OFF,
                vec![order(0..pages, ord)],
            );
            eprintln!("[serve] {label}: {:?} {}", t0.elapsed(), summary(&s));
            assert_clean(&label, &s);
            assert_eq!(
                s.pages_copied,
                pages,
                "{label}: every page copied once: {}",
                summary(&s)
            );
            assert!(
                s.faults >= 1 && s.faults <= pages,
                "{label}: {}",
                summary(&s)
            );
            assert_eq!(
                (
                    s.pages_continued,
                    s.pages_zeroed,
                    s.pages_prefetched,
                    s.other_events
                ),
                (0, 0, 0, 0),
                "{label}: {}",
                summary(&s)
            );
            if fault_around == 0 {
                assert_eq!(
                    s.faults,
                    pages,
                    "{label}: one fault per page: {}",
                    summary(&s)
                );
            } else if matches!(ord, Order::Sequential) {
                // Windows of at least fault_around bytes, growing along the streak.
                assert!(
                    s.faults * 8 <= pages,
                    "{label}: fault-around should cut faults: {}",
                    summary(&s)
                );
            }
        }
    }
}

#[test]
fn copy_fault_around_0() {
    fault_around_matrix("copy_fault_around_0", 0);
}

#[test]
fn copy_fault_around_64k() {
    fault_around_matrix("copy_fault_around_64k", 64 * KIB);
}

#[test]
fn copy_fault_around_512k() {
    fault_around_matrix("copy_fault_around_512k", 512 * KIB);
}

/// Four threads fault on the same pages in different orders: claim races,
/// duplicate faults on claimed and filled pages, EEXIST.
#[test]
fn concurrent_faulters_on_the_same_pages() {
    let test = "concurrent_faulters_on_the_same_pages";
    let _g = serial();
    let page = page();
    let len = 8 * MIB;
    let pages = len / page;
    let src = pattern();
    for fault_around in [0, 64 * KIB] {
        for round in 0..2u64 {
            let Some(uffd) = uffd_or_skip(test, Features::empty()) else {
                return;
            };
            let mem = Mem::anon(len);
            register(&uffd, &mem, RegisterMode::MISSING);
            let server = Server::builder(uffd)
                .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
                .source_arc(src.clone())
                .fault_around(fault_around)
                .workers(2)
                .spawn()
                .expect("spawn");
            let label = format!("{test} fault_around={fault_around} round={round}");
            let addr = mem.addr;
            let orders = vec![
                order(0..pages, Order::Sequential),
                order(0..pages, Order::Reverse),
                order(0..pages, Order::Random(11 + round)),
                order(0..pages, Order::Random(97 + round)),
            ];
            let s = serve_and_touch(
                &label,
                server,
                vec![mem],
                addr,
                src.clone(),
                SRC_OFF,
                orders,
            );
            eprintln!("[serve] {label}: {}", summary(&s));
            assert_clean(&label, &s);
            assert_eq!(s.pages_copied, pages, "{label}: {}", summary(&s));
            assert!(s.faults >= 1, "{label}: {}", summary(&s));
        }
    }
}

/// A snapshot file mapped with `MappedFile`.
#[test]
fn mapped_file_source() {
    let test = "mapped_file_source";
    let _g = serial();
    let page = page();
    let len = 16 * MIB;
    let pages = len / page;
    let src = pattern();
    let dir = TempDir::new("serve-file");
    let path = dir.0.join("mem.snap");
    std::fs::write(&path, &src[..(SRC_OFF + len + MIB) as usize]).expect("write snapshot");
    let Some(uffd) = uffd_or_skip(test, Features::empty()) else {
        return;
    };
    let mem = Mem::anon(len);
    register(&uffd, &mem, RegisterMode::MISSING);
    let source = MappedFile::open(&path).expect("MappedFile::open");
    assert_eq!(source.len(), SRC_OFF + len + MIB);
    let server = Server::builder(uffd)
        .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
        .source(source)
        .fault_around(512 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    let addr = mem.addr;
    let s = serve_and_touch(
        test,
        server,
        vec![mem],
        addr,
        src,
        SRC_OFF,
        vec![
            order(0..pages, Order::Random(3)),
            order(0..pages, Order::Sequential),
        ],
    );
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_clean(test, &s);
    assert_eq!(s.pages_copied, pages, "{}", summary(&s));

    // An empty file is refused.
    let empty = dir.0.join("empty.snap");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        MappedFile::open(&empty),
        Err(Error::Invalid { .. })
    ));
}

/// `spawn` refuses what it documents it refuses.
#[test]
fn spawn_rejects_bad_configurations() {
    let test = "spawn_rejects_bad_configurations";
    let _g = serial();
    let page = page();
    let Some(probe) = uffd_or_skip(test, Features::empty()) else {
        return;
    };
    drop(probe);
    let src = pattern();
    let base = 0x7000_0000_0000u64;
    type Case<'a> = (&'a str, Box<dyn Fn(Uffd) -> uffd_gmem::Result<Server> + 'a>);
    let cases: Vec<Case> = vec![
        (
            "no source",
            Box::new(|u| Server::builder(u).region(Region::new(base, page)).spawn()),
        ),
        (
            "no region",
            Box::new(|u| Server::builder(u).source_arc(src.clone()).spawn()),
        ),
        (
            "zero workers",
            Box::new(|u| {
                Server::builder(u)
                    .region(Region::new(base, page))
                    .source_arc(src.clone())
                    .workers(0)
                    .spawn()
            }),
        ),
        (
            "unaligned host",
            Box::new(|u| {
                Server::builder(u)
                    .region(Region::new(base + 1, page))
                    .source_arc(src.clone())
                    .spawn()
            }),
        ),
        (
            "unaligned source offset",
            Box::new(|u| {
                Server::builder(u)
                    .region(Region::new(base, page).source_offset(8))
                    .source_arc(src.clone())
                    .spawn()
            }),
        ),
        (
            "empty region",
            Box::new(|u| {
                Server::builder(u)
                    .region(Region::new(base, 0))
                    .source_arc(src.clone())
                    .spawn()
            }),
        ),
        (
            "past the source",
            Box::new(|u| {
                Server::builder(u)
                    .region(Region::new(base, 2 * page).source_offset(PATTERN_LEN - page))
                    .source_arc(src.clone())
                    .spawn()
            }),
        ),
        (
            "overlapping regions",
            Box::new(|u| {
                Server::builder(u)
                    .region(Region::new(base, 4 * page))
                    .region(Region::new(base + 2 * page, 4 * page))
                    .source_arc(src.clone())
                    .spawn()
            }),
        ),
    ];
    for (what, case) in cases {
        let uffd = Uffd::builder().create().expect("uffd");
        match case(uffd) {
            Err(Error::Invalid { .. }) => {}
            other => panic!("{what}: expected Error::Invalid, got {other:?}"),
        }
    }
    assert!(server_threads().is_empty(), "{:?}", server_threads());
}

// ---------------------------------------------------------------------------
// In-process: MINOR + UFFDIO_CONTINUE on shmem
// ---------------------------------------------------------------------------

/// The VMM maps a memfd shared; the server fills the page cache through an
/// unregistered alias mapping of the same memfd, then `UFFDIO_CONTINUE`.
/// The memfd is fallocated first, so every first touch is a MINOR fault.
#[test]
fn continue_via_alias_on_shmem() {
    let test = "continue_via_alias_on_shmem";
    let _g = serial();
    let page = page();
    let len = 16 * MIB;
    let pages = len / page;
    let src = pattern();
    let Some(uffd) = uffd_or_skip(test, Features::MINOR_SHMEM) else {
        return;
    };
    let fd = memfd(c"uffd-serve-test", len);
    fallocate(&fd, len);
    let vmm = Mem::shared(&fd, len);
    let alias = Mem::shared(&fd, len);
    register(&uffd, &vmm, RegisterMode::MINOR);
    // SAFETY: `alias` is a writable MAP_SHARED mapping of the same memfd in
    // this process, covering the whole region, never registered with a
    // userfaultfd; `serve_and_touch` unmaps it only after the server is shut
    // down (or leaks it).
    let region = unsafe {
        Region::new(vmm.addr, len)
            .source_offset(SRC_OFF)
            .continue_via_alias(alias.addr)
    };
    let server = Server::builder(uffd)
        .region(region)
        .source_arc(src.clone())
        .fault_around(64 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    let addr = vmm.addr;
    let s = serve_and_touch(
        test,
        server,
        vec![vmm, alias],
        addr,
        src.clone(),
        SRC_OFF,
        vec![
            order(0..pages, Order::Random(5)),
            order(0..pages, Order::Sequential),
        ],
    );
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_clean(test, &s);
    assert_eq!(s.pages_continued, pages, "{}", summary(&s));
    assert_eq!(s.pages_copied, 0, "{}", summary(&s));
    // The page cache holds the contents too.
    let mut buf = vec![0u8; page as usize];
    for i in [0, pages / 2, pages - 1] {
        // SAFETY: pread into our buffer from our memfd.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                (i * page) as libc::off_t,
            )
        };
        assert_eq!(n, page as isize);
        let off = (SRC_OFF + i * page) as usize;
        assert!(buf == src[off..off + page as usize], "page cache page {i}");
    }
}

/// As above with `pwrite` into the memfd, registered MISSING | MINOR on a
/// memfd with holes: first touches are MISSING faults, resolved by filling
/// the page cache and `UFFDIO_CONTINUE`.
#[test]
fn continue_via_pwrite_on_shmem() {
    let test = "continue_via_pwrite_on_shmem";
    let _g = serial();
    let page = page();
    let len = 16 * MIB;
    let pages = len / page;
    let src = pattern();
    let Some(uffd) = uffd_or_skip(test, Features::MINOR_SHMEM) else {
        return;
    };
    let fd = memfd(c"uffd-serve-test", len);
    let vmm = Mem::shared(&fd, len);
    register(&uffd, &vmm, RegisterMode::MISSING | RegisterMode::MINOR);
    let server = Server::builder(uffd)
        .region(
            Region::new(vmm.addr, len)
                .source_offset(SRC_OFF)
                .continue_via_pwrite(Arc::new(fd.try_clone().unwrap()), 0),
        )
        .source_arc(src.clone())
        .fault_around(64 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    let addr = vmm.addr;
    let s = serve_and_touch(
        test,
        server,
        vec![vmm],
        addr,
        src,
        SRC_OFF,
        vec![
            order(0..pages, Order::Random(7)),
            order(0..pages, Order::Reverse),
        ],
    );
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_clean(test, &s);
    assert_eq!(s.pages_continued, pages, "{}", summary(&s));
    assert_eq!(s.pages_copied, 0, "{}", summary(&s));
}

// ---------------------------------------------------------------------------
// In-process: zero-copy, MINOR + UFFDIO_CONTINUE alone (Backing::Prefilled)
// ---------------------------------------------------------------------------

/// A memfd snapshot of `len` bytes, its page cache filled with the pattern
/// from source offset 0 (through its own mapping, never registered).
fn memfd_snapshot(len: u64) -> HostMapping {
    let snap = HostMapping::memfd("uffd-serve-snapshot", len as usize).expect("memfd");
    snap.write_at(0, &pattern()[..len as usize])
        .expect("write the snapshot");
    snap
}

/// A fresh mapping of `snap`'s memfd registered MINOR (or `mode`) with
/// `uffd`; `None` after a capability skip when the kernel refuses the
/// registration (MINOR on a `MAP_PRIVATE` shmem mapping).
fn prefilled_guest(
    snap: &HostMapping,
    uffd: &Uffd,
    shared: bool,
    mode: RegisterMode,
) -> Option<HostMapping> {
    let fd = snap.memfd_fd().expect("a memfd");
    let guest = HostMapping::file(fd, 0, snap.len(), shared).expect("mmap the snapshot");
    match uffd.register_mapping(&guest, mode) {
        Ok(_) => Some(guest),
        Err(e) if !shared => {
            skip_capability(
                "UFFDIO_REGISTER MINOR on a MAP_PRIVATE shmem mapping",
                format_args!("refused ({e}; errno {:?})", e.errno()),
            );
            None
        }
        Err(e) => panic!("UFFDIO_REGISTER {mode:?} on a MAP_SHARED shmem mapping: {e}"),
    }
}

/// No source, every region prefilled: every page is mapped from the
/// snapshot's page cache with `UFFDIO_CONTINUE` alone.
fn continue_prefilled(test: &str, shared: bool) -> Option<(HostMapping, HostMapping)> {
    let page = page();
    let len = 16 * MIB;
    let pages = len / page;
    let uffd = uffd_or_skip(test, Features::MINOR_SHMEM)?;
    let snap = memfd_snapshot(len);
    let guest = prefilled_guest(&snap, &uffd, shared, RegisterMode::MINOR)?;
    let server = Server::builder(uffd)
        .region(Region::new(guest.addr(), len).continue_prefilled())
        .fault_around(64 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn without a source");
    let s = serve_and_touch(
        test,
        server,
        Vec::new(),
        guest.addr(),
        pattern(),
        0,
        vec![
            order(0..pages, Order::Random(11)),
            order(0..pages, Order::Sequential),
        ],
    );
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_clean(test, &s);
    assert_eq!(s.pages_continued, pages, "{}", summary(&s));
    assert_eq!(s.pages_copied, 0, "{}", summary(&s));
    assert_eq!(s.pages_zeroed, 0, "{}", summary(&s));
    assert!(s.faults > 0, "{}", summary(&s));
    Some((snap, guest))
}

#[test]
fn continue_prefilled_map_shared() {
    let test = "continue_prefilled_map_shared";
    let _g = serial();
    let Some((snap, guest)) = continue_prefilled(test, true) else {
        return;
    };
    // Shared: a write through the guest mapping reaches the file.
    guest.write_at(5 * page(), &[0xa5; 8]).unwrap();
    let mut b = [0u8; 8];
    snap.read_at(5 * page(), &mut b).unwrap();
    assert_eq!(b, [0xa5; 8]);
}

/// `MAP_PRIVATE` (a clone of the snapshot): `UFFDIO_CONTINUE` maps the page
/// cache page, and a write after it copies the page: the memfd keeps the
/// snapshot's bytes, the guest sees its write, a second clone the snapshot.
#[test]
fn continue_prefilled_map_private() {
    let test = "continue_prefilled_map_private";
    let _g = serial();
    let page = page();
    let Some((snap, guest)) = continue_prefilled(test, false) else {
        return;
    };
    let src = pattern();
    let at = 7 * page + 64;
    guest.write_at(at, &[0x5a; 16]).unwrap();
    let mut got = [0u8; 16];
    guest.read_at(at, &mut got).unwrap();
    assert_eq!(got, [0x5a; 16], "the clone sees its own write");
    snap.read_at(at, &mut got).unwrap();
    assert_eq!(
        got[..],
        src[at as usize..at as usize + 16],
        "the write was copied on write: the memfd keeps the snapshot"
    );
    // SAFETY: pread into our buffer from the memfd.
    let n = unsafe {
        libc::pread(
            snap.memfd_fd().unwrap().as_raw_fd(),
            got.as_mut_ptr().cast(),
            got.len(),
            at as libc::off_t,
        )
    };
    assert_eq!(n, 16);
    assert_eq!(
        got[..],
        src[at as usize..at as usize + 16],
        "the page cache"
    );
    // Another clone of the same snapshot (unregistered) reads the snapshot.
    let other = HostMapping::file(snap.memfd_fd().unwrap(), 0, snap.len(), false).unwrap();
    other.read_at(at, &mut got).unwrap();
    assert_eq!(got[..], src[at as usize..at as usize + 16], "another clone");
    // A first touch that is a write, served: the MINOR fault is continued
    // (mapped read-only, private) and the write then copies the page.
    let uffd = uffd_or_skip(test, Features::MINOR_SHMEM).unwrap();
    let clone = prefilled_guest(&snap, &uffd, false, RegisterMode::MINOR).unwrap();
    let server = Server::builder(uffd)
        .region(Region::new(clone.addr(), snap.len() as u64).continue_prefilled())
        .spawn()
        .unwrap();
    let at = 9 * page + 8;
    std::thread::scope(|sc| {
        let (tx, rx) = mpsc::channel();
        let clone = &clone;
        sc.spawn(move || {
            clone.write_at(at, &[0x77; 8]).unwrap();
            let _ = tx.send(());
        });
        rx.recv_timeout(DEADLINE)
            .expect("the write fault is still blocked");
    });
    let s = server.shutdown().unwrap();
    eprintln!("[serve] {test} (write fault): {}", summary(&s));
    assert!(s.errors.is_empty(), "{}", summary(&s));
    assert_eq!(
        (s.faults, s.pages_continued, s.pages_copied),
        (1, 1, 0),
        "{}",
        summary(&s)
    );
    let mut w = [0u8; 8];
    clone.read_at(at, &mut w).unwrap();
    assert_eq!(w, [0x77; 8]);
    snap.read_at(at, &mut w).unwrap();
    assert_eq!(
        w[..],
        src[at as usize..at as usize + 8],
        "the memfd is unchanged"
    );
}

/// Reads `len` bytes at `at` of `map` in a thread, within [`DEADLINE`].
fn read_within_deadline(map: &HostMapping, at: u64, len: usize) -> Vec<u8> {
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        s.spawn(move || {
            let mut b = vec![0u8; len];
            map.read_at(at, &mut b).unwrap();
            let _ = tx.send(b);
        });
        rx.recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("the read at {at:#x} is still blocked after {DEADLINE:?}"))
    })
}

/// Registered MISSING | MINOR: a MISSING fault on a prefilled region (a
/// hole in the snapshot) is reported in `Stats::errors` and answered with
/// zeroes; the rest is continued.
#[test]
fn continue_prefilled_missing_fault_is_reported() {
    let test = "continue_prefilled_missing_fault_is_reported";
    let _g = serial();
    let page = page();
    let len = 64 * page;
    let Some(uffd) = uffd_or_skip(test, Features::MINOR_SHMEM) else {
        return;
    };
    let snap = HostMapping::memfd("uffd-serve-holes", len as usize).unwrap();
    // Pages 0..32 written; 32..64 a hole.
    snap.write_at(0, &pattern()[..32 * page as usize]).unwrap();
    let guest = prefilled_guest(
        &snap,
        &uffd,
        true,
        RegisterMode::MISSING | RegisterMode::MINOR,
    )
    .expect("MAP_SHARED");
    let server = Server::builder(uffd)
        .region(Region::new(guest.addr(), len).continue_prefilled())
        .fault_around(16 * page)
        .spawn()
        .expect("spawn");
    let hole = read_within_deadline(&guest, 40 * page, page as usize);
    assert!(hole.iter().all(|&b| b == 0), "a hole reads as zeroes");
    let data = read_within_deadline(&guest, 3 * page, page as usize);
    assert_eq!(data[..], pattern()[3 * page as usize..4 * page as usize]);
    // The faulting page is served first and the reader resumes at once;
    // the rest of its window follows. Shut down only once it is in (or
    // the deadline passed), so the count below is the window's, not a
    // race with the shutdown.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.stats().pages_continued < 16 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = server.shutdown().unwrap();
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_eq!(s.pages_zeroed, 1, "{}", summary(&s));
    assert_eq!(s.pages_continued, 16, "one window: {}", summary(&s));
    assert_eq!(s.errors.len(), 1, "{}", summary(&s));
    let e = &s.errors[0];
    assert_eq!(e.op, "fill");
    assert_eq!(
        e.range,
        Some(guest.addr() + 40 * page..guest.addr() + 41 * page)
    );
    assert!(matches!(*e.error, Error::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("prefilled"), "{e}");
}

/// `REMOVE` under `ZeroOnNextFault` on a prefilled `MAP_SHARED` region:
/// pages `MADV_DONTNEED` only unmapped are continued again with what the
/// page cache holds (the guest's last writes); pages `MADV_REMOVE` punched
/// fault MISSING and are zeroed, with no error.
#[test]
fn continue_prefilled_remove_zero_on_next_fault() {
    let test = "continue_prefilled_remove_zero_on_next_fault";
    let _g = serial();
    let page = page();
    let len = 64 * page;
    let Some(uffd) = uffd_or_skip(test, Features::MINOR_SHMEM | Features::EVENT_REMOVE) else {
        return;
    };
    let snap = memfd_snapshot(len);
    let guest = prefilled_guest(
        &snap,
        &uffd,
        true,
        RegisterMode::MISSING | RegisterMode::MINOR,
    )
    .expect("MAP_SHARED");
    let server = Server::builder(uffd)
        .region(Region::new(guest.addr(), len).continue_prefilled())
        .fault_around(16 * page)
        .on_remove(RemovePolicy::ZeroOnNextFault)
        .spawn()
        .expect("spawn");
    let all = read_within_deadline(&guest, 0, len as usize);
    assert!(all[..] == pattern()[..len as usize]);
    guest.write_at(2 * page, &[0x11; 8]).unwrap();
    let advise = |first: u64, n: u64, advice: i32| {
        // SAFETY: pages of our own guest mapping, no reference into them.
        let r = unsafe {
            libc::madvise(
                (guest.addr() + first * page) as *mut libc::c_void,
                (n * page) as usize,
                advice,
            )
        };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    };
    advise(0, 4, libc::MADV_DONTNEED);
    advise(32, 4, libc::MADV_REMOVE);
    let kept = read_within_deadline(&guest, 0, 4 * page as usize);
    assert_eq!(kept[2 * page as usize..2 * page as usize + 8], [0x11; 8]);
    assert!(kept[3 * page as usize..] == pattern()[3 * page as usize..4 * page as usize]);
    let punched = read_within_deadline(&guest, 32 * page, 4 * page as usize);
    assert!(
        punched.iter().all(|&b| b == 0),
        "punched pages read as zeroes"
    );
    let s = server.shutdown().unwrap();
    eprintln!("[serve] {test}: {}", summary(&s));
    assert!(s.errors.is_empty(), "{}", summary(&s));
    assert!(s.other_events >= 2, "two REMOVE events: {}", summary(&s));
    assert_eq!(s.pages_zeroed, 4, "{}", summary(&s));
    assert_eq!(s.pages_continued, 64 + 4, "{}", summary(&s));
    assert_eq!(s.pages_copied, 0, "{}", summary(&s));
}

/// A server whose regions are all prefilled spawns without a source; one
/// region that reads a source makes the source required again.
#[test]
fn prefilled_regions_need_no_source() {
    let test = "prefilled_regions_need_no_source";
    let _g = serial();
    let page = page();
    let Some(probe) = uffd_or_skip(test, Features::empty()) else {
        return;
    };
    drop(probe);
    let base = 0x7000_0000_0000u64;
    let server = Server::builder(Uffd::builder().create().unwrap())
        .region(Region::new(base, 4 * page).continue_prefilled())
        .region(Region::new(base + 4 * page, 4 * page).continue_prefilled())
        .spawn()
        .expect("spawn without a source");
    server.shutdown().unwrap();
    let server = Server::builder(Uffd::builder().create().unwrap())
        .region(Region::new(base, 4 * page))
        .resolve(Resolve::Continue(Backing::Prefilled))
        .spawn()
        .expect("spawn without a source, prefilled by default");
    server.shutdown().unwrap();
    match Server::builder(Uffd::builder().create().unwrap())
        .region(Region::new(base, 4 * page).continue_prefilled())
        .region(Region::new(base + 4 * page, 4 * page))
        .spawn()
    {
        Err(e @ Error::Invalid { .. }) => {
            assert!(e.to_string().contains("no page source"), "{e}")
        }
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
    assert!(server_threads().is_empty(), "{:?}", server_threads());
}

// ---------------------------------------------------------------------------
// In-process: prefetch
// ---------------------------------------------------------------------------

/// Run 1 records the working set; run 2 prefetches it and faults less.
#[test]
fn prefetch_of_a_recorded_working_set() {
    let test = "prefetch_of_a_recorded_working_set";
    let _g = serial();
    let page = page();
    let len = 16 * MIB;
    let pages = len / page;
    let src = pattern();
    // A scattered quarter of the pages, in random order.
    let mut subset = order(0..pages, Order::Random(21));
    subset.truncate((pages / 4) as usize);

    let Some(uffd) = uffd_or_skip(test, Features::empty()) else {
        return;
    };
    let mem = Mem::anon(len);
    register(&uffd, &mem, RegisterMode::MISSING);
    let server = Server::builder(uffd)
        .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
        .source_arc(src.clone())
        .record(true)
        .spawn()
        .expect("spawn");
    let addr = mem.addr;
    let run1 = serve_and_touch(
        "run 1 (record)",
        server,
        vec![mem],
        addr,
        src.clone(),
        SRC_OFF,
        vec![subset.clone()],
    );
    eprintln!("[serve] {test} run 1: {}", summary(&run1));
    assert_clean(test, &run1);
    assert_eq!(run1.faults, subset.len() as u64, "{}", summary(&run1));
    let ws = run1.working_set();
    let want: Vec<u64> = subset.iter().map(|i| SRC_OFF + i * page).collect();
    assert_eq!(
        ws, want,
        "the working set is the touched source offsets in order"
    );

    let uffd = Uffd::builder().non_blocking(true).create().expect("uffd");
    let mem = Mem::anon(len);
    register(&uffd, &mem, RegisterMode::MISSING);
    let server = Server::builder(uffd)
        .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
        .source_arc(src.clone())
        .prefetch(ws.clone())
        .spawn()
        .expect("spawn");
    let prefetched = wait_until(DEADLINE, || {
        server.stats().pages_prefetched >= ws.len() as u64
    });
    assert!(
        prefetched,
        "prefetch did not finish: {}",
        summary(&server.stats())
    );
    let addr = mem.addr;
    let run2 = serve_and_touch(
        "run 2 (prefetch)",
        server,
        vec![mem],
        addr,
        src,
        SRC_OFF,
        vec![subset.clone()],
    );
    eprintln!("[serve] {test} run 2: {}", summary(&run2));
    assert_clean(test, &run2);
    assert_eq!(run2.pages_prefetched, ws.len() as u64, "{}", summary(&run2));
    assert_eq!(run2.pages_copied, ws.len() as u64, "{}", summary(&run2));
    assert!(
        run2.faults < run1.faults,
        "prefetch should save faults: run 1 {} run 2 {}",
        run1.faults,
        run2.faults
    );
    assert_eq!(
        run2.faults,
        0,
        "every touched page was prefetched: {}",
        summary(&run2)
    );
}

/// `prefetch_all`: every page filled in the background.
#[test]
fn prefetch_all_fills_every_page() {
    let test = "prefetch_all_fills_every_page";
    let _g = serial();
    let page = page();
    let len = 16 * MIB;
    let pages = len / page;
    let src = pattern();

    // (a) Wait for the prefetcher, then touch: no fault at all.
    let Some(uffd) = uffd_or_skip(test, Features::empty()) else {
        return;
    };
    let mem = Mem::anon(len);
    register(&uffd, &mem, RegisterMode::MISSING);
    let server = Server::builder(uffd)
        .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
        .source_arc(src.clone())
        .prefetch_all(true)
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let filled = wait_until(DEADLINE, || server.stats().pages_prefetched >= pages);
    assert!(
        filled,
        "prefetch_all did not finish: {}",
        summary(&server.stats())
    );
    let took = t0.elapsed();
    let addr = mem.addr;
    let s = serve_and_touch(
        "prefetch_all, then touch",
        server,
        vec![mem],
        addr,
        src.clone(),
        SRC_OFF,
        vec![order(0..pages, Order::Random(9))],
    );
    eprintln!(
        "[serve] {test} (a) prefetched {pages} pages in {took:?}: {}",
        summary(&s)
    );
    assert_clean(test, &s);
    assert_eq!(
        (s.faults, s.pages_copied, s.pages_prefetched),
        (0, pages, pages),
        "{}",
        summary(&s)
    );

    // (b) Touch at once, racing the prefetcher.
    let uffd = Uffd::builder().non_blocking(true).create().expect("uffd");
    let mem = Mem::anon(len);
    register(&uffd, &mem, RegisterMode::MISSING);
    let server = Server::builder(uffd)
        .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
        .source_arc(src.clone())
        .prefetch_all(true)
        .fault_around(64 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    let addr = mem.addr;
    let s = serve_and_touch(
        "prefetch_all racing touches",
        server,
        vec![mem],
        addr,
        src,
        SRC_OFF,
        vec![order(0..pages, Order::Random(10))],
    );
    eprintln!("[serve] {test} (b): {}", summary(&s));
    assert_clean(test, &s);
    assert_eq!(s.pages_copied, pages, "{}", summary(&s));
    assert!(s.faults < pages, "{}", summary(&s));
}

// ---------------------------------------------------------------------------
// In-process: lifecycle
// ---------------------------------------------------------------------------

/// `shutdown` (and `Drop`) join every server thread and close every fd the
/// server owns; `stop_when_closed` stops the server when the peer hangs up.
#[test]
fn shutdown_joins_threads_and_closes_fds() {
    let test = "shutdown_joins_threads_and_closes_fds";
    let _g = serial();
    let page = page();
    let len = 4 * MIB;
    let pages = len / page;
    let src = pattern();
    let dir = TempDir::new("serve-lifecycle");
    let path = dir.0.join("mem.snap");
    std::fs::write(&path, &src[..(SRC_OFF + len) as usize]).unwrap();
    if uffd_or_skip(test, Features::empty()).is_none() {
        return;
    }
    assert_no_server_threads();
    let fds_before = open_fds();

    for how in ["shutdown", "drop", "peer hangs up"] {
        let uffd = Uffd::builder().non_blocking(true).create().expect("uffd");
        let mem = Mem::anon(len);
        register(&uffd, &mem, RegisterMode::MISSING);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut theirs = Some(theirs);
        let server = Server::builder(uffd)
            .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
            .source(MappedFile::open(&path).unwrap())
            .workers(3)
            .fault_around(64 * KIB)
            .prefetch((0..8).map(|i| SRC_OFF + i * page).collect())
            .stop_when_closed(OwnedFd::from(ours))
            .spawn()
            .expect("spawn");
        // Threads name themselves once running: wait for the three workers.
        let workers = || {
            server_threads()
                .iter()
                .filter(|n| n.starts_with("uffd-serve-"))
                .count()
        };
        let named = wait_until(Duration::from_secs(2), || workers() == 3);
        assert!(named, "{how}: {:?}", server_threads());
        assert!(open_fds().values().any(|t| t.contains("userfaultfd")));
        let addr = mem.addr;
        // Fault every page (served by the three workers) from a thread.
        let src2 = src.clone();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::Builder::new()
            .name("toucher".into())
            .spawn(move || {
                let _ = tx.send(touch_and_verify(
                    addr,
                    &(0..pages).collect::<Vec<_>>(),
                    &src2,
                    SRC_OFF,
                ));
            })
            .unwrap();
        match rx.recv_timeout(DEADLINE) {
            Ok(r) => {
                r.unwrap_or_else(|e| panic!("{how}: {e}"));
            }
            Err(_) => {
                drop(server);
                std::mem::forget(mem);
                panic!("{how}: the toucher hung");
            }
        }
        t.join().unwrap();
        assert!(!server.is_stopped(), "{how}");
        let t0 = Instant::now();
        match how {
            "shutdown" => {
                let s = server.shutdown().expect("shutdown");
                assert_clean(how, &s);
                assert_eq!(s.pages_copied, pages, "{}", summary(&s));
                assert_eq!(s.stopped_because, None);
            }
            "drop" => drop(server),
            _ => {
                drop(theirs.take());
                let stopped = server.wait_timeout(Duration::from_secs(5));
                let s = server.stats();
                assert!(
                    stopped,
                    "stop_when_closed: not stopped 5 s after the hang-up: {}",
                    summary(&s)
                );
                assert!(s.stopped_because.is_some(), "{}", summary(&s));
                eprintln!(
                    "[serve] {test}: stopped by itself in {:?}: {:?}",
                    t0.elapsed(),
                    s.stopped_because
                );
                let s = server.shutdown().expect("shutdown");
                assert_clean(how, &s);
            }
        }
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(2), "{how} took {took:?}");
        drop((mem, theirs));
        let joined = wait_until(Duration::from_secs(2), || server_threads().is_empty());
        assert!(joined, "{how}: server threads left: {:?}", server_threads());
        let fds_after = open_fds();
        assert_eq!(fds_before, fds_after, "{how}: fds before and after");
        eprintln!("[serve] {test}: {how} in {took:?}, threads and fds back to the start");
    }
}

// ---------------------------------------------------------------------------
// The child VMM: fault injection and address-space events
// ---------------------------------------------------------------------------

const CHILD_TEST: &str = "child_vmm";
const ENV_SCENARIO: &str = "UFFD_GMEM_SERVE_TEST_SCENARIO";
const ENV_SOCK: &str = "UFFD_GMEM_SERVE_TEST_SOCK";

/// Starts the child VMM for `scenario` (with its socket in a scratch
/// directory of its own), accepts its connection and receives its handshake.
fn start_vmm(label: &str, scenario: &str) -> (ChildVmm, Handshake) {
    let dir = TempDir::new("serve-vmm");
    let sock = dir.0.join("uffd.sock");
    let envs = [
        (ENV_SCENARIO, scenario.as_ref()),
        (ENV_SOCK, sock.as_os_str()),
    ];
    let (mut vmm, hs) = ChildVmm::start(label, CHILD_TEST, &sock, &envs);
    vmm.dir = Some(dir);
    (vmm, hs)
}

/// A server for the child's single region (from its handshake).
fn child_server(hs: Handshake) -> uffd_gmem::serve::ServerBuilder {
    let r = &hs.regions[0];
    assert_eq!(hs.regions.len(), 1);
    let region = Region::new(r.base_host_virt_addr, r.size).source_offset(r.offset);
    Server::builder(hs.uffd).region(region)
}

/// The child's side: its guest memory, registered, and the socket.
struct VmmSide {
    mem: Mem,
    _uffd: Uffd,
    stream: UnixStream,
    lines: BufReader<UnixStream>,
    src_off: u64,
    page: u64,
}

impl VmmSide {
    /// Maps `len` bytes, registers them MISSING on a userfaultfd with
    /// `features`, and sends the handshake.
    fn connect(len: u64, features: Features) -> VmmSide {
        let sock = std::env::var(ENV_SOCK).expect(ENV_SOCK);
        let page = page();
        let mem = Mem::anon(len);
        let uffd = Uffd::builder()
            .non_blocking(true)
            .require_features(features)
            .create()
            .expect("child: userfaultfd");
        register(&uffd, &mem, RegisterMode::MISSING);
        let stream = UnixStream::connect(&sock).expect("child: connect");
        let regions = [GuestRegionUffdMapping::new(mem.addr, len, SRC_OFF, page)];
        firecracker::send(&stream, &regions, &[uffd.as_fd()]).expect("child: send handshake");
        let lines = BufReader::new(stream.try_clone().unwrap());
        VmmSide {
            mem,
            _uffd: uffd,
            stream,
            lines,
            src_off: SRC_OFF,
            page,
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stream, "{line}").expect("child: write");
    }

    fn wait_for(&mut self, word: &str) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.lines.read_line(&mut line).expect("child: read");
            assert!(
                n > 0,
                "child: the parent closed the socket; expected {word:?}"
            );
            if line.trim() == word {
                return;
            }
        }
    }

    /// Reads `pages` (faulting them in) and compares with the pattern, or
    /// with zeroes.
    fn check(&mut self, what: &str, pages: impl IntoIterator<Item = u64>, zero: bool) {
        let mut buf = vec![0u8; self.page as usize];
        let mut want = vec![0u8; self.page as usize];
        for i in pages {
            // SAFETY: page `i` lies in `self.mem`, mapped while `self` lives.
            unsafe { read_page(self.mem.addr, i, &mut buf) };
            if zero {
                want.fill(0);
            } else {
                fill_pattern(self.src_off + i * self.page, &mut want);
            }
            if buf != want {
                let m = mismatch(i, &buf, &want);
                self.say(&format!("fail {what}: {m}"));
                panic!("child: {what}: {m}");
            }
        }
    }
}

/// The child VMM's entry point (run by the tests below in a child process).
#[test]
#[ignore = "child process entry: the fault-injection tests run it in a child VMM"]
fn child_vmm() {
    let Ok(scenario) = std::env::var(ENV_SCENARIO) else {
        eprintln!("child_vmm: not started by a test; nothing to do");
        return;
    };
    let args: Vec<&str> = scenario.split_whitespace().collect();
    let page = page();
    match args.as_slice() {
        ["error", bad] => {
            let bad: u64 = bad.parse().unwrap();
            let pages = 1024;
            let mut v = VmmSide::connect(pages * page, Features::empty());
            let half = pages / 2;
            v.check("first half", (0..half).filter(|&i| i != bad), false);
            v.say("phase1 ok");
            // This thread faults on the page the source cannot read: it stays
            // blocked until the process exits.
            let addr = v.mem.addr;
            std::thread::spawn(move || {
                let mut b = vec![0u8; page as usize];
                // SAFETY: the mapping is leaked below, so it outlives the thread.
                unsafe { read_page(addr, bad, &mut b) };
                eprintln!("child: the bad page was resolved");
            });
            std::thread::sleep(Duration::from_millis(50));
            v.check("second half", (half..pages).filter(|&i| i != bad), false);
            v.say("ok");
            v.wait_for("exit");
            // The blocked thread reads the mapping: never unmap it under it.
            std::mem::forget(v);
        }
        ["remove", first, count] => {
            let (first, count): (u64, u64) = (first.parse().unwrap(), count.parse().unwrap());
            let pages = 2048;
            let mut v = VmmSide::connect(pages * page, Features::EVENT_REMOVE);
            // Touch the first half, let the server settle, drop a range that
            // spans touched and untouched pages, then read everything.
            v.check("before REMOVE", 0..pages / 2, false);
            v.say("touched");
            v.wait_for("go");
            // SAFETY: MADV_DONTNEED on our own anonymous mapping, which no
            // Rust reference points into.
            let r = unsafe {
                libc::madvise(
                    (v.mem.addr + first * page) as *mut libc::c_void,
                    (count * page) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
            v.check("removed range", first..first + count, true);
            v.check("before the removed range", 0..first, false);
            v.check("after the removed range", first + count..pages, false);
            v.say("ok");
            v.wait_for("exit");
        }
        ["remove-loop", rounds] => {
            // Drop and read back the same pages again and again, reading them
            // in reverse: the faults race the server's handling of each
            // REMOVE, which walks the pages upwards.
            let rounds: u64 = rounds.parse().unwrap();
            let pages = 256;
            let mut v = VmmSide::connect(pages * page, Features::EVENT_REMOVE);
            v.check("before REMOVE", 0..pages, false);
            for round in 0..rounds {
                // SAFETY: MADV_DONTNEED on our own anonymous mapping, which no
                // Rust reference points into.
                let r = unsafe {
                    libc::madvise(
                        v.mem.addr as *mut libc::c_void,
                        (pages * page) as usize,
                        libc::MADV_DONTNEED,
                    )
                };
                assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
                v.check(&format!("round {round}"), (0..pages).rev(), true);
                if round % 50 == 0 {
                    v.say(&format!("round {round}"));
                }
            }
            v.say("ok");
            v.wait_for("exit");
        }
        ["remap-race", rounds] => {
            // Touch a fresh page (starting a fault-around window) and move the
            // region at once, round after round, through a reservation.
            let rounds: u64 = rounds.parse().unwrap();
            let pages = 1024;
            let len = pages * page;
            let mut v = VmmSide::connect(len, Features::EVENT_REMAP);
            let reserve = Mem::map(
                len * rounds,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            );
            for round in 0..rounds {
                let fresh = (round * 389 + 7) % pages;
                v.check(&format!("round {round}"), [fresh], false);
                let dest = reserve.addr + round * len;
                // SAFETY: moves our own registered mapping onto a slot of our
                // own reservation (still mapped PROT_NONE, so nothing else
                // can have taken it); nothing references either range.
                let p = unsafe {
                    libc::mremap(
                        v.mem.addr as *mut libc::c_void,
                        len as usize,
                        len as usize,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        dest as *mut libc::c_void,
                    )
                };
                assert_ne!(
                    p,
                    libc::MAP_FAILED,
                    "mremap: {}",
                    std::io::Error::last_os_error()
                );
                v.mem.addr = dest;
            }
            v.say("moved");
            v.check("every page at the last address", 0..pages, false);
            v.say("ok");
            v.wait_for("exit");
            // `reserve` now holds the region's final slot and unmaps it.
            std::mem::forget(std::mem::replace(&mut v.mem, Mem { addr: 0, len: 0 }));
            drop(reserve);
        }
        ["unmap-race"] => {
            // Touch a page (starting a fault-around window) and at once unmap
            // part of that window, at eight places; then read what is left.
            let pages = 1024u64;
            let mut v = VmmSide::connect(pages * page, Features::EVENT_UNMAP);
            let mut holes = Vec::new();
            for k in 0..8u64 {
                let p = k * 128 + 40;
                v.check(&format!("round {k}"), [p], false);
                let hole = p + 1..p + 33;
                // SAFETY: unmaps part of our own mapping; those pages are
                // never read again, and the rest is unmapped by the process
                // exit (the mapping is leaked below).
                let r = unsafe {
                    libc::munmap(
                        (v.mem.addr + hole.start * page) as *mut libc::c_void,
                        ((hole.end - hole.start) * page) as usize,
                    )
                };
                assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
                holes.push(hole);
            }
            v.check(
                "every page left",
                (0..pages).filter(|i| !holes.iter().any(|h| h.contains(i))),
                false,
            );
            v.say("ok");
            v.wait_for("exit");
            std::mem::forget(std::mem::replace(&mut v.mem, Mem { addr: 0, len: 0 }));
        }
        ["unmap"] => {
            let pages = 2048;
            let q = pages / 4;
            let mut v = VmmSide::connect(pages * page, Features::EVENT_UNMAP);
            v.check("first quarter", 0..q, false);
            v.say("touched");
            v.wait_for("go");
            // SAFETY: unmaps the second half of our own mapping; nothing
            // reads it afterwards, and `v.mem` is shrunk to match.
            let r = unsafe {
                libc::munmap(
                    (v.mem.addr + 2 * q * page) as *mut libc::c_void,
                    (2 * q * page) as usize,
                )
            };
            assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
            v.mem.len = 2 * q * page;
            v.check("second quarter after UNMAP", q..2 * q, false);
            v.check("first quarter again", 0..q, false);
            v.say("ok");
            v.wait_for("exit");
        }
        ["remap"] => {
            let pages = 1024;
            let len = pages * page;
            let mut v = VmmSide::connect(len, Features::EVENT_REMAP);
            v.check("first half at the old address", 0..pages / 2, false);
            v.say("touched");
            v.wait_for("go");
            // A destination: reserve an address range, then move onto it.
            let dest = Mem::map(
                len,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            );
            // SAFETY: moves our own registered mapping onto our own
            // reservation; nothing references either. `v.mem` then names the
            // new address and the reservation's handle is forgotten (its
            // range now belongs to the moved mapping).
            let p = unsafe {
                libc::mremap(
                    v.mem.addr as *mut libc::c_void,
                    len as usize,
                    len as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    dest.addr as *mut libc::c_void,
                )
            };
            assert_ne!(
                p,
                libc::MAP_FAILED,
                "mremap: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(p as u64, dest.addr);
            let old = v.mem.addr;
            v.mem.addr = dest.addr;
            std::mem::forget(dest);
            v.say(&format!("moved {old:#x} {:#x}", v.mem.addr));
            v.check("every page at the new address", 0..pages, false);
            v.say("ok");
            v.wait_for("exit");
        }
        other => panic!("child_vmm: unknown scenario {other:?}"),
    }
}

/// A source that fails to read the page at source offset `bad`.
struct FailingSource {
    inner: Arc<Vec<u8>>,
    bad: u64,
    page: u64,
}

impl PageSource for FailingSource {
    fn len(&self) -> u64 {
        self.inner.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad + self.page && self.bad < end {
            return Err(std::io::Error::other(format!(
                "injected I/O error at {:#x}",
                self.bad
            )));
        }
        buf.copy_from_slice(&self.inner[offset as usize..end as usize]);
        Ok(())
    }
}

/// A page source error is reported in `Stats::errors`; the faulting page
/// stays unresolved (its thread blocked) while every other page is served.
fn source_error(test: &str, fault_around: u64) {
    let _g = serial();
    let page = page();
    if uffd_or_skip(test, Features::empty()).is_none() {
        return;
    }
    let pages = 1024u64;
    // Not window aligned: with fault-around the bad page sits inside the
    // windows of its neighbours.
    let bad = 100u64;
    let (mut vmm, hs) = start_vmm(test, &format!("error {bad}"));
    let bad_off = hs.regions[0].offset + bad * page;
    let server = child_server(hs)
        .source(FailingSource {
            inner: pattern(),
            bad: bad_off,
            page,
        })
        .fault_around(fault_around)
        .workers(2)
        .spawn()
        .expect("spawn");
    vmm.expect("phase1 ok", &server);
    vmm.expect("ok", &server);
    let reported = wait_until(Duration::from_secs(5), || {
        server.stats().errors.iter().any(|e| {
            e.to_string().contains("injected I/O error")
                && e.op == "page source read"
                && e.source_offset == Some(bad_off)
        })
    });
    let s = server.stats();
    if !reported {
        vmm.fail(&format!(
            "no error names the bad page's read: {}",
            summary(&s)
        ));
    }
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_eq!(s.pages_copied, pages - 1, "{}", summary(&s));
    assert!(
        s.errors
            .iter()
            .all(|e| e.to_string().contains("injected I/O error")),
        "only the injected error is reported: {:?}",
        s.errors
    );
}

#[test]
fn source_error_fault_around_0() {
    source_error("source_error_fault_around_0", 0);
}

#[test]
fn source_error_fault_around_64k() {
    source_error("source_error_fault_around_64k", 64 * KIB);
}

/// `MADV_DONTNEED` on part of the region, half of it served before.
fn remove(test: &str, policy: RemovePolicy) {
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_REMOVE).is_none() {
        return;
    }
    // Pages 768..1280 of 2048: 256 served before, 256 never touched.
    let (first, count) = (768u64, 512u64);
    let (mut vmm, hs) = start_vmm(test, &format!("remove {first} {count}"));
    let server = child_server(hs)
        .source_arc(pattern())
        .fault_around(64 * KIB)
        .workers(2)
        .on_remove(policy)
        .spawn()
        .expect("spawn");
    vmm.expect("touched", &server);
    quiesce(&server);
    let before = server.stats();
    vmm.send("go");
    vmm.expect("ok", &server);
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!(
        "[serve] {test}: before REMOVE {}\n    after: {}",
        summary(&before),
        summary(&s)
    );
    assert_clean(test, &s);
    assert!(
        s.other_events >= 1,
        "the REMOVE event was read: {}",
        summary(&s)
    );
    match policy {
        RemovePolicy::Unregister => assert_eq!(s.pages_zeroed, 0, "{}", summary(&s)),
        _ => assert_eq!(
            s.pages_zeroed,
            count,
            "every removed page answered with zeroes: {}",
            summary(&s)
        ),
    }
}

/// REMOVE after REMOVE on the same pages, each read back at once in
/// reverse order: faults on pages the server is still resetting must not be
/// lost.
#[test]
fn remove_zero_on_next_fault_repeatedly() {
    let test = "remove_zero_on_next_fault_repeatedly";
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_REMOVE).is_none() {
        return;
    }
    let rounds = 300;
    let (mut vmm, hs) = start_vmm(test, &format!("remove-loop {rounds}"));
    let server = child_server(hs)
        .source_arc(pattern())
        .workers(3)
        .on_remove(RemovePolicy::ZeroOnNextFault)
        .spawn()
        .expect("spawn");
    vmm.expect("ok", &server);
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_clean(test, &s);
    assert_eq!(s.other_events, rounds, "{}", summary(&s));
    assert_eq!(s.pages_zeroed, rounds * 256, "{}", summary(&s));
}

#[test]
fn remove_unregister() {
    remove("remove_unregister", RemovePolicy::Unregister);
}

#[test]
fn remove_zero_on_next_fault() {
    remove("remove_zero_on_next_fault", RemovePolicy::ZeroOnNextFault);
}

/// `munmap` of half the region: no error, the rest still served.
#[test]
fn unmap_part_of_a_region() {
    let test = "unmap_part_of_a_region";
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_UNMAP).is_none() {
        return;
    }
    let (mut vmm, hs) = start_vmm(test, "unmap");
    let server = child_server(hs)
        .source_arc(pattern())
        .fault_around(64 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    vmm.expect("touched", &server);
    quiesce(&server);
    vmm.send("go");
    vmm.expect("ok", &server);
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_clean(test, &s);
    assert!(
        s.other_events >= 1,
        "the UNMAP event was read: {}",
        summary(&s)
    );
    assert!(s.pages_copied >= 1024, "{}", summary(&s));
}

/// `mremap` right after a fault, round after round, while the fault-around
/// window is still being filled at the old address: no page may be left
/// claimed by a fill that went to the old address.
#[test]
fn remap_while_fault_around_is_in_flight() {
    let test = "remap_while_fault_around_is_in_flight";
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_REMAP).is_none() {
        return;
    }
    let rounds = 8;
    let (mut vmm, hs) = start_vmm(test, &format!("remap-race {rounds}"));
    let server = child_server(hs)
        .source_arc(pattern())
        .fault_around(512 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    vmm.expect("moved", &server);
    vmm.expect("ok", &server);
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_eq!(s.other_events, rounds, "{}", summary(&s));
    // Fills that raced a move may fail (the old address is gone); nothing
    // else may.
    for e in &s.errors {
        assert!(
            e.to_string().contains("UFFDIO_COPY"),
            "unexpected error: {e}"
        );
    }
}

/// `munmap` of part of a fault-around window being filled: no hang, every
/// page left is right.
#[test]
fn unmap_while_fault_around_is_in_flight() {
    let test = "unmap_while_fault_around_is_in_flight";
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_UNMAP).is_none() {
        return;
    }
    let (mut vmm, hs) = start_vmm(test, "unmap-race");
    let server = child_server(hs)
        .source_arc(pattern())
        .fault_around(512 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    vmm.expect("ok", &server);
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!("[serve] {test}: {}", summary(&s));
    assert_eq!(s.other_events, 8, "{}", summary(&s));
    // Fills that raced an unmap may fail (the range is gone); nothing else
    // may.
    for e in &s.errors {
        assert!(
            e.to_string().contains("UFFDIO_COPY"),
            "unexpected error: {e}"
        );
    }
}

/// `mremap` of the whole region: pages not yet served are served at the new
/// address with the right contents.
#[test]
fn remap_a_region() {
    let test = "remap_a_region";
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_REMAP).is_none() {
        return;
    }
    let pages = 1024u64;
    let (mut vmm, hs) = start_vmm(test, "remap");
    let server = child_server(hs)
        .source_arc(pattern())
        .fault_around(64 * KIB)
        .workers(2)
        .spawn()
        .expect("spawn");
    vmm.expect("touched", &server);
    quiesce(&server);
    vmm.send("go");
    let moved = vmm.expect("moved", &server);
    vmm.expect("ok", &server);
    vmm.send("exit");
    vmm.finish_ok();
    let s = server.shutdown().expect("shutdown");
    eprintln!("[serve] {test}: moved {moved}: {}", summary(&s));
    assert_clean(test, &s);
    assert!(
        s.other_events >= 1,
        "the REMAP event was read: {}",
        summary(&s)
    );
    assert_eq!(
        s.pages_copied,
        pages,
        "each page filled once, before or after the move: {}",
        summary(&s)
    );
}

/// Voluntary context switches of the server's worker threads: how often
/// they went to sleep (and so were woken).
fn worker_sleeps() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("uffd-serve-"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// `WakePolicy::Exclusive` (the default) wakes one of four sleeping
/// workers per fault; `WakePolicy::All` wakes all four. Both serve every
/// page.
#[test]
fn wake_policy_exclusive_wakes_one_worker_per_fault() {
    use uffd_gmem::serve::WakePolicy;
    let test = "wake_policy_exclusive_wakes_one_worker_per_fault";
    let _g = serial();
    let page = page();
    let pages = 100u64;
    let len = pages * page;
    let src = pattern();
    let mut sleeps = Vec::new();
    for policy in [WakePolicy::Exclusive, WakePolicy::All] {
        let Some(uffd) = uffd_or_skip(test, Features::empty()) else {
            return;
        };
        let mem = Mem::anon(len);
        register(&uffd, &mem, RegisterMode::MISSING);
        let server = Server::builder(uffd)
            .region(Region::new(mem.addr, len).source_offset(SRC_OFF))
            .source_arc(src.clone())
            .workers(4)
            .wake_policy(policy)
            .spawn()
            .expect("spawn");
        let named = wait_until(Duration::from_secs(2), || {
            server_threads()
                .iter()
                .filter(|n| n.starts_with("uffd-serve-"))
                .count()
                == 4
        });
        assert!(named, "{policy:?}: {:?}", server_threads());
        // Let the workers reach their first sleep.
        std::thread::sleep(Duration::from_millis(50));
        let before = worker_sleeps();
        let (addr, src2) = (mem.addr, src.clone());
        // One faulter, one fault at a time and 1 ms apart: every fault
        // finds all four workers asleep.
        let touched = std::thread::spawn(move || {
            (0..pages).try_for_each(|i| {
                std::thread::sleep(Duration::from_millis(1));
                touch_and_verify(addr, &[i], &src2, SRC_OFF).map(drop)
            })
        })
        .join()
        .unwrap();
        touched.unwrap_or_else(|e| panic!("{policy:?}: {e}"));
        let woken = worker_sleeps() - before;
        let s = server.shutdown().expect("shutdown");
        assert!(s.errors.is_empty(), "{policy:?}: {}", summary(&s));
        assert_eq!(s.pages_copied, pages, "{policy:?}: {}", summary(&s));
        eprintln!("[serve] {test}: {policy:?}: {woken} worker wake-ups for {pages} faults");
        sleeps.push(woken);
        drop(mem);
    }
    let (exclusive, all) = (sleeps[0], sleeps[1]);
    assert!(
        exclusive * 2 <= all,
        "Exclusive woke workers {exclusive} times, All {all} times, for {pages} faults each"
    );
}
