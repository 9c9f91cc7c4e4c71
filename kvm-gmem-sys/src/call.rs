//! The one place the workspace issues an ioctl (feature `ioctl`): the
//! request is a const parameter, and a compile-time check ties it to the
//! argument, so "the request encodes `T`" is no longer a comment a caller
//! must get right but a build error when it is wrong.
//!
//! ```
//! # #[cfg(feature = "ioctl")] {
//! use kvm_gmem_sys::{UFFDIO_API, uffdio_api};
//! use kvm_gmem_sys::ioctl::ioctl_arg;
//!
//! let mut api = uffdio_api { api: 0xaa, ..Default::default() };
//! // SAFETY: uffdio_api holds no pointers; fd -1 is simply refused (EBADF).
//! assert_eq!(unsafe { ioctl_arg::<UFFDIO_API, _>(-1, &mut api) }, Err(libc::EBADF));
//! # }
//! ```
//!
//! A request whose size is not the argument's does not build:
//!
//! ```compile_fail,E0080
//! use kvm_gmem_sys::{UFFDIO_API, uffdio_range};
//! let mut wrong = uffdio_range::default();
//! // uffdio_range is 16 bytes, UFFDIO_API encodes 24.
//! let _ = unsafe { kvm_gmem_sys::ioctl::ioctl_arg::<UFFDIO_API, _>(-1, &mut wrong) };
//! ```

use crate::_IOC_NONE;
use crate::ioctl::{_IOC_DIR, _IOC_SIZE};
use core::ffi::{c_int, c_ulong};

/// `ioctl(fd, REQ, arg)` for a request whose argument is a `T` in memory:
/// the raw return value, or the errno.
///
/// Checked when it is instantiated: `REQ` must have a direction (`_IOR`,
/// `_IOW` or `_IOWR`) and encode exactly `size_of::<T>()` bytes.
///
/// # Safety
///
/// `fd` must be open for the call, and every user pointer stored *inside*
/// `arg` must be what this request requires of it (the kernel reads or
/// writes through them). `arg` itself is valid: it is a live `&mut T` of the
/// size the request encodes.
#[inline]
pub unsafe fn ioctl_arg<const REQ: u32, T>(fd: c_int, arg: &mut T) -> Result<c_int, c_int> {
    const {
        assert!(
            _IOC_DIR(REQ) != _IOC_NONE,
            "this request takes no argument struct: use ioctl_int"
        );
        assert!(
            _IOC_SIZE(REQ) == size_of::<T>(),
            "the request does not encode the size of the argument type"
        );
    }
    // SAFETY: `arg` is a live, exclusive `T` of the size the request
    // encodes (checked above); the caller vouches for `fd` and for the
    // pointers inside `arg`.
    let r = unsafe { libc::ioctl(fd, REQ as _, arg as *mut T) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// `ioctl(fd, REQ, value)` for a request without an argument struct
/// (`_IO`): the value is passed as is.
///
/// Checked when it is instantiated: `REQ` must encode no direction and size.
///
/// # Safety
///
/// `fd` must be open for the call, and `value` must mean for this request
/// what the caller intends (a few `_IO` requests take an address).
#[inline]
pub unsafe fn ioctl_int<const REQ: u32>(fd: c_int, value: c_ulong) -> Result<c_int, c_int> {
    const {
        assert!(
            _IOC_DIR(REQ) == _IOC_NONE && _IOC_SIZE(REQ) == 0,
            "this request takes an argument struct: use ioctl_arg"
        );
    }
    // SAFETY: an integer argument; the caller vouches for `fd` and `value`.
    let r = unsafe { libc::ioctl(fd, REQ as _, value) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// The calling thread's errno.
fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot,
    // valid for the thread's lifetime.
    unsafe { *libc::__errno_location() }
}
