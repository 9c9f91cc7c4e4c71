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

/// `fstat(fd)`.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, Errno> {
    // SAFETY: an all-zero `stat` is a valid output buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the borrow; `st` is a writable `stat` the
    // kernel fills.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(Errno::last());
    }
    Ok(st)
}

/// A memfd named `name` of `size` bytes whose size is sealed (no shrink,
/// no grow, no further seals), close-on-exec.
#[cfg(feature = "rfc-kvm-userfault")]
pub(crate) fn sealed_memfd(op: &'static str, name: &std::ffi::CStr, size: u64) -> Result<OwnedFd> {
    let Ok(len) = libc::off_t::try_from(size) else {
        return Err(Error::invalid(
            op,
            format!("{size} bytes is larger than off_t"),
        ));
    };
    // SAFETY: `name` is NUL-terminated; memfd_create returns a new
    // descriptor or -1, and reads nothing else.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(Error::kernel(op, Errno::last()));
    }
    let fd = own_new_fd(op, raw)?;
    // SAFETY: `fd` is open; ftruncate takes integers.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(Error::kernel("ftruncate(sealed memfd)", Errno::last()));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: `fd` is open; F_ADD_SEALS takes an integer and changes only
    // the file's seals.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::kernel(
            "fcntl(F_ADD_SEALS, sealed memfd)",
            Errno::last(),
        ));
    }
    Ok(fd)
}

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
