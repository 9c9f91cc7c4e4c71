//! Helpers shared by `uffd-gmem`'s integration tests, each of which includes
//! this module with `mod common;` (it is not a test target of its own).
//!
//! - the file-wide lock and the two skip rules: without a userfaultfd at
//!   all a test prints `SKIP <test>: <why>` and passes, unless `CI=true`,
//!   where it fails ([`skip`]); where the kernel lacks a feature it prints
//!   `SKIP <test>: UFFD_FEATURE_<NAME> = absent (...) on <kernel>` and
//!   passes, under `CI=true` too, unless a kernel lane lists the feature in
//!   `GMEM_REQUIRED_CAPS` (`capability.rs`, a byte-identical copy of
//!   kvm-gmem's `tests/common/capability.rs`);
//! - the page source pattern, a shuffle, and test-owned mappings;
//! - what the fd and thread checks count (`/proc/self/fd`,
//!   `/proc/self/task`);
//! - a child VMM: this test binary re-executed with one ignored test as its
//!   only test, connecting over a Unix socket and sending Firecracker's
//!   handshake.
//!
//! Every test binary uses only part of it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use uffd_gmem::serve::Stats;
use uffd_gmem::{Features, RegisterMode, Uffd};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// How long one test's faulting work, or a child VMM's next line, may take
/// before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// The length of the shared pattern source ([`pattern`]).
pub const PATTERN_LEN: u64 = 40 * MIB;

pub fn page() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

// ---------------------------------------------------------------------------
// The lock and the skip rule
// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// The file-wide lock every test holds (the fd and thread counts would
/// otherwise see the other tests' work).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// A byte-identical copy of kvm-gmem's tests/common/capability.rs.
mod capability;
pub use capability::{ci, skip_capability};

/// The device skip: prints `SKIP <test>: <why>` (or fails under `CI=true`).
pub fn skip(test: &str, why: &str) {
    if ci() {
        panic!("{test}: {why} (CI=true: a skip is a failure)");
    }
    eprintln!("SKIP {test}: {why}");
}

/// A non-blocking userfaultfd with `features`, or `None` after a skip: a
/// capability skip naming the first feature the kernel does not offer
/// ([`skip_missing_features`]), or a device [`skip`] when no userfaultfd
/// can be created at all.
pub fn uffd_or_skip(test: &str, features: Features) -> Option<Uffd> {
    match Uffd::builder()
        .non_blocking(true)
        .require_features(features)
        .create()
    {
        Ok(u) => Some(u),
        Err(uffd_gmem::Error::MissingFeatures { missing, supported }) => {
            skip_missing_features(missing, supported);
            None
        }
        Err(e) => {
            skip(test, &format!("no userfaultfd with {features:?}: {e}"));
            None
        }
    }
}

/// The capability skip for features the kernel does not offer: names the
/// first of `missing` as `UFFD_FEATURE_<NAME>`, with what UFFDIO_API offers.
pub fn skip_missing_features(missing: Features, supported: Features) {
    let name = missing.iter_names().next().map_or_else(
        || format!("UFFD_FEATURE bits {missing:?}"),
        |(n, _)| format!("UFFD_FEATURE_{n}"),
    );
    skip_capability(
        &name,
        format_args!("absent (UFFDIO_API offers {:#x})", supported.bits()),
    );
}

// ---------------------------------------------------------------------------
// Patterns and orders
// ---------------------------------------------------------------------------

pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The pattern bytes at source offset `off` (a multiple of 8): every 8-byte
/// word is a hash of its position, so a misplaced page never matches.
pub fn fill_pattern(off: u64, buf: &mut [u8]) {
    for (k, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&splitmix(off / 8 + k as u64).to_le_bytes());
    }
}

/// The shared page source: [`PATTERN_LEN`] bytes of [`fill_pattern`].
pub fn pattern() -> Arc<Vec<u8>> {
    static P: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    P.get_or_init(|| {
        let mut v = vec![0u8; PATTERN_LEN as usize];
        fill_pattern(0, &mut v);
        Arc::new(v)
    })
    .clone()
}

pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Shuffles `v` (Fisher-Yates over [`xorshift`] seeded with `seed`).
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        v.swap(i, (xorshift(&mut s) % (i as u64 + 1)) as usize);
    }
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// A mapping owned by a test (unmapped on drop, unless forgotten).
#[derive(Debug)]
pub struct Mem {
    pub addr: u64,
    pub len: u64,
}

impl Mem {
    /// `mmap(NULL, len, prot, flags, fd, 0)`.
    pub fn map_prot(len: u64, prot: i32, flags: i32, fd: i32) -> Mem {
        // SAFETY: a fresh mapping at an address the kernel chooses; no other
        // code uses that range.
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

    /// A readable and writable mapping.
    pub fn map(len: u64, flags: i32, fd: i32) -> Mem {
        Mem::map_prot(len, libc::PROT_READ | libc::PROT_WRITE, flags, fd)
    }

    /// Anonymous `MAP_PRIVATE | MAP_NORESERVE`, as Firecracker maps guest
    /// memory.
    pub fn anon(len: u64) -> Mem {
        Mem::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }

    /// A shared mapping of `fd` from offset 0.
    pub fn shared(fd: &OwnedFd, len: u64) -> Mem {
        Mem::map(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr + self.len
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every thread reading it has finished (a
        // test leaks the mapping instead when a thread may still run).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Registers all of `mem` on `uffd` in `mode`.
pub fn register(uffd: &Uffd, mem: &Mem, mode: RegisterMode) {
    // SAFETY: `mem` is a mapping the test made for the purpose; no Rust
    // reference points into it (it is only read through raw-pointer copies),
    // and it stays mapped until the server serving it is shut down.
    unsafe { uffd.register(mem.range(), mode) }
        .unwrap_or_else(|e| panic!("UFFDIO_REGISTER {mode:?}: {e}"));
}

/// Copies `buf.len()` bytes at `addr` into `buf` (faulting them in).
///
/// # Safety
///
/// `addr .. addr + buf.len()` must stay mapped and readable during the call.
pub unsafe fn read_at(addr: u64, buf: &mut [u8]) {
    // SAFETY: the caller guarantees the source is mapped; `buf` is ours.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
}

/// Copies page `i` (of `buf.len()` bytes) of the memory at `addr` into
/// `buf` (faulting it in).
///
/// # Safety
///
/// `addr + i * buf.len() .. + buf.len()` must stay mapped and readable for
/// the duration of the call.
pub unsafe fn read_page(addr: u64, i: u64, buf: &mut [u8]) {
    // SAFETY: the caller's guarantee.
    unsafe { read_at(addr + i * buf.len() as u64, buf) };
}

/// A memfd named `name` of `len` bytes (a hole: nothing allocated).
pub fn memfd(name: &CStr, len: u64) -> OwnedFd {
    // SAFETY: a NUL-terminated name and flags.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our descriptor.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}

/// Allocates the first `len` bytes of `fd` (so that every first touch of a
/// mapping of it is a MINOR fault).
pub fn fallocate(fd: &OwnedFd, len: u64) {
    // SAFETY: fallocate on our descriptor; integer arguments only.
    let r = unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, len as libc::off_t) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// A pipe adopted as a "userfaultfd", and the pipe's write end: the records
/// written to it are what a hostile peer controls when it passes off
/// another fd as its userfaultfd.
pub fn fake_uffd() -> (Uffd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(r, 0);
    // SAFETY: both were just created by pipe2; nobody else owns them.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Uffd::from_initialized(rx), tx)
}

// ---------------------------------------------------------------------------
// Descriptors, threads, waiting
// ---------------------------------------------------------------------------

/// This process's open fds and what they are (the directory listing's own
/// fd left out).
pub fn open_fds() -> BTreeMap<i32, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let target = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if target.is_empty() || target.starts_with("/proc/") {
            continue;
        }
        out.insert(fd, target);
    }
    out
}

/// Names of this process's threads that the server starts (`uffd-*`).
pub fn server_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("uffd-"))
        .collect()
}

/// Fails if server threads are left over (from an earlier test).
#[track_caller]
pub fn assert_no_server_threads() {
    assert!(
        server_threads().is_empty(),
        "left over: {:?}",
        server_threads()
    );
}

/// Waits up to `timeout` for `f`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One line of a server's statistics.
pub fn summary(s: &Stats) -> String {
    let q = |x| {
        s.latency
            .quantile(x)
            .map_or_else(|| "-".to_string(), |d| format!("{d:?}"))
    };
    format!(
        "faults={} copied={} continued={} zeroed={} prefetched={} eexist={} eagain={} wakes={} \
         other_events={} latency p50<={} p99<={} max={:?} errors={} {:?} stopped_because={:?}",
        s.faults,
        s.pages_copied,
        s.pages_continued,
        s.pages_zeroed,
        s.pages_prefetched,
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

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/uffd-gmem-<tag>-<pid>-<n>`, empty.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "uffd-gmem-{tag}-{}-{}",
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
// The handler's side of a child VMM
// ---------------------------------------------------------------------------

#[cfg(feature = "firecracker")]
mod child_vmm;
#[cfg(feature = "firecracker")]
#[allow(unused_imports)] // not every test binary starts a child VMM
pub use child_vmm::ChildVmm;
