//! `KVM_CREATE_GUEST_MEMFD`: the builder, the owned handle, and
//! `fallocate` on it; telling a guest_memfd from any other fd (for
//! [`GuestMemfd::adopt`] and `share::recv`).
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::kvm::{Extension, check_extension};
use crate::sys::{ioctl_arg, own_new_fd, page_size};
use crate::vm::VmOps;
use kvm_gmem_sys as sys;
use std::ffi::OsStr;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

bitflags::bitflags! {
    /// `GUEST_MEMFD_FLAG_*`: how a guest_memfd is created.
    ///
    /// A VM accepts only the flags its `KVM_CAP_GUEST_MEMFD_FLAGS` reports;
    /// when the kernel refuses, [`GuestMemfdBuilder::create`] names the
    /// flags the VM does not offer.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct GuestMemfdFlags: u64 {
        /// `GUEST_MEMFD_FLAG_MMAP` (Linux 6.18): the fd may be `mmap`ed.
        const MMAP = sys::GUEST_MEMFD_FLAG_MMAP;
        /// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18): memory starts shared,
        /// so host accesses through a mapping are allowed.
        const INIT_SHARED = sys::GUEST_MEMFD_FLAG_INIT_SHARED;
        /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` (RFC, bit 2): folios leave the
        /// kernel's direct map
        /// (<https://lore.kernel.org/kvm/20260114134510.1835-8-kalyazin@amazon.com/>).
        #[cfg(feature = "rfc-no-direct-map")]
        const NO_DIRECT_MAP = sys::rfc::no_direct_map::GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        /// `GUEST_MEMFD_FLAG_WRITE` (RFC, bit 3 in Firecracker's stack):
        /// `write()`/`pwrite()` populate the file
        /// (<https://lore.kernel.org/kvm/20251114151828.98165-2-kalyazin@amazon.com/>).
        #[cfg(feature = "rfc-gmem-write")]
        const WRITE = sys::rfc::gmem_write::GUEST_MEMFD_FLAG_WRITE;
    }
}

impl std::fmt::Display for GuestMemfdFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return write!(f, "none (0x0)");
        }
        let mut first = true;
        for (name, _) in self.iter_names() {
            write!(f, "{}{name}", if first { "" } else { "|" })?;
            first = false;
        }
        let unknown = self.bits() & !Self::all().bits();
        if unknown != 0 {
            write!(f, "{}unknown {unknown:#x}", if first { "" } else { "|" })?;
        }
        write!(f, " ({:#x})", self.bits())
    }
}

/// The flags `vm` accepts; see [`VmOps::guest_memfd_flags`].
pub(crate) fn supported_flags(vm: BorrowedFd<'_>) -> Result<GuestMemfdFlags> {
    let v = check_extension(vm, Extension::GUEST_MEMFD_FLAGS)?;
    Ok(GuestMemfdFlags::from_bits_retain(v.max(0) as u64))
}

/// Builds a guest_memfd; see [`GuestMemfd::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until create() is called"]
pub struct GuestMemfdBuilder {
    size: u64,
    flags: GuestMemfdFlags,
}

impl GuestMemfdBuilder {
    /// Sets or clears `GUEST_MEMFD_FLAG_MMAP`.
    pub fn mmap(mut self, on: bool) -> Self {
        self.flags.set(GuestMemfdFlags::MMAP, on);
        self
    }

    /// Sets or clears `GUEST_MEMFD_FLAG_INIT_SHARED`.
    pub fn init_shared(mut self, on: bool) -> Self {
        self.flags.set(GuestMemfdFlags::INIT_SHARED, on);
        self
    }

    /// Sets or clears the RFC `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`.
    #[cfg(feature = "rfc-no-direct-map")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rfc-no-direct-map")))]
    pub fn no_direct_map(mut self, on: bool) -> Self {
        self.flags.set(GuestMemfdFlags::NO_DIRECT_MAP, on);
        self
    }

    /// Sets or clears the RFC `GUEST_MEMFD_FLAG_WRITE`.
    #[cfg(feature = "rfc-gmem-write")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rfc-gmem-write")))]
    pub fn write(mut self, on: bool) -> Self {
        self.flags.set(GuestMemfdFlags::WRITE, on);
        self
    }

    /// Sets the whole flag set at once, including bits the crate does not
    /// name (the kernel refuses what it does not support, and the refusal
    /// is explained against the VM's supported set).
    pub fn flags(mut self, flags: GuestMemfdFlags) -> Self {
        self.flags = flags;
        self
    }

    /// `ioctl(vm, KVM_CREATE_GUEST_MEMFD, &args)`: creates the guest_memfd
    /// (since Linux 6.8; flags since 6.18).
    ///
    /// The size must be non-zero and a multiple of the page size (checked
    /// before the ioctl), and every flag must be in the VM's
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: when the kernel refuses, the capabilities
    /// are asked which rule was broken, so a successful create costs what
    /// the raw ioctl costs (plus one `fcntl` for close-on-exec).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for the size rule, [`Error::UnsupportedFlags`]
    /// naming the offending flags and the supported set,
    /// [`Error::Unsupported`] when the kernel has no guest_memfd at all, and
    /// [`Error::Kernel`] for other refusals.
    ///
    /// # Examples
    ///
    /// A guest_memfd the host can map where the VM offers that (Linux
    /// 6.18), a private-only one otherwise; the typed refusal where the
    /// kernel has no guest_memfd:
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// let flags = vm.guest_memfd_flags()?.intersection(shared);
    /// match GuestMemfd::builder(64 << 20).flags(flags).create(&vm) {
    ///     Ok(gmem) => println!("{} MiB guest_memfd, flags {}", gmem.size() >> 20, gmem.flags()),
    ///     Err(e) if e.is_unsupported() => println!("no guest_memfd here: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd>
    #[doc(alias = "KVM_CREATE_GUEST_MEMFD")]
    pub fn create(self, vm: &impl VmOps) -> Result<GuestMemfd> {
        let vm = vm.vm_fd();
        let op = "KVM_CREATE_GUEST_MEMFD";
        let page = page_size();
        if self.size == 0 {
            return Err(Error::invalid(op, "size must be non-zero"));
        }
        if !self.size.is_multiple_of(page) {
            return Err(Error::invalid(
                op,
                format!(
                    "size {:#x} is not a multiple of the page size ({page:#x})",
                    self.size
                ),
            ));
        }
        if self.size > i64::MAX as u64 {
            return Err(Error::invalid(
                op,
                format!("size {:#x} exceeds the largest file size", self.size),
            ));
        }
        // The ioctl first: the capabilities are asked only to explain a
        // refusal, so a successful create costs one ioctl (and the
        // close-on-exec fcntl), like the raw call.
        let flags = self.flags;
        match self.create_unchecked(vm) {
            Ok(gmem) => Ok(gmem),
            Err(e @ Error::Kernel { .. }) => Err(explain_refusal(vm, flags)?.unwrap_or(e)),
            Err(e) => Err(e),
        }
    }

    /// The ioctl alone, without the size and flag checks: for probes that
    /// want the kernel's own answer.
    pub(crate) fn create_unchecked(self, vm: BorrowedFd<'_>) -> Result<GuestMemfd> {
        let op = "KVM_CREATE_GUEST_MEMFD";
        let mut args = sys::kvm_create_guest_memfd {
            size: self.size,
            flags: self.flags.bits(),
            ..Default::default()
        };
        // SAFETY: KVM_CREATE_GUEST_MEMFD takes a `kvm_create_guest_memfd`
        // (the request encodes its size) and holds no pointers.
        let raw = unsafe { ioctl_arg::<{ sys::KVM_CREATE_GUEST_MEMFD }, _>(vm, &mut args) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(GuestMemfd {
            fd: own_new_fd(op, raw)?,
            size: self.size,
            flags: self.flags,
        })
    }
}

/// After the kernel refused to create a guest_memfd: the typed reason when
/// the capabilities show one (no guest_memfd at all, or flags the VM does not
/// offer).
fn explain_refusal(vm: BorrowedFd<'_>, flags: GuestMemfdFlags) -> Result<Option<Error>> {
    let op = "KVM_CREATE_GUEST_MEMFD";
    if check_extension(vm, Extension::GUEST_MEMFD)? == 0 {
        return Ok(Some(Error::Unsupported {
            op,
            capability: "KVM_CAP_GUEST_MEMFD",
            evidence: "KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) = 0 on the VM fd".into(),
        }));
    }
    if !flags.is_empty() {
        let supported = supported_flags(vm)?;
        let unsupported = flags.difference(supported);
        if !unsupported.is_empty() {
            return Ok(Some(Error::UnsupportedFlags {
                op,
                unsupported,
                supported,
            }));
        }
    }
    Ok(None)
}

/// `ANON_INODE_FS_MAGIC` (`linux/magic.h`): guest_memfd's filesystem up to 6.18.
pub(crate) const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;
/// `GUEST_MEMFD_MAGIC` (`linux/magic.h`, "GMEM"): guest_memfd's own pseudo
/// filesystem in 7.x.
pub(crate) const GUEST_MEMFD_MAGIC: i64 = 0x474d_454d;

/// Whether `f_type` and the `/proc/self/fd/N` link name a guest_memfd; see
/// the identity table in the `share` module's docs.
pub(crate) fn is_guest_memfd(f_type: i64, link: &OsStr) -> bool {
    let link = link.as_encoded_bytes();
    match f_type {
        ANON_INODE_FS_MAGIC => link == b"anon_inode:[kvm-gmem]",
        GUEST_MEMFD_MAGIC => link == b"/[kvm-gmem] (deleted)" || link == b"/[kvm-gmem]",
        _ => false,
    }
}

/// Tells whether `fd` is a guest_memfd (the `/proc/self/fd/N` link and
/// `fstatfs`, as the identity table in the `share` module's docs says) and,
/// if it is, reads its size with `fstat`: `Ok(Ok(size))`, or `Ok(Err(why))`
/// naming what the fd is instead (the caller picks the error variant).
///
/// # Errors
///
/// [`Error::Kernel`] naming `readlink(/proc/self/fd)` (e.g. `ENOENT` where
/// `/proc` is not mounted), `fstatfs(guest_memfd)` or `fstat(guest_memfd)`.
pub(crate) fn identify(fd: BorrowedFd<'_>) -> Result<std::result::Result<u64, String>> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| {
        Error::kernel(
            "readlink(/proc/self/fd)",
            Errno(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    // SAFETY: an all-zero `statfs` is a valid output buffer.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the borrow; `sfs` is a writable `statfs`.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut sfs) } < 0 {
        return Err(Error::kernel("fstatfs(guest_memfd)", Errno::last()));
    }
    #[allow(clippy::unnecessary_cast)] // `f_type`'s type differs between libcs
    let f_type = sfs.f_type as i64;
    if !is_guest_memfd(f_type, link.as_os_str()) {
        return Ok(Err(format!(
            "the fd is not a guest_memfd: /proc/self/fd/N reads {:?} on a filesystem of type {f_type:#x}, expected \"anon_inode:[kvm-gmem]\" (type {ANON_INODE_FS_MAGIC:#x}) or \"/[kvm-gmem] (deleted)\" (type {GUEST_MEMFD_MAGIC:#x})",
            link.display().to_string()
        )));
    }
    let st = crate::sys::fstat(fd).map_err(|e| Error::kernel("fstat(guest_memfd)", e))?;
    Ok(Ok(st.st_size as u64))
}

/// How a guest_memfd's mapping promise failed ([`probe_mapping`]).
#[derive(Debug)]
pub(crate) enum MappingProbe {
    /// `mmap` of the fd failed (no `GUEST_MEMFD_FLAG_MMAP`: `ENODEV`).
    NoMmap(Errno),
    /// The page mapped but cannot be faulted in from the host (no
    /// `GUEST_MEMFD_FLAG_INIT_SHARED`: `EFAULT`).
    Private(Errno),
}

/// Maps the first page of the guest_memfd `fd` shared (and unmaps it); with
/// `fault_in`, also faults it in through `MADV_POPULATE_READ`, which reports
/// with `EFAULT` what would otherwise be a SIGBUS. Without `fault_in`
/// nothing is allocated; with it, the first page is (zero-filled if it was
/// a hole).
pub(crate) fn probe_mapping(
    fd: BorrowedFd<'_>,
    fault_in: bool,
) -> std::result::Result<(), MappingProbe> {
    let page = page_size() as usize;
    // SAFETY: a fresh one-page shared mapping chosen by the kernel (addr
    // NULL), replacing nothing, unmapped below on every path.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MappingProbe::NoMmap(Errno::last()));
    }
    let mut result = Ok(());
    if fault_in {
        loop {
            // SAFETY: `p..p + page` is the mapping just made; the advice only
            // faults the page in (in the kernel, never raising a signal) and
            // changes no contents.
            if unsafe { libc::madvise(p, page, libc::MADV_POPULATE_READ) } == 0 {
                break;
            }
            match Errno::last() {
                Errno(libc::EINTR) => continue,
                e => {
                    result = Err(MappingProbe::Private(e));
                    break;
                }
            }
        }
    }
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(p, page) };
    result
}

/// An owned guest_memfd: the fd, its size and the flags it was created with.
///
/// # Examples
///
/// ```
/// use kvm_gmem::{GuestMemfd, KvmDevice, VmType};
///
/// # fn main() -> Result<(), kvm_gmem::Error> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
/// match GuestMemfd::builder(2 << 20).create(&vm) {
///     Ok(gmem) => println!("{} bytes, flags {}", gmem.size(), gmem.flags()),
///     Err(e) if e.is_unsupported() => println!("no guest_memfd here: {e}"),
///     Err(e) => return Err(e),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct GuestMemfd {
    fd: OwnedFd,
    size: u64,
    flags: GuestMemfdFlags,
}

impl GuestMemfd {
    /// A builder for a guest_memfd of `size` bytes; [`GuestMemfdBuilder::create`]
    /// issues the ioctl.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, KvmDevice, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// // The size rule is checked before the ioctl.
    /// assert!(GuestMemfd::builder(0).create(&vm).is_err());
    /// match GuestMemfd::builder(2 << 20).mmap(true).init_shared(true).create(&vm) {
    ///     Ok(gmem) => assert_eq!(gmem.size(), 2 << 20),
    ///     // No guest_memfd (before 6.8), or no MMAP/INIT_SHARED (before 6.18).
    ///     Err(e) => assert!(e.is_unsupported(), "{e}"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd>
    pub fn builder(size: u64) -> GuestMemfdBuilder {
        GuestMemfdBuilder {
            size,
            flags: GuestMemfdFlags::empty(),
        }
    }

    /// Wraps a guest_memfd fd whose size and flags are known (e.g. received
    /// from another process and validated by [`crate::share::recv`]).
    pub(crate) fn from_parts(fd: OwnedFd, size: u64, flags: GuestMemfdFlags) -> GuestMemfd {
        GuestMemfd { fd, size, flags }
    }

    /// Adopts a guest_memfd that arrived as a bare fd, e.g. the second fd of
    /// Firecracker's UFFD handshake (`Handshake::guest_memfd` in
    /// `uffd-gmem`), after checking that it is one; its size is read with
    /// `fstat`.
    ///
    /// The check is the one [`share::recv`](crate::share::recv) makes (see
    /// its module's identity table): the `/proc/self/fd/N` link together
    /// with `fstatfs`, so `/proc` must be mounted.
    ///
    /// **Flags.** The kernel has no call that reports the flags a
    /// guest_memfd was created with, so an adopted one reports only what
    /// could be verified without side effects: [`GuestMemfdFlags::MMAP`]
    /// when a one-page shared `mmap` of it succeeds (nothing is faulted in
    /// or allocated), nothing else. [`GuestMemfd::flags`] is thus a subset
    /// of the real flags, never more: [`GuestMemfd::map`] refuses (no
    /// `INIT_SHARED`), and so does anything that needs `WRITE`. When the
    /// creator's flags are known (a protocol fixes them), state them with
    /// [`GuestMemfd::adopt_with_flags`].
    ///
    /// The fd is consumed: on every error it is closed (take a
    /// [`try_clone`](OwnedFd::try_clone) first to keep it).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] (op `"GuestMemfd::adopt"`) when the fd is not a
    /// guest_memfd, naming what it is (the link and the filesystem type): a
    /// memfd, a file, a socket, a pipe, another anonymous inode (an eventfd,
    /// a KVM VM fd) are all refused; the kernel would answer `EINVAL` to a
    /// memslot or populate request naming such an fd. [`Error::Kernel`]
    /// naming `readlink(/proc/self/fd)` (`ENOENT` without `/proc`),
    /// `fstatfs(guest_memfd)` or `fstat(guest_memfd)`.
    ///
    /// # Examples
    ///
    /// A memfd is not a guest_memfd: refused, and closed. A guest_memfd
    /// created here stands in for one received from a VMM:
    ///
    /// ```
    /// use kvm_gmem::{Error, GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    /// use std::os::fd::{FromRawFd, OwnedFd};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // SAFETY: memfd_create returns a new fd (checked), owned by nobody else.
    /// let raw = unsafe { libc::memfd_create(c"not-gmem".as_ptr(), libc::MFD_CLOEXEC) };
    /// assert!(raw >= 0);
    /// // SAFETY: `raw` is that new fd.
    /// let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
    /// let e = GuestMemfd::adopt(memfd).unwrap_err();
    /// assert!(matches!(&e, Error::Invalid { rule, .. } if rule.contains("not a guest_memfd")), "{e}");
    ///
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// let Ok(gmem) = GuestMemfd::builder(2 << 20).flags(vm.guest_memfd_flags()? & shared).create(&vm)
    /// else {
    ///     return Ok(()); // no guest_memfd (before Linux 6.8)
    /// };
    /// let created = gmem.flags();
    /// let adopted = GuestMemfd::adopt(gmem.into_owned_fd())?;
    /// assert_eq!(adopted.size(), 2 << 20);
    /// // What the probe could see (MMAP where it was created with it), never more.
    /// assert_eq!(adopted.flags(), created & GuestMemfdFlags::MMAP);
    /// # Ok(())
    /// # }
    /// ```
    pub fn adopt(fd: OwnedFd) -> Result<GuestMemfd> {
        let op = "GuestMemfd::adopt";
        let size = identify(fd.as_fd())?.map_err(|rule| Error::invalid(op, rule))?;
        let flags = match probe_mapping(fd.as_fd(), false) {
            Ok(()) => GuestMemfdFlags::MMAP,
            Err(_) => GuestMemfdFlags::empty(),
        };
        Ok(GuestMemfd { fd, size, flags })
    }

    /// As [`GuestMemfd::adopt`], with the flags the creator used, which the
    /// caller knows from elsewhere (Firecracker's secret-hiding restore
    /// creates the guest_memfd with `GUEST_MEMFD_FLAG_WRITE`, for one).
    /// [`GuestMemfd::flags`] then reports `flags`.
    ///
    /// The claims a mapping depends on are checked, as
    /// [`share::recv`](crate::share::recv) checks announced ones, so a
    /// false claim cannot make [`GuestMemfd::map`] hand out a mapping that
    /// raises SIGBUS: `MMAP` by mapping the first page, `INIT_SHARED` by
    /// faulting that page in (`MADV_POPULATE_READ`), **which allocates it,
    /// zero-filled, if it was a hole**. A handler that populates the memory
    /// itself (`pwrite`, userfaultfd) should therefore claim only what it
    /// uses, e.g. `WRITE` alone, so that nothing is faulted in before it
    /// writes the page. `WRITE` and `NO_DIRECT_MAP` cannot be observed
    /// without changing the file and are taken as claimed: a false `WRITE`
    /// shows up as the kernel refusing the first `pwrite` (`ENODEV`).
    ///
    /// # Errors
    ///
    /// As [`GuestMemfd::adopt`] (op `"GuestMemfd::adopt_with_flags"`), and
    /// [`Error::Invalid`] for bits this build does not name, `INIT_SHARED`
    /// without `MMAP` (the kernel creates no such guest_memfd), or a
    /// claimed `MMAP` / `INIT_SHARED` the fd does not honour.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{Error, GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let Ok(private) = GuestMemfd::builder(2 << 20).create(&vm) else {
    ///     return Ok(()); // no guest_memfd (before Linux 6.8)
    /// };
    /// // A false claim that a mapping depends on is refused.
    /// let e = GuestMemfd::adopt_with_flags(private.into_owned_fd(), GuestMemfdFlags::MMAP)
    ///     .unwrap_err();
    /// assert!(matches!(e, Error::Invalid { .. }), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn adopt_with_flags(fd: OwnedFd, flags: GuestMemfdFlags) -> Result<GuestMemfd> {
        let op = "GuestMemfd::adopt_with_flags";
        let unknown = flags.bits() & !GuestMemfdFlags::all().bits();
        if unknown != 0 {
            return Err(Error::invalid(
                op,
                format!(
                    "flags {flags} hold bits {unknown:#x} that this build does not name (it \
                     knows {}; RFC flags need their cargo feature)",
                    GuestMemfdFlags::all()
                ),
            ));
        }
        if flags.contains(GuestMemfdFlags::INIT_SHARED) && !flags.contains(GuestMemfdFlags::MMAP) {
            return Err(Error::invalid(
                op,
                format!(
                    "flags {flags}: INIT_SHARED without MMAP (the kernel creates no such \
                     guest_memfd)"
                ),
            ));
        }
        let size = identify(fd.as_fd())?.map_err(|rule| Error::invalid(op, rule))?;
        if flags.contains(GuestMemfdFlags::MMAP) {
            let shared = flags.contains(GuestMemfdFlags::INIT_SHARED);
            probe_mapping(fd.as_fd(), shared).map_err(|p| {
                Error::invalid(
                    op,
                    match p {
                        MappingProbe::NoMmap(e) => format!(
                            "GUEST_MEMFD_FLAG_MMAP was claimed, but mmap of the fd failed: {e}"
                        ),
                        MappingProbe::Private(e) => format!(
                            "GUEST_MEMFD_FLAG_INIT_SHARED was claimed, but the host cannot fault \
                             the guest_memfd's first page in ({e}): the memory is private"
                        ),
                    },
                )
            })?;
        }
        Ok(GuestMemfd { fd, size, flags })
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The flags it was created with.
    ///
    /// For one from [`GuestMemfd::adopt`], the subset that could be
    /// verified (at most `MMAP`); for one from
    /// [`GuestMemfd::adopt_with_flags`], the flags claimed; for one from
    /// [`share::recv`](crate::share::recv), the flags announced. The latter
    /// two had their `MMAP` / `INIT_SHARED` checked.
    pub fn flags(&self) -> GuestMemfdFlags {
        self.flags
    }

    /// Gives up the handle, returning the fd.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    fn check_range(&self, op: &'static str, range: &Range<u64>) -> Result<()> {
        let page = page_size();
        if range.start >= range.end {
            return Err(Error::invalid(
                op,
                format!("empty range {:#x}..{:#x}", range.start, range.end),
            ));
        }
        if !range.start.is_multiple_of(page) || !range.end.is_multiple_of(page) {
            return Err(Error::invalid(
                op,
                format!(
                    "range {:#x}..{:#x} is not page aligned (page size {page:#x})",
                    range.start, range.end
                ),
            ));
        }
        if range.end > self.size {
            return Err(Error::invalid(
                op,
                format!(
                    "range {:#x}..{:#x} ends past the file size {:#x}",
                    range.start, range.end, self.size
                ),
            ));
        }
        Ok(())
    }

    /// `fallocate(gmem, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ...)`:
    /// frees the pages of `range`; they read as zero when touched again.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] unless `range` is non-empty, page aligned and inside
    /// the file (checked before the call); [`Error::Kernel`] otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// if !vm.guest_memfd_flags()?.contains(shared) {
    ///     return Ok(()); // a guest_memfd the host maps needs Linux 6.18
    /// }
    /// let gmem = GuestMemfd::builder(2 << 20).flags(shared).create(&vm)?;
    /// let map = gmem.map()?;
    /// let page = kvm_gmem::page_size();
    /// map.fill(0, 2 * page as usize, 0xaa)?;
    /// gmem.punch_hole(0..page)?; // the first page is freed ...
    /// let mut byte = [0u8];
    /// map.read_at(0, &mut byte)?;
    /// assert_eq!(byte, [0]); // ... and reads as zero
    /// map.read_at(page, &mut byte)?;
    /// assert_eq!(byte, [0xaa]); // the second is untouched
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://man7.org/linux/man-pages/man2/fallocate.2.html>
    #[doc(alias = "FALLOC_FL_PUNCH_HOLE")]
    pub fn punch_hole(&self, range: Range<u64>) -> Result<()> {
        let op = "fallocate(PUNCH_HOLE)";
        self.check_range(op, &range)?;
        self.fallocate(
            op,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            range,
        )
    }

    /// `fallocate(gmem, FALLOC_FL_KEEP_SIZE, ...)`: allocates the pages of
    /// `range` up front.
    ///
    /// # Errors
    ///
    /// As for [`GuestMemfd::punch_hole`].
    ///
    /// # References
    ///
    /// <https://man7.org/linux/man-pages/man2/fallocate.2.html>
    pub fn allocate(&self, range: Range<u64>) -> Result<()> {
        let op = "fallocate(KEEP_SIZE)";
        self.check_range(op, &range)?;
        self.fallocate(op, libc::FALLOC_FL_KEEP_SIZE, range)
    }

    fn fallocate(&self, op: &'static str, mode: i32, range: Range<u64>) -> Result<()> {
        crate::sys::fallocate(self.fd.as_fd(), mode, range.start, range.end - range.start)
            .map_err(|e| Error::kernel(op, e))
    }

    /// `mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, gmem, 0)`: the
    /// host's view of the whole file; see [`crate::Mapping`].
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when any access through the mapping would raise
    /// SIGBUS: the guest_memfd lacks `MMAP` (no mapping possible) or
    /// `INIT_SHARED` (every host fault is refused). [`Error::Kernel`] if
    /// `mmap` fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// if !vm.guest_memfd_flags()?.contains(shared) {
    ///     return Ok(()); // a guest_memfd the host maps needs Linux 6.18
    /// }
    /// let gmem = GuestMemfd::builder(2 << 20).flags(shared).create(&vm)?;
    /// let map = gmem.map()?;
    /// assert_eq!(map.len() as u64, gmem.size());
    /// // Without INIT_SHARED every host access would fault: refused.
    /// let private = GuestMemfd::builder(2 << 20).mmap(true).create(&vm)?;
    /// assert!(private.map().is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd> (mapping a guest_memfd)
    /// - <https://man7.org/linux/man-pages/man2/mmap.2.html>
    pub fn map(&self) -> Result<crate::mapping::Mapping> {
        crate::mapping::Mapping::new(self)
    }
}

impl AsFd for GuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for GuestMemfd {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_accepts_both_kernel_forms_only() {
        let ok = [
            (ANON_INODE_FS_MAGIC, "anon_inode:[kvm-gmem]"),
            (GUEST_MEMFD_MAGIC, "/[kvm-gmem] (deleted)"),
            (GUEST_MEMFD_MAGIC, "/[kvm-gmem]"),
        ];
        for (t, l) in ok {
            assert!(is_guest_memfd(t, OsStr::new(l)), "{t:#x} {l}");
        }
        let refused = [
            // The right name on the wrong filesystem, and the reverse.
            (GUEST_MEMFD_MAGIC, "anon_inode:[kvm-gmem]"),
            (ANON_INODE_FS_MAGIC, "/[kvm-gmem] (deleted)"),
            // tmpfs and ext4 files named like a guest_memfd.
            (0x0102_1994, "/[kvm-gmem] (deleted)"),
            (0xef53, "/[kvm-gmem]"),
            // Other anonymous inodes.
            (ANON_INODE_FS_MAGIC, "anon_inode:[eventfd]"),
            (ANON_INODE_FS_MAGIC, "anon_inode:kvm-vm"),
            (GUEST_MEMFD_MAGIC, "/memfd:[kvm-gmem] (deleted)"),
        ];
        for (t, l) in refused {
            assert!(!is_guest_memfd(t, OsStr::new(l)), "{t:#x} {l}");
        }
    }
}
