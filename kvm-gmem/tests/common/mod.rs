//! Helpers shared by `kvm-gmem`'s integration tests, each of which includes
//! this module with `mod common;` (it is not a test target of its own):
//! the file-wide lock, the skip rule (where `/dev/kvm` cannot be opened a
//! test prints `SKIP <test>: <why>` and passes, except under `CI=true`,
//! where that is a failure), the fd count, guest_memfd creation and the
//! hand-over header. Every test binary uses only part of it.
//!
//! `seccomp_filter.rs` next to it is not part of this module: the seccomp
//! tests of both crates include it with `#[path]`.

#![allow(dead_code)]

use kvm_gmem::{GuestMemfd, GuestMemfdFlags, Kvm, Vm, VmType};
use std::sync::{Mutex, MutexGuard};

static LOCK: Mutex<()> = Mutex::new(());

/// The file-wide lock every test holds: some tests count this process's
/// descriptors ([`open_fds`]).
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `CI=true`: a skip is then a failure.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Opens `/dev/kvm`, or says why the test is skipped (`None`); under
/// `CI=true` a missing device is a failure.
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::open() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            assert!(
                !ci(),
                "{test}: /dev/kvm is required under CI=true but cannot be opened: {e}"
            );
            eprintln!(
                "SKIP {test}: /dev/kvm cannot be opened ({e}); run on a KVM host as a user with access to it"
            );
            None
        }
    }
}

/// `/dev/kvm` and a VM of the default type, or `None` as [`kvm_or_skip`].
/// Once `/dev/kvm` is open, a VM that cannot be created is a failure.
pub fn vm_or_skip(test: &str) -> Option<(Kvm, Vm)> {
    let kvm = kvm_or_skip(test)?;
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    Some((kvm, vm))
}

/// How many descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Runs `cases` with `/dev/kvm` (or skips: [`kvm_or_skip`]) under the lock
/// and fails with `leaked` if that leaves a descriptor open that was not
/// open before (`/dev/kvm`'s own included).
pub fn assert_no_fd_leaks(test: &str, leaked: &str, cases: impl FnOnce(&Kvm)) {
    let _guard = lock();
    let before = open_fds();
    {
        let Some(kvm) = kvm_or_skip(test) else {
            return;
        };
        cases(&kvm);
    }
    assert_eq!(open_fds(), before, "{leaked}");
}

pub fn page() -> u64 {
    kvm_gmem::page_size()
}

/// `MMAP | INIT_SHARED`: a guest_memfd the host can map, shared from the
/// start.
pub fn shared() -> GuestMemfdFlags {
    GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED
}

/// A fresh guest_memfd of `size` bytes with `flags`, through the builder.
pub fn gmem(vm: &Vm, size: u64, flags: GuestMemfdFlags) -> GuestMemfd {
    GuestMemfd::builder(size)
        .flags(flags)
        .create(vm)
        .unwrap_or_else(|e| panic!("creating a {size:#x}-byte guest_memfd with flags {flags}: {e}"))
}

/// The hand-over header in the documented wire format, written
/// independently of the crate: magic, version, reserved, size, flags (all
/// little-endian).
pub fn header(magic: &[u8; 8], version: u32, reserved: u32, size: u64, flags: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&reserved.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h
}

/// `kvm_test!(name, case)`: a test `name` that holds [`lock`], opens
/// `/dev/kvm` (or skips: [`kvm_or_skip`]) and runs `case(&kvm)`.
#[macro_export]
macro_rules! kvm_test {
    ($name:ident, $body:expr) => {
        #[test]
        fn $name() {
            let _guard = $crate::common::lock();
            let Some(kvm) = $crate::common::kvm_or_skip(stringify!($name)) else {
                return;
            };
            #[allow(clippy::redundant_closure_call)]
            ($body)(&kvm);
        }
    };
}
