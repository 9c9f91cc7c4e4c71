//! The raw calls, each in one place.
#![allow(unsafe_code)]

use crate::error::Errno;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `ioctl(fd, request, value)`.
pub(crate) fn ioctl_val(fd: BorrowedFd<'_>, request: u32, value: u64) -> Result<i32, Errno> {
    // SAFETY: an integer argument; the kernel reads no memory of ours.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, value as libc::c_ulong) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// `ioctl(fd, request, &mut arg)`.
///
/// # Safety
///
/// `request` must encode an argument of type `T`, and the user pointers
/// inside `arg` must satisfy that ioctl's requirements.
pub(crate) unsafe fn ioctl_ptr<T>(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: &mut T,
) -> Result<i32, Errno> {
    // SAFETY: `arg` is a valid exclusive `T`; the caller vouches for the rest.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// `poll(fd, POLLIN, timeout)`: whether `fd` became readable.
pub(crate) fn poll_in(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool, Errno> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one initialised pollfd, live and exclusively borrowed
    // for the call (nfds = 1).
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    match r {
        r if r > 0 && p.revents & libc::POLLERR != 0 => Err(Errno(libc::EBADFD)),
        r if r > 0 => Ok(p.revents & libc::POLLIN != 0),
        0 => Ok(false),
        _ => match Errno::last() {
            Errno(libc::EINTR) => Ok(false),
            e => Err(e),
        },
    }
}

/// Sets `O_NONBLOCK` on the open file description.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: F_GETFL/F_SETFL read and write only the descriptor's status flags.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(Errno::last());
    }
    if fl & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL writes only the descriptor's status flags.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd takes only integers and passes no memory.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: eventfd(2) returned a new, non-negative descriptor that
    // nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Makes an eventfd readable (wakes every poller).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: the kernel reads exactly the 8 bytes of `one`, a live local;
    // `fd` is open for the borrow.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// `poll` on two descriptors for input, `timeout_ms` at most.
pub(crate) fn poll2(a: BorrowedFd<'_>, b: BorrowedFd<'_>, timeout_ms: i32) {
    let mut p = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `p` is an array of two initialised pollfds, live for the
    // call (nfds = 2).
    unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
}
