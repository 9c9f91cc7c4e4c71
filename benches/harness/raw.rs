//! The baselines' raw libc building blocks, shared by the bench targets:
//! what a hand-written VMM handler does, with nothing of the crates.

use kvm_gmem_sys as sys;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A non-blocking, close-on-exec userfaultfd from the system call (or
/// `/dev/userfaultfd` where the call is refused) after the `UFFDIO_API`
/// handshake with `features`.
pub fn uffd(features: u64) -> OwnedFd {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags.
    let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
    if raw < 0 {
        // SAFETY: a NUL-terminated path.
        let dev =
            unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(dev >= 0, "neither userfaultfd(2) nor /dev/userfaultfd");
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as an integer.
        raw = unsafe { libc::ioctl(dev, sys::USERFAULTFD_IOC_NEW as _, flags as libc::c_ulong) };
        // SAFETY: `dev` is ours and closed once.
        unsafe { libc::close(dev) };
        assert!(
            raw >= 0,
            "USERFAULTFD_IOC_NEW: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a new descriptor that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut api = sys::uffdio_api {
        api: sys::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: the request encodes `uffdio_api`, which holds no pointers.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) };
    assert_eq!(r, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    fd
}

/// `UFFDIO_REGISTER` of `len` bytes at `start` in `mode`.
pub fn register(fd: &OwnedFd, start: usize, len: usize, mode: u64) {
    let mut reg = sys::uffdio_register {
        range: sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a uffdio_register; the benches register
    // only their own mappings, which no Rust reference points into.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut reg) };
    assert_eq!(r, 0, "UFFDIO_REGISTER: {}", std::io::Error::last_os_error());
}

/// A non-blocking, close-on-exec eventfd: the handlers' stop signal.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes only integers.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: eventfd returned a new descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Sleeps in poll on the userfaultfd and the stop eventfd; false: stop.
pub fn poll_both(uffd: i32, wake: i32) -> bool {
    let mut p = [
        libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds.
    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR), "poll: {e}");
    }
    p[1].revents == 0
}

/// A close-on-exec shmem memfd of `len` bytes.
pub fn memfd(len: u64) -> OwnedFd {
    // SAFETY: a NUL-terminated name and flags.
    let raw = unsafe { libc::memfd_create(c"gmem-bench".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: memfd_create returned a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on the descriptor just created.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}
