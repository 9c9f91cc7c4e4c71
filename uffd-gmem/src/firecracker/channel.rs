//! The secret-hiding branch's fault channel: after the handshake, the same
//! Unix socket carries length-prefixed bitcode 0.6 messages both ways.
//!
//! Every frame is a 4-byte little-endian payload length, then the payload:
//! the `bitcode` 0.6 encoding (bitcode's own `Encode`/`Decode` derive, not
//! serde) of a [`FaultRequest`] (Firecracker to the handler) or a
//! [`FaultReply`] (the handler to Firecracker). The field order and types are
//! Firecracker's, so the bytes are Firecracker's.
//!
//! [`FaultChannel`] reads and writes whole frames on a blocking or a
//! non-blocking socket (Firecracker makes its end non-blocking): a partial
//! read or write is continued after `poll`. A frame length of zero or above
//! [`MAX_FRAME`], a payload that is not the message, and a peer that closes
//! the socket in the middle of a frame are [`Error::Protocol`]s (op
//! [`CHANNEL_OP`]); nothing on the wire can make it panic or allocate more
//! than [`MAX_FRAME`] bytes. A peer that closes the socket between frames is
//! `Ok(None)`.

use crate::error::{Errno, Error, Result};
use crate::sys;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

/// The operation named in the fault channel's [`Error::Protocol`] errors.
pub const CHANNEL_OP: &str = "firecracker fault channel";

/// The largest payload a frame may announce, in bytes. Either message
/// encodes to a few dozen bytes; a length above this is refused before
/// anything is allocated for it.
pub const MAX_FRAME: u32 = 4096;

/// The frame header: the payload length, `u32` little-endian.
pub const FRAME_HEADER: usize = 4;

/// A fault Firecracker asks the handler to resolve (`FaultRequest` in
/// Firecracker's `uffd_broker.rs`, field for field).
///
/// On the sync vCPU path (a vCPU exited with `KVM_MEMORY_EXIT_FLAG_USERFAULT`)
/// Firecracker sends `offset = 0` and `gpa = Some(page-aligned guest physical
/// address)`.
///
/// # Examples
///
/// ```
/// use uffd_gmem::firecracker::FaultRequest;
///
/// let req = FaultRequest::sync(2, 0x10_3000, 1 << 4);
/// let frame = req.to_frame();
/// assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
/// assert_eq!(FaultRequest::from_frame(&frame)?, Some((req, frame.len())));
/// assert_eq!(FaultRequest::from_frame(&frame[..3])?, None); // incomplete
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bitcode::Encode, bitcode::Decode)]
pub struct FaultRequest {
    /// The faulting vCPU's index.
    pub vcpu: u32,
    /// A file offset (guest_memfd / snapshot); 0 on the sync path, which
    /// gives `gpa`.
    pub offset: u64,
    /// `KVM_MEMORY_EXIT_FLAG_*` of the exit (`USERFAULT` = 1 << 4, `APF` =
    /// 1 << 5 on the async path).
    pub flags: u64,
    /// The faulting guest physical address, page aligned.
    pub gpa: Option<u64>,
}

/// The handler's answer to a [`FaultRequest`] (`FaultReply` in Firecracker's
/// `uffd_broker.rs`, field for field). Firecracker wakes the vCPU named by
/// `vcpu`.
///
/// # Examples
///
/// ```
/// use uffd_gmem::firecracker::{FaultReply, FaultRequest};
///
/// let req = FaultRequest::sync(1, 0x20_0000, 1 << 4);
/// let reply = FaultReply::for_request(&req, 0x8_0000, 4096);
/// assert_eq!((reply.vcpu, reply.gpa, reply.flags), (Some(1), Some(0x20_0000), 1 << 4));
/// assert_eq!((reply.offset, reply.len, reply.zero), (0x8_0000, 4096, false));
/// let frame = reply.to_frame();
/// assert_eq!(FaultReply::from_frame(&frame)?, Some((reply, frame.len())));
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bitcode::Encode, bitcode::Decode)]
pub struct FaultReply {
    /// The vCPU to wake (the request's, echoed).
    pub vcpu: Option<u32>,
    /// The file offset of what was populated.
    pub offset: u64,
    /// The length populated, in bytes.
    pub len: u64,
    /// The request's flags, echoed.
    pub flags: u64,
    /// The request's guest physical address, echoed.
    pub gpa: Option<u64>,
    /// Whether the range was populated with zeroes rather than snapshot
    /// contents.
    pub zero: bool,
}

impl FaultRequest {
    /// A sync-path request: `offset` 0, `gpa` given.
    pub fn sync(vcpu: u32, gpa: u64, flags: u64) -> FaultRequest {
        FaultRequest {
            vcpu,
            offset: 0,
            flags,
            gpa: Some(gpa),
        }
    }

    /// The whole frame: the length prefix, then the bitcode payload.
    pub fn to_frame(&self) -> Vec<u8> {
        frame(self)
    }

    /// Decodes the frame at the start of `buf`: the request and the bytes
    /// the frame took, or `None` while `buf` holds less than a whole frame.
    /// Pure, for callers that buffer the stream themselves.
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] (op [`CHANNEL_OP`]) for a length of 0 or above
    /// [`MAX_FRAME`] (as soon as the header is complete), or a payload that
    /// is not exactly one encoded [`FaultRequest`].
    pub fn from_frame(buf: &[u8]) -> Result<Option<(FaultRequest, usize)>> {
        parse_frame(buf, "FaultRequest")
    }
}

impl FaultReply {
    /// The reply to `req` after populating `len` bytes at file offset
    /// `offset`: `vcpu`, `flags` and `gpa` echoed, `zero` false.
    pub fn for_request(req: &FaultRequest, offset: u64, len: u64) -> FaultReply {
        FaultReply {
            vcpu: Some(req.vcpu),
            offset,
            len,
            flags: req.flags,
            gpa: req.gpa,
            zero: false,
        }
    }

    /// The whole frame: the length prefix, then the bitcode payload.
    pub fn to_frame(&self) -> Vec<u8> {
        frame(self)
    }

    /// As [`FaultRequest::from_frame`], for a reply.
    ///
    /// # Errors
    ///
    /// As [`FaultRequest::from_frame`].
    pub fn from_frame(buf: &[u8]) -> Result<Option<(FaultReply, usize)>> {
        parse_frame(buf, "FaultReply")
    }
}

fn protocol(what: impl Into<String>) -> Error {
    Error::Protocol {
        op: CHANNEL_OP,
        what: what.into(),
    }
}

fn frame<T: bitcode::Encode>(msg: &T) -> Vec<u8> {
    let payload = bitcode::encode(msg);
    // Both messages encode to a few dozen bytes: far below MAX_FRAME.
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks a frame header: the payload length it announces.
fn check_len(header: [u8; FRAME_HEADER], what: &str) -> Result<usize> {
    let len = u32::from_le_bytes(header);
    if len == 0 {
        return Err(protocol(format!(
            "{what} frame: payload length 0 (a frame holds at least one byte of bitcode)"
        )));
    }
    if len > MAX_FRAME {
        // The secret-hiding branch also sends `no_exitless_apf` /
        // `exitless_apf:<N>` as plain text on this socket: say so.
        let hint = if header.iter().all(|b| b.is_ascii_graphic()) {
            format!(
                " (the header reads as text \"{}\": an unframed message such as Firecracker's \
                 exitless-APF announcement, which the fault channel does not read)",
                String::from_utf8_lossy(&header)
            )
        } else {
            String::new()
        };
        return Err(protocol(format!(
            "{what} frame: payload length {len} exceeds MAX_FRAME ({MAX_FRAME}){hint}"
        )));
    }
    Ok(len as usize)
}

fn decode<T: bitcode::DecodeOwned>(payload: &[u8], what: &str) -> Result<T> {
    bitcode::decode(payload).map_err(|e| {
        let n = payload.len().min(16);
        let hex: String = payload[..n].iter().map(|b| format!("{b:02x}")).collect();
        let more = if payload.len() > n { "..." } else { "" };
        protocol(format!(
            "{what} frame: the {}-byte payload is not a bitcode 0.6 {what} ({e}; payload \
             {hex}{more})",
            payload.len()
        ))
    })
}

fn parse_frame<T: bitcode::DecodeOwned>(buf: &[u8], what: &str) -> Result<Option<(T, usize)>> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER>() else {
        return Ok(None);
    };
    let len = check_len(*header, what)?;
    let Some(payload) = buf[FRAME_HEADER..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode(payload, what)?, FRAME_HEADER + len)))
}

/// Firecracker's secret-hiding fault channel over the handshake's socket,
/// which stays open after [`Handshake::recv`](super::Handshake::recv).
///
/// Each call moves one whole frame; it blocks (with `poll` on a
/// non-blocking socket) until the frame is through. Senders are serialized
/// with each other, and receivers with each other, so one thread may
/// receive while others send. After an error in the middle of a frame the
/// direction is out of step with the peer and refuses further frames:
/// drop the channel.
///
/// # Examples
///
/// Both ends in one process (Firecracker would hold the other end):
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use uffd_gmem::firecracker::{FaultChannel, FaultReply, FaultRequest};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let (vmm, handler) = UnixStream::pair().unwrap();
/// vmm.set_nonblocking(true).unwrap(); // as Firecracker does
/// let (vmm, handler) = (FaultChannel::new(vmm), FaultChannel::new(handler));
///
/// vmm.send_request(&FaultRequest::sync(0, 0x10_0000, 1 << 4))?;
/// let req = handler.recv_request()?.expect("a request");
/// assert_eq!(req.gpa, Some(0x10_0000));
/// // ... populate the page, clear its userfault bit ...
/// handler.send_reply(&FaultReply::for_request(&req, 0x10_0000, 4096))?;
/// let reply = vmm.recv_reply()?.expect("a reply");
/// assert_eq!((reply.vcpu, reply.len), (Some(0), 4096));
///
/// drop(vmm); // Firecracker went away: end of stream, between frames
/// assert_eq!(handler.recv_request()?, None);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FaultChannel {
    stream: UnixStream,
    /// Held for a whole frame; `true` once a frame was cut short.
    send: Mutex<bool>,
    /// As `send`, for receiving.
    recv: Mutex<bool>,
}

impl FaultChannel {
    /// Wraps the connected stream (blocking or not; its mode is left as it
    /// is).
    pub fn new(stream: UnixStream) -> FaultChannel {
        FaultChannel {
            stream,
            send: Mutex::new(false),
            recv: Mutex::new(false),
        }
    }

    /// The socket, e.g. to `poll` it with other descriptors.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the socket back.
    pub fn into_inner(self) -> UnixStream {
        self.stream
    }

    /// Sends one [`FaultRequest`] frame (Firecracker's side; for tests and
    /// demos).
    ///
    /// # Errors
    ///
    /// As [`FaultChannel::send_reply`].
    pub fn send_request(&self, req: &FaultRequest) -> Result<()> {
        self.send_frame(&req.to_frame(), "send_request")
    }

    /// Sends one [`FaultReply`] frame.
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`] naming `sendmsg` (`EPIPE` once the peer is gone;
    /// no `SIGPIPE` is raised) or `poll`; [`Error::Protocol`] when an earlier
    /// send stopped in the middle of a frame.
    pub fn send_reply(&self, reply: &FaultReply) -> Result<()> {
        self.send_frame(&reply.to_frame(), "send_reply")
    }

    /// Receives one [`FaultRequest`]; `None` when the peer closed the socket
    /// between frames.
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] (op [`CHANNEL_OP`]): a length of 0 or above
    /// [`MAX_FRAME`]; a payload that is not a [`FaultRequest`]; the peer
    /// closed the socket in the middle of a frame; an earlier receive stopped
    /// in the middle of a frame. [`Error::Kernel`] naming `recvmsg` or
    /// `poll`; [`Error::Poll`] if the descriptor is not open.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// use std::os::unix::net::UnixStream;
    /// use uffd_gmem::Error;
    /// use uffd_gmem::firecracker::{CHANNEL_OP, FaultChannel};
    ///
    /// let (mut vmm, handler) = UnixStream::pair().unwrap();
    /// vmm.write_all(&u32::MAX.to_le_bytes()).unwrap(); // 4 GiB announced
    /// let e = FaultChannel::new(handler).recv_request().unwrap_err();
    /// assert!(matches!(e, Error::Protocol { op: CHANNEL_OP, .. }), "{e}");
    /// ```
    pub fn recv_request(&self) -> Result<Option<FaultRequest>> {
        self.recv_frame("FaultRequest")
    }

    /// Receives one [`FaultReply`] (Firecracker's side; for tests and
    /// demos); `None` when the peer closed the socket between frames.
    ///
    /// # Errors
    ///
    /// As [`FaultChannel::recv_request`].
    pub fn recv_reply(&self) -> Result<Option<FaultReply>> {
        self.recv_frame("FaultReply")
    }

    fn lock(m: &Mutex<bool>) -> MutexGuard<'_, bool> {
        // A panic while holding the lock cannot leave the flag half-written.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_frame(&self, frame: &[u8], call: &str) -> Result<()> {
        let mut broken = Self::lock(&self.send);
        if *broken {
            return Err(protocol(format!(
                "{call}: an earlier send stopped in the middle of a frame; the stream is out of \
                 step"
            )));
        }
        let fd = self.stream.as_fd();
        let mut sent = 0;
        while sent < frame.len() {
            match sys::sendmsg_fds(fd, &frame[sent..], &[]) {
                Ok(n) => sent += n,
                Err(Errno(libc::EINTR)) => {}
                Err(Errno(libc::EAGAIN)) => {
                    if let Err(e) = wait(fd, libc::POLLOUT) {
                        *broken = sent > 0;
                        return Err(e);
                    }
                }
                Err(e) => {
                    *broken = sent > 0;
                    return Err(Error::kernel("sendmsg(firecracker fault channel)", e));
                }
            }
        }
        Ok(())
    }

    fn recv_frame<T: bitcode::DecodeOwned>(&self, what: &str) -> Result<Option<T>> {
        let mut broken = Self::lock(&self.recv);
        if *broken {
            return Err(protocol(format!(
                "{what} frame: an earlier receive stopped in the middle of a frame; the stream \
                 is out of step"
            )));
        }
        let fd = self.stream.as_fd();
        // Bytes of this frame consumed: an error after the first leaves the
        // stream mid-frame.
        let mut consumed = 0;
        let mut header = [0u8; FRAME_HEADER];
        let r = (|| {
            if !read_exact(fd, &mut header, &mut consumed, what)? {
                return Ok(None);
            }
            let len = check_len(header, what)?;
            let mut payload = [0u8; MAX_FRAME as usize];
            read_exact(fd, &mut payload[..len], &mut consumed, what)?;
            // A payload that does not decode was read whole: the stream is
            // still in step.
            Ok(Some(decode(&payload[..len], what)))
        })();
        match r {
            Ok(None) => Ok(None),
            Ok(Some(msg)) => msg.map(Some),
            Err(e) => {
                *broken = consumed > 0;
                Err(e)
            }
        }
    }
}

impl AsFd for FaultChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Waits for `events` on `fd`.
fn wait(fd: BorrowedFd<'_>, events: i16) -> Result<()> {
    let mut p = [sys::pollfd(fd, events)];
    match sys::poll(&mut p, -1) {
        Ok(_) if p[0].revents & libc::POLLNVAL != 0 => Err(Error::Poll {
            op: "poll(firecracker fault channel)",
            revents: p[0].revents,
        }),
        // POLLHUP / POLLERR: the next recvmsg / sendmsg reports it.
        Ok(_) | Err(Errno(libc::EINTR)) => Ok(()),
        Err(e) => Err(Error::kernel("poll(firecracker fault channel)", e)),
    }
}

/// Fills `buf` from `fd`, counting into `consumed` the bytes of the frame
/// read so far. `Ok(false)` when the peer closed the socket before the
/// frame's first byte; end of stream anywhere else is a protocol error.
fn read_exact(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    consumed: &mut usize,
    what: &str,
) -> Result<bool> {
    let mut got = 0;
    // Fds that ride along (Firecracker sends none here) are closed: no room
    // is made for them.
    let mut stray = Vec::new();
    while got < buf.len() {
        match sys::recvmsg_fds(fd, &mut buf[got..], 0, &mut stray) {
            Ok((0, _)) if *consumed == 0 => return Ok(false),
            Ok((0, _)) => {
                return Err(protocol(format!(
                    "{what} frame: the peer closed the socket in the middle of the frame, after \
                     {consumed} bytes"
                )));
            }
            Ok((n, _)) => {
                got += n;
                *consumed += n;
            }
            Err(Errno(libc::EINTR)) => {}
            Err(Errno(libc::EAGAIN)) => wait(fd, libc::POLLIN)?,
            Err(e) => return Err(Error::kernel("recvmsg(firecracker fault channel)", e)),
        }
        stray.clear();
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_rules() {
        assert!(check_len(0u32.to_le_bytes(), "FaultRequest").is_err());
        assert_eq!(check_len(MAX_FRAME.to_le_bytes(), "x").unwrap(), 4096);
        assert!(check_len((MAX_FRAME + 1).to_le_bytes(), "x").is_err());
        let e = check_len(*b"no_e", "FaultRequest").unwrap_err();
        assert!(e.to_string().contains("exitless-APF"), "{e}");
    }

    #[test]
    fn parse_frame_needs_the_whole_frame() {
        let f = FaultRequest::sync(1, 0x1000, 16).to_frame();
        for cut in 0..f.len() {
            assert_eq!(
                FaultRequest::from_frame(&f[..cut]).unwrap(),
                None,
                "cut {cut}"
            );
        }
        let mut two = f.clone();
        two.extend_from_slice(&f);
        let (req, used) = FaultRequest::from_frame(&two).unwrap().unwrap();
        assert_eq!((req.vcpu, used), (1, f.len()));
    }
}
