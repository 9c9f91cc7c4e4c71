//! What kvm-gmem and uffd-gmem share above the raw bindings (feature
//! `support`): the errno type of their errors, the host page size, and the
//! types their `seccomp` modules describe themselves with. A program that
//! uses both crates gets one [`Errno`] and one [`seccomp::Rule`] shape.

use core::fmt;
use std::string::ToString;

/// An errno value returned by the kernel.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current `errno`.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The symbolic name (`EINVAL`), when it is one the crate meets.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::ESRCH => "ESRCH",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::ENOTDIR => "ENOTDIR",
            libc::EINVAL => "EINVAL",
            libc::ENFILE => "ENFILE",
            libc::EMFILE => "EMFILE",
            libc::ENOTTY => "ENOTTY",
            libc::ENOSPC => "ENOSPC",
            libc::ESPIPE => "ESPIPE",
            libc::EROFS => "EROFS",
            libc::ERANGE => "ERANGE",
            libc::ENOSYS => "ENOSYS",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            _ => return None,
        })
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.0);
        // io::Error's Display appends "(os error N)"; keep the text only.
        let text = msg.to_string();
        let text = text.split(" (os error").next().unwrap_or(&text);
        match self.name() {
            Some(n) => write!(f, "{n} ({}): {text}", self.0),
            None => write!(f, "errno {}: {text}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "Errno({n})"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

/// The host page size, asked of the kernel once per process.
#[inline]
pub fn page_size() -> u64 {
    use core::sync::atomic::{AtomicU64, Ordering};
    // Asked once: the page size of a running process never changes, and the
    // hot paths (every userfaultfd resolve) check alignment against it.
    static PAGE: AtomicU64 = AtomicU64::new(0);
    let cached = PAGE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf takes an integer name and returns an integer; no
    // memory of ours is passed.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if v > 0 { v as u64 } else { 4096 };
    PAGE.store(page, Ordering::Relaxed);
    page
}

/// The start of `offset .. offset + len` inside a mapping of `size` bytes,
/// or the broken rule, worded for an `Invalid` error: the bounds check of
/// the crates' mappings' copies.
pub fn span_in(offset: u64, len: usize, size: usize) -> Result<usize, std::string::String> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size as u64 => Ok(offset as usize),
        _ => Err(std::format!(
            "range {offset:#x}+{len:#x} is outside the mapping (size {size:#x})"
        )),
    }
}

/// Copies `len` bytes with volatile accesses: 8-byte words when source and
/// destination can be aligned together (the usual case: page-aligned guest
/// memory and heap buffers), single bytes otherwise. Never forms a reference
/// to either side.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes.
pub unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    if (src as usize ^ dst as usize).is_multiple_of(8) {
        while i < len && !(dst as usize + i).is_multiple_of(8) {
            // SAFETY: `i < len`, and the caller guarantees `src` readable and
            // `dst` writable for `len` bytes; byte accesses need no alignment.
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 8 <= len {
            // SAFETY: `i + 8 <= len` keeps the word inside both caller
            // ranges; `dst + i` is 8-aligned (loop above) and `src + i` too,
            // as `src` and `dst` agree modulo 8 on this path.
            unsafe {
                let w = src.add(i).cast::<u64>().read_volatile();
                dst.add(i).cast::<u64>().write_volatile(w);
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: `i < len`, inside both caller ranges; byte accesses.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

/// The vocabulary of the crates' seccomp tables: each crate lists, per
/// feature, the system calls and ioctl requests it makes
/// (`kvm_gmem::seccomp`, `uffd_gmem::seccomp`, whose module docs say how to
/// turn a [`Rule`](seccomp::Rule) into a filter).
pub mod seccomp {
    /// A system call: its name and its number on this target.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub struct Syscall {
        /// The kernel's name for it (`openat`, `fallocate`, ...).
        pub name: &'static str,
        /// Its number on the target (`libc::SYS_*`).
        pub nr: libc::c_long,
    }

    /// An ioctl request: its name and its number (the `kvm-gmem-sys` constant).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub struct Ioctl {
        /// The request's name in the kernel headers.
        pub name: &'static str,
        /// The request number, as the crate passes it to `ioctl`.
        pub request: u32,
    }

    /// What one feature needs; see the [module docs](self) for how to turn it
    /// into a filter. `F` is the feature type of the crate that describes
    /// itself (`kvm_gmem::seccomp::Feature`, `uffd_gmem::seccomp::Feature`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub struct Rule<F: 'static> {
        /// The feature.
        pub feature: F,
        /// System calls other than `ioctl`, allowed with any arguments.
        pub syscalls: &'static [Syscall],
        /// `ioctl` requests.
        pub ioctls: &'static [Ioctl],
        /// Whether the feature starts threads (see [`thread_start`]).
        pub threads: bool,
    }

    impl Syscall {
        /// `name` with number `nr` (for crates that describe their own features
        /// with these types). A leading `SYS_` is dropped from `name`, so
        /// `stringify!(SYS_openat)` names `openat`.
        pub const fn new(name: &'static str, nr: libc::c_long) -> Syscall {
            Syscall {
                name: strip_sys(name),
                nr,
            }
        }
    }

    impl Ioctl {
        /// Request `request`, named `name`.
        pub const fn new(name: &'static str, request: u32) -> Ioctl {
            Ioctl { name, request }
        }
    }

    impl<F> Rule<F> {
        /// A rule (for crates that describe their own features with these
        /// types).
        pub const fn new(
            feature: F,
            syscalls: &'static [Syscall],
            ioctls: &'static [Ioctl],
            threads: bool,
        ) -> Rule<F> {
            Rule {
                feature,
                syscalls,
                ioctls,
                threads,
            }
        }

        /// Whether the rule lists system call `nr` (any call but `ioctl`).
        pub fn allows_syscall(&self, nr: libc::c_long) -> bool {
            self.syscalls.iter().any(|s| s.nr == nr)
        }

        /// Whether the rule lists ioctl request `request`.
        pub fn allows_ioctl(&self, request: u32) -> bool {
            self.ioctls.iter().any(|i| i.request == request)
        }
    }

    /// `"SYS_openat"` -> `"openat"`.
    const fn strip_sys(s: &'static str) -> &'static str {
        match s.as_bytes() {
            [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
                Ok(name) => name,
                Err(_) => s,
            },
            _ => s,
        }
    }

    /// What starting and joining a `std::thread` takes with glibc (2.36) and
    /// Rust's standard library on Linux, as measured by the kvm-gmem and uffd-gmem tests: not
    /// the crate's own calls, and other C libraries differ (`clone` instead of
    /// `clone3`, no `rseq`). Allow these where a [`Rule::threads`] feature runs.
    pub fn thread_start() -> &'static [Syscall] {
        THREAD_START
    }

    const THREAD_START: &[Syscall] = &[
        Syscall::new("clone3", libc::SYS_clone3),
        Syscall::new("clone", libc::SYS_clone),
        Syscall::new("rseq", libc::SYS_rseq),
        Syscall::new("set_robust_list", libc::SYS_set_robust_list),
        Syscall::new("rt_sigprocmask", libc::SYS_rt_sigprocmask),
        Syscall::new("rt_sigaction", libc::SYS_rt_sigaction),
        Syscall::new("sigaltstack", libc::SYS_sigaltstack),
        Syscall::new("prctl", libc::SYS_prctl),
        Syscall::new("sched_getaffinity", libc::SYS_sched_getaffinity),
        Syscall::new("gettid", libc::SYS_gettid),
        Syscall::new("mmap", libc::SYS_mmap),
        Syscall::new("mprotect", libc::SYS_mprotect),
        Syscall::new("munmap", libc::SYS_munmap),
        Syscall::new("madvise", libc::SYS_madvise),
        Syscall::new("futex", libc::SYS_futex),
        Syscall::new("exit", libc::SYS_exit),
    ];
}
