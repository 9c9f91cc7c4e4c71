//! The few raw calls the crate makes, each in one place. The bottom layer:
//! it uses only the crate's error type, never a module above it.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `ioctl(fd, REQ, arg)` through kvm-gmem-sys's checked call (the request
/// encodes `T`, checked when this is compiled), the errno typed.
///
/// # Safety
///
/// Every user pointer stored inside `arg` must be what request `REQ`
/// requires of it (the kernel reads or writes through them).
#[inline]
pub(crate) unsafe fn ioctl_arg<const REQ: u32, T>(
    fd: BorrowedFd<'_>,
    arg: &mut T,
) -> Result<i32, Errno> {
    // SAFETY: `fd` is open for the borrow; the caller vouches for the
    // pointers inside `arg`.
    unsafe { kvm_gmem_sys::ioctl::ioctl_arg::<REQ, T>(fd.as_raw_fd(), arg) }.map_err(Errno)
}

/// `ioctl(fd, REQ, value)` for a request without an argument struct, the
/// errno typed.
///
/// # Safety
///
/// `value` must mean for request `REQ` what the caller intends (a few `_IO`
/// requests take an address).
#[inline]
pub(crate) unsafe fn ioctl_int<const REQ: u32>(
    fd: BorrowedFd<'_>,
    value: u64,
) -> Result<i32, Errno> {
    // SAFETY: `fd` is open for the borrow; the caller vouches for `value`.
    unsafe { kvm_gmem_sys::ioctl::ioctl_int::<REQ>(fd.as_raw_fd(), value as libc::c_ulong) }
        .map_err(Errno)
}

/// Takes ownership of a descriptor the kernel just returned, and marks it
/// close-on-exec when the kernel did not.
pub(crate) fn own_new_fd(op: &'static str, raw: i32) -> Result<OwnedFd> {
    // SAFETY: `raw` was just returned by a successful system call that
    // creates a descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_cloexec(op, fd.as_raw_fd())?;
    Ok(fd)
}

fn set_cloexec(op: &'static str, raw: i32) -> Result<()> {
    // One F_SETFD, without reading first: FD_CLOEXEC is the only descriptor
    // flag, and a descriptor the kernel just created has none set.
    // SAFETY: `raw` is the descriptor `own_new_fd` just took ownership of,
    // open for the call; F_SETFD takes an integer and changes only its
    // descriptor flags.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(Error::kernel(op, Errno::last()));
    }
    Ok(())
}

pub use kvm_gmem_sys::support::page_size;

/// `open(path, flags | O_CLOEXEC)`.
pub(crate) fn open_cloexec(path: &std::ffi::CStr, flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    let raw = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `raw` was just returned by open(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `fallocate(fd, mode, offset, len)`.
pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(Errno(libc::EINVAL));
    };
    // SAFETY: fallocate takes only integers; `fd` is open for the borrow.
    let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// `pwrite` of one zeroed page at offset 0 (the guest_memfd write() probe).
pub(crate) fn pwrite_zero_page(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let page = vec![0u8; page_size() as usize];
    // SAFETY: `page` is a readable buffer of `page.len()` bytes.
    let r = unsafe { libc::pwrite(fd.as_raw_fd(), page.as_ptr().cast(), page.len(), 0) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}
