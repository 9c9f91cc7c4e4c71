//! `kvm_gmem::share` on the real kernel: a guest_memfd sent to a separate
//! process (this test binary, re-executed) is populated there and read back
//! here; hostile peers are refused with `Error::Protocol`, with every fd
//! they sent closed.
//!
//! Tests need `/dev/kvm`; without it they print `SKIP` and pass, except under
//! `CI=true`, where that is a failure. They also need guest_memfd with
//! MMAP|INIT_SHARED: where the kernel lacks it they print `SKIP <test>:
//! <capability> = <value> on <kernel>` and pass. Every test holds the file-wide lock
//! (`common::lock`): some count this process's fds, and one clears
//! `FD_CLOEXEC` on a socket for a spawn.

#![allow(unsafe_code)]

mod common;

use common::{gmem, gmem_vm_or_skip, header, lock, open_fds, shared};
use kvm_gmem::populate::{Populate, Source, Strategy};
use kvm_gmem::share;
use kvm_gmem::{Error, GuestMemfd, GuestMemfdFlags};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CHILD_SIZE: u64 = 64 << 20;
const SOCK_ENV: &str = "GMEM_TEST_SOCK_FD";

/// Byte `i` of the pattern the child writes.
fn pat(i: u64) -> u8 {
    (i.wrapping_add(0x3c6e_f372)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> 56) as u8
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor.
    let raw = unsafe { libc::memfd_create(c"not-a-gmem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on the descriptor just created.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

/// One `sendmsg` of `bytes` with `fds` in SCM_RIGHTS (none: no control data).
fn raw_send(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raws: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut control = vec![0u64; 64];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raws.is_empty() {
        // SAFETY: CMSG_SPACE is a constant computation.
        let space = unsafe { libc::CMSG_SPACE((raws.len() * 4) as u32) } as usize;
        assert!(space <= control.len() * 8);
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is 8-aligned and `space` bytes long,
        // room for one header and `raws.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raws.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(
                raws.as_ptr(),
                libc::CMSG_DATA(c).cast::<i32>(),
                raws.len(),
            );
        }
    }
    // SAFETY: `msg` describes `bytes` and the control buffer, both alive for
    // the call; the fds are open (borrowed).
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(
        r,
        bytes.len() as isize,
        "sendmsg: {}",
        std::io::Error::last_os_error()
    );
}

fn good(size: u64, flags: GuestMemfdFlags) -> Vec<u8> {
    header(b"KVMGMEM1", 1, 0, size, flags.bits())
}

fn expect_protocol(test: &str, case: &str, r: kvm_gmem::Result<GuestMemfd>, needle: &str) {
    match r {
        Err(Error::Protocol { what, .. }) => {
            println!("{test}: {case}: {what}");
            assert!(
                what.contains(needle),
                "{test}: {case}: {what:?} lacks {needle:?}"
            );
        }
        Err(e) => panic!("{test}: {case}: expected Error::Protocol, got {e:?}"),
        Ok(g) => panic!("{test}: {case}: accepted {g:?}"),
    }
}

/// The child's entry point: runs only when re-executed by
/// `populated_by_a_separate_process` (which sets `GMEM_TEST_SOCK_FD`).
#[test]
#[ignore = "child entry point of share::populated_by_a_separate_process"]
fn populator_child() {
    let Ok(fd) = std::env::var(SOCK_ENV) else {
        eprintln!("populator_child: {SOCK_ENV} not set; nothing to do outside the parent test");
        return;
    };
    let raw: i32 = fd.parse().expect("GMEM_TEST_SOCK_FD is an fd number");
    // SAFETY: the parent passed this descriptor (inherited over exec) for
    // this process to own; nothing else in the child uses it.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let gmem = share::recv(&sock).expect("share::recv");
    let src: Vec<u8> = (0..gmem.size()).map(pat).collect();
    let report = Populate::detached(&gmem)
        .run(0..gmem.size(), Source::bytes(&src))
        .expect("populate in the child");
    println!("populator_child (pid {}): {report:?}", std::process::id());
    assert_eq!(report.strategy, Strategy::MmapCopy);
    use std::io::Write;
    (&sock).write_all(b"d").expect("write done");
}

#[test]
fn populated_by_a_separate_process() {
    let _g = lock();
    let test = "populated_by_a_separate_process";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let fds = open_fds();
    let g = gmem(&vm, CHILD_SIZE, shared());
    let (parent, child_end) = UnixStream::pair().expect("socketpair");
    // The child's end must survive exec: clear FD_CLOEXEC for the spawn only
    // (the lock keeps other tests of this binary from spawning meanwhile).
    // SAFETY: F_SETFD on a descriptor we own changes only its flags.
    let r = unsafe { libc::fcntl(child_end.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(r, 0, "fcntl(F_SETFD)");
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--ignored", "--exact", "populator_child", "--nocapture"])
        .env(SOCK_ENV, child_end.as_raw_fd().to_string())
        .spawn()
        .expect("spawn the populator child");
    drop(child_end);
    share::send(&parent, &g).expect("share::send");

    let deadline = Instant::now() + Duration::from_secs(60);
    parent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut done = [0u8; 1];
    let got = (&parent).read(&mut done);
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{test}: the child did not finish within 60 s (killed)");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(status.success(), "{test}: child failed: {status}");
    assert!(
        matches!(got, Ok(1)) && done == *b"d",
        "{test}: no done byte: {got:?}"
    );

    let map = g.map().expect("map");
    let mut buf = vec![0u8; MIB as usize];
    for at in (0..CHILD_SIZE).step_by(MIB as usize) {
        map.read_at(at, &mut buf).expect("read_at");
        for (k, &b) in buf.iter().enumerate() {
            let pos = at + k as u64;
            assert_eq!(b, pat(pos), "{test}: byte at offset {pos:#x}");
        }
    }
    drop((map, g, parent));
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}

#[test]
fn send_and_recv_in_one_process() {
    let _g = lock();
    let test = "send_and_recv_in_one_process";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let fds = open_fds();
    {
        let g = gmem(&vm, 2 * MIB, shared());
        let (a, b) = UnixStream::pair().expect("socketpair");
        share::send(&a, &g).expect("send");
        let r = share::recv(&b).expect("recv");
        assert_eq!(r.size(), 2 * MIB);
        assert_eq!(r.flags(), shared());
        // The same memory: a write through one mapping shows in the other.
        let (m1, m2) = (g.map().expect("map"), r.map().expect("map"));
        m1.write_at(0x1234, b"shared").expect("write");
        let mut buf = [0u8; 6];
        m2.read_at(0x1234, &mut buf).expect("read");
        assert_eq!(&buf, b"shared");
        // Received with close-on-exec.
        // SAFETY: F_GETFD on a descriptor we own reads its flags.
        let fl = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETFD) };
        assert!(
            fl >= 0 && fl & libc::FD_CLOEXEC != 0,
            "{test}: received fd lacks FD_CLOEXEC"
        );

        // A guest_memfd without MMAP travels too.
        let plain = gmem(&vm, MIB, GuestMemfdFlags::empty());
        share::send(&a, &plain).expect("send");
        let r = share::recv(&b).expect("recv");
        assert_eq!((r.size(), r.flags()), (MIB, GuestMemfdFlags::empty()));
    }
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}

#[test]
fn hostile_peers_are_refused_without_leaks() {
    let _g = lock();
    let test = "hostile_peers_are_refused_without_leaks";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let fds = open_fds();
    {
        let size = 2 * MIB;
        let g = gmem(&vm, size, shared());
        let g2 = gmem(&vm, size, shared());
        let private = gmem(&vm, size, GuestMemfdFlags::MMAP);
        let unmappable = gmem(&vm, size, GuestMemfdFlags::empty());
        let mfd = memfd(size);
        let (a, b) = UnixStream::pair().expect("socketpair");
        let ok = good(size, shared());
        let fd = g.as_fd();

        raw_send(&a, &ok, &[]);
        expect_protocol(test, "no fd", share::recv(&b), "0 fds");

        raw_send(&a, &ok, &[fd, g2.as_fd()]);
        expect_protocol(test, "two fds", share::recv(&b), "2 fds");

        let many: Vec<BorrowedFd<'_>> = (0..40).map(|_| fd).collect();
        raw_send(&a, &ok, &many);
        expect_protocol(test, "40 fds", share::recv(&b), "MSG_CTRUNC");

        raw_send(&a, &ok, &[mfd.as_fd()]);
        expect_protocol(test, "a memfd", share::recv(&b), "not a guest_memfd");

        raw_send(&a, &good(2 * size, shared()), &[fd]);
        expect_protocol(test, "wrong size", share::recv(&b), "differs");

        raw_send(&a, &ok[..16], &[fd]);
        expect_protocol(test, "truncated", share::recv(&b), "short or truncated");

        // An over-long message leaves bytes in the stream: use a fresh pair
        // (after any Protocol error the connection is to be dropped).
        let (a2, b2) = UnixStream::pair().expect("socketpair");
        let mut long = ok.clone();
        long.extend_from_slice(&[0; 8]);
        raw_send(&a2, &long, &[fd]);
        expect_protocol(test, "too long", share::recv(&b2), "or more");
        drop((a2, b2));

        raw_send(&a, &header(b"KVMGMEM2", 1, 0, size, 3), &[fd]);
        expect_protocol(test, "magic", share::recv(&b), "magic");

        raw_send(&a, &header(b"KVMGMEM1", 2, 0, size, 3), &[fd]);
        expect_protocol(test, "version", share::recv(&b), "version 2");

        raw_send(&a, &header(b"KVMGMEM1", 1, 7, size, 3), &[fd]);
        expect_protocol(test, "reserved", share::recv(&b), "reserved");

        raw_send(&a, &header(b"KVMGMEM1", 1, 0, size, 3 | 1 << 40), &[fd]);
        expect_protocol(test, "unknown flag", share::recv(&b), "does not name");

        raw_send(&a, &header(b"KVMGMEM1", 1, 0, 0, 3), &[fd]);
        expect_protocol(test, "size 0", share::recv(&b), "page size");

        raw_send(&a, &header(b"KVMGMEM1", 1, 0, size - 1, 3), &[fd]);
        expect_protocol(test, "unaligned size", share::recv(&b), "page size");

        raw_send(&a, &good(size, shared()), &[private.as_fd()]);
        expect_protocol(test, "INIT_SHARED claimed", share::recv(&b), "private");

        raw_send(
            &a,
            &good(size, GuestMemfdFlags::MMAP),
            &[unmappable.as_fd()],
        );
        expect_protocol(
            test,
            "MMAP claimed",
            share::recv(&b),
            "mmap of the fd failed",
        );

        // The connection still works after all that.
        share::send(&a, &g).expect("send");
        assert_eq!(share::recv(&b).expect("recv").size(), size);

        drop(a);
        expect_protocol(test, "peer closed", share::recv(&b), "peer closed");
    }
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}
