//! Acceptance tests after the kernel's userfaultfd selftests
//! (`tools/testing/selftests/mm/uffd-unit-tests.c`, kernel-tests.md §7) and
//! the guest_memfd userfaultfd cases (§6.3), written against this crate's API.
//!
//! Ground rules, shared by every test:
//! - one file-wide lock: tests run one at a time, so the descriptor count
//!   checked at the end of each test is exact and a `fork` sees no other
//!   test's registrations;
//! - bounded: userfaultfds are non-blocking and polled with timeouts, threads
//!   are joined with a deadline, children are killed after one. When a test
//!   fails, unwinding drops its userfaultfd, which releases any thread still
//!   blocked on a fault (mappings are then leaked rather than unmapped under
//!   that thread);
//! - nothing in this process touches memory that could raise SIGBUS: such
//!   accesses happen in forked children, which run only async-signal-safe code;
//! - no timing assertions;
//! - where neither `/dev/userfaultfd` nor `userfaultfd(2)` is usable a test
//!   prints `SKIP <test>: <why>` and passes, unless `CI=true`.

mod common;

#[cfg(feature = "guest-memfd")]
use common::skip_capability;
use common::{ci, serial, skip_missing_features};
#[cfg(feature = "guest-memfd")]
use kvm_gmem::VmOps;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uffd_gmem::sys_bindings as sys;
use uffd_gmem::{
    Access, Errno, Error, Event, EventBuffer, FaultKind, Features, Ioctls, Mode, Origin,
    RegisterMode, Uffd,
};

/// How long any wait in a test may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);
/// One poll of a userfaultfd.
const POLL: Duration = Duration::from_millis(20);

fn ps() -> u64 {
    uffd_gmem::page_size()
}

// ---------------------------------------------------------------------------
// Test groups: the lock, the skip rule, the descriptor check.

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Held for the whole of a test: the file-wide lock and the descriptor count
/// at its start, checked again when the test ends without panicking.
struct Group {
    name: &'static str,
    fds: usize,
    _lock: MutexGuard<'static, ()>,
}

impl Drop for Group {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let now = count_fds();
            assert_eq!(
                now, self.fds,
                "{}: descriptors open before {} / after {now}",
                self.name, self.fds
            );
        }
    }
}

/// Takes the lock; `None` (after printing `SKIP`) when no userfaultfd can be
/// created at all, which fails instead under `CI=true`.
fn group(name: &'static str) -> Option<Group> {
    let lock = serial();
    match Uffd::builder().create() {
        Ok(_) => {}
        Err(e) if e.is_unsupported() => {
            assert!(!ci(), "{name}: no usable userfaultfd under CI=true: {e}");
            eprintln!("SKIP {name}: {e}");
            return None;
        }
        Err(e) => panic!("{name}: creating a userfaultfd: {e}"),
    }
    Some(Group {
        name,
        fds: count_fds(),
        _lock: lock,
    })
}

/// A non-blocking userfaultfd with `features`; `None` (after printing
/// `SKIP`) when the kernel lacks one of them or refuses them to us.
fn uffd_with(test: &str, features: Features) -> Option<Uffd> {
    match Uffd::builder()
        .non_blocking(true)
        .require_features(features)
        .create()
    {
        Ok(u) => Some(u),
        Err(Error::MissingFeatures { missing, supported }) => {
            skip_missing_features(missing, supported);
            None
        }
        Err(Error::Kernel {
            errno: Errno(libc::EPERM),
            ..
        }) => {
            eprintln!(
                "SKIP {test}: UFFDIO_API refused {features:?} (EPERM: EVENT_FORK needs CAP_SYS_PTRACE)"
            );
            None
        }
        Err(e) => panic!("{test}: creating a userfaultfd with {features:?}: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Memory.

/// An mmap'd region, unmapped on drop (leaked instead while panicking: a
/// thread released from a fault may still be reading it).
struct Map {
    addr: u64,
    len: u64,
}

impl Map {
    fn mmap(len: u64, prot: i32, flags: i32, fd: i32) -> Map {
        // SAFETY: a fresh mapping placed by the kernel (addr NULL); it
        // replaces nothing of ours.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", Errno::last());
        Map {
            addr: p as u64,
            len,
        }
    }

    /// Private anonymous memory.
    fn anon(pages: u64) -> Map {
        Map::mmap(
            pages * ps(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        )
    }

    /// A shared view of `fd` from offset 0.
    fn shared(fd: BorrowedFd<'_>, pages: u64) -> Map {
        Map::mmap(
            pages * ps(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
        )
    }

    /// Address space reserved with `PROT_NONE` (a target for `mremap`).
    fn reserve(pages: u64) -> Map {
        Map::mmap(
            pages * ps(),
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
        )
    }

    fn page(&self, i: u64) -> u64 {
        self.addr + i * ps()
    }

    fn page_range(&self, i: u64) -> Range<u64> {
        self.page(i)..self.page(i) + ps()
    }

    fn range(&self) -> Range<u64> {
        self.addr..self.addr + self.len
    }

    fn madvise(&self, advice: i32) {
        // SAFETY: advice on our own mapping; the advices used here
        // (NOHUGEPAGE, DONTFORK) change no contents.
        let r = unsafe { libc::madvise(self.addr as *mut libc::c_void, self.len as usize, advice) };
        assert_eq!(r, 0, "madvise({advice}): {}", Errno::last());
    }

    /// Gives up ownership (the region is unmapped or moved elsewhere).
    fn forget(self) -> (u64, u64) {
        let r = (self.addr, self.len);
        std::mem::forget(self);
        r
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: our own mapping; nothing refers to it any more.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
        }
    }
}

/// An empty shmem file of `pages` pages.
fn memfd(pages: u64) -> OwnedFd {
    common::memfd(c"uffd-selftest", pages * ps())
}

/// Volatile byte loads.
///
/// # Safety
///
/// `addr..addr + len` must be mapped readable memory whose faults, if any,
/// are served (no SIGBUS in this process).
unsafe fn load(addr: u64, len: u64) -> Vec<u8> {
    (0..len)
        // SAFETY: in bounds of the caller's readable range.
        .map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) })
        .collect()
}

/// Volatile byte stores.
///
/// # Safety
///
/// As [`load`], and writable; no Rust reference points into the range.
unsafe fn store(addr: u64, len: u64, byte: u8) {
    for i in 0..len {
        // SAFETY: in bounds of the caller's writable range.
        unsafe { std::ptr::write_volatile((addr + i) as *mut u8, byte) };
    }
}

/// Inverts every byte (the selftests' MINOR handler "bit flip").
///
/// # Safety
///
/// As [`store`].
unsafe fn flip(addr: u64, len: u64) {
    for i in 0..len {
        let p = (addr + i) as *mut u8;
        // SAFETY: in bounds of the caller's writable range.
        unsafe { std::ptr::write_volatile(p, !std::ptr::read_volatile(p)) };
    }
}

fn uniform(bytes: &[u8], byte: u8) -> bool {
    bytes.iter().all(|&b| b == byte)
}

// ---------------------------------------------------------------------------
// Threads, events, children.

/// Joins `h`, failing the test if it has not finished within [`DEADLINE`].
fn join<T>(h: JoinHandle<T>, what: &str) -> T {
    let end = Instant::now() + DEADLINE;
    while !h.is_finished() {
        assert!(
            Instant::now() < end,
            "{what}: thread still running after {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Serves `uffd` until `worker` finishes: polls with a timeout, hands every
/// event to `on_event`, then joins the worker. Fails after [`DEADLINE`].
fn serve<T>(uffd: &Uffd, worker: JoinHandle<T>, mut on_event: impl FnMut(Event<Uffd>)) -> T {
    let end = Instant::now() + DEADLINE;
    let mut buf = EventBuffer::with_capacity(16);
    while !worker.is_finished() {
        assert!(
            Instant::now() < end,
            "the faulting thread made no progress within {DEADLINE:?}"
        );
        if uffd.poll_readable(POLL).expect("poll(userfaultfd)") {
            for ev in uffd.read_events(&mut buf).expect("read(userfaultfd)") {
                on_event(ev);
            }
        }
    }
    join(worker, "faulting thread")
}

/// Runs `f` in a thread that is expected to raise no fault on `uffd`.
fn unfaulted<T: Send + 'static>(uffd: &Uffd, f: impl FnOnce() -> T + Send + 'static) -> T {
    serve(uffd, std::thread::spawn(f), |ev| {
        panic!("unexpected event {ev:?}")
    })
}

/// The next event, within [`DEADLINE`].
fn next_event(uffd: &Uffd) -> Event<Uffd> {
    let end = Instant::now() + DEADLINE;
    loop {
        if uffd.poll_readable(POLL).expect("poll(userfaultfd)")
            && let Some(ev) = uffd.read_event().expect("read(userfaultfd)")
        {
            return ev;
        }
        assert!(Instant::now() < end, "no event within {DEADLINE:?}");
    }
}

/// A forked child, killed and reaped on drop if not waited for.
struct Child {
    pid: libc::pid_t,
    reaped: bool,
}

impl Child {
    /// Forks; the child runs `body` and `_exit`s with its result.
    ///
    /// # Safety
    ///
    /// The test process is multi-threaded: `body` must do only
    /// async-signal-safe work (volatile loads and stores, plain system
    /// calls), no allocation, no locks, no panics.
    unsafe fn spawn(body: impl FnOnce() -> i32) -> Child {
        // SAFETY: the child runs only `body` (async-signal-safe by this
        // function's contract) and `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", Errno::last());
        if pid == 0 {
            let code = body();
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        FORKED.store(true, Ordering::SeqCst);
        Child { pid, reaped: false }
    }

    /// The wait status, within [`DEADLINE`] (the child is killed after it).
    fn wait(mut self) -> i32 {
        let end = Instant::now() + DEADLINE;
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a local.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                self.reaped = true;
                return status;
            }
            assert!(
                r == 0 || Errno::last() == Errno(libc::EINTR),
                "waitpid: {}",
                Errno::last()
            );
            assert!(
                Instant::now() < end,
                "child {} still running after {DEADLINE:?}",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            let mut status = 0;
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, &mut status, 0);
            }
        }
    }
}

/// In a child: no core file for the signal it is about to die of.
fn child_no_core() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit is a plain, async-signal-safe system call.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// In a child: one volatile load.
fn child_load(addr: u64) -> u8 {
    // SAFETY: only called in children on pages of their own address space;
    // any signal it raises is what the test expects.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

fn killed_by_sigbus(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS
}

// ---------------------------------------------------------------------------
// Raw ioctls, for what the crate deliberately does not expose.

fn raw_api(fd: BorrowedFd<'_>, api: u64, features: u64) -> Result<sys::uffdio_api, Errno> {
    let mut arg = sys::uffdio_api {
        api,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `uffdio_api`, which holds no pointers.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut arg) };
    if r < 0 { Err(Errno::last()) } else { Ok(arg) }
}

/// `UFFDIO_REGISTER` through the raw ioctl.
///
/// # Safety
///
/// As [`Uffd::register`].
#[cfg(feature = "guest-memfd")]
unsafe fn raw_register(fd: BorrowedFd<'_>, range: Range<u64>, mode: u64) -> Result<u64, Errno> {
    let mut arg = sys::uffdio_register {
        range: sys::uffdio_range {
            start: range.start,
            len: range.end - range.start,
        },
        mode,
        ioctls: 0,
    };
    // SAFETY: the request encodes `uffdio_register`; the caller vouches for the range.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut arg) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(arg.ioctls)
    }
}

/// A fresh, uninitialised userfaultfd from the device or the system call.
fn raw_open(device: bool) -> Result<OwnedFd, Errno> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if device {
        // SAFETY: a NUL-terminated path.
        let dev =
            unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(Errno::last());
        }
        // SAFETY: open returned a new descriptor.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value.
        let raw = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                sys::USERFAULTFD_IOC_NEW as _,
                flags as libc::c_ulong,
            )
        };
        if raw < 0 {
            return Err(Errno::last());
        }
        // SAFETY: the ioctl returned a new descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    } else {
        // SAFETY: userfaultfd(2) takes only flags.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if raw < 0 {
            return Err(Errno::last());
        }
        // SAFETY: the system call returned a new descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    }
}

// ---------------------------------------------------------------------------
// 7.2 test_uffd_api

/// The handshake rules on a raw fd (the same fd throughout, as the selftest).
fn raw_api_sequence(fd: BorrowedFd<'_>, how: &str) {
    assert_eq!(
        raw_api(fd, 0xab, 0).map(|_| ()),
        Err(Errno(libc::EINVAL)),
        "{how}: api 0xab"
    );
    assert_eq!(
        raw_api(fd, sys::UFFD_API, 1 << 63).map(|_| ()),
        Err(Errno(libc::EINVAL)),
        "{how}: feature bit 63"
    );
    let ok = raw_api(fd, sys::UFFD_API, 0).unwrap_or_else(|e| panic!("{how}: features 0: {e}"));
    let ioctls = Ioctls::from_bits_retain(ok.ioctls);
    assert!(
        ioctls.contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API),
        "{how}: {ioctls:?}"
    );
    assert_eq!(
        raw_api(fd, sys::UFFD_API, 1).map(|_| ()),
        Err(Errno(libc::EINVAL)),
        "{how}: second UFFDIO_API"
    );
}

/// The typed handshake through `builder` (device or system call).
fn typed_api(how: &str, builder: impl Fn() -> uffd_gmem::UffdBuilder, origin: Origin) {
    let uffd = builder().create().unwrap_or_else(|e| panic!("{how}: {e}"));
    assert_eq!(uffd.origin(), origin, "{how}");
    assert_eq!(uffd.features(), Some(Features::empty()), "{how}");
    let supported = uffd.supported_features().expect("supported features");
    let ioctls = uffd.api_ioctls().expect("api ioctls");
    assert!(
        ioctls.contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API),
        "{how}: {ioctls:?}"
    );

    // A second handshake on the adopted fd: the kernel rejects it.
    let adopted = Uffd::from_initialized(OwnedFd::from(uffd));
    assert_eq!(adopted.origin(), Origin::Adopted);
    assert_eq!(adopted.features(), None);
    assert_eq!(adopted.supported_features(), None);
    assert_eq!(adopted.api_ioctls(), None);
    assert_eq!(
        raw_api(adopted.as_fd(), sys::UFFD_API, 0).map(|_| ()),
        Err(Errno(libc::EINVAL)),
        "{how}: UFFDIO_API on an initialised fd"
    );
    drop(adopted);

    // An unknown feature bit.
    match builder()
        .require_features(Features::from_bits_retain(1 << 63))
        .create()
    {
        Err(Error::MissingFeatures {
            missing,
            supported: s,
        }) => {
            assert_eq!(missing.bits(), 1 << 63, "{how}");
            assert_eq!(s, supported, "{how}");
        }
        other => panic!("{how}: feature bit 63 gave {other:?}"),
    }

    // RWP: refused exactly when the kernel does not offer it.
    match builder().require_features(Features::RWP).create() {
        Err(Error::MissingFeatures { missing, .. }) => {
            assert!(
                !supported.contains(Features::RWP),
                "{how}: RWP offered but refused"
            );
            assert_eq!(missing, Features::RWP, "{how}");
        }
        Ok(u) => {
            assert!(
                supported.contains(Features::RWP),
                "{how}: RWP accepted but not offered"
            );
            assert_eq!(u.features(), Some(Features::RWP));
        }
        Err(e) => panic!("{how}: RWP: {e}"),
    }
}

#[test]
fn api() {
    let Some(_g) = group("api") else { return };

    // Via /dev/userfaultfd.
    let device_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .is_ok();
    if device_usable {
        typed_api("device", Uffd::builder, Origin::Device);
        let fd = raw_open(true).expect("USERFAULTFD_IOC_NEW");
        raw_api_sequence(fd.as_fd(), "raw device");
    } else {
        eprintln!("SKIP api via /dev/userfaultfd: the device cannot be opened");
    }

    // Via the system call: a device path that does not exist forces it.
    let syscall = || Uffd::builder().device_path("/nonexistent");
    match syscall().create() {
        Ok(_) => {
            typed_api("syscall", syscall, Origin::Syscall);
            let fd = raw_open(false).expect("userfaultfd(2)");
            raw_api_sequence(fd.as_fd(), "raw syscall");
        }
        Err(e) if e.is_unsupported() && device_usable => {
            eprintln!("SKIP api via userfaultfd(2): {e}");
        }
        Err(e) => panic!("userfaultfd(2): {e}"),
    }
}

// ---------------------------------------------------------------------------
// 7.3 register-ioctls

#[test]
fn register_ioctls() {
    let Some(_g) = group("register_ioctls") else {
        return;
    };
    let offered = Uffd::builder()
        .create()
        .unwrap()
        .supported_features()
        .unwrap();
    let wanted = Features::MISSING_SHMEM
        | Features::PAGEFAULT_FLAG_WP
        | Features::WP_HUGETLBFS_SHMEM
        | Features::MINOR_SHMEM;
    let uffd = uffd_with("register_ioctls", offered & wanted).unwrap();

    let anon = Map::anon(1);
    let fd = memfd(1);
    let shmem = Map::shared(fd.as_fd(), 1);

    for (kind, map) in [("anon", &anon), ("shmem", &shmem)] {
        // No mode: refused before any call.
        // SAFETY: `map` is ours and nothing references it.
        let r = unsafe { uffd.register(map.range(), RegisterMode::empty()) };
        assert!(matches!(r, Err(Error::Invalid { .. })), "{kind}: {r:?}");
        // SAFETY: as above.
        let r = unsafe { uffd.register(map.addr + 1..map.addr + ps(), RegisterMode::MISSING) };
        assert!(matches!(r, Err(Error::Invalid { .. })), "{kind}: {r:?}");

        for bits in 1..8u64 {
            let mode = RegisterMode::from_bits_retain(bits);
            let wp = mode.contains(RegisterMode::WP);
            let minor = mode.contains(RegisterMode::MINOR);
            let shmem = kind == "shmem";
            let mut needs = Features::empty();
            needs.set(Features::PAGEFAULT_FLAG_WP, wp);
            needs.set(Features::WP_HUGETLBFS_SHMEM, wp && shmem);
            needs.set(Features::MINOR_SHMEM, minor && shmem);
            if !offered.contains(needs) {
                eprintln!("register_ioctls: {kind} {mode:?} left out");
                skip_missing_features(needs.difference(offered), offered);
                continue;
            }
            // SAFETY: `map` is ours and nothing references it.
            let r = unsafe { uffd.register(map.range(), mode) };
            if minor && kind == "anon" {
                assert!(
                    matches!(
                        r,
                        Err(Error::Kernel {
                            errno: Errno(libc::EINVAL),
                            ..
                        })
                    ),
                    "{kind} {mode:?}: {r:?}"
                );
                continue;
            }
            let ioctls = r.unwrap_or_else(|e| panic!("{kind} {mode:?}: {e}"));
            let mut expect = Ioctls::WAKE;
            if mode.contains(RegisterMode::MISSING) {
                expect |= Ioctls::COPY | Ioctls::ZEROPAGE;
            }
            if wp {
                expect |= Ioctls::WRITEPROTECT;
            }
            if minor {
                expect |= Ioctls::CONTINUE;
            }
            assert!(ioctls.contains(expect), "{kind} {mode:?}: {ioctls:?}");
            assert_eq!(
                ioctls.contains(Ioctls::CONTINUE),
                minor,
                "{kind} {mode:?}: CONTINUE offered only for MINOR ranges: {ioctls:?}"
            );
            assert_eq!(
                ioctls.contains(Ioctls::WRITEPROTECT),
                wp,
                "{kind} {mode:?}: WRITEPROTECT offered only for WP ranges: {ioctls:?}"
            );
            uffd.unregister(map.range()).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// 7.3 zeropage

#[test]
fn zeropage() {
    let Some(_g) = group("zeropage") else { return };
    let uffd = uffd_with("zeropage", Features::empty()).unwrap();

    // Anonymous memory: retry of the same page.
    let anon = Map::anon(2);
    // SAFETY: `anon` is ours and nothing references it.
    let ioctls = unsafe { uffd.register(anon.range(), RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::ZEROPAGE), "{ioctls:?}");
    assert_eq!(
        uffd.zeropage(anon.page_range(0), Mode::empty()).unwrap(),
        ps()
    );
    let p = anon.page(0);
    // SAFETY: the page is mapped now; a fault would reach `unfaulted`'s handler.
    let bytes = unfaulted(&uffd, move || unsafe { load(p, ps()) });
    assert!(uniform(&bytes, 0));
    match uffd.zeropage(anon.page_range(0), Mode::empty()) {
        Err(Error::Exists { addr, done: 0, .. }) => assert_eq!(addr, anon.page(0)),
        other => panic!("anon retry: {other:?}"),
    }
    uffd.wake(anon.page_range(0)).unwrap();
    // Modes other than DONTWAKE are refused before the call.
    assert!(matches!(
        uffd.zeropage(anon.page_range(1), Mode::WP),
        Err(Error::Invalid { .. })
    ));

    // shmem: the retry goes through the alias, which sees the page-cache page.
    let fd = memfd(1);
    let view = Map::shared(fd.as_fd(), 1);
    let alias = Map::shared(fd.as_fd(), 1);
    for m in [&view, &alias] {
        // SAFETY: ours, unreferenced.
        let ioctls = unsafe { uffd.register(m.range(), RegisterMode::MISSING) }.unwrap();
        assert!(ioctls.contains(Ioctls::ZEROPAGE), "{ioctls:?}");
    }
    assert_eq!(
        uffd.zeropage(view.page_range(0), Mode::empty()).unwrap(),
        ps()
    );
    let p = view.page(0);
    // SAFETY: mapped by the ZEROPAGE; a fault would reach the handler.
    let bytes = unfaulted(&uffd, move || unsafe { load(p, ps()) });
    assert!(uniform(&bytes, 0));
    match uffd.zeropage(alias.page_range(0), Mode::empty()) {
        Err(Error::Exists { addr, done: 0, .. }) => assert_eq!(addr, alias.page(0)),
        other => panic!("shmem retry through the alias: {other:?}"),
    }
    uffd.wake(alias.page_range(0)).unwrap();
}

// ---------------------------------------------------------------------------
// 7.3 minor (+ §6.3.1 uffd_minor)

/// The MINOR flow of the selftests and of §6.3.1: `registered` is a view
/// registered MINOR on `uffd`, `fill` a second, unregistered view of the same
/// file. Every page is filled through `fill`; a thread reads every page
/// through `registered`; each fault must be MINOR, one per page; the handler
/// bit-flips the page through `fill`, CONTINUEs it without waking, checks a
/// second CONTINUE is `Exists`, and wakes the faulter. The reader must see
/// the flipped bytes; a second pass raises no fault.
fn minor_flow(test: &str, uffd: &Uffd, registered: u64, fill: u64, pages: u64) {
    let ps = ps();
    let pattern = |i: u64| 0x10u8.wrapping_add(i as u8);
    for i in 0..pages {
        // SAFETY: `fill` is an unregistered shared view of `pages` pages.
        unsafe { store(fill + i * ps, ps, pattern(i)) };
    }

    let reader = std::thread::spawn(move || {
        (0..pages)
            // SAFETY: the registered view is mapped; its faults are served below.
            .map(|i| unsafe { load(registered + i * ps, ps) })
            .collect::<Vec<_>>()
    });
    let mut faults = vec![0u32; pages as usize];
    let contents = serve(uffd, reader, |ev| match ev {
        Event::Pagefault {
            kind: FaultKind::Minor,
            access: Access::Read,
            address,
            ..
        } => {
            assert!(
                (registered..registered + pages * ps).contains(&address)
                    && address.is_multiple_of(ps),
                "{test}: fault at {address:#x}"
            );
            let i = (address - registered) / ps;
            faults[i as usize] += 1;
            // SAFETY: the unregistered view; the faulter is blocked and reads
            // only after the CONTINUE below.
            unsafe { flip(fill + i * ps, ps) };
            let page = address..address + ps;
            assert_eq!(
                uffd.r#continue(page.clone(), Mode::DONTWAKE).unwrap(),
                ps,
                "{test}"
            );
            match uffd.r#continue(page.clone(), Mode::empty()) {
                Err(Error::Exists { addr, done: 0, .. }) => assert_eq!(addr, address),
                other => panic!("{test}: second CONTINUE gave {other:?}"),
            }
            // EEXIST woke nobody, and the first CONTINUE did not wake either.
            uffd.wake(page).unwrap();
        }
        other => panic!("{test}: unexpected event {other:?}"),
    });
    assert!(
        faults.iter().all(|&n| n == 1),
        "{test}: MINOR faults per page {faults:?}"
    );
    for (i, page) in contents.iter().enumerate() {
        assert!(
            uniform(page, !pattern(i as u64)),
            "{test}: page {i} reads {:#x}, not the flipped {:#x}",
            page[0],
            !pattern(i as u64)
        );
    }
    // The pages are mapped now: a second pass raises no fault.
    // SAFETY: mapped; a fault would reach `unfaulted`'s handler.
    let again = unfaulted(uffd, move || unsafe { load(registered, pages * ps) });
    assert!(uniform(&again[..ps as usize], !pattern(0)));
}

/// §7.3 "minor" on shmem: a memfd mapped twice, the alias registered MINOR.
fn shmem_minor(test: &str) {
    let Some(uffd) = uffd_with(test, Features::MINOR_SHMEM) else {
        return;
    };
    let pages = 4;
    let fd = memfd(pages);
    let view = Map::shared(fd.as_fd(), pages);
    let alias = Map::shared(fd.as_fd(), pages);
    // SAFETY: ours and unreferenced; stays mapped while registered.
    let ioctls = unsafe { uffd.register(alias.range(), RegisterMode::MINOR) }.unwrap();
    assert!(
        ioctls.contains(Ioctls::CONTINUE | Ioctls::WAKE),
        "{ioctls:?}"
    );
    minor_flow(test, &uffd, alias.addr, view.addr, pages);
}

#[test]
fn minor() {
    let Some(_g) = group("minor") else { return };
    shmem_minor("minor");
}

// ---------------------------------------------------------------------------
// §6.3 userfaultfd on guest_memfd (feature `guest-memfd`)

#[cfg(feature = "guest-memfd")]
fn guest_memfd_pair(
    pages: u64,
) -> Result<
    (
        kvm_gmem::Vm,
        kvm_gmem::GuestMemfd,
        kvm_gmem::Mapping,
        kvm_gmem::Mapping,
    ),
    String,
> {
    let kvm = match kvm_gmem::KvmDevice::open() {
        Ok(kvm) => kvm,
        Err(e) => {
            assert!(
                !ci(),
                "guest_memfd: /dev/kvm is required under CI=true: {e}"
            );
            return Err(format!("/dev/kvm: {e}"));
        }
    };
    let vm = kvm
        .create_vm(kvm_gmem::VmType::DEFAULT)
        .map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let want = kvm_gmem::GuestMemfdFlags::MMAP | kvm_gmem::GuestMemfdFlags::INIT_SHARED;
    let cap = vm
        .extension(kvm_gmem::Extension::GUEST_MEMFD)
        .map_err(|e| format!("KVM_CHECK_EXTENSION: {e}"))?;
    let offered = vm.guest_memfd_flags().map_err(|e| format!("{e}"))?;
    if cap <= 0 {
        skip_capability("KVM_CAP_GUEST_MEMFD", cap);
        return Err("no guest_memfd".into());
    }
    if !offered.contains(want) {
        let flags = format!("absent (KVM_CAP_GUEST_MEMFD_FLAGS = {offered})");
        skip_capability("GUEST_MEMFD_FLAG_INIT_SHARED", flags);
        return Err("no guest_memfd with MMAP|INIT_SHARED".into());
    }
    let gmem = kvm_gmem::GuestMemfd::builder(pages * ps())
        .flags(want)
        .create(&vm)
        .map_err(|e| format!("guest_memfd with MMAP|INIT_SHARED: {e}"))?;
    let a = gmem.map().map_err(|e| format!("mmap: {e}"))?;
    let b = gmem.map().map_err(|e| format!("mmap: {e}"))?;
    Ok((vm, gmem, a, b))
}

/// `uffd.register_guest_memfd(map, mode)`, after the kernel's raw answer to
/// the same registration on a throwaway userfaultfd: the two must agree.
/// `None` after a capability skip (`UFFDIO_REGISTER_GUEST_MEMFD`) when the
/// kernel refuses userfaultfd on guest_memfd.
#[cfg(feature = "guest-memfd")]
fn register_guest_memfd_or_skip(
    test: &str,
    uffd: &Uffd,
    map: &kvm_gmem::Mapping,
    mode: RegisterMode,
) -> Option<Ioctls> {
    let range = map.addr()..map.addr() + map.len() as u64;
    let probe = uffd_with(test, Features::empty()).unwrap();
    // SAFETY: guest memory, referenced by nothing; the probe is closed
    // (unregistering) before the real registration.
    let raw = unsafe { raw_register(probe.as_fd(), range, mode.bits()) };
    drop(probe);
    match uffd.register_guest_memfd(map, mode) {
        Err(e) => {
            assert!(e.is_unsupported(), "{test}: {mode:?}: {e}");
            assert_eq!(raw, Err(Errno(libc::EINVAL)), "{test}: {mode:?}: {e}");
            skip_capability("UFFDIO_REGISTER_GUEST_MEMFD", format_args!("refused ({e})"));
            None
        }
        Ok(ioctls) => {
            assert!(raw.is_ok(), "{test}: raw {raw:?} but typed Ok");
            assert!(ioctls.contains(Ioctls::WAKE), "{test}: {ioctls:?}");
            Some(ioctls)
        }
    }
}

/// §6.3.1 uffd_minor: a guest_memfd (`MMAP | INIT_SHARED`) mapped twice,
/// the first mapping registered MINOR on a userfaultfd with features 0;
/// every page written through the second lands in the guest_memfd's page
/// cache, and a thread reading through the first takes one MINOR fault per
/// page at exactly that page, resolved with `UFFDIO_CONTINUE`
/// ([`minor_flow`]: the reader sees the handler's bytes, a second pass
/// faults no more). Then the refusals: write-protect mode on that mapping,
/// and MINOR or MISSING on a guest_memfd without `INIT_SHARED` (EINVAL).
/// The shmem equivalent runs too, on every kernel.
#[cfg(feature = "guest-memfd")]
#[test]
fn guest_memfd() {
    let test = "guest_memfd";
    let Some(_g) = group(test) else {
        return;
    };
    let pages = 4;
    match guest_memfd_pair(pages) {
        Err(why) => eprintln!("{test}: the guest_memfd part is left out: {why}"),
        Ok((vm, _gmem, a, b)) => {
            let uffd = uffd_with(test, Features::empty()).unwrap();
            if let Some(ioctls) = register_guest_memfd_or_skip(test, &uffd, &a, RegisterMode::MINOR)
            {
                assert!(ioctls.contains(Ioctls::CONTINUE), "{ioctls:?}");
                minor_flow(test, &uffd, a.addr(), b.addr(), pages);
                guest_memfd_refusals(test, &vm, &b, pages);
            }
        }
    }
    // The nearest equivalent every kernel supports: shmem mapped twice,
    // through the same flow.
    shmem_minor("guest_memfd (shmem equivalent)");
}

/// What userfaultfd on guest_memfd refuses: WP registration of `map` (a
/// mapping of an `INIT_SHARED` guest_memfd), and any registration of a
/// guest_memfd created without `INIT_SHARED` (EINVAL).
#[cfg(feature = "guest-memfd")]
fn guest_memfd_refusals(test: &str, vm: &kvm_gmem::Vm, map: &kvm_gmem::Mapping, pages: u64) {
    let probe = uffd_with(test, Features::empty()).unwrap();
    let range = map.addr()..map.addr() + map.len() as u64;
    // SAFETY: guest memory, referenced by nothing; a refused registration
    // changes nothing, and the probe is closed (unregistering) right after.
    let wp = unsafe { raw_register(probe.as_fd(), range, RegisterMode::WP.bits()) };
    assert!(
        wp.is_err(),
        "{test}: WP registration of a guest_memfd: {wp:?}"
    );

    // MMAP without INIT_SHARED: the kernel maps it, but every access would
    // raise SIGBUS, so the mapping is made here and never touched.
    let private = kvm_gmem::GuestMemfd::builder(pages * ps())
        .mmap(true)
        .create(vm)
        .expect("a guest_memfd with MMAP only");
    let m = Map::mmap(
        pages * ps(),
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
        private.as_raw_fd(),
    );
    for mode in [RegisterMode::MINOR, RegisterMode::MISSING] {
        // SAFETY: as above; `m` is never accessed.
        let r = unsafe { raw_register(probe.as_fd(), m.range(), mode.bits()) };
        assert_eq!(
            r.map(|_| ()),
            Err(Errno(libc::EINVAL)),
            "{test}: {mode:?} registration of a guest_memfd without INIT_SHARED"
        );
    }
}

/// §6.3.2 uffd_missing: a single guest_memfd mapping registered MISSING on
/// a userfaultfd with features 0; a thread reads page 1, which the
/// guest_memfd does not hold: one PAGEFAULT event at exactly that page,
/// kind `Missing` (no WP flag), access read; `UFFDIO_COPY` of a 0xab page
/// resolves it and the reader sees 0xab; a second read faults no more. The
/// copy went into the guest_memfd: a second, unregistered mapping sees it,
/// and a second copy to the page is `Exists`.
#[cfg(feature = "guest-memfd")]
#[test]
fn guest_memfd_missing() {
    let test = "guest_memfd_missing";
    let Some(_g) = group(test) else {
        return;
    };
    let pages = 4;
    let (_vm, _gmem, a, b) = match guest_memfd_pair(pages) {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!("{test}: left out: {why}");
            return;
        }
    };
    let uffd = uffd_with(test, Features::empty()).unwrap();
    let Some(ioctls) = register_guest_memfd_or_skip(test, &uffd, &a, RegisterMode::MISSING) else {
        return;
    };
    assert!(ioctls.contains(Ioctls::COPY), "{ioctls:?}");
    let ps = ps();
    let target = a.addr() + ps;
    // SAFETY: the registered mapping; its fault is served below.
    let reader = std::thread::spawn(move || unsafe { load(target, ps) });
    match next_event(&uffd) {
        Event::Pagefault {
            kind: FaultKind::Missing,
            access: Access::Read,
            address,
            ..
        } => assert_eq!(address, target, "{test}: the fault's address"),
        other => panic!("{test}: expected a read MISSING fault at {target:#x}, got {other:?}"),
    }
    let src = vec![0xabu8; ps as usize];
    // SAFETY: `src` is readable for one page for the whole call.
    let n = unsafe { uffd.copy(target, src.as_ptr(), ps, Mode::empty()) }
        .unwrap_or_else(|e| panic!("{test}: UFFDIO_COPY: {e}"));
    assert_eq!(n, ps, "{test}: bytes copied");
    let bytes = join(reader, "the reader of page 1");
    assert!(
        uniform(&bytes, 0xab),
        "{test}: the reader saw {:#x}",
        bytes[0]
    );
    // SAFETY: mapped now; a fault would reach `unfaulted`'s handler.
    let again = unfaulted(&uffd, move || unsafe { load(target, ps) });
    assert!(uniform(&again, 0xab), "{test}: a second read");
    // SAFETY: `b` is an unregistered view of the same guest_memfd, and
    // page 1 is in its page cache now.
    let through_b = unsafe { load(b.addr() + ps, ps) };
    assert!(uniform(&through_b, 0xab), "{test}: the second mapping");
    // SAFETY: as for the first copy.
    match unsafe { uffd.copy(target, src.as_ptr(), ps, Mode::empty()) } {
        Err(Error::Exists { addr, done: 0, .. }) => assert_eq!(addr, target),
        other => panic!("{test}: a second UFFDIO_COPY to the page gave {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 7.3 events: fork, remap, remove, unmap

/// What a fork-event handler reports: `(forks, faults)`, or why it gave up.
type HandlerResult = Result<(usize, usize), &'static str>;

static HANDLER_READY: AtomicBool = AtomicBool::new(false);
/// Set in the parent when `fork` has returned (see [`Child::spawn`]).
static FORKED: AtomicBool = AtomicBool::new(false);

/// Spawns the thread that serves `uffd` (registered, with `EVENT_FORK`)
/// across a `fork`, and waits until it runs; `f` does the serving.
///
/// The forking thread blocks in the kernel until the FORK event is read,
/// holding glibc's allocator locks (its fork handlers take them), and
/// closing `uffd` does not release it (the half-built child already holds a
/// reference to the file). So until the event is read the thread must
/// neither allocate nor free: `buf` and `state` are allocated by the caller
/// and dropped only after the fork has returned, `f` reports failures as
/// static strings, and when `f` fails the thread keeps reading events (which
/// releases the fork) until the fork has returned or the deadline passed.
fn spawn_fork_handler<S: Send + 'static>(
    uffd: Uffd,
    buf: EventBuffer,
    state: S,
    f: impl FnOnce(&Uffd, &mut EventBuffer, &mut S) -> HandlerResult + Send + 'static,
) -> JoinHandle<HandlerResult> {
    HANDLER_READY.store(false, Ordering::SeqCst);
    FORKED.store(false, Ordering::SeqCst);
    let h = std::thread::spawn(move || {
        let (mut buf, mut state) = (buf, state);
        HANDLER_READY.store(true, Ordering::SeqCst);
        let r = f(&uffd, &mut buf, &mut state);
        if r.is_err() {
            let end = Instant::now() + DEADLINE;
            while !FORKED.load(Ordering::SeqCst) && Instant::now() < end {
                if uffd.poll_readable(POLL).unwrap_or(false)
                    && let Ok(events) = uffd.read_events(&mut buf)
                {
                    events.for_each(drop);
                }
            }
        }
        drop(uffd);
        drop(state);
        r
    });
    let end = Instant::now() + DEADLINE;
    while !HANDLER_READY.load(Ordering::SeqCst) {
        assert!(Instant::now() < end, "the fork handler did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    h
}

/// events_fork's handler loop: read the FORK event, then serve the child's
/// single fault with a COPY of `src` through the child's userfaultfd.
fn serve_fork(
    uffd: &Uffd,
    child: &mut Option<Uffd>,
    buf: &mut EventBuffer,
    src: &[u8],
    base: u64,
) -> HandlerResult {
    let end = Instant::now() + DEADLINE;
    let (mut forks, mut faults) = (0, 0);
    while faults == 0 {
        if Instant::now() > end {
            return Err(if forks == 0 {
                "no FORK event"
            } else {
                "no fault from the child"
            });
        }
        let u = child.as_ref().unwrap_or(uffd);
        if !u.poll_readable(POLL).map_err(|_| "poll failed")? {
            continue;
        }
        for ev in u.read_events(buf).map_err(|_| "read failed")? {
            match ev {
                Event::Fork { uffd: c } if child.is_none() => {
                    forks += 1;
                    *child = Some(c);
                }
                Event::Pagefault {
                    kind: FaultKind::Missing,
                    address,
                    ..
                } if address == base => {
                    let Some(c) = child.as_ref() else {
                        return Err("a fault on the parent's userfaultfd");
                    };
                    faults += 1;
                    // SAFETY: `src` is a readable page.
                    let n = unsafe { c.copy(base, src.as_ptr(), ps(), Mode::empty()) }
                        .map_err(|_| "UFFDIO_COPY through the child's userfaultfd failed")?;
                    if n != ps() {
                        return Err("UFFDIO_COPY copied less than a page");
                    }
                }
                _ => return Err("an unexpected event"),
            }
        }
    }
    Ok((forks, faults))
}

#[test]
fn events_fork() {
    let Some(_g) = group("events_fork") else {
        return;
    };
    let Some(uffd) = uffd_with("events_fork", Features::EVENT_FORK) else {
        return;
    };
    let area = Map::anon(1);
    // SAFETY: ours and unreferenced.
    unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    let base = area.addr;

    let src = vec![0xabu8; ps() as usize];
    let buf = EventBuffer::with_capacity(4);
    let handler = spawn_fork_handler(uffd, buf, (src, None), move |u, buf, (src, child)| {
        serve_fork(u, child, buf, src, base)
    });

    // SAFETY: the child does a volatile load and `_exit`s.
    let child = unsafe { Child::spawn(|| if child_load(base) == 0xab { 0 } else { 1 }) };
    let status = child.wait();
    let (forks, faults) = join(handler, "fork handler").unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child {}",
        describe(status)
    );
    assert_eq!((forks, faults), (1, 1));
}

/// Runs `op` (which blocks until its event is read) in a thread, reads the
/// event, joins the thread and returns both.
fn mm_event<T: Send + 'static>(
    uffd: &Uffd,
    op: impl FnOnce() -> T + Send + 'static,
) -> (Event<Uffd>, T) {
    let t = std::thread::spawn(op);
    let ev = next_event(uffd);
    (ev, join(t, "mm operation"))
}

#[test]
fn events_remap() {
    let Some(_g) = group("events_remap") else {
        return;
    };
    let Some(uffd) = uffd_with("events_remap", Features::EVENT_REMAP) else {
        return;
    };
    let area = Map::anon(2);
    // SAFETY: ours and unreferenced.
    unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    let (from, len) = area.forget();
    let (to, _) = Map::reserve(2).forget();
    let (ev, r) = mm_event(&uffd, move || {
        // SAFETY: moves our own mapping over our own reservation.
        let r = unsafe {
            libc::mremap(
                from as *mut libc::c_void,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            )
        };
        (r as u64, Errno::last())
    });
    let moved = Map { addr: to, len };
    assert_eq!(r.0, to, "mremap: {}", r.1);
    match ev {
        Event::Remap {
            from: f,
            to: t,
            len: l,
        } => assert_eq!((f, t, l), (from, to, len)),
        other => panic!("{other:?}"),
    }
    // The registration moved with the range: faults report the new address.
    let p = moved.page(1);
    let worker = std::thread::spawn(move || {
        // SAFETY: registered and mapped; the fault is served below.
        let bytes = unsafe { load(p, 1) };
        bytes[0]
    });
    let v = serve(&uffd, worker, |ev| match ev {
        Event::Pagefault {
            kind: FaultKind::Missing,
            address,
            ..
        } if address == p => {
            assert_eq!(uffd.zeropage(p..p + ps(), Mode::empty()).unwrap(), ps());
        }
        other => panic!("{other:?}"),
    });
    assert_eq!(v, 0);
}

#[test]
fn events_remove() {
    let Some(_g) = group("events_remove") else {
        return;
    };
    let Some(uffd) = uffd_with("events_remove", Features::EVENT_REMOVE) else {
        return;
    };
    let area = Map::anon(2);
    // SAFETY: ours and unreferenced.
    unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    assert_eq!(
        uffd.zeropage(area.page_range(1), Mode::empty()).unwrap(),
        ps()
    );
    let (start, end) = (area.page(1), area.page(1) + ps());
    let (ev, r) = mm_event(&uffd, move || {
        // SAFETY: drops a page of our own mapping that nothing references.
        let r = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                (end - start) as usize,
                libc::MADV_DONTNEED,
            )
        };
        (r, Errno::last())
    });
    assert_eq!(r.0, 0, "madvise: {}", r.1);
    match ev {
        Event::Remove { start: s, end: e } => assert_eq!((s, e), (start, end)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn events_unmap() {
    let Some(_g) = group("events_unmap") else {
        return;
    };
    let Some(uffd) = uffd_with("events_unmap", Features::EVENT_UNMAP) else {
        return;
    };
    let area = Map::anon(2);
    // SAFETY: ours and unreferenced.
    unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    let (start, len) = area.forget();
    let (ev, r) = mm_event(&uffd, move || {
        // SAFETY: unmaps our own mapping, which nothing references.
        let r = unsafe { libc::munmap(start as *mut libc::c_void, len as usize) };
        (r, Errno::last())
    });
    assert_eq!(r.0, 0, "munmap: {}", r.1);
    match ev {
        Event::Unmap { start: s, end: e } => assert_eq!((s, e), (start, start + len)),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 7.3 poison

#[test]
fn poison() {
    let Some(_g) = group("poison") else { return };

    // Without enabling the feature: refused before the call (or unsupported).
    let plain = uffd_with("poison", Features::empty()).unwrap();
    let offered = plain.supported_features().unwrap();
    let area = Map::anon(1);
    // SAFETY: ours and unreferenced.
    unsafe { plain.register(area.range(), RegisterMode::MISSING) }.unwrap();
    let r = plain.poison(area.page_range(0), Mode::empty());
    if offered.contains(Features::POISON) {
        assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    } else {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    }
    drop(plain);
    drop(area);

    let Some(uffd) = uffd_with("poison", Features::POISON) else {
        return;
    };
    let area = Map::anon(2);
    // SAFETY: ours and unreferenced; page 0 is never touched in this process.
    let ioctls = unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::COPY | Ioctls::POISON), "{ioctls:?}");
    assert_eq!(
        uffd.poison(area.page_range(0), Mode::empty()).unwrap(),
        ps()
    );
    match uffd.poison(area.page_range(0), Mode::empty()) {
        Err(Error::Exists { done: 0, .. }) => {}
        other => panic!("second POISON: {other:?}"),
    }
    let zeros = vec![0u8; ps() as usize];
    // SAFETY: `zeros` is a readable page.
    let n = unsafe { uffd.copy(area.page(1), zeros.as_ptr(), ps(), Mode::empty()) }.unwrap();
    assert_eq!(n, ps());

    let (p0, p1) = (area.page(0), area.page(1));
    // SAFETY: the child does volatile loads, setrlimit and `_exit`.
    let child = unsafe {
        Child::spawn(move || {
            child_no_core();
            if child_load(p1) != 0 {
                return 3;
            }
            child_load(p0); // SIGBUS
            4
        })
    };
    let status = child.wait();
    assert!(killed_by_sigbus(status), "child {}", describe(status));
}

// ---------------------------------------------------------------------------
// 7.3 sigbus

/// sigbus's poll thread: counts FORK events and faults on the parent's and
/// the child's userfaultfd until `done`.
fn count_events(
    uffd: &Uffd,
    child: &mut Option<Uffd>,
    buf: &mut EventBuffer,
    done: &AtomicBool,
) -> HandlerResult {
    let end = Instant::now() + DEADLINE;
    let (mut forks, mut faults) = (0, 0);
    loop {
        let finished = done.load(Ordering::Acquire);
        for ev in uffd.read_events(buf).map_err(|_| "read failed")? {
            match ev {
                Event::Fork { uffd: c } if child.is_none() => {
                    forks += 1;
                    *child = Some(c);
                }
                Event::Pagefault { .. } => faults += 1,
                _ => return Err("an unexpected event on the parent's userfaultfd"),
            }
        }
        if let Some(c) = child.as_ref() {
            for ev in c.read_events(buf).map_err(|_| "read failed")? {
                match ev {
                    Event::Pagefault { .. } => faults += 1,
                    _ => return Err("an unexpected event on the child's userfaultfd"),
                }
            }
        }
        if finished {
            return Ok((forks, faults));
        }
        if Instant::now() > end {
            return Err("not told that the child finished");
        }
        uffd.poll_readable(POLL).map_err(|_| "poll failed")?;
    }
}

#[test]
fn sigbus() {
    let Some(_g) = group("sigbus") else { return };
    let Some(uffd) = uffd_with("sigbus", Features::SIGBUS | Features::EVENT_FORK) else {
        return;
    };
    let area = Map::anon(2);
    // SAFETY: ours and unreferenced; page 0 is never touched in this process.
    unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    // Page 1 is resolved ahead: reading it must work in the child.
    let src = vec![0x5au8; ps() as usize];
    // SAFETY: `src` is a readable page.
    let n = unsafe { uffd.copy(area.page(1), src.as_ptr(), ps(), Mode::empty()) };
    assert_eq!(n.unwrap(), ps());

    // A poll thread that must see the FORK event and no fault on either fd.
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let buf = EventBuffer::with_capacity(4);
    let handler = spawn_fork_handler(uffd, buf, (done2, None), |u, buf, (done, child)| {
        count_events(u, child, buf, done)
    });

    let (p0, p1) = (area.page(0), area.page(1));
    // SAFETY: the child does volatile loads, setrlimit and `_exit`.
    let child = unsafe {
        Child::spawn(move || {
            child_no_core();
            if child_load(p1) != 0x5a {
                return 3;
            }
            child_load(p0); // SIGBUS: the child inherited the registration
            4
        })
    };
    let status = child.wait();
    done.store(true, Ordering::Release);
    let (forks, faults) = join(handler, "poll thread").unwrap();
    assert!(killed_by_sigbus(status), "child {}", describe(status));
    assert_eq!(forks, 1);
    assert_eq!(faults, 0, "SIGBUS mode must deliver no fault events");
}

// ---------------------------------------------------------------------------
// 7.3 move

#[test]
fn r#move() {
    let Some(_g) = group("move") else { return };
    let pages = 4;

    // Without enabling the feature: refused before the call.
    let plain = uffd_with("move", Features::empty()).unwrap();
    let offered = plain.supported_features().unwrap();
    let (a, b) = (Map::anon(1), Map::anon(1));
    // SAFETY: ours and unreferenced.
    unsafe { plain.register(a.range(), RegisterMode::MISSING) }.unwrap();
    // SAFETY: as above (and nothing is moved: the call is refused).
    let r = unsafe { plain.r#move(a.addr, b.addr, ps(), Mode::empty()) };
    if offered.contains(Features::MOVE) {
        assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    } else {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    }
    drop((plain, a, b));

    let Some(uffd) = uffd_with("move", Features::MOVE) else {
        return;
    };
    let dst = Map::anon(pages);
    let src = Map::anon(pages);
    src.madvise(libc::MADV_NOHUGEPAGE);
    src.madvise(libc::MADV_DONTFORK);
    let pattern = |i: u64| 0x30u8 + i as u8;
    for i in 0..pages {
        // SAFETY: `src` is ours, unregistered and unreferenced.
        unsafe { store(src.page(i), ps(), pattern(i)) };
    }
    // SAFETY: `dst` is ours and unreferenced.
    let ioctls = unsafe { uffd.register(dst.range(), RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::MOVE), "{ioctls:?}");

    let base = dst.addr;
    let reader = std::thread::spawn(move || {
        (0..pages)
            // SAFETY: registered and mapped; faults are served below.
            .map(|i| unsafe { load(base + i * ps(), ps()) })
            .collect::<Vec<_>>()
    });
    let mut faults = vec![0u32; pages as usize];
    let contents = serve(&uffd, reader, |ev| match ev {
        Event::Pagefault {
            kind: FaultKind::Missing,
            access: Access::Read,
            address,
            ..
        } if dst.range().contains(&address) => {
            let i = (address - base) / ps();
            faults[i as usize] += 1;
            // SAFETY: the source page is ours and referenced by nothing.
            let n = unsafe { uffd.r#move(address, src.page(i), ps(), Mode::ALLOW_SRC_HOLES) };
            assert_eq!(n.unwrap(), ps());
        }
        other => panic!("unexpected {other:?}"),
    });
    assert!(faults.iter().all(|&n| n == 1), "faults per page {faults:?}");
    for (i, page) in contents.iter().enumerate() {
        assert!(uniform(page, pattern(i as u64)), "page {i}");
    }
    for i in 0..pages {
        // SAFETY: `src` is unregistered anonymous memory: a moved-out page
        // reads as the zero page.
        let bytes = unsafe { load(src.page(i), ps()) };
        assert!(uniform(&bytes, 0), "source page {i} after the move");
    }
}

// ---------------------------------------------------------------------------
// 7.3 mmap-changing

#[test]
fn mmap_changing() {
    let Some(_g) = group("mmap_changing") else {
        return;
    };
    let features =
        Features::EVENT_REMOVE | Features::MOVE | Features::POISON | Features::MINOR_SHMEM;
    let Some(uffd) = uffd_with("mmap_changing", features) else {
        return;
    };
    let fd = memfd(2);
    let area = Map::shared(fd.as_fd(), 2);
    // SAFETY: ours and unreferenced.
    unsafe { uffd.register(area.range(), RegisterMode::MISSING) }.unwrap();
    let src = Map::anon(1);
    // SAFETY: `src` is ours and unregistered.
    unsafe { store(src.addr, ps(), 0x77) };

    // MADV_REMOVE blocks until the REMOVE event is read.
    let (start, end) = (area.page(0), area.page(0) + ps());
    let remover = std::thread::spawn(move || {
        // SAFETY: drops a page of our own shared mapping; nothing references it.
        let r = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                (end - start) as usize,
                libc::MADV_REMOVE,
            )
        };
        (r, Errno::last())
    });
    let deadline = Instant::now() + DEADLINE;
    while !uffd.poll_readable(POLL).unwrap() {
        assert!(Instant::now() < deadline, "no REMOVE event");
    }

    // The event is pending: every resolving ioctl answers EAGAIN with no
    // progress (the kernel's -EAGAIN in the result field is no byte count).
    let dst = area.page_range(1);
    let check = |what: &str, r: Result<u64, Error>| match r {
        Err(Error::Again { done: 0, .. }) => {}
        other => panic!("{what} while the mm is changing: {other:?}"),
    };
    // SAFETY: `src` is a readable page.
    check("COPY", unsafe {
        uffd.copy(dst.start, src.addr as *const u8, ps(), Mode::empty())
    });
    check("ZEROPAGE", uffd.zeropage(dst.clone(), Mode::empty()));
    check("CONTINUE", uffd.r#continue(dst.clone(), Mode::empty()));
    check("POISON", uffd.poison(dst.clone(), Mode::empty()));
    // SAFETY: `src` is ours and unreferenced.
    check("MOVE", unsafe {
        uffd.r#move(dst.start, src.addr, ps(), Mode::empty())
    });

    match uffd.read_event().unwrap() {
        Some(Event::Remove { start: s, end: e }) => assert_eq!((s, e), (start, end)),
        other => panic!("{other:?}"),
    }
    let (r, errno) = join(remover, "MADV_REMOVE");
    assert_eq!(r, 0, "madvise(MADV_REMOVE): {errno}");
}

// ---------------------------------------------------------------------------
// RWP (mm-new; Linux 7.3 in this crate's naming)

#[test]
fn rwp() {
    let Some(_g) = group("rwp") else { return };
    let plain = uffd_with("rwp", Features::empty()).unwrap();
    let offered = plain.supported_features().unwrap();
    let area = Map::anon(1);

    if !offered.contains(Features::RWP) {
        let r = plain.rwprotect(area.range(), true, Mode::empty());
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
        // SAFETY: ours and unreferenced (and the call is refused).
        let r = unsafe { plain.register(area.range(), RegisterMode::RWP) };
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    }
    if !offered.contains(Features::RWP_ASYNC) {
        let r = plain.set_mode(Features::RWP_ASYNC, Features::empty());
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    }
    drop(plain);
    if !offered.contains(Features::RWP) {
        // The typed Unsupported answers were checked above; the fault part
        // needs the feature.
        skip_missing_features(Features::RWP, offered);
        return;
    }

    // The kernel offers RWP: a synchronous RWP fault, then asynchronous mode
    // switched on and off at run time. Only RWP is negotiated: negotiating
    // RWP_ASYNC in UFFDIO_API starts the userfaultfd in asynchronous mode
    // (checked at the end).
    let uffd = uffd_with("rwp", Features::RWP).unwrap();
    // SAFETY: ours, unregistered yet.
    unsafe { store(area.addr, ps(), 0x5a) };
    // SAFETY: ours and unreferenced.
    let ioctls = unsafe { uffd.register(area.range(), RegisterMode::RWP) }.unwrap();
    assert!(ioctls.contains(Ioctls::RWPROTECT), "{ioctls:?}");
    uffd.rwprotect(area.range(), true, Mode::empty()).unwrap();
    let p = area.addr;
    // SAFETY: registered and mapped; the fault is served below.
    let reader = std::thread::spawn(move || unsafe { load(p, ps()) });
    let mut faults = 0;
    let bytes = serve(&uffd, reader, |ev| match ev {
        Event::Pagefault {
            kind: FaultKind::ReadWriteProtect,
            address,
            ..
        } if address == p => {
            faults += 1;
            uffd.rwprotect(p..p + ps(), false, Mode::empty()).unwrap();
        }
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(faults, 1);
    assert!(uniform(&bytes, 0x5a));

    if offered.contains(Features::RWP_ASYNC) {
        uffd.set_mode(Features::RWP_ASYNC, Features::empty())
            .unwrap();
        uffd.rwprotect(area.range(), true, Mode::empty()).unwrap();
        // SAFETY: registered; async mode resolves the fault without an event.
        let bytes = unfaulted(&uffd, move || unsafe { load(p, ps()) });
        assert!(uniform(&bytes, 0x5a));
        uffd.set_mode(Features::empty(), Features::RWP_ASYNC)
            .unwrap();
        drop(uffd);

        // RWP_ASYNC negotiated at UFFDIO_API: asynchronous from the start,
        // until UFFDIO_SET_MODE disables it.
        let area = Map::anon(1);
        // SAFETY: ours, unregistered yet.
        unsafe { store(area.addr, ps(), 0x6b) };
        let uffd = uffd_with("rwp", Features::RWP | Features::RWP_ASYNC).unwrap();
        // SAFETY: ours and unreferenced.
        unsafe { uffd.register(area.range(), RegisterMode::RWP) }.unwrap();
        uffd.rwprotect(area.range(), true, Mode::empty()).unwrap();
        let p = area.addr;
        // SAFETY: registered; async mode resolves the fault without an event.
        let bytes = unfaulted(&uffd, move || unsafe { load(p, ps()) });
        assert!(uniform(&bytes, 0x6b));
        uffd.set_mode(Features::empty(), Features::RWP_ASYNC)
            .unwrap();
        uffd.rwprotect(area.range(), true, Mode::empty()).unwrap();
        // SAFETY: registered and mapped; the fault is served below.
        let reader = std::thread::spawn(move || unsafe { load(p, ps()) });
        let mut faults = 0;
        let bytes = serve(&uffd, reader, |ev| match ev {
            Event::Pagefault {
                kind: FaultKind::ReadWriteProtect,
                address,
                ..
            } if address == p => {
                faults += 1;
                uffd.rwprotect(p..p + ps(), false, Mode::empty()).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(faults, 1, "after disabling RWP_ASYNC the read must fault");
        assert!(uniform(&bytes, 0x6b));
    }
}
