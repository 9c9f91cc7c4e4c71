//! Interoperation with kvm-ioctls (feature `kvm-ioctls`).
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

use crate::fault::MemoryFault;
use crate::vm::VmOps;
use std::os::fd::{AsRawFd, BorrowedFd};

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

impl MemoryFault {
    /// From kvm-ioctls' `VcpuExit::MemoryFault { flags, gpa, size }`; `None`
    /// for any other exit.
    pub fn from_vcpu_exit(exit: &kvm_ioctls::VcpuExit<'_>) -> Option<MemoryFault> {
        match exit {
            kvm_ioctls::VcpuExit::MemoryFault { flags, gpa, size } => {
                Some(MemoryFault::from_raw(*flags, *gpa, *size))
            }
            _ => None,
        }
    }
}
