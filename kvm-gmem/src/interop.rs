//! Interoperation with kvm-ioctls and kvm-bindings (feature `kvm-ioctls`).
//!
//! A `kvm_ioctls::VmFd` is a [`VmOps`]: pass `&vm_fd` wherever this crate
//! takes a VM (`GuestMemfd::builder(..).create(&vm_fd)`) and call the VM
//! operations on it with method syntax (`vm_fd.extension(..)`,
//! `vm_fd.set_attributes(..)`): no name is shared with `VmFd`'s own methods,
//! and none of this crate's types shares a name with kvm-ioctls' (its `Kvm`
//! and `Cap` are [`KvmDevice`](crate::KvmDevice) and
//! [`Extension`](crate::Extension) here), so one file imports both.
//!
//! A `VcpuFd` implements only `AsRawFd`, so [`vcpu_fd`] lends its
//! descriptor to [`crate::pre_fault_memory`].
//!
//! The arguments of kvm-bindings that this crate also builds convert both
//! ways where that is meaningful, by copying field by field; the two
//! crates' structs are checked at compile time to have the same size,
//! alignment and field offsets, so the copy cannot silently drift:
//!
//! | this crate | kvm-bindings |
//! | --- | --- |
//! | [`MemoryRegion2`] (`From`) | `kvm_userspace_memory_region2`, for `VmFd::set_user_memory_region2` |
//! | [`MemoryAttributes::to_kvm_bindings`] / [`MemoryAttributes::from_kvm_bindings`] | `kvm_memory_attributes`, for `VmFd::set_memory_attributes` |
//! | [`MemoryFault::from_kvm_bindings_run`], [`MemoryFault::from_vcpu_exit`] | `kvm_run` (`VcpuFd::get_kvm_run`), `VcpuExit::MemoryFault` |
//!
//! ```
//! use kvm_gmem::{Extension, GuestMemfd, VmOps};
//! use kvm_ioctls::{Cap, Kvm};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # if kvm_gmem::KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
//! let kvm = Kvm::new()?;
//! let vm_fd = kvm.create_vm()?;
//! // kvm-ioctls' own check, and this crate's, on the same VmFd.
//! let _ = vm_fd.check_extension(Cap::UserMemory);
//! if vm_fd.extension(Extension::GUEST_MEMFD)? == 0 {
//!     println!("no guest_memfd on this kernel");
//!     return Ok(());
//! }
//! let gmem = GuestMemfd::builder(2 << 20).create(&vm_fd)?;
//! println!("guest_memfd of {} bytes on a kvm-ioctls VM", gmem.size());
//! # Ok(())
//! # }
//! ```
//!
//! # References
//!
//! - <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
//! - <https://docs.kernel.org/virt/kvm/api.html#kvm-set-memory-attributes>
//! - <https://docs.kernel.org/virt/kvm/api.html#kvm-exit-memory-fault>

use crate::attributes::MemoryAttributes;
use crate::error::{Error, Result};
use crate::fault::MemoryFault;
use crate::memslot::MemoryRegion2;
use crate::vm::VmOps;
use kvm_gmem_sys as sys;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Compile-time proof that two `repr(C)` structs have the same size,
/// alignment and offset of every named field.
macro_rules! same_layout {
    ($a:ty, $b:ty: $($field:tt)+) => {
        static_assertions::assert_eq_size!($a, $b);
        static_assertions::assert_eq_align!($a, $b);
        $(static_assertions::const_assert_eq!(
            std::mem::offset_of!($a, $field),
            std::mem::offset_of!($b, $field)
        );)+
    };
}

same_layout!(
    kvm_bindings::kvm_userspace_memory_region2,
    sys::kvm_userspace_memory_region2:
    slot flags guest_phys_addr memory_size userspace_addr guest_memfd_offset guest_memfd pad1 pad2
);
same_layout!(
    kvm_bindings::kvm_memory_attributes,
    sys::kvm_memory_attributes:
    address size attributes flags
);
same_layout!(kvm_bindings::kvm_run, sys::kvm_run: exit_reason __bindgen_anon_1);
static_assertions::const_assert_eq!(
    kvm_bindings::KVM_EXIT_MEMORY_FAULT,
    sys::KVM_EXIT_MEMORY_FAULT
);
static_assertions::const_assert_eq!(
    kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE as u64,
    sys::KVM_MEMORY_EXIT_FLAG_PRIVATE
);
static_assertions::const_assert_eq!(
    kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64,
    sys::KVM_MEMORY_ATTRIBUTE_PRIVATE
);
static_assertions::const_assert_eq!(kvm_bindings::KVM_MEM_GUEST_MEMFD, sys::KVM_MEM_GUEST_MEMFD);

impl VmOps for kvm_ioctls::VmFd {
    fn vm_fd(&self) -> BorrowedFd<'_> {
        #[allow(unsafe_code)]
        // SAFETY: a VmFd owns its descriptor and keeps it open until dropped;
        // the returned borrow cannot outlive `self`.
        unsafe {
            BorrowedFd::borrow_raw(self.as_raw_fd())
        }
    }
}

/// The vCPU descriptor of a kvm-ioctls `VcpuFd` (for
/// [`crate::pre_fault_memory`]), borrowed for the `VcpuFd`'s lifetime.
pub fn vcpu_fd(vcpu: &kvm_ioctls::VcpuFd) -> BorrowedFd<'_> {
    #[allow(unsafe_code)]
    // SAFETY: the VcpuFd owns its descriptor and keeps it open until
    // dropped; the returned borrow cannot outlive `vcpu`.
    unsafe {
        BorrowedFd::borrow_raw(vcpu.as_raw_fd())
    }
}

/// The validated slot as kvm-bindings' argument, field by field (the RFC
/// KVM Userfault bitmap, when set, travels in `pad2[0]`, where that series
/// puts it), for `VmFd::set_user_memory_region2`.
///
/// The raw struct names the guest_memfd by number and does not borrow it:
/// keep the [`GuestMemfd`](crate::GuestMemfd) open until the ioctl has
/// returned. Prefer [`VmOps::set_memory_region`], which a `VmFd` also has.
///
/// # Examples
///
/// ```
/// use kvm_gmem::MemoryRegion2;
///
/// # fn main() -> Result<(), kvm_gmem::Error> {
/// let page = kvm_gmem::page_size();
/// let region = MemoryRegion2::builder(3, 0x10_0000, 4 * page)
///     .userspace_addr(0x7f00_0000_0000)
///     .build()?;
/// let raw = kvm_bindings::kvm_userspace_memory_region2::from(&region);
/// assert_eq!((raw.slot, raw.guest_phys_addr), (3, 0x10_0000));
/// assert_eq!(raw.memory_size, 4 * page);
/// // Then, with a kvm-ioctls VmFd: unsafe { vm_fd.set_user_memory_region2(raw) }
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
impl From<&MemoryRegion2<'_>> for kvm_bindings::kvm_userspace_memory_region2 {
    fn from(region: &MemoryRegion2<'_>) -> Self {
        let raw = region.as_raw();
        kvm_bindings::kvm_userspace_memory_region2 {
            slot: raw.slot,
            flags: raw.flags,
            guest_phys_addr: raw.guest_phys_addr,
            memory_size: raw.memory_size,
            userspace_addr: raw.userspace_addr,
            guest_memfd_offset: raw.guest_memfd_offset,
            guest_memfd: raw.guest_memfd,
            pad1: raw.pad1,
            pad2: raw.pad2,
        }
    }
}

/// As for `From<&MemoryRegion2>`.
impl From<MemoryRegion2<'_>> for kvm_bindings::kvm_userspace_memory_region2 {
    fn from(region: MemoryRegion2<'_>) -> Self {
        Self::from(&region)
    }
}

/// The attributes of a kvm-bindings `kvm_memory_attributes` (its
/// `attributes` field; bits the crate does not name are kept). The range is
/// [`MemoryAttributes::from_kvm_bindings`]'s.
impl From<kvm_bindings::kvm_memory_attributes> for MemoryAttributes {
    fn from(raw: kvm_bindings::kvm_memory_attributes) -> Self {
        MemoryAttributes::from_bits_retain(raw.attributes)
    }
}

impl MemoryAttributes {
    /// kvm-bindings' argument of `KVM_SET_MEMORY_ATTRIBUTES` setting `self`
    /// on the guest physical `range` (`flags` 0), for
    /// `VmFd::set_memory_attributes`. Nothing is checked here:
    /// [`VmOps::set_attributes`] checks the range and the VM's support
    /// first.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::MemoryAttributes;
    ///
    /// let raw = MemoryAttributes::PRIVATE.to_kvm_bindings(0x1000..0x3000);
    /// assert_eq!((raw.address, raw.size), (0x1000, 0x2000));
    /// assert_eq!(raw.attributes, MemoryAttributes::PRIVATE.bits());
    /// assert_eq!(
    ///     MemoryAttributes::from_kvm_bindings(&raw).unwrap(),
    ///     (0x1000..0x3000, MemoryAttributes::PRIVATE)
    /// );
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-memory-attributes>
    pub fn to_kvm_bindings(self, range: Range<u64>) -> kvm_bindings::kvm_memory_attributes {
        kvm_bindings::kvm_memory_attributes {
            address: range.start,
            size: range.end.saturating_sub(range.start),
            attributes: self.bits(),
            flags: 0,
        }
    }

    /// The guest physical range and the attributes of kvm-bindings'
    /// `kvm_memory_attributes` (bits the crate does not name are kept).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when `address + size` overflows or `flags` is not
    /// 0 (the kernel answers `EINVAL` to both).
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-memory-attributes>
    pub fn from_kvm_bindings(
        raw: &kvm_bindings::kvm_memory_attributes,
    ) -> Result<(Range<u64>, MemoryAttributes)> {
        let op = "KVM_SET_MEMORY_ATTRIBUTES";
        if raw.flags != 0 {
            return Err(Error::invalid(
                op,
                format!("flags {:#x} must be 0", raw.flags),
            ));
        }
        let end = raw.address.checked_add(raw.size).ok_or_else(|| {
            Error::invalid(
                op,
                format!(
                    "address {:#x} + size {:#x} overflows",
                    raw.address, raw.size
                ),
            )
        })?;
        Ok((
            raw.address..end,
            MemoryAttributes::from_bits_retain(raw.attributes),
        ))
    }
}

impl MemoryFault {
    /// From kvm-ioctls' `VcpuExit::MemoryFault { flags, gpa, size }`; `None`
    /// for any other exit.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-exit-memory-fault>
    pub fn from_vcpu_exit(exit: &kvm_ioctls::VcpuExit<'_>) -> Option<MemoryFault> {
        match exit {
            kvm_ioctls::VcpuExit::MemoryFault { flags, gpa, size } => {
                Some(MemoryFault::from_raw(*flags, *gpa, *size))
            }
            _ => None,
        }
    }

    /// From kvm-bindings' run structure (`VcpuFd::get_kvm_run`), when its
    /// exit reason is `KVM_EXIT_MEMORY_FAULT`; as
    /// [`MemoryFault::from_kvm_run`] for this crate's bindings.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{MemoryFault, MemoryFaultFlags};
    ///
    /// let mut run = kvm_bindings::kvm_run::default();
    /// assert_eq!(MemoryFault::from_kvm_bindings_run(&run), None);
    /// run.exit_reason = kvm_bindings::KVM_EXIT_MEMORY_FAULT;
    /// run.__bindgen_anon_1.memory_fault.flags = kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE.into();
    /// run.__bindgen_anon_1.memory_fault.gpa = 0x20_0000;
    /// run.__bindgen_anon_1.memory_fault.size = 0x1000;
    /// let fault = MemoryFault::from_kvm_bindings_run(&run).unwrap();
    /// assert!(fault.is_private());
    /// assert_eq!((fault.gpa, fault.size), (0x20_0000, 0x1000));
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-exit-memory-fault>
    pub fn from_kvm_bindings_run(run: &kvm_bindings::kvm_run) -> Option<MemoryFault> {
        if run.exit_reason != kvm_bindings::KVM_EXIT_MEMORY_FAULT {
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: with exit_reason KVM_EXIT_MEMORY_FAULT the kernel wrote the
        // `memory_fault` member of the exit union; all its fields are
        // integers, valid for any bit pattern.
        let m = unsafe { run.__bindgen_anon_1.memory_fault };
        Some(MemoryFault::from_raw(m.flags, m.gpa, m.size))
    }
}
