//! [`VmOps`]: every operation on an existing VM fd, one method each. The
//! methods only delegate to the module that owns the concept (`kvm`,
//! `gmem`, `memslot`, `attributes`), which sees a plain `BorrowedFd`.

use crate::attributes::{self, MemoryAttributes};
use crate::error::Result;
use crate::gmem::{self, GuestMemfdFlags};
use crate::kvm::{self, Extension, Vm};
use crate::memslot::{self, MemoryRegion2};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};

/// The operations on a VM fd.
///
/// Implemented for [`Vm`], for a [`BorrowedFd`] of any VM fd, for references
/// to either, and (feature `kvm-ioctls`) for `kvm_ioctls::VmFd`; the one
/// method to write for a VMM's own VM type is [`VmOps::vm_fd`]. No method
/// shares a name with one of `VmFd`'s own (its `check_extension` and
/// `set_memory_attributes` take kvm-ioctls' types), so method syntax works
/// on a `VmFd` as on a [`Vm`].
///
/// ```
/// use kvm_gmem::{Extension, KvmDevice, VmOps, VmType};
///
/// # fn main() -> Result<(), kvm_gmem::Error> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
/// println!("guest_memfd: {}", vm.extension(Extension::GUEST_MEMFD)?);
/// println!("flags: {}", vm.guest_memfd_flags()?);
/// # Ok(())
/// # }
/// ```
pub trait VmOps {
    /// The VM's descriptor, borrowed for as long as `self` is.
    fn vm_fd(&self) -> BorrowedFd<'_>;

    /// `ioctl(vm, KVM_CHECK_EXTENSION, cap)`: this VM's answer (0 = not
    /// supported), which can differ from `/dev/kvm`'s
    /// ([`KvmDevice::extension`](crate::KvmDevice::extension)) for memory
    /// attributes and guest_memfd flags.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-check-extension>
    #[doc(alias = "KVM_CHECK_EXTENSION")]
    fn extension(&self, cap: Extension) -> Result<i32> {
        kvm::check_extension(self.vm_fd(), cap)
    }

    /// The guest_memfd flags this VM accepts:
    /// `KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS)` on the VM fd (0
    /// before Linux 6.18). Bits the crate does not name are kept.
    ///
    /// # References
    ///
    /// - <https://docs.kernel.org/virt/kvm/api.html#kvm-check-extension>
    /// - <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd> (the flags)
    #[doc(alias = "KVM_CAP_GUEST_MEMFD_FLAGS")]
    fn guest_memfd_flags(&self) -> Result<GuestMemfdFlags> {
        gmem::supported_flags(self.vm_fd())
    }

    /// `ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &region)`: creates or changes
    /// the slot (since Linux 6.8).
    ///
    /// # Safety
    ///
    /// From here on the kernel trusts the userspace address: the memory at
    /// `userspace_addr .. + size` (when one was given), and the userfault
    /// bitmap (RFC), must stay mapped and must not be repurposed until the
    /// slot is deleted ([`VmOps::delete_memory_region`]) or the VM is
    /// destroyed. KVM reads and writes that memory on the guest's behalf.
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`](crate::Error::Kernel) with the kernel's errno, e.g.
    /// `EEXIST` for a guest range that overlaps another slot, and for a
    /// guest_memfd range already bound to another slot (Linux 7.2 and
    /// later; `EINVAL` up to 7.1);
    /// [`Error::Unsupported`](crate::Error::Unsupported) naming
    /// `GUEST_MEMFD_FLAG_MMAP` on arm64, whose KVM binds only a guest_memfd
    /// the host can map.
    ///
    /// # Examples
    ///
    /// A guest_memfd-backed slot with the host's view as its
    /// `userspace_addr`:
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryRegion2, VmOps, VmType};
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
    /// let region = MemoryRegion2::builder(0, 0x1_0000_0000, 2 << 20)
    ///     .guest_memfd(&gmem, 0)
    ///     .userspace(&map)
    ///     .build()?;
    /// // SAFETY: `map` stays mapped until the slot is deleted below.
    /// unsafe { vm.set_memory_region(&region)? };
    /// vm.delete_memory_region(0)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
    #[doc(alias = "KVM_SET_USER_MEMORY_REGION2")]
    #[allow(unsafe_code)]
    unsafe fn set_memory_region(&self, region: &MemoryRegion2<'_>) -> Result<()> {
        // SAFETY: the caller's promise (# Safety) is the one `set` needs.
        unsafe { region.set(self.vm_fd()) }
    }

    /// `ioctl(vm, KVM_SET_USER_MEMORY_REGION2, {slot, memory_size: 0})`:
    /// deletes a slot. Safe: deleting makes the kernel stop using the memory.
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`](crate::Error::Kernel) with the kernel's errno.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
    #[doc(alias = "KVM_SET_USER_MEMORY_REGION2")]
    fn delete_memory_region(&self, slot: u32) -> Result<()> {
        memslot::delete(self.vm_fd(), slot)
    }

    /// The memory attributes this VM supports:
    /// `KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES)` on the VM fd. On
    /// Linux 7.3, `/dev/kvm` may answer `PRIVATE` while a default VM answers
    /// 0: only the VM's answer counts for that VM.
    ///
    /// # References
    ///
    /// - <https://docs.kernel.org/virt/kvm/api.html#kvm-check-extension>
    /// - <https://docs.kernel.org/virt/kvm/api.html#kvm-set-memory-attributes>
    #[doc(alias = "KVM_CAP_MEMORY_ATTRIBUTES")]
    fn supported_attributes(&self) -> Result<MemoryAttributes> {
        attributes::supported(self.vm_fd())
    }

    /// `ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &{gpa, size, attributes})`:
    /// sets `attributes` (replacing the previous ones) on the guest physical
    /// `range` (since Linux 6.8).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`](crate::Error::Invalid) unless `range` is non-empty
    /// and page aligned; [`Error::Unsupported`](crate::Error::Unsupported)
    /// naming `KVM_CAP_MEMORY_ATTRIBUTES` when the VM does not support every
    /// requested attribute (or any, when clearing);
    /// [`Error::Kernel`](crate::Error::Kernel) otherwise.
    ///
    /// # Examples
    ///
    /// Making the first 2 MiB private, then one page of it shared again; a
    /// VM without private memory (a default x86 VM, kernels before 6.8)
    /// refuses with the capability named:
    ///
    /// ```
    /// use kvm_gmem::{KvmDevice, MemoryAttributes, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// match vm.set_attributes(0..2 << 20, MemoryAttributes::PRIVATE) {
    ///     Ok(()) => vm.set_attributes(0..0x1000, MemoryAttributes::empty())?,
    ///     Err(e) if e.is_unsupported() => println!("no private memory: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-memory-attributes>
    #[doc(alias = "KVM_SET_MEMORY_ATTRIBUTES")]
    fn set_attributes(&self, range: Range<u64>, attributes: MemoryAttributes) -> Result<()> {
        attributes::set(self.vm_fd(), range, attributes)
    }
}

impl VmOps for Vm {
    fn vm_fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl VmOps for BorrowedFd<'_> {
    fn vm_fd(&self) -> BorrowedFd<'_> {
        *self
    }
}

impl<T: VmOps + ?Sized> VmOps for &T {
    fn vm_fd(&self) -> BorrowedFd<'_> {
        (**self).vm_fd()
    }
}
