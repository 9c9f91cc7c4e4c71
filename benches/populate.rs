//! Populating guest memory: 1 GiB of a fresh guest_memfd (`MMAP |
//! INIT_SHARED`, Linux 6.18) filled from a pre-faulted anonymous buffer
//! (`GMEM_BENCH_QUICK`: 64 MiB).
//!
//! Baseline: what a VMM writes without this crate, on libc: `mmap` the
//! guest_memfd and `memcpy` the buffer in, one thread (one write fault per
//! 4 KiB page). Ours: every `Populate` strategy this kernel runs (`MmapCopy`
//! on one and two threads, `Auto`), `Mapping::populate_write` +
//! `Mapping::copy_from`, and `Populate::detached` in a separate process that
//! received the guest_memfd with `kvm_gmem::share` (this binary re-executed
//! with `GMEM_BENCH_CHILD=populate`). Also: `pwrite` into a shmem memfd as a
//! stand-in for the guest_memfd `write()` series (`Strategy::Write`), and the
//! bound, `memcpy` into pre-faulted anonymous memory.
//!
//! Every run gets a fresh guest_memfd; the candidates run interleaved (one
//! unrecorded warm-up round, then `SAMPLES` rounds); rows give the median in
//! GB/s (10^9 bytes/s), the notes the best. After every run a sample of the
//! destination (4 pages per MiB: the first and three pseudo-random ones,
//! whole pages) is compared with the source, so nothing is faked.
//!
//! On a host without guest_memfd (or without `MMAP | INIT_SHARED`) every
//! guest_memfd row is reported as skipped with the reason; the `pwrite`
//! stand-in and the bound still run (their own row compares them).

#[path = "harness/mod.rs"]
mod harness;

use harness::{Bench, Row, Target, Unit, gbps, interleaved, max, median};
use kvm_gmem::populate::{Populate, Report, Source, Strategy};
use kvm_gmem::{GuestMemfd, GuestMemfdFlags, share};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "GMEM_BENCH_CHILD";
const SOCK_ENV: &str = "GMEM_BENCH_SOCK_FD";
const SIZE_ENV: &str = "GMEM_BENCH_SIZE";
const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

fn main() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("populate") {
        child();
        return;
    }
    let size = harness::size(1 << 30, 64 << 20) as u64;
    let samples = harness::size(5, 2);
    let mut bench = Bench::new("populate");

    let src = Anon::new(size as usize);
    fill_pattern(src.bytes_mut());
    let src_bytes = src.bytes();
    let bound_dst = Anon::new(size as usize);
    // Pre-fault the bound's destination (write every page).
    bound_dst.bytes_mut().fill(1);

    // The candidates that need no guest_memfd: they run on every host.
    let mut shmem_pwrite = || {
        let fd = harness::raw::memfd(size);
        let t = Instant::now();
        pwrite_chunks(&fd, src_bytes, MIB as usize);
        let d = t.elapsed();
        verify_fd(&fd, src_bytes, d.as_nanos() as u64);
        gbps(size, d)
    };
    let mut bound = || {
        let t = Instant::now();
        // SAFETY: both buffers hold `size` bytes, are ours and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src_bytes.as_ptr(), bound_dst.ptr, size as usize) };
        let d = t.elapsed();
        assert!(bound_dst.bytes()[..PAGE] == src_bytes[..PAGE]);
        gbps(size, d)
    };
    let need = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let (gmem, shm_v, bound_v) = match harness::gmem_vm(need) {
        Ok((vm, _)) => {
            let (g, [shm, bound]) = GmemRuns::measure(
                &vm,
                size,
                samples,
                src_bytes,
                [&mut shmem_pwrite, &mut bound],
            );
            (Ok(g), shm, bound)
        }
        Err(why) => {
            let v = interleaved(samples, &mut [&mut shmem_pwrite, &mut bound]);
            (Err(why), v[0].clone(), v[1].clone())
        }
    };

    // Rows give the best run (bandwidth: the other jobs on the 2 CPUs only
    // ever slow a run down), notes the median.
    let bound_m = max(&bound_v);
    let mib = size >> 20;
    let case = |what: &str| format!("populate {mib} MiB: {what}");
    let frac = |m: f64| format!("{:.0}% of the memcpy bound", 100.0 * m / bound_m);
    let stats = |g: &GmemRuns, v: &[f64]| {
        format!(
            "best of {} runs (median {:.3} GB/s, baseline median {:.3}); {}",
            v.len(),
            median(v),
            median(&g.raw),
            frac(max(v))
        )
    };
    // One row, or its skip where this host has no guest_memfd: `got` is the
    // baseline's value, ours and the note.
    let row = |bench: &mut Bench,
               what: &str,
               baseline: &str,
               ours: &str,
               target: Option<Target>,
               got: Result<(f64, f64, String), &String>| match got {
        Ok((baseline_value, ours_value, note)) => bench.row(Row {
            case: case(what),
            baseline: baseline.into(),
            baseline_value,
            ours: ours.into(),
            ours_value,
            unit: Unit::GBps,
            target,
            note,
        }),
        Err(why) => bench.skip(case(what), baseline, ours, why.as_str()),
    };
    let g = gmem.as_ref();
    row(
        &mut bench,
        "MmapCopy, 1 thread",
        RAW,
        "Populate MmapCopy threads(1)",
        None,
        g.map(|g| {
            let note = format!(
                "{}; {}; fallocate + MADV_POPULATE_READ per 4 MiB batch, then a volatile copy",
                describe(&g.mc1_report),
                stats(g, &g.mc1)
            );
            (max(&g.raw), max(&g.mc1), note)
        }),
    );
    row(
        &mut bench,
        "MmapCopy, 2 threads",
        RAW,
        "Populate MmapCopy threads(2)",
        None,
        g.map(|g| {
            let note = format!("{}; {}", describe(&g.mc2_report), stats(g, &g.mc2));
            (max(&g.raw), max(&g.mc2), note)
        }),
    );
    row(
        &mut bench,
        "default (Strategy::Auto)",
        RAW,
        "Populate::new(vm).gpa_base(0) Auto",
        Some(Target::min(2.0, "default >= 2x raw mmap+memcpy")),
        g.map(|g| {
            let note = format!(
                "{}; {}; Auto's MmapCopy pre-faults each 4 MiB batch with fallocate(KEEP_SIZE) + \
                 MADV_POPULATE_READ (no separate MADV_POPULATE_WRITE strategy in Populate)",
                describe(&g.auto_report),
                stats(g, &g.auto)
            );
            (max(&g.raw), max(&g.auto), note)
        }),
    );
    row(
        &mut bench,
        "MADV_POPULATE_WRITE, then copy",
        RAW,
        "Mapping::populate_write + copy_from",
        None,
        g.map(|g| {
            let note = format!(
                "kvm-gmem's Mapping API, 1 thread: one MADV_POPULATE_WRITE over the whole range, \
                 then one volatile copy; {}",
                stats(g, &g.populate_write)
            );
            (max(&g.raw), max(&g.populate_write), note)
        }),
    );
    row(
        &mut bench,
        "separate process (share::send + detached)",
        RAW,
        "Populate::detached in a child",
        None,
        g.map(|g| {
            let note = format!(
                "time from share::send to the child's done message (recv, checks, populate, \
                 reply); child reported: {}; {}",
                g.child_line,
                stats(g, &g.separate)
            );
            (max(&g.raw), max(&g.separate), note)
        }),
    );
    row(
        &mut bench,
        "write() stand-in: pwrite into shmem memfd",
        RAW,
        PWRITE,
        None,
        g.map(|g| {
            let note = format!(
                "stand-in for Strategy::Write (this kernel has no guest_memfd write()): a fresh \
                 memfd per run, pwrite in 1 MiB chunks; the baseline is still the guest_memfd \
                 mmap + memcpy; {}",
                stats(g, &shm_v)
            );
            (max(&g.raw), max(&shm_v), note)
        }),
    );
    row(
        &mut bench,
        "default vs memcpy bound",
        BOUND,
        "Populate Auto",
        None,
        g.map(|g| {
            let note = format!(
                "speed-up = fraction of the bound (the copy alone, no page allocation or fault); \
                 best of {} (bound median {:.3} GB/s, Auto median {:.3}); the raw baseline is {}",
                bound_v.len(),
                median(&bound_v),
                median(&g.auto),
                frac(max(&g.raw))
            );
            (bound_m, max(&g.auto), note)
        }),
    );
    row(
        &mut bench,
        "copy step alone (pages already mapped)",
        "libc memcpy through the mapping",
        "Mapping::copy_from (volatile 8-byte stores)",
        None,
        g.map(|g| {
            let (vol, mc) = &g.copy_step;
            let note = format!(
                "diagnostic: the copy MmapCopy does after pre-faulting, into a guest_memfd whose \
                 pages are all mapped (no faults), best of {} (medians {:.3} vs {:.3} GB/s)",
                vol.len(),
                median(vol),
                median(mc)
            );
            (max(mc), max(vol), note)
        }),
    );
    bench.row(Row {
        case: case("write() stand-in vs memcpy bound"),
        baseline: BOUND.into(),
        baseline_value: bound_m,
        ours: PWRITE.into(),
        ours_value: max(&shm_v),
        unit: Unit::GBps,
        target: None,
        note: format!(
            "needs no guest_memfd, so it runs on every host: speed-up = fraction of the bound; a \
             fresh shmem memfd per run, pwrite in 1 MiB chunks; best of {} (medians {:.3} vs \
             {:.3} GB/s)",
            shm_v.len(),
            median(&shm_v),
            median(&bound_v)
        ),
    });
    bench.note(format!(
        "populate: every run creates a fresh {mib} MiB guest_memfd (MMAP|INIT_SHARED) or shmem \
         memfd; the source is a pre-faulted anonymous buffer with a per-word pattern; after each \
         run 4 whole pages per MiB are compared with the source; candidates interleaved, \
         {samples} rounds after a warm-up; rows give the best run, notes the median: the \
         machine's 2 CPUs are shared with other developers' jobs, which only ever slow a run \
         down, so medians are noisy"
    ));
    bench.finish();
}

const RAW: &str = "raw libc mmap + memcpy, 1 thread";
const BOUND: &str = "memcpy into pre-faulted anonymous memory, 1 thread";
const PWRITE: &str = "pwrite 1 MiB chunks, shmem memfd, 1 thread";

/// The guest_memfd candidates' samples (GB/s, one per run) and what they
/// reported.
struct GmemRuns {
    raw: Vec<f64>,
    mc1: Vec<f64>,
    mc2: Vec<f64>,
    auto: Vec<f64>,
    populate_write: Vec<f64>,
    separate: Vec<f64>,
    /// (Mapping::copy_from, memcpy) GB/s into already populated pages,
    /// without the warm-up round.
    copy_step: (Vec<f64>, Vec<f64>),
    mc1_report: Option<Report>,
    mc2_report: Option<Report>,
    auto_report: Option<Report>,
    /// The child's last report.
    child_line: String,
}

impl GmemRuns {
    /// Runs the guest_memfd candidates on `vm` interleaved with `others`
    /// (the candidates every host runs); returns theirs and the others'
    /// samples.
    fn measure(
        vm: &impl kvm_gmem::VmOps,
        size: u64,
        samples: usize,
        src_bytes: &[u8],
        others: [&mut dyn FnMut() -> f64; 2],
    ) -> (GmemRuns, [Vec<f64>; 2]) {
        let mut child = PopulatorChild::spawn(size);
        let mut auto_report: Option<Report> = None;
        let mut mc1_report: Option<Report> = None;
        let mut mc2_report: Option<Report> = None;
        let mut child_reports: Vec<String> = Vec::new();
        let mut copy_step: (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());

        let mut raw = || {
            let g = fresh(vm, size);
            let t = Instant::now();
            raw_mmap_memcpy(&g, src_bytes);
            let d = t.elapsed();
            verify("raw mmap + memcpy", &g, src_bytes, d.as_nanos() as u64);
            gbps(size, d)
        };
        let mmap_copy = |threads: usize, report: &mut Option<Report>| {
            let g = fresh(vm, size);
            let t = Instant::now();
            let r = Populate::new(vm, &g)
                .strategy(Strategy::MmapCopy)
                .threads(threads)
                .run(0..size, Source::bytes(src_bytes))
                .expect("Populate MmapCopy");
            let d = t.elapsed();
            verify("MmapCopy", &g, src_bytes, d.as_nanos() as u64);
            *report = Some(r);
            gbps(size, d)
        };
        let mut mmap_copy_1 = || mmap_copy(1, &mut mc1_report);
        let mut mmap_copy_2 = || mmap_copy(2, &mut mc2_report);
        let mut auto = || {
            let g = fresh(vm, size);
            let t = Instant::now();
            // The default, as a VMM calls it: every strategy eligible (the
            // VM and the memslot's base given, so the RFC ioctl is probed
            // too).
            let r = Populate::new(vm, &g)
                .gpa_base(0)
                .run(0..size, Source::bytes(src_bytes))
                .expect("Populate Auto");
            let d = t.elapsed();
            verify("Auto", &g, src_bytes, d.as_nanos() as u64);
            auto_report = Some(r);
            gbps(size, d)
        };
        let mut populate_write = || {
            let g = fresh(vm, size);
            let t = Instant::now();
            let map = g.map().expect("map");
            map.populate_write(0, size as usize)
                .expect("MADV_POPULATE_WRITE");
            map.copy_from(0, src_bytes).expect("copy_from");
            drop(map);
            let d = t.elapsed();
            verify(
                "populate_write + copy_from",
                &g,
                src_bytes,
                d.as_nanos() as u64,
            );
            // The copy step alone, into the now populated guest_memfd: ours'
            // volatile copy against libc memcpy, through one mapping.
            let map = g.map().expect("map");
            // SAFETY: touches every page so that neither copy below faults.
            let r = unsafe {
                libc::madvise(
                    map.as_ptr().cast(),
                    size as usize,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            assert_eq!(r, 0, "MADV_POPULATE_WRITE");
            let t = Instant::now();
            map.copy_from(0, src_bytes).expect("copy_from");
            copy_step.0.push(gbps(size, t.elapsed()));
            let t = Instant::now();
            // SAFETY: the mapping holds `size` writable bytes of a
            // guest_memfd with MMAP|INIT_SHARED that nothing else uses;
            // `src` does not overlap it.
            unsafe {
                std::ptr::copy_nonoverlapping(src_bytes.as_ptr(), map.as_ptr(), size as usize)
            };
            copy_step.1.push(gbps(size, t.elapsed()));
            drop(map);
            verify("copy step", &g, src_bytes, d.as_nanos() as u64 ^ 1);
            gbps(size, d)
        };
        let mut separate = || {
            let g = fresh(vm, size);
            let (d, line) = child.populate(&g);
            verify("separate process", &g, src_bytes, d.as_nanos() as u64);
            child_reports.push(line);
            gbps(size, d)
        };
        let [shmem_pwrite, bound] = others;
        let v = interleaved(
            samples,
            &mut [
                &mut raw,
                &mut mmap_copy_1,
                &mut mmap_copy_2,
                &mut auto,
                &mut populate_write,
                &mut separate,
                shmem_pwrite,
                bound,
            ],
        );
        child.finish();
        let [raw, mc1, mc2, auto, populate_write, separate, shm, bound]: [Vec<f64>; 8] =
            v.try_into().expect("8 candidates");
        // The warm-up round's values are not samples.
        let copy_step = (copy_step.0.split_off(1), copy_step.1.split_off(1));
        let runs = GmemRuns {
            raw,
            mc1,
            mc2,
            auto,
            populate_write,
            separate,
            copy_step,
            mc1_report,
            mc2_report,
            auto_report,
            child_line: child_reports.pop().unwrap_or_default(),
        };
        (runs, [shm, bound])
    }
}

/// What `Populate` reported: the strategy that ran and why others did not.
fn describe(r: &Option<Report>) -> String {
    let Some(r) = r else {
        return "no report".into();
    };
    let tried = r
        .tried
        .iter()
        .map(|(s, why)| format!("{s:?} skipped: {why}"))
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "ran {:?} on {} thread(s){}",
        r.strategy,
        r.threads,
        if tried.is_empty() {
            String::new()
        } else {
            format!(" [{tried}]")
        }
    )
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A private anonymous mapping owned by the bench.
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Anon {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Anon { ptr: p.cast(), len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is ours, readable for `len` bytes while `self`
        // lives; no other thread writes it while this borrow is in use.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as for `bytes`; callers use it once, before any shared
        // borrow is taken (setup only).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Every 8-byte word is a hash of its index: a misplaced page never matches.
fn fill_pattern(buf: &mut [u8]) {
    for (k, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix(0x6d65_6d00 ^ k as u64).to_le_bytes());
    }
}

fn fresh(vm: &impl kvm_gmem::VmOps, size: u64) -> GuestMemfd {
    GuestMemfd::builder(size)
        .mmap(true)
        .init_shared(true)
        .create(vm)
        .expect("guest_memfd with MMAP|INIT_SHARED (Linux 6.18)")
}

/// The pages checked in MiB `m`: the first and three pseudo-random ones.
fn sample_pages(m: u64, seed: u64) -> [u64; 4] {
    let per = MIB / PAGE as u64;
    let h = splitmix(seed ^ (m << 20));
    [0, h % per, (h >> 20) % per, (h >> 40) % per].map(|p| m * MIB + p * PAGE as u64)
}

fn verify(what: &str, g: &GuestMemfd, src: &[u8], seed: u64) {
    let map = g.map().expect("map for verification");
    let mut buf = vec![0u8; PAGE];
    for m in 0..g.size() / MIB {
        for off in sample_pages(m, seed) {
            map.read_at(off, &mut buf).expect("read_at");
            let o = off as usize;
            assert!(
                buf[..] == src[o..o + PAGE],
                "{what}: the page at offset {off:#x} differs from the source"
            );
        }
    }
}

fn verify_fd(fd: &OwnedFd, src: &[u8], seed: u64) {
    let mut buf = vec![0u8; PAGE];
    for m in 0..src.len() as u64 / MIB {
        for off in sample_pages(m, seed) {
            // SAFETY: `buf` is writable for PAGE bytes.
            let r =
                unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), PAGE, off as i64) };
            assert_eq!(r, PAGE as isize, "pread(memfd)");
            let o = off as usize;
            assert!(
                buf[..] == src[o..o + PAGE],
                "pwrite stand-in: the page at offset {off:#x} differs from the source"
            );
        }
    }
}

/// The baseline: `mmap` the guest_memfd, `memcpy`, `munmap`, on libc.
fn raw_mmap_memcpy(g: &GuestMemfd, src: &[u8]) {
    let len = src.len();
    // SAFETY: a fresh shared mapping of the guest_memfd (MMAP|INIT_SHARED, so
    // the host may fault every page in), chosen by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            g.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap(guest_memfd)");
    // SAFETY: the mapping holds `len` writable bytes, nothing else uses it,
    // and it does not overlap `src`; then it is unmapped once.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), p.cast::<u8>(), len);
        libc::munmap(p, len);
    }
}

fn pwrite_chunks(fd: &OwnedFd, src: &[u8], chunk: usize) {
    let mut done = 0usize;
    while done < src.len() {
        let n = chunk.min(src.len() - done);
        // SAFETY: `src[done..done + n]` is readable; the kernel only reads it.
        let r =
            unsafe { libc::pwrite(fd.as_raw_fd(), src[done..].as_ptr().cast(), n, done as i64) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        assert!(r > 0, "pwrite(memfd): {}", std::io::Error::last_os_error());
        done += r as usize;
    }
}

// ---------------------------------------------------------------------------
// The separate populating process
// ---------------------------------------------------------------------------

/// The parent's side: the child process and the socket to it.
struct PopulatorChild {
    child: Child,
    sock: UnixStream,
    reader: BufReader<UnixStream>,
}

impl PopulatorChild {
    fn spawn(size: u64) -> PopulatorChild {
        let (parent, child_end) = UnixStream::pair().expect("socketpair");
        // The child's end must survive exec: clear FD_CLOEXEC (this process
        // spawns nothing else meanwhile).
        // SAFETY: F_SETFD on a descriptor we own changes only its flags.
        let r = unsafe { libc::fcntl(child_end.as_raw_fd(), libc::F_SETFD, 0) };
        assert_eq!(r, 0, "fcntl(F_SETFD)");
        let child = Command::new(std::env::current_exe().expect("current_exe"))
            .env(CHILD_ENV, "populate")
            .env(SOCK_ENV, child_end.as_raw_fd().to_string())
            .env(SIZE_ENV, size.to_string())
            .spawn()
            .expect("spawn the populating child");
        drop(child_end);
        parent
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("SO_RCVTIMEO");
        let mut reader = BufReader::new(parent.try_clone().expect("dup"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("the child's ready line");
        assert_eq!(line.trim(), "ready", "child: {line:?}");
        PopulatorChild {
            child,
            sock: parent,
            reader,
        }
    }

    /// Sends `g`; returns the time until the child's done line, and the line.
    fn populate(&mut self, g: &GuestMemfd) -> (Duration, String) {
        let mut line = String::new();
        let t = Instant::now();
        share::send(&self.sock, g).expect("share::send");
        self.reader.read_line(&mut line).expect("the child's reply");
        let d = t.elapsed();
        assert!(line.starts_with("done "), "child failed: {line:?}");
        (d, line.trim()["done ".len()..].to_string())
    }

    /// Closes the socket (the child exits on end-of-file) and reaps it.
    fn finish(self) {
        let PopulatorChild {
            mut child,
            sock,
            reader,
        } = self;
        drop((sock, reader));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait().expect("try_wait") {
                Some(s) => {
                    assert!(s.success(), "the populating child failed: {s}");
                    return;
                }
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the populating child did not exit (killed)");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// The child: builds the same source, then populates every guest_memfd it
/// receives with `Populate::detached` until the parent closes the socket.
fn child() {
    let raw: i32 = std::env::var(SOCK_ENV)
        .expect("GMEM_BENCH_SOCK_FD")
        .parse()
        .expect("an fd number");
    let size: usize = std::env::var(SIZE_ENV)
        .expect("GMEM_BENCH_SIZE")
        .parse()
        .expect("a size");
    // SAFETY: the parent passed this descriptor (inherited over exec) for
    // this process to own; nothing else here uses it.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let src = Anon::new(size);
    fill_pattern(src.bytes_mut());
    (&sock).write_all(b"ready\n").expect("write ready");
    loop {
        let g = match share::recv(&sock) {
            Ok(g) => g,
            Err(kvm_gmem::Error::Protocol { .. }) => return, // the parent closed
            Err(e) => panic!("child: share::recv: {e}"),
        };
        let reply = match Populate::detached(&g).run(0..g.size(), Source::bytes(src.bytes())) {
            Ok(r) => format!(
                "done {:?} on {} thread(s), {:.1} ms in the child\n",
                r.strategy,
                r.threads,
                r.elapsed.as_secs_f64() * 1e3
            ),
            Err(e) => format!("error {e}\n"),
        };
        drop(g);
        (&sock).write_all(reply.as_bytes()).expect("write reply");
    }
}
