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
pub(crate) unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, request: u32, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: `arg` is a valid exclusive `T`; the caller vouches for the rest.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// `poll(fd, POLLIN, timeout)`: whether `fd` became readable.
pub(crate) fn poll_in(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool, Errno> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    match r {
        r if r > 0 => Ok(p.revents & libc::POLLIN != 0),
        0 => Ok(false),
        _ => match Errno::last() {
            Errno(libc::EINTR) => Ok(false),
            e => Err(e),
        },
    }
}
