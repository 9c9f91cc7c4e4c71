//! What each feature of this crate asks of the kernel, for seccomp filters.
//!
//! The same shape as `kvm_gmem::seccomp` (whose module docs say how to
//! turn a [`Rule`] into a filter): for each [`Feature`], the system calls by
//! their number on the target and the ioctl requests by the `kvm-gmem-sys`
//! constant the crate issues.
//!
//! ```
//! use uffd_gmem::seccomp::{Feature, rule};
//!
//! // A fault-handling process: the Firecracker handshake, then serving.
//! # #[cfg(feature = "firecracker")]
//! let handshake = rule(Feature::FirecrackerHandshake);
//! let serve = rule(Feature::Serve);
//! assert!(serve.allows_ioctl(uffd_gmem::sys_bindings::UFFDIO_COPY));
//! assert!(serve.threads); // also allow seccomp::thread_start()
//! # #[cfg(feature = "firecracker")]
//! assert!(handshake.allows_syscall(libc::SYS_recvmsg));
//! ```
//!
//! Two features need a word:
//!
//! - [`Feature::CreateDevice`] and [`Feature::CreateSyscall`]: the builder
//!   always tries `/dev/userfaultfd` first and falls back to the system call
//!   when opening it fails with `ENOENT`, `EACCES`, `EPERM`, `ENODEV` or
//!   `ENXIO`. A filter that wants only the system call may therefore answer
//!   `openat` of the device with `EACCES` (`SECCOMP_RET_ERRNO`) instead of
//!   allowing it; [`Feature::CreateSyscall`] lists `openat` for the attempt.
//! - [`Feature::Serve`] covers the server's own threads and calls; the page
//!   source's calls are the source's ([`Feature::MappedFile`] for
//!   [`MappedFile`](crate::serve::MappedFile); none for a `Vec<u8>`).
//!
//! The lists are checked by running features in a child process under a
//! seccomp filter made of their rule and a documented runtime baseline
//! (`uffd-gmem/tests/seccomp.rs`).

use kvm_gmem_sys as sys;
use kvm_gmem_sys::support::seccomp::{Ioctl, Syscall};

pub use kvm_gmem_sys::support::seccomp::thread_start;

/// What one feature needs (the shape kvm-gmem's `seccomp` module uses too).
///
/// # Examples
///
/// ```
/// use uffd_gmem::seccomp::{Feature, Rule, rule};
///
/// let r: &Rule = rule(Feature::CreateSyscall);
/// assert_eq!(r.feature, Feature::CreateSyscall);
/// let names: Vec<&str> = r.syscalls.iter().map(|s| s.name).collect();
/// assert!(names.contains(&"userfaultfd") && names.contains(&"openat"));
/// assert_eq!(r.ioctls[0].name, "UFFDIO_API");
/// assert!(r.allows_syscall(libc::SYS_userfaultfd) && !r.threads);
/// ```
pub type Rule = kvm_gmem_sys::support::seccomp::Rule<Feature>;

/// A feature of this crate, as a unit of seccomp policy.
///
/// # Examples
///
/// A handler of `MINOR` faults on a VMM's userfaultfd, as a set of features:
///
/// ```
/// use uffd_gmem::seccomp::{Feature, rule};
/// use uffd_gmem::sys_bindings as sys;
///
/// let handler = [Feature::Adopt, Feature::Events, Feature::Continue, Feature::Wake];
/// let allows_ioctl = |req| handler.iter().any(|&f| rule(f).allows_ioctl(req));
/// assert!(allows_ioctl(sys::UFFDIO_CONTINUE) && allows_ioctl(sys::UFFDIO_WAKE));
/// assert!(!allows_ioctl(sys::UFFDIO_COPY)); // not asked for
/// assert!(handler.iter().any(|&f| rule(f).allows_syscall(libc::SYS_read)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// [`UffdBuilder::create`](crate::UffdBuilder::create) through
    /// `/dev/userfaultfd` and `USERFAULTFD_IOC_NEW` (Linux 6.1), then the
    /// `UFFDIO_API` handshake.
    CreateDevice,
    /// [`UffdBuilder::create`](crate::UffdBuilder::create) through the
    /// `userfaultfd(2)` system call, after the device was refused; then the
    /// `UFFDIO_API` handshake.
    CreateSyscall,
    /// [`Uffd::from_initialized`](crate::Uffd::from_initialized): adopting a
    /// VMM's userfaultfd (it asks `/proc/self/fd` whether the fd is one).
    Adopt,
    /// [`Uffd::register`](crate::Uffd::register),
    /// [`Uffd::register_mapping`](crate::Uffd::register_mapping),
    /// `Uffd::register_guest_memfd`,
    /// [`Uffd::unregister`](crate::Uffd::unregister).
    Register,
    /// [`Uffd::copy`](crate::Uffd::copy).
    Copy,
    /// [`Uffd::zeropage`](crate::Uffd::zeropage).
    Zeropage,
    /// `Uffd::r#continue`.
    Continue,
    /// [`Uffd::wake`](crate::Uffd::wake).
    Wake,
    /// [`Uffd::writeprotect`](crate::Uffd::writeprotect).
    WriteProtect,
    /// [`Uffd::poison`](crate::Uffd::poison).
    Poison,
    /// `Uffd::r#move`.
    Move,
    /// [`Uffd::rwprotect`](crate::Uffd::rwprotect).
    RwProtect,
    /// [`Uffd::set_mode`](crate::Uffd::set_mode).
    SetMode,
    /// [`Uffd::read_events`](crate::Uffd::read_events),
    /// [`Uffd::read_event`](crate::Uffd::read_event),
    /// [`Uffd::poll_readable`](crate::Uffd::poll_readable); for a fork
    /// event, adopting the child's userfaultfd (as [`Feature::Adopt`]) and
    /// `close` when it is dropped.
    Events,
    /// [`serve::Server`](crate::serve::Server) from
    /// [`ServerBuilder::spawn`](crate::serve::ServerBuilder::spawn) to
    /// [`Server::shutdown`](crate::serve::Server::shutdown): worker and
    /// prefetch threads, the wake-up eventfd, events, every resolving ioctl
    /// it issues, `pwrite` for
    /// [`Region::continue_via_pwrite`](crate::serve::Region::continue_via_pwrite),
    /// each worker's epoll (or `poll`), which also watches the fd of
    /// [`ServerBuilder::stop_when_closed`](crate::serve::ServerBuilder::stop_when_closed).
    Serve,
    /// [`MappedFile::open`](crate::serve::MappedFile::open) and
    /// [`MappedFile::from_file`](crate::serve::MappedFile::from_file), and
    /// its drop.
    MappedFile,
    /// [`HostMapping::anonymous`](crate::HostMapping::anonymous),
    /// [`HostMapping::memfd`](crate::HostMapping::memfd),
    /// [`HostMapping::file`](crate::HostMapping::file), their copies and
    /// their drop.
    HostMapping,
    /// [`firecracker::Handshake::recv`](crate::firecracker::Handshake::recv)
    /// and `recv_timeout`: the message and its fds, the userfaultfd check
    /// (`/proc/self/fd`, or `fstatfs` where `/proc` is not mounted),
    /// `SO_PEERCRED`.
    #[cfg(feature = "firecracker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "firecracker")))]
    FirecrackerHandshake,
    /// [`firecracker::send`](crate::firecracker::send) and
    /// [`firecracker::send_payload`](crate::firecracker::send_payload) (the
    /// VMM's side).
    #[cfg(feature = "firecracker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "firecracker")))]
    FirecrackerSend,
    /// [`firecracker::FaultChannel`](crate::firecracker::FaultChannel):
    /// sending and receiving frames both ways, on a blocking or a
    /// non-blocking socket (`sendmsg` with `MSG_NOSIGNAL`; `recvmsg` with
    /// `MSG_DONTWAIT`, so an empty socket is waited on with `poll` even when
    /// it blocks; `poll` for a full one), `close` of any fd that rides along
    /// and of the socket when the channel is dropped.
    #[cfg(feature = "firecracker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "firecracker")))]
    FirecrackerFaultChannel,
    /// [`firecracker::UserfaultServer`](crate::firecracker::UserfaultServer):
    /// [`new`](crate::firecracker::UserfaultServer::new) (no system call),
    /// [`from_fd`](crate::firecracker::UserfaultServer::from_fd) (the
    /// guest_memfd's size: a duplicate with `fcntl(F_DUPFD_CLOEXEC)`, its
    /// `statx`/`fstat`, `close`) and
    /// [`serve`](crate::firecracker::UserfaultServer::serve) (`pwrite` into
    /// the guest_memfd; the bitmap is memory). The guest_memfd and the
    /// bitmap come from kvm-gmem: `GuestMemfd::adopt_with_flags` is
    /// `kvm_gmem::seccomp::Feature::AdoptGuestMemfd`; the bitmap's
    /// `UserfaultBitmap::from_fd` (`fstat`, then `mmap` of the memfd;
    /// `munmap` and `close` on drop) has no kvm-gmem feature yet: build it
    /// before the filter. The requests arrive through
    /// [`Feature::FirecrackerFaultChannel`].
    #[cfg(feature = "firecracker-secret-hiding")]
    #[cfg_attr(docsrs, doc(cfg(feature = "firecracker-secret-hiding")))]
    UserfaultServer,
}

/// `Syscall` entries from `libc::SYS_*` names.
macro_rules! sc {
    ($($(#[$m:meta])* $nr:ident),* $(,)?) => {
        &[$($(#[$m])* Syscall::new(stringify!($nr), libc::$nr)),*]
    };
}

/// `Ioctl` entries from `kvm-gmem-sys` constant names.
macro_rules! io {
    ($($req:ident),* $(,)?) => {
        &[$(Ioctl::new(stringify!($req), sys::$req)),*]
    };
}

/// One ioctl and nothing else.
const fn only(feature: Feature, ioctls: &'static [Ioctl]) -> Rule {
    Rule::new(feature, &[], ioctls, false)
}

static RULES: &[Rule] = &[
    Rule::new(
        Feature::CreateDevice,
        sc![
            #[cfg(target_arch = "x86_64")]
            SYS_open,
            SYS_openat,
            SYS_close,
        ],
        io![USERFAULTFD_IOC_NEW, UFFDIO_API],
        false,
    ),
    Rule::new(
        Feature::CreateSyscall,
        sc![
            #[cfg(target_arch = "x86_64")]
            SYS_open,
            SYS_openat,
            SYS_userfaultfd,
            SYS_close,
        ],
        io![UFFDIO_API],
        false,
    ),
    Rule::new(
        Feature::Adopt,
        sc![
            #[cfg(target_arch = "x86_64")]
            SYS_readlink,
            SYS_readlinkat,
        ],
        &[],
        false,
    ),
    only(Feature::Register, io![UFFDIO_REGISTER, UFFDIO_UNREGISTER]),
    only(Feature::Copy, io![UFFDIO_COPY]),
    only(Feature::Zeropage, io![UFFDIO_ZEROPAGE]),
    only(Feature::Continue, io![UFFDIO_CONTINUE]),
    only(Feature::Wake, io![UFFDIO_WAKE]),
    only(Feature::WriteProtect, io![UFFDIO_WRITEPROTECT]),
    only(Feature::Poison, io![UFFDIO_POISON]),
    only(Feature::Move, io![UFFDIO_MOVE]),
    only(Feature::RwProtect, io![UFFDIO_RWPROTECT]),
    only(Feature::SetMode, io![UFFDIO_SET_MODE]),
    Rule::new(
        Feature::Events,
        sc![
            SYS_read,
            #[cfg(target_arch = "x86_64")]
            SYS_poll,
            SYS_ppoll,
            #[cfg(target_arch = "x86_64")]
            SYS_readlink,
            SYS_readlinkat,
            SYS_close,
        ],
        &[],
        false,
    ),
    Rule::new(
        Feature::Serve,
        sc![
            // O_NONBLOCK on the userfaultfd
            SYS_fcntl,
            // the wake-up eventfd: create, signal, poll, drain, close
            SYS_eventfd2,
            SYS_write,
            SYS_read,
            #[cfg(target_arch = "x86_64")]
            SYS_poll,
            SYS_ppoll,
            SYS_close,
            // one epoll per worker (the userfaultfd added EPOLLEXCLUSIVE)
            SYS_epoll_create1,
            SYS_epoll_ctl,
            #[cfg(target_arch = "x86_64")]
            SYS_epoll_wait,
            SYS_epoll_pwait,
            // Continue through pwrite
            SYS_pwrite64,
            // waits and latency
            SYS_clock_nanosleep,
            #[cfg(target_arch = "x86_64")]
            SYS_nanosleep,
            SYS_clock_gettime,
        ],
        io![
            UFFDIO_COPY,
            UFFDIO_ZEROPAGE,
            UFFDIO_CONTINUE,
            UFFDIO_WAKE,
            UFFDIO_UNREGISTER,
        ],
        true,
    ),
    Rule::new(
        Feature::MappedFile,
        sc![
            #[cfg(target_arch = "x86_64")]
            SYS_open,
            SYS_openat,
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            SYS_mmap,
            SYS_munmap,
            SYS_close,
        ],
        &[],
        false,
    ),
    Rule::new(
        Feature::HostMapping,
        sc![
            SYS_memfd_create,
            SYS_ftruncate,
            SYS_mmap,
            SYS_munmap,
            SYS_close
        ],
        &[],
        false,
    ),
    #[cfg(feature = "firecracker")]
    Rule::new(
        Feature::FirecrackerHandshake,
        sc![
            SYS_recvmsg,
            #[cfg(target_arch = "x86_64")]
            SYS_poll,
            SYS_ppoll,
            #[cfg(target_arch = "x86_64")]
            SYS_readlink,
            SYS_readlinkat,
            SYS_fstatfs,
            SYS_getsockopt,
            SYS_close,
            SYS_clock_gettime,
        ],
        &[],
        false,
    ),
    #[cfg(feature = "firecracker")]
    Rule::new(
        Feature::FirecrackerSend,
        sc![
            SYS_sendmsg,
            #[cfg(target_arch = "x86_64")]
            SYS_poll,
            SYS_ppoll,
        ],
        &[],
        false,
    ),
    #[cfg(feature = "firecracker")]
    Rule::new(
        Feature::FirecrackerFaultChannel,
        sc![
            // one frame at a time: MSG_NOSIGNAL / MSG_DONTWAIT
            SYS_sendmsg,
            SYS_recvmsg,
            // waiting for room or for bytes
            #[cfg(target_arch = "x86_64")]
            SYS_poll,
            SYS_ppoll,
            // stray fds; the socket, when the channel is dropped
            SYS_close,
        ],
        &[],
        false,
    ),
    #[cfg(feature = "firecracker-secret-hiding")]
    Rule::new(
        Feature::UserfaultServer,
        sc![
            // from_fd: the guest_memfd's size through a duplicate
            SYS_fcntl,
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
            SYS_close,
            // serve: the page into the guest_memfd
            SYS_pwrite64,
        ],
        &[],
        false,
    ),
];

/// Every feature's rule.
///
/// # Examples
///
/// ```
/// use uffd_gmem::seccomp::{Feature, rules};
///
/// // One rule per feature; only serving starts threads.
/// assert_eq!(rules().iter().filter(|r| r.feature == Feature::Copy).count(), 1);
/// let threaded: Vec<Feature> = rules().iter().filter(|r| r.threads).map(|r| r.feature).collect();
/// assert_eq!(threaded, [Feature::Serve]);
/// ```
pub fn rules() -> &'static [Rule] {
    RULES
}

/// The rule for `feature`.
///
/// # Examples
///
/// ```
/// use uffd_gmem::seccomp::{Feature, rule};
/// use uffd_gmem::sys_bindings as sys;
///
/// let copy = rule(Feature::Copy);
/// assert!(copy.allows_ioctl(sys::UFFDIO_COPY));
/// assert!(!copy.allows_ioctl(sys::UFFDIO_ZEROPAGE));
/// assert!(copy.syscalls.is_empty()); // an ioctl on the fd, nothing more
/// ```
///
/// # Panics
///
/// Never: every feature has a rule (the crate's tests check it).
pub fn rule(feature: Feature) -> &'static Rule {
    RULES
        .iter()
        .find(|r| r.feature == feature)
        .expect("every Feature has a rule")
}
