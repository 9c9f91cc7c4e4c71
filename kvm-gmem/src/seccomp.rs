//! What each feature of this crate asks of the kernel, for seccomp filters.
//!
//! A VMM that confines itself with seccomp (Firecracker, Cloud Hypervisor
//! and crosvm all do, per thread) must allow every system call and ioctl
//! request the libraries it calls make. [`rules`] lists them for each
//! [`Feature`] of this crate, as data a filter builder such as
//! [seccompiler](https://docs.rs/seccompiler) consumes: system calls by
//! their number on the target (`libc::SYS_*`), ioctl requests by the
//! number the crate issues (the `kvm-gmem-sys` constant, so a header update
//! cannot leave the table behind).
//!
//! ```
//! use kvm_gmem::seccomp::{Feature, rule};
//! use kvm_gmem::populate::Strategy;
//!
//! // The thread that creates guest memory and populates it from a file.
//! let mut syscalls = std::collections::BTreeSet::new();
//! let mut ioctls = std::collections::BTreeSet::new();
//! for f in [
//!     Feature::CreateGuestMemfd,
//!     Feature::MemslotV2,
//!     Feature::Populate(Strategy::MmapCopy),
//! ] {
//!     let r = rule(f);
//!     syscalls.extend(r.syscalls.iter().map(|s| s.nr));
//!     ioctls.extend(r.ioctls.iter().map(|i| i.request));
//! }
//! assert!(ioctls.contains(&kvm_gmem::sys_bindings::KVM_CREATE_GUEST_MEMFD));
//! assert!(syscalls.contains(&libc::SYS_fallocate));
//! ```
//!
//! How to read a [`Rule`]:
//!
//! - [`Rule::syscalls`] never contains `ioctl`; allow each with any
//!   arguments. Where the C library may use one of several system calls
//!   for one function (`open` or `openat`, `poll` or `ppoll`, `fstat`,
//!   `newfstatat` or `statx`), all of them are listed.
//! - [`Rule::ioctls`]: allow `ioctl` when its second argument (the
//!   request) is one of these. Compare the **low 32 bits** only
//!   (seccompiler's `ArgLen::Dword`): the kernel reads the request as an
//!   `unsigned int`, and C libraries differ in how they widen it. The file
//!   descriptor cannot be checked (its number is not known in advance).
//! - [`Rule::threads`]: the feature starts threads (with `std::thread`);
//!   the filter must also allow what starting and joining one takes, which
//!   belongs to the C library and Rust's standard library, not to this
//!   crate: [`thread_start`] lists what glibc and std use today.
//! - Not listed anywhere: what every Rust program needs whatever it calls
//!   (`read`/`write` on its own descriptors, `close`, `futex`, the
//!   allocator's `mmap`/`munmap`/`brk`/`madvise`, `exit_group`,
//!   `rt_sigreturn`, `clock_gettime` where the vDSO falls back to the system
//!   call). `close` and `fcntl` are listed where the crate itself creates
//!   and owns descriptors.
//!
//! The lists are checked: the crate's tests run each feature in a child
//! process under a seccomp filter made of its rule and a small, documented
//! runtime baseline, and kill the child on anything else
//! (`kvm-gmem/tests/seccomp.rs`).

use crate::populate::Strategy;
use kvm_gmem_sys as sys;

pub use kvm_gmem_sys::support::seccomp::{Ioctl, Rule, Syscall, thread_start};

/// A feature of this crate, as a unit of seccomp policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// [`KvmDevice::open`](crate::KvmDevice::open) and
    /// [`KvmDevice::open_path`](crate::KvmDevice::open_path).
    OpenKvm,
    /// [`KvmDevice::create_vm`](crate::KvmDevice::create_vm),
    /// [`KvmDevice::extension`](crate::KvmDevice::extension),
    /// [`VmOps::extension`](crate::VmOps::extension),
    /// [`KvmDevice::api_version`](crate::KvmDevice::api_version).
    CreateVm,
    /// [`Capabilities::query`](crate::Capabilities::query): capability
    /// checks, and the behavioural RFC probes on a scratch VM (a guest_memfd
    /// per flag, a `pwrite`, a one-page memslot, the populate ioctl's size-0
    /// probe), and `/proc/sys/kernel/osrelease`.
    Capabilities,
    /// [`GuestMemfdBuilder::create`](crate::GuestMemfdBuilder::create) and
    /// [`VmOps::guest_memfd_flags`](crate::VmOps::guest_memfd_flags).
    CreateGuestMemfd,
    /// [`GuestMemfd::map`](crate::GuestMemfd::map), the [`Mapping`]'s
    /// copies, [`Mapping::populate_write`], and its drop.
    ///
    /// [`Mapping`]: crate::Mapping
    /// [`Mapping::populate_write`]: crate::Mapping::populate_write
    Map,
    /// [`GuestMemfd::punch_hole`](crate::GuestMemfd::punch_hole) and
    /// [`GuestMemfd::allocate`](crate::GuestMemfd::allocate).
    PunchHole,
    /// [`VmOps::set_memory_region`](crate::VmOps::set_memory_region) and
    /// [`VmOps::delete_memory_region`](crate::VmOps::delete_memory_region).
    MemslotV2,
    /// [`VmOps::set_attributes`](crate::VmOps::set_attributes)
    /// and [`VmOps::supported_attributes`](crate::VmOps::supported_attributes).
    MemoryAttributes,
    /// [`pre_fault_memory`](crate::pre_fault_memory) (on its error path it
    /// opens `/dev/kvm` to ask for `KVM_CAP_PRE_FAULT_MEMORY`).
    PreFault,
    /// [`Populate::run`](crate::populate::Populate::run) with this
    /// strategy; [`Strategy::Auto`] is the union of the three it may pick.
    Populate(Strategy),
    /// [`share::send`](crate::share::send).
    ShareSend,
    /// [`share::recv`](crate::share::recv), with its checks of the fd
    /// (`/proc/self/fd`, `fstatfs`, `fstat`, a one-page mapping).
    ShareRecv,
    /// [`GuestMemfd::adopt`](crate::GuestMemfd::adopt) and
    /// [`GuestMemfd::adopt_with_flags`](crate::GuestMemfd::adopt_with_flags):
    /// the checks [`Feature::ShareRecv`] makes of a received fd
    /// (`/proc/self/fd`, `fstatfs`, `fstat`, a one-page mapping, faulted in
    /// for a claimed `INIT_SHARED`), and `close` of a refused fd; no socket
    /// call. For a handler that receives the fd some other way
    /// (Firecracker's handshake: `uffd_gmem::seccomp`'s
    /// `FirecrackerHandshake`).
    AdoptGuestMemfd,
}

/// `Syscall` entries from `libc::SYS_*` names.
macro_rules! sc {
    ($($(#[$m:meta])* $nr:ident),* $(,)?) => {
        &[$($(#[$m])* Syscall::new(stringify!($nr), libc::$nr)),*]
    };
}

/// `Ioctl` entries from `kvm-gmem-sys` constant names.
macro_rules! io {
    ($($(#[$m:meta])* $req:ident),* $(,)?) => {
        &[$($(#[$m])* Ioctl::new(stringify!($req), sys::$req)),*]
    };
}

/// The descriptor bookkeeping of a call that creates one: `fcntl` to mark it
/// close-on-exec where the kernel did not (guest_memfd), `close` on drop.
const FD: &[Syscall] = sc![SYS_fcntl, SYS_close];

const POPULATE_IOCTL: &[Ioctl] = &[
    #[cfg(feature = "rfc-populate")]
    Ioctl::new(
        "KVM_GUEST_MEMFD_POPULATE",
        sys::rfc::populate::KVM_GUEST_MEMFD_POPULATE,
    ),
];

static RULES: &[Rule<Feature>] = &[
    Rule::new(
        Feature::OpenKvm,
        sc![
            #[cfg(target_arch = "x86_64")]
            SYS_open,
            SYS_openat,
            SYS_close
        ],
        &[],
        false,
    ),
    Rule::new(
        Feature::CreateVm,
        FD,
        io![KVM_CREATE_VM, KVM_CHECK_EXTENSION, KVM_GET_API_VERSION],
        false,
    ),
    Rule::new(
        Feature::Capabilities,
        sc![
            // /proc/sys/kernel/osrelease
            #[cfg(target_arch = "x86_64")]
            SYS_open,
            SYS_openat,
            SYS_read,
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            // the scratch VM and its guest_memfds
            SYS_fcntl,
            SYS_close,
            // the write() probe
            SYS_pwrite64,
            // the KVM Userfault memslot probe's page
            SYS_mmap,
            SYS_munmap,
        ],
        &[
            Ioctl::new("KVM_CHECK_EXTENSION", sys::KVM_CHECK_EXTENSION),
            Ioctl::new("KVM_CREATE_VM", sys::KVM_CREATE_VM),
            Ioctl::new("KVM_CREATE_GUEST_MEMFD", sys::KVM_CREATE_GUEST_MEMFD),
            Ioctl::new(
                "KVM_SET_USER_MEMORY_REGION2",
                sys::KVM_SET_USER_MEMORY_REGION2,
            ),
            #[cfg(feature = "rfc-populate")]
            Ioctl::new(
                "KVM_GUEST_MEMFD_POPULATE",
                sys::rfc::populate::KVM_GUEST_MEMFD_POPULATE,
            ),
        ],
        false,
    ),
    Rule::new(
        Feature::CreateGuestMemfd,
        FD,
        io![KVM_CHECK_EXTENSION, KVM_CREATE_GUEST_MEMFD],
        false,
    ),
    Rule::new(
        Feature::Map,
        sc![SYS_mmap, SYS_munmap, SYS_madvise],
        &[],
        false,
    ),
    Rule::new(Feature::PunchHole, sc![SYS_fallocate], &[], false),
    Rule::new(
        Feature::MemslotV2,
        &[],
        io![KVM_SET_USER_MEMORY_REGION2],
        false,
    ),
    Rule::new(
        Feature::MemoryAttributes,
        &[],
        io![KVM_CHECK_EXTENSION, KVM_SET_MEMORY_ATTRIBUTES],
        false,
    ),
    Rule::new(
        Feature::PreFault,
        sc![
            #[cfg(target_arch = "x86_64")]
            SYS_open,
            SYS_openat,
            SYS_close
        ],
        io![KVM_PRE_FAULT_MEMORY, KVM_CHECK_EXTENSION],
        false,
    ),
    Rule::new(
        Feature::Populate(Strategy::PopulateIoctl),
        // The source file's size, and its read-only mapping.
        sc![
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            SYS_mmap,
            SYS_madvise,
            SYS_munmap
        ],
        POPULATE_IOCTL,
        true,
    ),
    Rule::new(
        Feature::Populate(Strategy::Write),
        sc![
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            SYS_mmap,
            SYS_madvise,
            SYS_munmap,
            SYS_pwrite64,
        ],
        &[],
        true,
    ),
    Rule::new(
        Feature::Populate(Strategy::MmapCopy),
        sc![
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            SYS_mmap,
            SYS_munmap,
            SYS_fallocate,
            SYS_madvise,
            SYS_pread64,
        ],
        &[],
        true,
    ),
    Rule::new(
        Feature::Populate(Strategy::Auto),
        sc![
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            SYS_mmap,
            SYS_munmap,
            SYS_fallocate,
            SYS_madvise,
            SYS_pread64,
            SYS_pwrite64,
        ],
        POPULATE_IOCTL,
        true,
    ),
    Rule::new(Feature::ShareSend, sc![SYS_sendmsg, SYS_sendto], &[], false),
    Rule::new(
        Feature::ShareRecv,
        sc![
            SYS_recvmsg,
            SYS_close,
            // identity: /proc/self/fd/N, fstatfs, the size
            #[cfg(target_arch = "x86_64")]
            SYS_readlink,
            SYS_readlinkat,
            SYS_fstatfs,
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            // the one-page mapping check
            SYS_mmap,
            SYS_madvise,
            SYS_munmap,
        ],
        &[],
        false,
    ),
    Rule::new(
        Feature::AdoptGuestMemfd,
        sc![
            // identity: /proc/self/fd/N, fstatfs, the size
            #[cfg(target_arch = "x86_64")]
            SYS_readlink,
            SYS_readlinkat,
            SYS_fstatfs,
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            // the MMAP probe; MADV_POPULATE_READ for a claimed INIT_SHARED
            SYS_mmap,
            SYS_madvise,
            SYS_munmap,
            // a refused fd
            SYS_close,
        ],
        &[],
        false,
    ),
];

/// Every feature's rule (for [`Feature::Populate`]: one per strategy,
/// [`Strategy::Auto`] included; `UffdCopy` is not implemented and has none).
pub fn rules() -> &'static [Rule<Feature>] {
    RULES
}

/// The rule for `feature`. Every feature has one (the crate's tests check
/// it); `Feature::Populate(Strategy::UffdCopy)`, which always fails before
/// any system call, gets an empty rule.
pub fn rule(feature: Feature) -> &'static Rule<Feature> {
    static NONE: Rule<Feature> = Rule::new(Feature::Populate(Strategy::UffdCopy), &[], &[], false);
    RULES.iter().find(|r| r.feature == feature).unwrap_or(&NONE)
}
