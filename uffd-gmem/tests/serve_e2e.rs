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

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake};
use uffd_gmem::serve::{MappedFile, Region, Server, Stats};
use uffd_gmem::{Features, RegisterMode, Uffd};

const DEADLINE: Duration = Duration::from_secs(30);
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
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

fn page() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

fn total_len() -> u64 {
    REGIONS.iter().sum()
}

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn skip(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: {why} (CI=true: a skip is a failure)");
    }
    eprintln!("SKIP {test}: {why}");
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

/// A mapping owned by the test.
struct Mem {
    addr: u64,
    len: u64,
}

impl Mem {
    fn map(len: u64, prot: i32, flags: i32, fd: i32) -> Mem {
        // SAFETY: a fresh mapping at an address the kernel chooses.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, flags, fd, 0) };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mem {
            addr: p as u64,
            len,
        }
    }

    /// Guest memory as Firecracker maps it.
    fn guest(len: u64) -> Mem {
        Mem::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every thread reading it has finished.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Copies `buf.len()` bytes at `addr` into `buf` (faulting them in).
///
/// # Safety
///
/// `addr .. addr + buf.len()` must stay mapped and readable during the call.
unsafe fn read_at(addr: u64, buf: &mut [u8]) {
    // SAFETY: the caller guarantees the source is mapped; `buf` is ours.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
}

/// Threads of this process named `uffd-*` (the server's).
fn server_threads() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("uffd-"))
        .collect()
}

fn summary(s: &Stats) -> String {
    let q = |x| {
        s.latency
            .quantile(x)
            .map_or_else(|| "-".to_string(), |d| format!("{d:?}"))
    };
    format!(
        "faults={} copied={} zeroed={} eexist={} eagain={} wakes={} other_events={} \
         latency p50<={} p99<={} max={:?} errors={} {:?} stopped_because={:?}",
        s.faults,
        s.pages_copied,
        s.pages_zeroed,
        s.eexist,
        s.eagain,
        s.wakes,
        s.other_events,
        q(0.5),
        q(0.99),
        s.max_latency,
        s.errors.len(),
        s.errors.iter().take(4).collect::<Vec<_>>(),
        s.stopped_because,
    )
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "uffd-gmem-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// The handler's side of the child VMM
// ---------------------------------------------------------------------------

struct ChildVmm {
    label: String,
    child: Child,
    stream: UnixStream,
    lines: BufReader<UnixStream>,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl ChildVmm {
    /// Listens on `sock`, starts the child VMM, accepts its connection and
    /// receives its handshake.
    fn start(label: &str, scenario: &str, sock: &Path, snapshot: &Path) -> (ChildVmm, Handshake) {
        let listener = UnixListener::bind(sock).expect("bind");
        listener.set_nonblocking(true).unwrap();
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .args([
                CHILD_TEST,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_SCENARIO, scenario)
            .env(ENV_SOCK, sock)
            .env(ENV_SNAPSHOT, snapshot)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child VMM");
        let output = Arc::new(Mutex::new(Vec::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|mut p| {
                let out = output.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = p.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        out.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                })
            })
            .collect::<Vec<_>>();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{label}: accept: {e}"),
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait();
                for r in readers {
                    let _ = r.join();
                }
                panic!(
                    "{label}: the child VMM never connected ({st:?}); its output:\n{}",
                    String::from_utf8_lossy(&output.lock().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let lines = BufReader::new(stream.try_clone().unwrap());
        let mut vmm = ChildVmm {
            label: label.to_string(),
            child,
            stream,
            lines,
            output,
            readers,
        };
        let hs = match Handshake::recv_timeout(&vmm.stream, Duration::from_secs(20)) {
            Ok(hs) => hs,
            Err(e) => vmm.fail(&format!("handshake: {e}")),
        };
        (vmm, hs)
    }

    fn fail(&mut self, msg: &str) -> ! {
        let _ = self.child.kill();
        let st = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let out = String::from_utf8_lossy(&out);
        let tail: String = out
            .chars()
            .rev()
            .take(6000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "{}: {msg}\nchild VMM: {st:?}; its output (tail):\n{tail}",
            self.label
        );
    }

    /// Reads lines until one starts with `word` and returns the rest; fails
    /// (with the server's statistics) on a `fail` line, end of file or
    /// timeout.
    fn expect(&mut self, word: &str, server: &Server) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let err = match self.lines.read_line(&mut line) {
                Ok(0) => format!("the child closed the socket; expected {word:?}"),
                Ok(_) => {
                    let l = line.trim_end();
                    if let Some(rest) = l.strip_prefix(word) {
                        return rest.trim().to_string();
                    }
                    if !l.starts_with("fail") {
                        eprintln!("[child] {l}");
                        continue;
                    }
                    format!("the child reported: {l}")
                }
                Err(e) => format!("no {word:?} from the child within {DEADLINE:?} ({e})"),
            };
            let s = server.stats();
            self.fail(&format!("{err}\nserver: {}", summary(&s)));
        }
    }

    /// Waits (bounded) for the child to exit.
    fn finish(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    for r in self.readers.drain(..) {
                        let _ = r.join();
                    }
                    return st;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => self.fail("the child did not exit"),
            }
        }
    }
}

impl Drop for ChildVmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
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
    let regions: Vec<Mem> = REGIONS.iter().map(|&len| Mem::guest(len)).collect();
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
    let snap = Mem::map(offset, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd());
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
    if let Err(e) = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::EVENT_REMOVE)
        .create()
    {
        skip(test, &format!("no userfaultfd with EVENT_REMOVE: {e}"));
        return;
    }
    assert!(
        server_threads().is_empty(),
        "left over: {:?}",
        server_threads()
    );
    let page = page();
    let dir = TempDir::new();
    let snapshot = dir.0.join("mem.snap");
    write_snapshot(&snapshot, total_len());
    let snap_len = std::fs::metadata(&snapshot).unwrap().len();
    let pages = snap_len / page;

    let t0 = Instant::now();
    let (mut vmm, hs) = ChildVmm::start(
        test,
        &format!("{order} {variant}"),
        &dir.0.join("fc.sock"),
        &snapshot,
    );
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
            // Matched by the errno's text, whatever names Errno's Display uses.
            let gone = [libc::ESRCH, libc::ENOENT, libc::EFAULT].iter().any(|&n| {
                let text = std::io::Error::from_raw_os_error(n).to_string();
                e.contains(text.split(" (os error").next().unwrap_or(&text))
            });
            assert!(gone, "unexpected error after the VMM died: {e}");
        }
    } else {
        let sum = vmm.expect("ok", &server);
        let st = vmm.finish();
        if !st.success() {
            vmm.fail(&format!("the child exited with {st}"));
        }
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
    let joined = {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !server_threads().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        server_threads().is_empty()
    };
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
