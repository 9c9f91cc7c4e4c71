//! Population of guest_memfd ranges.
#![allow(unused_imports)]

use crate::error::Errno;
use std::os::fd::AsFd;

/// `ioctl(vm, KVM_GUEST_MEMFD_POPULATE, {size: 0})`: the only way the crate
/// issues request 0x4020AED6 without knowing what it means on this kernel.
#[cfg(feature = "rfc-populate")]
pub(crate) fn probe_populate_ioctl(vm: &impl AsFd) -> Result<(), Errno> {
    use kvm_gmem_sys::rfc::populate as rfc;
    let mut arg = rfc::kvm_guest_memfd_populate {
        gpa: 0,
        size: 0,
        from: std::ptr::null_mut(),
        flags: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: the request encodes `kvm_guest_memfd_populate` (32 bytes). With
    // size 0 a POPULATE kernel copies nothing, and `from` is NULL; a kernel
    // where the number is KVM_ASYNC_PF reads op 0 and refuses with EINVAL.
    unsafe { crate::sys::ioctl_ptr(vm.as_fd(), rfc::KVM_GUEST_MEMFD_POPULATE, &mut arg) }.map(|_| ())
}
