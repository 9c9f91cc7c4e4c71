//! `GuestMemfd::adopt` and `GuestMemfd::adopt_with_flags`: a guest_memfd
//! that arrives as a bare fd is recognised, its size read and its flags
//! reported no more than verified; every other kind of fd is refused with
//! `Error::Invalid` and closed.
//!
//! The refusals need no KVM. The rest needs `/dev/kvm` (without it: `SKIP`,
//! a failure under `CI=true`) and guest_memfd (a capability `SKIP` where the
//! kernel lacks it). Every test holds the file-wide lock (`common::lock`):
//! they count this process's fds.

#![allow(unsafe_code)]

mod common;

use common::{gmem, gmem_vm_or_skip, kvm_or_skip, lock, open_fds, page, shared};
use kvm_gmem::{Error, GuestMemfd, GuestMemfdFlags, VmOps, VmType};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A new fd from a libc call that returns one (checked).
fn own(raw: i32, what: &str) -> OwnedFd {
    assert!(raw >= 0, "{what}: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` was just returned by the call and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Whether `e` is the typed refusal of a fd that is not a guest_memfd.
fn is_not_gmem(e: &Error, op: &str) -> bool {
    matches!(e, Error::Invalid { op: o, rule } if *o == op && rule.contains("not a guest_memfd"))
}

/// Every kind of fd a handler might be handed by mistake, with its name.
fn wrong_kinds() -> Vec<(&'static str, OwnedFd)> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("kvm-gmem-adopt-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; page() as usize]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // SAFETY: a NUL-terminated name; the result is checked by `own`.
    let memfd = own(
        unsafe { libc::memfd_create(c"[kvm-gmem]".as_ptr(), libc::MFD_CLOEXEC) },
        "memfd_create",
    );
    // SAFETY: integer arguments; the result is checked by `own`.
    let eventfd = own(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }, "eventfd");
    let (sock, _) = UnixStream::pair().unwrap();
    vec![
        ("a regular file", file.into()),
        ("a memfd named [kvm-gmem]", memfd),
        ("an eventfd (another anonymous inode)", eventfd),
        ("a socket", sock.into()),
        (
            "/dev/null",
            std::fs::File::open("/dev/null").unwrap().into(),
        ),
        ("a directory", std::fs::File::open(&dir).unwrap().into()),
    ]
}

#[test]
fn wrong_kinds_are_refused_and_closed() {
    let _guard = lock();
    let before = open_fds();
    for (what, fd) in wrong_kinds() {
        let e = GuestMemfd::adopt(fd).unwrap_err();
        assert!(is_not_gmem(&e, "GuestMemfd::adopt"), "{what}: {e}");
        assert_eq!(e.errno().map(|e| e.0), Some(libc::EINVAL), "{what}");
    }
    for (what, fd) in wrong_kinds() {
        let e = GuestMemfd::adopt_with_flags(fd, GuestMemfdFlags::empty()).unwrap_err();
        assert!(
            is_not_gmem(&e, "GuestMemfd::adopt_with_flags"),
            "{what}: {e}"
        );
    }
    assert_eq!(open_fds(), before, "a refused fd was left open");
}

/// The refused fd itself is closed: the only write end of a pipe, adopted
/// and refused, leaves the read end at end of file.
#[test]
fn a_refused_fd_is_closed() {
    let _guard = lock();
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read, write) = (own(fds[0], "pipe2"), own(fds[1], "pipe2"));
    let e = GuestMemfd::adopt(write).unwrap_err();
    assert!(is_not_gmem(&e, "GuestMemfd::adopt"), "{e}");
    assert!(e.to_string().contains("pipe:"), "names what the fd is: {e}");
    let mut buf = [0u8; 1];
    let n = std::fs::File::from(read).read(&mut buf).unwrap();
    assert_eq!(n, 0, "the write end is still open somewhere");
}

#[test]
fn kvm_fds_are_not_guest_memfds() {
    let _guard = lock();
    let Some(kvm) = kvm_or_skip("kvm_fds_are_not_guest_memfds") else {
        return;
    };
    let before = open_fds();
    let vm = kvm.create_vm(VmType::DEFAULT).unwrap();
    for (what, fd) in [
        ("/dev/kvm", kvm.as_fd_owned()),
        ("a VM fd (anon_inode:kvm-vm)", OwnedFd::from(vm)),
    ] {
        let e = GuestMemfd::adopt(fd).unwrap_err();
        assert!(is_not_gmem(&e, "GuestMemfd::adopt"), "{what}: {e}");
    }
    assert_eq!(open_fds(), before);
}

/// `try_clone` for the KVM device handle (the test keeps its own).
trait OwnedClone {
    fn as_fd_owned(&self) -> OwnedFd;
}

impl<T: AsRawFd> OwnedClone for T {
    fn as_fd_owned(&self) -> OwnedFd {
        // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (checked by `own`).
        own(
            unsafe { libc::fcntl(self.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) },
            "F_DUPFD_CLOEXEC",
        )
    }
}

#[test]
fn adopts_a_guest_memfd_with_its_size_and_verified_flags() {
    let _guard = lock();
    let Some((_kvm, vm)) = gmem_vm_or_skip("adopts_a_guest_memfd", GuestMemfdFlags::empty()) else {
        return;
    };
    let before = open_fds();
    let private = gmem(&vm, 4 << 20, GuestMemfdFlags::empty());
    let adopted = GuestMemfd::adopt(private.into_owned_fd()).unwrap();
    assert_eq!(
        (adopted.size(), adopted.flags()),
        (4 << 20, GuestMemfdFlags::empty())
    );
    drop(adopted);

    let offered = vm.guest_memfd_flags().unwrap();
    if offered.contains(shared()) {
        let g = gmem(&vm, 2 << 20, shared());
        let map = g.map().unwrap();
        map.write_at(page() + 5, b"adopted").unwrap();
        // adopt: MMAP seen by the probe; INIT_SHARED is not probed (it would
        // fault a page in), so map() refuses.
        let a = GuestMemfd::adopt(g.as_fd_owned()).unwrap();
        assert_eq!((a.size(), a.flags()), (2 << 20, GuestMemfdFlags::MMAP));
        assert!(matches!(a.map(), Err(Error::Invalid { .. })));
        // adopt_with_flags: both claims checked; the mapping shows the
        // same file.
        let b = GuestMemfd::adopt_with_flags(g.as_fd_owned(), shared()).unwrap();
        assert_eq!(b.flags(), shared());
        let mut buf = [0u8; 7];
        b.map().unwrap().read_at(page() + 5, &mut buf).unwrap();
        assert_eq!(&buf, b"adopted");
        drop((a, b, map, g));
    }
    assert_eq!(open_fds(), before);
}

#[test]
fn false_claims_are_refused() {
    let _guard = lock();
    let Some((_kvm, vm)) = gmem_vm_or_skip("false_claims_are_refused", GuestMemfdFlags::empty())
    else {
        return;
    };
    let before = open_fds();
    let invalid = |e: Error, needle: &str| {
        assert!(
            matches!(&e, Error::Invalid { op: "GuestMemfd::adopt_with_flags", rule } if rule.contains(needle)),
            "{e}"
        );
    };
    let private = gmem(&vm, 2 << 20, GuestMemfdFlags::empty());
    // Checked before the fd is looked at.
    invalid(
        GuestMemfd::adopt_with_flags(private.as_fd_owned(), GuestMemfdFlags::INIT_SHARED)
            .unwrap_err(),
        "INIT_SHARED without MMAP",
    );
    invalid(
        GuestMemfd::adopt_with_flags(
            private.as_fd_owned(),
            GuestMemfdFlags::from_bits_retain(1 << 63),
        )
        .unwrap_err(),
        "does not name",
    );
    // A private-only guest_memfd claimed mappable.
    invalid(
        GuestMemfd::adopt_with_flags(private.as_fd_owned(), GuestMemfdFlags::MMAP).unwrap_err(),
        "GUEST_MEMFD_FLAG_MMAP was claimed",
    );
    let offered = vm.guest_memfd_flags().unwrap();
    if offered.contains(GuestMemfdFlags::MMAP) {
        // Mappable but private: claimed shared.
        let g = gmem(&vm, 2 << 20, GuestMemfdFlags::MMAP);
        invalid(
            GuestMemfd::adopt_with_flags(g.as_fd_owned(), shared()).unwrap_err(),
            "INIT_SHARED was claimed",
        );
        let ok = GuestMemfd::adopt_with_flags(g.as_fd_owned(), GuestMemfdFlags::MMAP).unwrap();
        assert_eq!(ok.flags(), GuestMemfdFlags::MMAP);
    }
    drop(private);
    assert_eq!(open_fds(), before);
}
