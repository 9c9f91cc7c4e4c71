//! `KVM_SET_MEMORY_ATTRIBUTES`: private/shared state of guest memory.

use crate::error::{Errno, Error, Result};
use crate::kvm::{Extension, check_extension};
use crate::sys::{ioctl_arg, page_size};
use kvm_gmem_sys as sys;
use std::ops::Range;
use std::os::fd::BorrowedFd;

bitflags::bitflags! {
    /// `KVM_MEMORY_ATTRIBUTE_*`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MemoryAttributes: u64 {
        /// `KVM_MEMORY_ATTRIBUTE_PRIVATE` (Linux 6.8): the guest holds the
        /// range as private; KVM maps it from guest_memfd.
        const PRIVATE = sys::KVM_MEMORY_ATTRIBUTE_PRIVATE;
    }
}

/// The attributes `vm` supports; see
/// [`VmOps::supported_attributes`](crate::VmOps::supported_attributes).
pub(crate) fn supported(vm: BorrowedFd<'_>) -> Result<MemoryAttributes> {
    let v = check_extension(vm, Extension::MEMORY_ATTRIBUTES)?;
    Ok(MemoryAttributes::from_bits_retain(v.max(0) as u64))
}

/// `ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, ..)`; see
/// [`VmOps::set_attributes`](crate::VmOps::set_attributes).
pub(crate) fn set(
    vm: BorrowedFd<'_>,
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
    let supported = supported(vm)?;
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
    let r = unsafe { ioctl_arg::<{ sys::KVM_SET_MEMORY_ATTRIBUTES }, _>(vm, &mut arg) };
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
