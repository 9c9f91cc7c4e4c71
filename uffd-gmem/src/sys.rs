//! The raw calls, each in one place: every system call the crate makes is
//! made here (ioctls through kvm-gmem-sys's checked `ioctl_arg` and
//! `ioctl_int`), each returning the kernel's errno as [`Errno`]. The other
//! modules call these and never `libc` functions; this one uses no other
//! module of the crate.
#![allow(unsafe_code)]

use kvm_gmem_sys as sys;
use kvm_gmem_sys::ioctl::{ioctl_arg, ioctl_int};
use kvm_gmem_sys::support::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Owns the descriptor a call returned, or reads errno (`raw < 0`).
///
/// # Safety
///
/// `raw` is the result of a call that returns a new descriptor (or -1 and
/// sets errno).
unsafe fn own(raw: i64) -> Result<OwnedFd, Errno> {
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a new descriptor (the caller's contract); nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// The count a call returned (bytes, ready descriptors), or its errno.
fn count(n: isize) -> Result<usize, Errno> {
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// `ioctl(fd, REQ, &mut arg)`; the request is checked against `T` when this
/// is compiled.
///
/// # Safety
///
/// The user pointers stored inside `arg` must be what request `REQ`
/// requires of them (the kernel reads or writes through them).
#[inline]
pub(crate) unsafe fn ioctl<const REQ: u32, T>(
    fd: BorrowedFd<'_>,
    arg: &mut T,
) -> Result<i32, Errno> {
    // SAFETY: `fd` is open for the borrow; the caller vouches for the
    // pointers inside `arg`.
    unsafe { ioctl_arg::<REQ, T>(fd.as_raw_fd(), arg) }.map_err(Errno)
}

/// `ioctl(dev, USERFAULTFD_IOC_NEW, flags)` on `/dev/userfaultfd`: a new,
/// uninitialised userfaultfd.
pub(crate) fn userfaultfd_ioc_new(dev: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as its integer
    // argument; no memory is passed.
    let raw = unsafe { ioctl_int::<{ sys::USERFAULTFD_IOC_NEW }>(dev.as_raw_fd(), flags as _) }
        .map_err(Errno)?;
    // SAFETY: USERFAULTFD_IOC_NEW returns a new descriptor.
    unsafe { own(raw.into()) }
}

/// `userfaultfd(flags)`: a new, uninitialised userfaultfd.
pub(crate) fn userfaultfd(flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor.
    unsafe { own(libc::syscall(libc::SYS_userfaultfd, flags)) }
}

/// `read(fd, buf)`: the bytes read.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is writable for its length.
    count(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// `pwrite(fd, src, len, offset)`: the bytes written.
///
/// # Safety
///
/// `src` must be valid for reads of `len` bytes for the call.
pub(crate) unsafe fn pwrite(
    fd: BorrowedFd<'_>,
    src: *const u8,
    len: usize,
    offset: u64,
) -> Result<usize, Errno> {
    // SAFETY: the caller vouches for `src`; `fd` is open for the borrow.
    count(unsafe { libc::pwrite(fd.as_raw_fd(), src.cast(), len, offset as libc::off_t) })
}

/// A `pollfd` asking for `events` on `fd`.
pub(crate) fn pollfd(fd: BorrowedFd<'_>, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// `poll(fds, timeout_ms)`: how many have events (their `revents` set).
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<usize, Errno> {
    // SAFETY: `fds` is an initialised, exclusively borrowed array of
    // `fds.len()` pollfds; the kernel writes only their `revents`. Any fd
    // number is harmless here (a closed one reports POLLNVAL).
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    count(r as isize)
}

/// `EPOLLIN | EPOLLEXCLUSIVE`: of the epolls waiting on one file, one is
/// woken per event (Linux 4.5).
pub(crate) const EPOLL_IN_EXCLUSIVE: u32 = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;

/// A new close-on-exec epoll instance.
pub(crate) fn epoll_create() -> Result<OwnedFd, Errno> {
    // SAFETY: epoll_create1 takes only flags and returns a new descriptor.
    unsafe { own(libc::epoll_create1(libc::EPOLL_CLOEXEC).into()) }
}

/// `epoll_ctl(ep, EPOLL_CTL_ADD, fd, {events, token})`.
pub(crate) fn epoll_add(
    ep: BorrowedFd<'_>,
    fd: BorrowedFd<'_>,
    events: u32,
    token: u64,
) -> Result<(), Errno> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a live, initialised epoll_event the kernel only reads;
    // both descriptors are open for their borrows.
    let r =
        unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
    count(r as isize).map(drop)
}

/// `epoll_wait(ep, out, timeout_ms)`: how many of `out` were filled.
pub(crate) fn epoll_wait(
    ep: BorrowedFd<'_>,
    out: &mut [libc::epoll_event],
    timeout_ms: i32,
) -> Result<usize, Errno> {
    let max = out.len().min(i32::MAX as usize) as i32;
    // SAFETY: `out` is writable for `max` events; the kernel writes at most
    // that many.
    let r = unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), max, timeout_ms) };
    count(r as isize)
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
pub(crate) fn eventfd() -> Result<OwnedFd, Errno> {
    // SAFETY: eventfd takes only integers and returns a new descriptor.
    unsafe { own(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).into()) }
}

/// Makes an eventfd readable (wakes every poller).
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: the kernel reads exactly the 8 bytes of `one`, a live local;
    // `fd` is open for the borrow.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Maps `len` bytes of `fd` read-only and private: the mapping's address.
pub(crate) fn mmap_read_only(fd: BorrowedFd<'_>, len: usize) -> Result<*const u8, Errno> {
    // SAFETY: a fresh mapping at an address the kernel picks, so it
    // replaces nothing; `fd` is open for the borrow.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    Ok(p.cast())
}

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, offset)`: a fresh
/// read-write mapping at an address the kernel picks (`fd` `None`: anonymous,
/// `MAP_ANONYMOUS` is added). Returns its address.
pub(crate) fn mmap_read_write(
    len: usize,
    shared: bool,
    fd: Option<BorrowedFd<'_>>,
    offset: libc::off_t,
) -> Result<*mut u8, Errno> {
    let mut flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    if fd.is_none() {
        flags |= libc::MAP_ANONYMOUS;
    }
    // SAFETY: a fresh mapping at an address the kernel picks (NULL, no
    // MAP_FIXED), so it replaces nothing; `fd` is open for the borrow.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd.map_or(-1, |fd| fd.as_raw_fd()),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    Ok(p.cast())
}

/// `memfd_create(name, MFD_CLOEXEC)`, then `ftruncate(len)`: a new memory
/// file of `len` bytes (a hole: nothing allocated yet).
pub(crate) fn memfd(name: &std::ffi::CStr, len: libc::off_t) -> Result<OwnedFd, Errno> {
    // SAFETY: `name` is NUL-terminated; memfd_create returns a new descriptor.
    let fd = unsafe { own(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC).into())? };
    // SAFETY: ftruncate on a descriptor we own; integer arguments only.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(Errno::last());
    }
    Ok(fd)
}

/// Unmaps a mapping made by [`mmap_read_only`] or [`mmap_read_write`].
///
/// # Safety
///
/// `ptr` and `len` are such a mapping, and nothing uses it any more.
pub(crate) unsafe fn munmap(ptr: *const u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
}

#[cfg(feature = "firecracker")] // the handshake
/// `fstatfs(fd)`: the filesystem type (`f_type`).
pub(crate) fn fstatfs_type(fd: BorrowedFd<'_>) -> Result<i64, Errno> {
    // SAFETY: an all-zero `statfs` is a valid output buffer.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the borrow; `sfs` is a writable statfs.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut sfs) } < 0 {
        return Err(Errno::last());
    }
    #[allow(clippy::unnecessary_cast)] // `f_type`'s type differs between libcs
    Ok(sfs.f_type as i64)
}

#[cfg(feature = "firecracker")] // the handshake
/// `getsockopt(SO_PEERCRED)` on a connected Unix socket.
pub(crate) fn peer_cred(fd: BorrowedFd<'_>) -> Result<libc::ucred, Errno> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size; the kernel
    // writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(cred) }
}

#[cfg(feature = "firecracker")] // the handshake
/// One `recvmsg(fd, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)` into `buf` with room
/// for `max_fds` descriptors (the kernel closes any beyond and sets
/// `MSG_CTRUNC`): the bytes read and the message flags. Every descriptor
/// received is pushed to `fds`, owned, before anything else is looked at.
pub(crate) fn recvmsg_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
) -> Result<(usize, i32), Errno> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((max_fds * size_of::<libc::c_int>()) as u32) } as usize;
    // A u64 buffer keeps the control data aligned for cmsghdr.
    let mut ctrl = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value, and
    // it spares naming the padding fields some targets have.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (describing `buf`) and `ctrl`, both live
    // and writable for the call, with their true lengths.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    let n = count(n)?;
    // SAFETY: `msg` was filled by the kernel; the CMSG_* accessors walk
    // `ctrl` within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header returned by CMSG_FIRSTHDR/NXTHDR lies
        // inside `ctrl`.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let n_fds = (hdr.cmsg_len as usize).saturating_sub(header) / size_of::<libc::c_int>();
            // SAFETY: the data of this header holds `n_fds` ints, inside `ctrl`.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for k in 0..n_fds {
                // SAFETY: `k < n_fds`, inside the data; it may be unaligned
                // for c_int, hence read_unaligned.
                let raw = unsafe { data.add(k).read_unaligned() };
                if raw >= 0 {
                    // SAFETY: SCM_RIGHTS installed `raw` as a new fd in this
                    // process; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is a header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n, msg.msg_flags))
}

#[cfg(feature = "firecracker")] // the handshake
/// One `sendmsg(fd, MSG_NOSIGNAL)` of `bytes`, with `fds` as `SCM_RIGHTS`
/// when there are any: the bytes sent.
pub(crate) fn sendmsg_fds(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, Errno> {
    let fd_bytes = size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut ctrl = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: plain data; all-zero is a valid empty msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `ctrl` is aligned and `space` bytes long, room for one
        // header with `fd_bytes` of data: CMSG_FIRSTHDR is non-null and
        // CMSG_DATA points at `fd_bytes` writable bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (k, fd) in fds.iter().enumerate() {
                data.add(k).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov` (describing `bytes`, only read by
    // sendmsg) and `ctrl`, live for the call.
    count(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })
}
