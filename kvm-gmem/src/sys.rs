//! The few raw calls the crate makes, each in one place.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `ioctl(fd, request, value)` with an integer argument.
pub(crate) fn ioctl_val(fd: BorrowedFd<'_>, request: u32, value: u64) -> Result<i32, Errno> {
    // SAFETY: the argument is passed by value, so the kernel reads no memory
    // of ours; `fd` is a valid open descriptor for the borrow's duration.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, value as libc::c_ulong) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

/// `ioctl(fd, request, &mut arg)`.
///
/// # Safety
///
/// `request` must encode an argument of type `T` (its size is `size_of::<T>()`
/// and the kernel reads or writes at most that much), and any user pointers
/// *inside* `arg` must satisfy what that ioctl requires of them.
pub(crate) unsafe fn ioctl_ptr<T>(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: &mut T,
) -> Result<i32, Errno> {
    // SAFETY: `arg` is a valid, exclusive `T` for the call; the caller
    // guarantees `request` describes a `T` and the pointers inside it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
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

/// The host page size.
#[inline]
pub fn page_size() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Asked once: the page size of a running process never changes, and the
    // hot paths (every userfaultfd resolve) check alignment against it.
    static PAGE: AtomicU64 = AtomicU64::new(0);
    let cached = PAGE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf takes an integer name and returns an integer; no
    // memory of ours is passed.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if v > 0 { v as u64 } else { 4096 };
    PAGE.store(page, Ordering::Relaxed);
    page
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

/// Whether `vm` accepts a one-page memslot with the KVM Userfault RFC flag
/// (`KVM_MEM_USERFAULT`, bit 3) and a bitmap. The slot is deleted again.
pub(crate) fn probe_userfault_memslot(vm: &crate::kvm::Vm) -> Result<(), Errno> {
    use std::os::fd::AsFd;
    const KVM_MEM_USERFAULT: u32 = 1 << 3;
    let page = page_size() as usize;
    // SAFETY: a fresh private anonymous mapping chosen by the kernel.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    let bitmap = [u64::MAX; 1];
    let mut raw = kvm_gmem_sys::kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_USERFAULT,
        guest_phys_addr: 0,
        memory_size: page as u64,
        userspace_addr: mem as u64,
        ..Default::default()
    };
    // pad2[0] is the RFC's `userfault_bitmap`.
    raw.pad2[0] = bitmap.as_ptr() as u64;
    // SAFETY: the request encodes this struct; `mem` and `bitmap` stay valid
    // until the slot is deleted below, before either is released.
    let r = unsafe {
        ioctl_ptr(
            vm.as_fd(),
            kvm_gmem_sys::KVM_SET_USER_MEMORY_REGION2,
            &mut raw,
        )
    };
    if r.is_ok() {
        let _ = crate::memslot::delete_memory_region(vm, 0);
    }
    // SAFETY: the mapping made above, no longer used by any slot.
    unsafe { libc::munmap(mem, page) };
    r.map(|_| ())
}
