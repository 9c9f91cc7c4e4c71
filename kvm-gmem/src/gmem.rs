//! `KVM_CREATE_GUEST_MEMFD`: the builder, the owned handle, and
//! `fallocate` on it.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::kvm::{Extension, check_extension};
use crate::sys::{ioctl_arg, own_new_fd, page_size};
use crate::vm::VmOps;
use kvm_gmem_sys as sys;
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

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The flags it was created with.
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
