//! Interoperation with kvm-ioctls (feature `kvm-ioctls`).
//!
//! Every VM API of this crate takes any [`AsFd`](std::os::fd::AsFd); a
//! `kvm_ioctls::VmFd` implements only `AsRawFd`, so [`vm_fd`] lends its
//! descriptor for as long as the `VmFd` is borrowed.

use crate::fault::MemoryFault;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The VM descriptor of a kvm-ioctls `VmFd`, borrowed for the `VmFd`'s
/// lifetime: pass it wherever this crate takes `&impl AsFd`.
pub fn vm_fd(vm: &kvm_ioctls::VmFd) -> BorrowedFd<'_> {
    #[allow(unsafe_code)]
    // SAFETY: a VmFd owns its descriptor and keeps it open until dropped; the
    // returned borrow cannot outlive `vm`.
    unsafe {
        BorrowedFd::borrow_raw(vm.as_raw_fd())
    }
}

/// The vCPU descriptor of a kvm-ioctls `VcpuFd` (for
/// [`crate::pre_fault_memory`]), borrowed for the `VcpuFd`'s lifetime.
pub fn vcpu_fd(vcpu: &kvm_ioctls::VcpuFd) -> BorrowedFd<'_> {
    #[allow(unsafe_code)]
    // SAFETY: as in `vm_fd`: the VcpuFd owns its descriptor for its lifetime.
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
