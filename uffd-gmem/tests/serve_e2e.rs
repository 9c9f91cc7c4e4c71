//! End to end: a child process plays Firecracker, this process the UFFD
//! handler.
//!
//! The child VMM (this test binary re-executed with the ignored
//! `child_vmm_e2e` test as its only test) maps two guest memory regions
//! (16 MiB + 8 MiB, anonymous `MAP_PRIVATE | MAP_NORESERVE`), creates a
//! non-blocking userfaultfd with `EVENT_REMOVE`, registers both regions
//! MISSING and sends Firecracker's handshake (JSON + the uffd as
//! `SCM_RIGHTS`) with `firecracker::send`. The handler receives it with
//! `Handshake::recv_timeout`, validates it against the snapshot file and
//! serves it with a `Server` (the snapshot as a `MappedFile`, fault-around
//! 512 KiB, two workers, stopping when the socket closes). The child faults
//! every page from four threads, compares every byte with the snapshot
//! (mapped read-only by itself), and reports a checksum over the socket.
//!
//! Variants: sequential and random order; overlapping pages (claim and
//! EEXIST races); `MADV_DONTNEED` during serving; the VMM killed mid-way.
//! Everything is bounded: the child is killed on any failure or timeout.
//! Without userfaultfd a test prints `SKIP <test>: <why>` and passes,
//! unless `CI=true`.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    ChildVmm, KIB, MIB, Mem, TempDir, assert_no_server_threads, page, read_at, serial,
    server_threads, shuffle, splitmix, summary, uffd_or_skip, wait_until,
};
use uffd_gmem::firecracker::{self, GuestRegionUffdMapping};
use uffd_gmem::serve::{MappedFile, Region, Server};
use uffd_gmem::{Features, RegisterMode, Uffd};

/// The guest memory regions, laid out back to back in the snapshot file.
const REGIONS: [u64; 2] = [16 * MIB, 8 * MIB];
const TOUCHERS: u64 = 4;
/// The range the `remove` variant drops (pages of guest memory, in the
/// first toucher's quarter).
const REMOVED: (u64, u64) = (256, 512);

const CHILD_TEST: &str = "child_vmm_e2e";
const ENV_SCENARIO: &str = "UFFD_GMEM_E2E_SCENARIO";
const ENV_SOCK: &str = "UFFD_GMEM_E2E_SOCK";
const ENV_SNAPSHOT: &str = "UFFD_GMEM_E2E_SNAPSHOT";

fn total_len() -> u64 {
    REGIONS.iter().sum()
}

/// The snapshot's bytes: every 8-byte word a hash of its file offset.
fn write_snapshot(path: &Path, len: u64) {
    let mut v = vec![0u8; len as usize];
    for (k, w) in v.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix(0xe2e0_0000 + k as u64).to_le_bytes());
    }
    std::fs::write(path, v).expect("write the snapshot");
}

/// A checksum of one page of guest memory (global page `g`); pages add up
/// with wrapping addition, so the order does not matter.
fn page_sum(g: u64, bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(splitmix(g), |h, w| {
        (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// The child VMM
// ---------------------------------------------------------------------------

/// Which guest memory page (global index over both regions) each of the
/// [`TOUCHERS`] threads touches, in order.
fn plan(order: &str, variant: &str, pages: u64) -> Vec<Vec<u64>> {
    let q = pages / TOUCHERS;
    (0..TOUCHERS)
        .map(|t| {
            let mut v: Vec<u64> = match variant {
                // Every page by two threads: quarters t and t + 1.
                "overlap" => (t * q..(t + 2) * q).map(|g| g % pages).collect(),
                _ => (t * q..(t + 1) * q).collect(),
            };
            match (order, variant, t % 2) {
                ("random", _, _) => shuffle(&mut v, 0xfeed + t),
                // Overlapping sequential threads run against each other.
                ("sequential", "overlap", 1) => v.reverse(),
                _ => {}
            }
            v
        })
        .collect()
}

/// The child VMM's entry point.
#[test]
#[ignore = "child process entry: the end-to-end tests run it as the VMM"]
fn child_vmm_e2e() {
    let Ok(scenario) = std::env::var(ENV_SCENARIO) else {
        eprintln!("child_vmm_e2e: not started by a test; nothing to do");
        return;
    };
    let (order, variant) = scenario
        .split_once(' ')
        .expect("scenario: <order> <variant>");
    let page = page();
    let sock = std::env::var(ENV_SOCK).expect(ENV_SOCK);
    let snapshot = std::env::var(ENV_SNAPSHOT).expect(ENV_SNAPSHOT);

    // Guest memory, the userfaultfd, the handshake: as Firecracker does.
    let regions: Vec<Mem> = REGIONS.iter().map(|&len| Mem::anon(len)).collect();
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::EVENT_REMOVE)
        .create()
        .expect("child: userfaultfd");
    let mut mappings = Vec::new();
    let mut offset = 0;
    for m in &regions {
        // SAFETY: guest memory this process mapped for the purpose: no Rust
        // reference points into it (it is read through raw-pointer copies),
        // and it stays mapped until the process exits.
        unsafe { uffd.register(m.addr..m.addr + m.len, RegisterMode::MISSING) }
            .expect("child: register");
        mappings.push(GuestRegionUffdMapping::new(m.addr, m.len, offset, page));
        offset += m.len;
    }
    let stream = UnixStream::connect(&sock).expect("child: connect");
    firecracker::send(&stream, &mappings, &[uffd.as_fd()]).expect("child: send the handshake");

    // The snapshot, mapped read-only, to compare with.
    let file = std::fs::File::open(&snapshot).expect("child: open the snapshot");
    let snap = Mem::map_prot(offset, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd());
    let pages = offset / page;
    // Global page g -> its guest address.
    let bases: Vec<(u64, u64)> = regions.iter().map(|m| (m.addr, m.len / page)).collect();
    let addr_of = move |g: u64| {
        let mut g = g;
        for &(base, n) in &bases {
            if g < n {
                return base + g * page;
            }
            g -= n;
        }
        unreachable!("page {g} past guest memory")
    };
    let snap_addr = snap.addr;
    let progress = Arc::new(AtomicU64::new(0));
    let removed = |g: u64| variant == "remove" && (REMOVED.0..REMOVED.1).contains(&g);

    let mut threads = Vec::new();
    for (t, list) in plan(order, variant, pages).into_iter().enumerate() {
        let progress = progress.clone();
        let addr_of = addr_of.clone();
        let is_remove = variant == "remove" && t == 0;
        let stream = stream.try_clone().unwrap();
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            let mut got = vec![0u8; page as usize];
            let mut want = vec![0u8; page as usize];
            let check =
                |g: u64, got: &mut [u8], want: &mut [u8], zero: bool| -> Result<(), String> {
                    // SAFETY: guest memory stays mapped while the process runs.
                    unsafe { read_at(addr_of(g), got) };
                    if zero {
                        want.fill(0);
                    } else {
                        // SAFETY: the snapshot mapping covers every guest page.
                        unsafe { read_at(snap_addr + g * page, want) };
                    }
                    if got != want {
                        let first = got
                            .iter()
                            .zip(want.iter())
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        return Err(format!(
                            "toucher {t}: guest page {g}: byte {first} is {:#04x}, want {:#04x}{}",
                            got[first],
                            want[first],
                            if got.iter().all(|&b| b == 0) {
                                " (zero page)"
                            } else {
                                ""
                            }
                        ));
                    }
                    Ok(())
                };
            for &g in &list {
                check(g, &mut got, &mut want, false)?;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            if is_remove {
                // Drop part of what was verified (balloon inflation) while the
                // other threads still fault, then read it back: zeroes.
                let (a, b) = (addr_of(REMOVED.0), (REMOVED.1 - REMOVED.0) * page);
                // SAFETY: MADV_DONTNEED on guest memory of this process,
                // which no Rust reference points into.
                let r = unsafe {
                    libc::madvise(a as *mut libc::c_void, b as usize, libc::MADV_DONTNEED)
                };
                if r != 0 {
                    return Err(format!("madvise: {}", std::io::Error::last_os_error()));
                }
                let _ = writeln!(&stream, "removed {} pages", REMOVED.1 - REMOVED.0);
                for g in REMOVED.0..REMOVED.1 {
                    check(g, &mut got, &mut want, true)?;
                }
            }
            Ok(())
        }));
    }
    if variant == "die" {
        // The VMM dies with half the pages touched and faults in flight.
        while progress.load(Ordering::Relaxed) < pages / 2 {
            std::thread::yield_now();
        }
        let _ = writeln!(&stream, "half");
        // SAFETY: kill(2) on this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }
    let mut failures = Vec::new();
    for t in threads {
        if let Err(e) = t.join().expect("toucher panicked") {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(&stream, "fail {failures:?}");
        panic!("child: {failures:?}");
    }
    // Every page is present now: a checksum of guest memory as the VMM sees it.
    let mut sum = 0u64;
    let mut got = vec![0u8; page as usize];
    for g in 0..pages {
        // SAFETY: as above.
        unsafe { read_at(addr_of(g), &mut got) };
        if removed(g) {
            assert!(
                got.iter().all(|&b| b == 0),
                "child: removed page {g} is not zero"
            );
        }
        sum = sum.wrapping_add(page_sum(g, &got));
    }
    writeln!(&stream, "ok {sum:#x}").expect("child: report");
    drop(uffd);
}

// ---------------------------------------------------------------------------
// The handler's tests
// ---------------------------------------------------------------------------

fn e2e(test: &str, order: &str, variant: &str) {
    let _g = serial();
    if uffd_or_skip(test, Features::EVENT_REMOVE).is_none() {
        return;
    }
    assert_no_server_threads();
    let page = page();
    let dir = TempDir::new("e2e");
    let snapshot = dir.0.join("mem.snap");
    write_snapshot(&snapshot, total_len());
    let snap_len = std::fs::metadata(&snapshot).unwrap().len();
    let pages = snap_len / page;

    let t0 = Instant::now();
    let sock = dir.0.join("fc.sock");
    let scenario = format!("{order} {variant}");
    let envs = [
        (ENV_SCENARIO, OsStr::new(&scenario)),
        (ENV_SOCK, sock.as_os_str()),
        (ENV_SNAPSHOT, snapshot.as_os_str()),
    ];
    let (mut vmm, hs) = ChildVmm::start(test, CHILD_TEST, &sock, &envs);
    if let Err(e) = hs.validate_against_snapshot(snap_len) {
        vmm.fail(&format!("validate_against_snapshot: {e}"));
    }
    assert_eq!(hs.regions.len(), REGIONS.len());
    assert_eq!(hs.page_size(), page);
    assert!(!hs.is_secret_hiding());
    let watch: OwnedFd = vmm.stream.try_clone().unwrap().into();
    let mut builder = Server::builder(hs.uffd)
        .source(MappedFile::open(&snapshot).expect("MappedFile::open"))
        .fault_around(512 * KIB)
        .workers(2)
        .record(true)
        .stop_when_closed(watch);
    for r in &hs.regions {
        builder =
            builder.region(Region::new(r.base_host_virt_addr, r.size).source_offset(r.offset));
    }
    let server = builder.spawn().expect("spawn");

    if variant == "die" {
        vmm.expect("half", &server);
        let st = vmm.finish();
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "the child killed itself: {st}"
        );
        let t1 = Instant::now();
        let stopped = server.wait_timeout(Duration::from_secs(5));
        let noticed = t1.elapsed();
        let s = server.stats();
        assert!(
            stopped,
            "the server did not notice the VMM's death within 5 s: {}",
            summary(&s)
        );
        assert!(s.stopped_because.is_some(), "{}", summary(&s));
        let t2 = Instant::now();
        let s = server.shutdown().expect("shutdown");
        let shut = t2.elapsed();
        eprintln!(
            "[e2e] {test}: noticed the VMM's death in {noticed:?}, shut down in {shut:?}: {}",
            summary(&s)
        );
        assert!(shut < Duration::from_secs(2), "shutdown took {shut:?}");
        assert!(
            s.pages_copied >= pages / 2 && s.pages_copied <= pages,
            "{}",
            summary(&s)
        );
        // A fill racing the VMM's exit may fail (the address space is gone);
        // nothing else may.
        for e in &s.errors {
            let gone = [libc::ESRCH, libc::ENOENT, libc::EFAULT]
                .iter()
                .any(|&n| e.error.errno() == Some(uffd_gmem::Errno(n)));
            assert!(gone, "unexpected error after the VMM died: {e}");
        }
    } else {
        let sum = vmm.expect("ok", &server);
        vmm.finish_ok();
        let took = t0.elapsed();
        // The child's exit closed the socket: the server stops by itself.
        let stopped = server.wait_timeout(Duration::from_secs(5));
        let s = server.shutdown().expect("shutdown");
        eprintln!("[e2e] {test}: {took:?} {}", summary(&s));
        assert!(
            stopped,
            "stop_when_closed did not stop the server: {}",
            summary(&s)
        );
        assert!(s.stopped_because.is_some());
        assert!(s.errors.is_empty(), "errors: {}", summary(&s));
        assert_eq!(
            s.pages_copied,
            pages,
            "every page copied once: {}",
            summary(&s)
        );
        assert!(s.faults >= 1 && s.faults <= pages, "{}", summary(&s));
        assert_eq!(s.pages_zeroed, 0, "{}", summary(&s));
        assert!(s.latency.count() >= 1 && s.max_latency > Duration::ZERO);
        if variant == "remove" {
            assert!(
                s.other_events >= 1,
                "the REMOVE event was read: {}",
                summary(&s)
            );
        } else {
            assert_eq!(s.other_events, 0, "{}", summary(&s));
        }
        // The checksum of guest memory as the VMM read it.
        let data = std::fs::read(&snapshot).unwrap();
        let mut want = 0u64;
        let zero = vec![0u8; page as usize];
        for g in 0..pages {
            let bytes = if variant == "remove" && (REMOVED.0..REMOVED.1).contains(&g) {
                &zero[..]
            } else {
                &data[(g * page) as usize..((g + 1) * page) as usize]
            };
            want = want.wrapping_add(page_sum(g, bytes));
        }
        assert_eq!(
            sum,
            format!("{want:#x}"),
            "the child's checksum of guest memory"
        );
    }
    let joined = wait_until(Duration::from_secs(2), || server_threads().is_empty());
    assert!(joined, "server threads left: {:?}", server_threads());
}

#[test]
fn e2e_sequential() {
    e2e("e2e_sequential", "sequential", "plain");
}

#[test]
fn e2e_random() {
    e2e("e2e_random", "random", "plain");
}

#[test]
fn e2e_overlapping_touches_sequential() {
    e2e(
        "e2e_overlapping_touches_sequential",
        "sequential",
        "overlap",
    );
}

#[test]
fn e2e_overlapping_touches_random() {
    e2e("e2e_overlapping_touches_random", "random", "overlap");
}

#[test]
fn e2e_remove_during_serving() {
    e2e("e2e_remove_during_serving", "random", "remove");
}

#[test]
fn e2e_vmm_dies_mid_way() {
    e2e("e2e_vmm_dies_mid_way", "random", "die");
}
