//! Handing a guest_memfd to another process over a Unix socket.
//!
//! The process that fills guest memory need not be the VMM: the VMM
//! [`send`]s the guest_memfd, a populator [`recv`]s it and runs
//! [`Populate::detached`](crate::populate::Populate::detached) on it. On a
//! stock Linux 6.18 kernel this works with the `MmapCopy` strategy.
//!
//! # Wire format
//!
//! One `sendmsg` on a connected `AF_UNIX` stream socket: a 32-byte header,
//! all integers little-endian, with exactly one fd in an `SCM_RIGHTS`
//! control message.
//!
//! | offset | size | field | value |
//! | --- | --- | --- | --- |
//! | 0 | 8 | magic | `b"KVMGMEM1"` |
//! | 8 | 4 | version | 1 |
//! | 12 | 4 | reserved | 0 |
//! | 16 | 8 | size | the guest_memfd's size in bytes: non-zero, a page multiple |
//! | 24 | 8 | flags | the `GUEST_MEMFD_FLAG_*` it was created with |
//!
//! [`recv`] trusts nothing in the message. It takes ownership of every fd
//! that arrives (closing all of them on any error; fds beyond what its
//! control buffer holds are closed by the kernel), and refuses with
//! [`Error::Protocol`] a peer that closed the connection, a truncated
//! message, a length other than 32, a wrong magic or version, a non-zero
//! reserved field, a number of fds other than one, flag bits this build does
//! not name, or a size that is zero or not page aligned. Then it checks that
//! the fd is a guest_memfd (see [identity](#identity)),
//! that its size is the announced one, and, when `MMAP` is announced, that a
//! page of it maps, and when `INIT_SHARED` is too, that the page can be
//! faulted in from the host (`MADV_POPULATE_READ`, which answers EFAULT
//! where an access would raise SIGBUS): a lying peer cannot make
//! [`GuestMemfd::map`] hand out a mapping that faults. That check faults the
//! first page in (allocating it, zero-filled, if it was a hole).
//!
//! # Identity
//!
//! A guest_memfd has no ioctl that names it, so [`recv`] identifies one by
//! the filesystem its inode lives on (`fstatfs`) together with the name
//! `/proc/self/fd/N` reads, and accepts the two forms the kernel has used:
//!
//! | Kernels | `f_type` | `/proc/self/fd/N` |
//! | --- | --- | --- |
//! | up to 6.18 | `ANON_INODE_FS_MAGIC` (`0x09041934`) | `anon_inode:[kvm-gmem]` |
//! | 7.x (guest_memfd's own pseudo filesystem) | `GUEST_MEMFD_MAGIC` (`0x474d454d`, "GMEM") | `/[kvm-gmem] (deleted)` |
//!
//! A memfd, a file, a socket or any other anonymous inode is refused; a file
//! named `[kvm-gmem]` on a real filesystem is refused by its `f_type`.
//! [`GuestMemfd::adopt`], for a guest_memfd that arrives as a bare fd
//! without this header, makes the same check.
//!
//! After a [`Error::Protocol`] the stream may be out of step with the peer
//! (an over-long message leaves bytes behind): drop the connection.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::gmem::{GuestMemfd, GuestMemfdFlags, MappingProbe, identify, probe_mapping};
use crate::sys::page_size;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// The header's magic.
const MAGIC: &[u8; 8] = b"KVMGMEM1";
/// The wire format's version.
const VERSION: u32 = 1;
/// The header's length.
const HEADER_LEN: usize = 32;
/// How many fds one message may bring in before the kernel truncates the
/// control data (the rest are closed by the kernel).
const MAX_FDS: usize = 16;
/// Sends `gmem` (the fd, its size and flags) on `socket`; see the
/// [module docs](self) for the wire format. The caller keeps its handle.
///
/// # Errors
///
/// [`Error::Kernel`] naming `sendmsg` when the kernel refuses (`EPIPE` when
/// the peer is gone: no SIGPIPE is raised).
///
/// # Examples
///
/// Both ends in one process, for brevity; in a VMM the other end belongs to
/// the populator (a socket pair made before spawning it, or a listening
/// socket):
///
/// ```
/// use kvm_gmem::{Extension, GuestMemfd, KvmDevice, VmOps, VmType, share};
/// use std::os::unix::net::UnixStream;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
/// if vm.extension(Extension::GUEST_MEMFD)? == 0 {
///     return Ok(()); // guest_memfd needs Linux 6.8
/// }
/// let gmem = GuestMemfd::builder(2 << 20).create(&vm)?;
/// let (vmm_end, populator_end) = UnixStream::pair()?;
/// share::send(&vmm_end, &gmem)?; // the VMM
/// let received = share::recv(&populator_end)?; // the populator
/// assert_eq!((received.size(), received.flags()), (gmem.size(), gmem.flags()));
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// `SCM_RIGHTS`: <https://man7.org/linux/man-pages/man7/unix.7.html>
pub fn send(socket: &UnixStream, gmem: &GuestMemfd) -> Result<()> {
    let op = "sendmsg(guest_memfd)";
    let header = encode(gmem.size(), gmem.flags().bits());
    let fd: i32 = gmem.as_raw_fd();
    let mut control = Control::new();
    let space = control.space(1);
    let mut iov = libc::iovec {
        iov_base: header.as_ptr().cast_mut().cast(),
        iov_len: header.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr();
    msg.msg_controllen = space as _;
    // SAFETY: `msg_control` points at `space` bytes of the aligned buffer,
    // room for one cmsghdr carrying one int (CMSG_SPACE(4)); CMSG_FIRSTHDR
    // returns its start, and CMSG_DATA points inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        libc::CMSG_DATA(cmsg).cast::<i32>().write_unaligned(fd);
    }
    let sent = loop {
        // SAFETY: `msg` describes the header (readable, 32 bytes) and the
        // control buffer built above; `fd` stays open for the call (borrowed
        // from `gmem`); the kernel only reads from both.
        let r = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            break r as usize;
        }
        match Errno::last() {
            Errno(libc::EINTR) => continue,
            e => return Err(Error::kernel(op, e)),
        }
    };
    // A stream socket may take part of the header; the fd went with it.
    let mut done = sent;
    while done < HEADER_LEN {
        // SAFETY: the rest of the header, readable for `HEADER_LEN - done` bytes.
        let r = unsafe {
            libc::send(
                socket.as_raw_fd(),
                header[done..].as_ptr().cast(),
                HEADER_LEN - done,
                libc::MSG_NOSIGNAL,
            )
        };
        if r > 0 {
            done += r as usize;
        } else if r < 0 && Errno::last() == Errno(libc::EINTR) {
            continue;
        } else {
            return Err(Error::kernel(
                op,
                if r < 0 {
                    Errno::last()
                } else {
                    Errno(libc::EPIPE)
                },
            ));
        }
    }
    Ok(())
}

/// Receives a guest_memfd sent with [`send`] from `socket`, after checking
/// everything the peer claims; see the [module docs](self).
///
/// # Errors
///
/// [`Error::Protocol`] naming what was wrong with the message or the fd
/// (every fd received is closed); [`Error::Kernel`] naming `recvmsg` when
/// the kernel refuses (e.g. `EAGAIN` on a non-blocking socket).
///
/// # Examples
///
/// Both ends in one process, for brevity; in a VMM the other end belongs to
/// the populator (a socket pair made before spawning it, or a listening
/// socket):
///
/// ```
/// use kvm_gmem::{Extension, GuestMemfd, KvmDevice, VmOps, VmType, share};
/// use std::os::unix::net::UnixStream;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
/// if vm.extension(Extension::GUEST_MEMFD)? == 0 {
///     return Ok(()); // guest_memfd needs Linux 6.8
/// }
/// let gmem = GuestMemfd::builder(2 << 20).create(&vm)?;
/// let (vmm_end, populator_end) = UnixStream::pair()?;
/// share::send(&vmm_end, &gmem)?; // the VMM
/// let received = share::recv(&populator_end)?; // the populator
/// assert_eq!((received.size(), received.flags()), (gmem.size(), gmem.flags()));
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// `SCM_RIGHTS`: <https://man7.org/linux/man-pages/man7/unix.7.html>
pub fn recv(socket: &UnixStream) -> Result<GuestMemfd> {
    let op = "recvmsg(guest_memfd)";
    // One byte more than the header, so an over-long message shows.
    let mut buf = [0u8; HEADER_LEN + 1];
    let mut control = Control::new();
    let space = control.space(MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr();
    let len = loop {
        msg.msg_controllen = space as _;
        msg.msg_flags = 0;
        // SAFETY: `msg` describes `buf` (writable, its length) and the
        // control buffer (writable, `space` bytes, cmsghdr-aligned); both
        // outlive the call.
        let r = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        match Errno::last() {
            Errno(libc::EINTR) => continue,
            e => return Err(Error::kernel(op, e)),
        }
    };
    // Own every fd before looking at anything else: dropping `fds` closes them.
    // SAFETY: `msg` was filled in by the successful recvmsg above.
    let fds = unsafe { take_fds(&msg) };
    check(op, &buf, len, msg.msg_flags, fds)
}

/// Validates one received message; `fds` are closed unless one is returned.
fn check(
    op: &'static str,
    buf: &[u8],
    len: usize,
    flags: i32,
    mut fds: Vec<OwnedFd>,
) -> Result<GuestMemfd> {
    let protocol = |what: String| Error::Protocol { op, what };
    if len == 0 && fds.is_empty() {
        return Err(protocol(
            "the peer closed the connection before sending a guest_memfd".into(),
        ));
    }
    if flags & libc::MSG_CTRUNC != 0 {
        return Err(protocol(format!(
            "control data truncated (MSG_CTRUNC): the peer sent more than {MAX_FDS} fds or other \
             ancillary data; all were closed"
        )));
    }
    if flags & libc::MSG_TRUNC != 0 {
        return Err(protocol("message truncated (MSG_TRUNC)".into()));
    }
    let (size, gmem_flags) = validate_header(op, &buf[..len.min(buf.len())], len, fds.len())?;
    let fd = fds.remove(0);
    verify_fd(op, fd.as_fd(), size, gmem_flags)?;
    Ok(GuestMemfd::from_parts(fd, size, gmem_flags))
}

/// Decodes and validates a hand-over message of `message.len()` bytes that
/// arrived with `fd_count` fds, applying every rule [`recv`] applies before
/// it looks at the fd itself: the announced size and flags, or
/// [`Error::Protocol`] (op `"decode(guest_memfd header)"`) naming the broken rule. Pure: no
/// system call. For fuzzing and property tests; not part of the stable API.
///
/// # Errors
///
/// [`Error::Protocol`]: a length other than 32, a wrong magic or version, a
/// non-zero reserved field, a fd count other than 1, flag bits this build
/// does not name, a size that is zero, not page aligned or past the largest
/// file size.
#[doc(hidden)]
pub fn decode_header(message: &[u8], fd_count: usize) -> Result<(u64, GuestMemfdFlags)> {
    validate_header(
        "decode(guest_memfd header)",
        message,
        message.len(),
        fd_count,
    )
}

/// The header rules; `len` is the received length (`recv` reads one byte
/// more than a header, so `len` tells a long message from an exact one).
fn validate_header(
    op: &'static str,
    buf: &[u8],
    len: usize,
    fd_count: usize,
) -> Result<(u64, GuestMemfdFlags)> {
    let protocol = |what: String| Error::Protocol { op, what };
    if len != HEADER_LEN {
        return Err(protocol(format!(
            "message of {len}{} bytes, the header is exactly {HEADER_LEN} (short or truncated message)",
            if len > HEADER_LEN { " or more" } else { "" }
        )));
    }
    let header = decode(buf);
    if header.magic != *MAGIC {
        return Err(protocol(format!(
            "wrong magic {:?}, expected {:?}",
            String::from_utf8_lossy(&header.magic),
            String::from_utf8_lossy(MAGIC)
        )));
    }
    if header.version != VERSION {
        return Err(protocol(format!(
            "wire format version {} is not supported (this build speaks {VERSION})",
            header.version
        )));
    }
    if header.reserved != 0 {
        return Err(protocol(format!(
            "reserved field is {:#x}, must be 0",
            header.reserved
        )));
    }
    if fd_count != 1 {
        return Err(protocol(format!(
            "{fd_count} fds came with the message, expected exactly 1; all were closed"
        )));
    }
    let unknown = header.flags & !GuestMemfdFlags::all().bits();
    if unknown != 0 {
        return Err(protocol(format!(
            "flags {:#x} hold bits {unknown:#x} that this build does not name \
             (it knows {}; RFC flags need their cargo feature)",
            header.flags,
            GuestMemfdFlags::all()
        )));
    }
    let page = page_size();
    if header.size == 0 || !header.size.is_multiple_of(page) {
        return Err(protocol(format!(
            "announced size {:#x} is not a non-zero multiple of the page size ({page:#x})",
            header.size
        )));
    }
    if header.size > i64::MAX as u64 {
        return Err(protocol(format!(
            "announced size {:#x} exceeds the largest file size ({:#x})",
            header.size,
            i64::MAX
        )));
    }
    Ok((header.size, GuestMemfdFlags::from_bits_retain(header.flags)))
}

/// Checks that `fd` is a guest_memfd of `size` bytes that honours `flags`'
/// mapping promises (the identity and mapping checks live with
/// [`GuestMemfd`], which [`GuestMemfd::adopt`] shares).
fn verify_fd(
    op: &'static str,
    fd: BorrowedFd<'_>,
    size: u64,
    flags: GuestMemfdFlags,
) -> Result<()> {
    let protocol = |what: String| Error::Protocol { op, what };
    let actual = identify(fd)?.map_err(protocol)?;
    if actual != size {
        return Err(protocol(format!(
            "announced size {size:#x} differs from the guest_memfd's size {actual:#x}"
        )));
    }
    if flags.contains(GuestMemfdFlags::MMAP) {
        let shared = flags.contains(GuestMemfdFlags::INIT_SHARED);
        probe_mapping(fd, shared).map_err(|p| {
            protocol(match p {
                MappingProbe::NoMmap(e) => {
                    format!("GUEST_MEMFD_FLAG_MMAP was announced, but mmap of the fd failed: {e}")
                }
                MappingProbe::Private(e) => format!(
                    "GUEST_MEMFD_FLAG_INIT_SHARED was announced, but the host cannot fault the \
                     guest_memfd's first page in ({e}): the memory is private"
                ),
            })
        })?;
    }
    Ok(())
}

/// Takes ownership of every fd in `msg`'s `SCM_RIGHTS` control messages.
///
/// # Safety
///
/// `msg` must have been filled in by a successful `recvmsg`, its control
/// buffer still alive: each fd in it is then a new descriptor that nothing
/// else owns.
unsafe fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: the caller guarantees `msg` and its control buffer are valid;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a header inside the buffer.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let n = (hdr.cmsg_len as usize).saturating_sub(header) / size_of::<i32>();
            // SAFETY: CMSG_DATA points at the payload of this header.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<i32>();
            for i in 0..n {
                // SAFETY: `i < n`, within the payload the kernel wrote; it may
                // be unaligned, hence read_unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                if raw >= 0 {
                    // SAFETY: SCM_RIGHTS installed `raw` in this process just
                    // now (with O_CLOEXEC from MSG_CMSG_CLOEXEC); the caller
                    // guarantees nobody else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: `cmsg` is a valid header in `msg`'s buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    fds
}

/// An aligned control-message buffer.
struct Control {
    buf: [u64; 16 + MAX_FDS / 2],
}

impl Control {
    fn new() -> Control {
        Control {
            buf: [0; 16 + MAX_FDS / 2],
        }
    }

    /// `CMSG_SPACE` for `n` fds, at most the buffer's size.
    fn space(&self, n: usize) -> usize {
        // SAFETY: CMSG_SPACE is a constant computation.
        let want = unsafe { libc::CMSG_SPACE((n * size_of::<i32>()) as u32) } as usize;
        want.min(size_of_val(&self.buf))
    }

    fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.buf.as_mut_ptr().cast()
    }
}

struct Header {
    magic: [u8; 8],
    version: u32,
    reserved: u32,
    size: u64,
    flags: u64,
}

fn encode(size: u64, flags: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&0u32.to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&flags.to_le_bytes());
    h
}

fn decode(b: &[u8]) -> Header {
    let mut h = [0u8; HEADER_LEN];
    let n = b.len().min(HEADER_LEN);
    h[..n].copy_from_slice(&b[..n]);
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[0..8]);
    Header {
        magic,
        version: u32_at(8),
        reserved: u32_at(12),
        size: u64_at(16),
        flags: u64_at(24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = encode(0x4000_0000, 3);
        assert_eq!(&h[0..8], b"KVMGMEM1");
        assert_eq!(&h[8..12], &[1, 0, 0, 0]);
        assert_eq!(&h[12..16], &[0; 4]);
        assert_eq!(&h[16..24], &0x4000_0000u64.to_le_bytes());
        assert_eq!(&h[24..32], &3u64.to_le_bytes());
        let d = decode(&h);
        assert_eq!(
            (&d.magic, d.version, d.reserved, d.size, d.flags),
            (MAGIC, 1, 0, 0x4000_0000, 3)
        );
    }

    #[test]
    fn control_buffer_holds_max_fds() {
        let c = Control::new();
        // SAFETY: CMSG_SPACE computes a size from an integer and reads
        // no memory.
        let want = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
        assert_eq!(c.space(MAX_FDS), want);
    }
}
