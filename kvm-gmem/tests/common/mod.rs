//! Helpers shared by `kvm-gmem`'s integration tests, each of which includes
//! this module with `mod common;` (it is not a test target of its own):
//! the file-wide lock, the two skip rules, the fd count, guest_memfd
//! creation and the hand-over header. Every test binary uses only part of it.
//!
//! The skip rules:
//!
//! - a missing **device** (`/dev/kvm` cannot be opened): the test prints
//!   `SKIP <test>: <why>` and passes, except under `CI=true`, where that is
//!   a failure ([`kvm_or_skip`]);
//! - a **capability** the host kernel lacks (guest_memfd, one of its flags,
//!   pre-fault, ...): the test prints `SKIP <test>: <capability> = <value>
//!   on <kernel>` and passes, under `CI=true` too, because CI proves those
//!   paths in the kernel lanes; a lane lists the capabilities its kernel must
//!   have in `GMEM_REQUIRED_CAPS`, and a skip of one of those fails
//!   ([`skip_capability`], [`has_guest_memfd`]).
//!
//! `capability.rs` (the capability skip rule) and `seccomp_filter.rs` next
//! to it depend on nothing but `std` and `libc`: the tests of both crates
//! include them with `#[path]`.

#![allow(dead_code)]

mod capability;

#[allow(unused_imports)]
pub use capability::{ci, kernel_release, skip_capability, test_name};
use kvm_gmem::{Extension, GuestMemfd, GuestMemfdFlags, KvmDevice, Vm, VmOps, VmType};
use std::sync::{Mutex, MutexGuard};

static LOCK: Mutex<()> = Mutex::new(());

/// The file-wide lock every test holds: some tests count this process's
/// descriptors ([`open_fds`]).
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens `/dev/kvm`, or says why the test is skipped (`None`); under
/// `CI=true` a missing device is a failure.
pub fn kvm_or_skip(test: &str) -> Option<KvmDevice> {
    match KvmDevice::open() {
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

/// The guest_memfd flags a test may need, with their uAPI names.
fn flag_names() -> Vec<(GuestMemfdFlags, &'static str)> {
    #[allow(unused_mut)]
    let mut names = vec![
        (GuestMemfdFlags::MMAP, "GUEST_MEMFD_FLAG_MMAP"),
        (GuestMemfdFlags::INIT_SHARED, "GUEST_MEMFD_FLAG_INIT_SHARED"),
    ];
    #[cfg(feature = "rfc-no-direct-map")]
    names.push((
        GuestMemfdFlags::NO_DIRECT_MAP,
        "GUEST_MEMFD_FLAG_NO_DIRECT_MAP",
    ));
    #[cfg(feature = "rfc-gmem-write")]
    names.push((GuestMemfdFlags::WRITE, "GUEST_MEMFD_FLAG_WRITE"));
    names
}

/// Whether `vm` offers guest_memfd with every flag in `flags`; otherwise a
/// capability skip ([`skip_capability`]) naming the first thing missing
/// (`KVM_CAP_GUEST_MEMFD`, or the flag with `KVM_CAP_GUEST_MEMFD_FLAGS`).
pub fn has_guest_memfd(vm: &impl VmOps, flags: GuestMemfdFlags) -> bool {
    let cap = vm
        .extension(Extension::GUEST_MEMFD)
        .expect("KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) on a VM fd");
    if cap <= 0 {
        skip_capability("KVM_CAP_GUEST_MEMFD", cap);
        return false;
    }
    let offered = vm
        .guest_memfd_flags()
        .expect("KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS)");
    let missing = flag_names()
        .into_iter()
        .find(|&(flag, _)| flags.contains(flag) && !offered.contains(flag));
    if let Some((_, name)) = missing {
        skip_capability(
            name,
            format!("absent (KVM_CAP_GUEST_MEMFD_FLAGS = {offered})"),
        );
        return false;
    }
    true
}

/// [`has_guest_memfd`] asked of a fresh VM of the default type.
pub fn kvm_has_guest_memfd(kvm: &KvmDevice, flags: GuestMemfdFlags) -> bool {
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    has_guest_memfd(&vm, flags)
}

/// Whether `cap` is positive on `vm`; otherwise a capability skip naming it
/// (`name`) with its value.
pub fn has_cap(vm: &impl VmOps, cap: Extension, name: &str) -> bool {
    let v = vm
        .extension(cap)
        .unwrap_or_else(|e| panic!("KVM_CHECK_EXTENSION({name}): {e}"));
    if v <= 0 {
        skip_capability(name, v);
    }
    v > 0
}

/// `/dev/kvm` and a VM of the default type, or `None` as [`kvm_or_skip`].
/// Once `/dev/kvm` is open, a VM that cannot be created is a failure.
pub fn vm_or_skip(test: &str) -> Option<(KvmDevice, Vm)> {
    let kvm = kvm_or_skip(test)?;
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    Some((kvm, vm))
}

/// [`vm_or_skip`], then [`has_guest_memfd`] with `flags` on that VM: `None`
/// after a device or capability skip.
pub fn gmem_vm_or_skip(test: &str, flags: GuestMemfdFlags) -> Option<(KvmDevice, Vm)> {
    let (kvm, vm) = vm_or_skip(test)?;
    has_guest_memfd(&vm, flags).then_some((kvm, vm))
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
pub fn assert_no_fd_leaks(test: &str, leaked: &str, cases: impl FnOnce(&KvmDevice)) {
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

/// The flags a guest_memfd needs to back a memslot here: none on x86_64;
/// `MMAP` on aarch64, whose KVM binds only guest_memfds the host can map
/// (arm64 has no private memory): KVM_SET_USER_MEMORY_REGION2 answers
/// EINVAL for a slot on any other.
pub fn slot_flags() -> GuestMemfdFlags {
    if cfg!(target_arch = "aarch64") {
        GuestMemfdFlags::MMAP
    } else {
        GuestMemfdFlags::empty()
    }
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
///
/// `kvm_test!(name, needs guest_memfd(FLAGS), case)`: the same, after
/// [`kvm_has_guest_memfd`] (a capability skip where a default VM does not
/// offer guest_memfd with `FLAGS`).
#[macro_export]
macro_rules! kvm_test {
    ($name:ident, $body:expr) => {
        $crate::kvm_test!(@ $name, |_: &kvm_gmem::KvmDevice| true, $body);
    };
    ($name:ident, needs guest_memfd($flags:expr), $body:expr) => {
        $crate::kvm_test!(
            @ $name,
            |kvm: &kvm_gmem::KvmDevice| $crate::common::kvm_has_guest_memfd(kvm, $flags),
            $body
        );
    };
    (@ $name:ident, $needs:expr, $body:expr) => {
        #[test]
        fn $name() {
            let _guard = $crate::common::lock();
            let Some(kvm) = $crate::common::kvm_or_skip(stringify!($name)) else {
                return;
            };
            #[allow(clippy::redundant_closure_call)]
            if ($needs)(&kvm) {
                ($body)(&kvm);
            }
        }
    };
}

/// The calling thread's `errno`, for the tests' raw system calls.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `EINVAL (22): Invalid argument`.
pub fn errno_name(e: i32) -> String {
    kvm_gmem::Errno(e).to_string()
}

/// Asserts that a raw call failed with `want`.
#[track_caller]
pub fn expect_errno<T: std::fmt::Debug>(r: Result<T, i32>, want: i32, what: &str) {
    match r {
        Err(e) => assert_eq!(
            e,
            want,
            "{what}: expected {}, got {}",
            errno_name(want),
            errno_name(e)
        ),
        Ok(v) => panic!(
            "{what}: expected {}, but it succeeded ({v:?})",
            errno_name(want)
        ),
    }
}
