//! Arbitrary bytes as a guest_memfd hand-over message (any length, meant to
//! be the 32-byte header) with 0..=3 fds.
//!
//! 1. `share::decode_header`, the pure validation `share::recv` applies
//!    before it looks at the fd: never a panic; `Ok` exactly when every
//!    documented rule holds (checked here independently), with the size
//!    and flags the bytes encode; otherwise `Error::Protocol`.
//! 2. The same bytes sent over a real socket pair with that many memfds
//!    attached, into `share::recv`: always refused (a memfd is never a
//!    guest_memfd) with `Error::Protocol`, and every received fd closed
//!    (the process's fd count may not grow).
//!
//! Input layout: byte 0 picks the fd count, the rest is the message.
#![no_main]

use kvm_gmem::{Error, GuestMemfdFlags, page_size, share};
use libfuzzer_sys::fuzz_target;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

fn oracle(b: &[u8], fds: usize) -> Option<(u64, u64)> {
    if b.len() != 32 || &b[..8] != b"KVMGMEM1" {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (size, flags) = (u64_at(16), u64_at(24));
    let ok = u32_at(8) == 1
        && u32_at(12) == 0
        && fds == 1
        && flags & !GuestMemfdFlags::all().bits() == 0
        && size != 0
        && size % page_size() == 0
        && size <= i64::MAX as u64;
    ok.then_some((size, flags))
}

struct Wire {
    a: UnixStream,
    b: UnixStream,
    memfds: Vec<OwnedFd>,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn wire() -> &'static Mutex<Wire> {
    static W: OnceLock<Mutex<Wire>> = OnceLock::new();
    W.get_or_init(|| {
        let (a, b) = UnixStream::pair().expect("socketpair");
        b.set_nonblocking(true).unwrap();
        let memfds = (0..3)
            .map(|_| {
                // SAFETY: a NUL-terminated name; memfd_create returns a new fd.
                let raw = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
                assert!(raw >= 0);
                // SAFETY: just created; nobody else owns it.
                unsafe { OwnedFd::from_raw_fd(raw) }
            })
            .collect();
        Mutex::new(Wire { a, b, memfds })
    })
}

/// One `sendmsg` of `bytes` with `fds` attached.
fn send(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
    let raws: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raws.is_empty() {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((raws.len() * 4) as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is aligned and at least `space` bytes
        // (64 >= CMSG_SPACE(12)): one header and `raws.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raws.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(raws.as_ptr(), libc::CMSG_DATA(c).cast(), raws.len());
        }
    }
    // SAFETY: `msg` describes `bytes` and the control buffer, alive for the
    // call; the fds are open.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(n, bytes.len() as isize);
}

fn drain(sock: &UnixStream) {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; the socket is non-blocking.
    while unsafe { libc::read(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let fds = usize::from(sel % 4);
    match (oracle(msg, fds), share::decode_header(msg, fds)) {
        (Some((size, flags)), Ok((s, f))) => assert_eq!((s, f.bits()), (size, flags)),
        (None, Err(Error::Protocol { op, what })) => {
            assert_eq!(op, "decode(guest_memfd header)");
            assert!(!what.is_empty());
        }
        (want, got) => panic!("oracle {want:?}, decoder {got:?}"),
    }

    if msg.is_empty() || msg.len() > 128 {
        return;
    }
    let w = wire().lock().unwrap_or_else(|e| e.into_inner());
    send(&w.a, msg, &w.memfds[..fds]);
    match share::recv(&w.b) {
        Err(Error::Protocol { op, .. }) => assert_eq!(op, "recvmsg(guest_memfd)"),
        other => panic!("a memfd hand-over was not refused as a protocol error: {other:?}"),
    }
    // An over-long message leaves bytes behind: drop them so that the next
    // run starts on a message boundary.
    drain(&w.b);
    check_fds();
});

/// Every received or created fd is closed: the fd count, sampled every 1024
/// runs from run 1024 on (after libFuzzer and the fixtures have settled),
/// may not grow. A leak of one fd per run would add a thousand; the slack
/// absorbs libFuzzer's own threads opening a file at the same moment.
fn check_fds() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static BASELINE: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    if !n.is_multiple_of(1024) {
        return;
    }
    let now = open_fds();
    if n == 1024 {
        BASELINE.store(now, Ordering::Relaxed);
        return;
    }
    let base = BASELINE.load(Ordering::Relaxed);
    assert!(
        now < base + 16,
        "fds leaked: {now} open, {base} after run 1024"
    );
}
