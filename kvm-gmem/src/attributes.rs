//! `KVM_SET_MEMORY_ATTRIBUTES`: private/shared state of guest memory.

use crate::error::{Errno, Error, Result};
use crate::kvm::{Cap, check_extension};
use crate::sys::{ioctl_ptr, page_size};
use kvm_gmem_sys as sys;
use std::ops::Range;
use std::os::fd::AsFd;

bitflags::bitflags! {
    /// `KVM_MEMORY_ATTRIBUTE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MemoryAttributes: u64 {
        /// `KVM_MEMORY_ATTRIBUTE_PRIVATE` (Linux 6.8): the guest holds the
        /// range as private; KVM maps it from guest_memfd.
        const PRIVATE = sys::KVM_MEMORY_ATTRIBUTE_PRIVATE;
    }
}

/// The attributes `vm` supports: `KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES)`
/// on the VM fd. On Linux 7.3, `/dev/kvm` may answer `PRIVATE` while a default
/// VM answers 0: only the VM's answer counts for that VM.
pub fn supported_attributes(vm: &impl AsFd) -> Result<MemoryAttributes> {
    let v = check_extension(vm, Cap::MEMORY_ATTRIBUTES)?;
    Ok(MemoryAttributes::from_bits_retain(v.max(0) as u64))
}

/// `ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &{gpa, size, attributes})`: sets
/// `attributes` (replacing the previous ones) on the guest physical `range`
/// (since Linux 6.8).
///
/// # Errors
///
/// [`Error::Invalid`] unless `range` is non-empty and page aligned;
/// [`Error::Unsupported`] naming `KVM_CAP_MEMORY_ATTRIBUTES` when the VM does
/// not support every requested attribute (or any, when clearing);
/// [`Error::Kernel`] otherwise.
#[doc(alias = "KVM_SET_MEMORY_ATTRIBUTES")]
pub fn set_memory_attributes(
    vm: &impl AsFd,
    range: Range<u64>,
    attributes: MemoryAttributes,
) -> Result<()> {
    let op = "KVM_SET_MEMORY_ATTRIBUTES";
    let page = page_size();
    if range.start >= range.end
        || !range.start.is_multiple_of(page)
        || !range.end.is_multiple_of(page)
    {
        return Err(Error::invalid(
            op,
            format!(
                "guest range {:#x}..{:#x} must be non-empty and page aligned",
                range.start, range.end
            ),
        ));
    }
    let supported = supported_attributes(vm)?;
    if supported.is_empty() || !supported.contains(attributes) {
        return Err(Error::Unsupported {
            op,
            capability: "KVM_CAP_MEMORY_ATTRIBUTES",
            evidence: format!(
                "KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES) on the VM fd = {:#x}, requested {:#x}",
                supported.bits(),
                attributes.bits()
            ),
        });
    }
    let mut arg = sys::kvm_memory_attributes {
        address: range.start,
        size: range.end - range.start,
        attributes: attributes.bits(),
        flags: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: the request encodes `kvm_memory_attributes`, which holds no pointers.
    let r = unsafe { ioctl_ptr(vm.as_fd(), sys::KVM_SET_MEMORY_ATTRIBUTES, &mut arg) };
    match r {
        Ok(_) => Ok(()),
        Err(e @ Errno(libc::ENOTTY)) => Err(Error::Unsupported {
            op,
            capability: "KVM_CAP_MEMORY_ATTRIBUTES",
            evidence: format!("the ioctl answered {e}"),
        }),
        Err(e) => Err(Error::kernel(op, e)),
    }
}
