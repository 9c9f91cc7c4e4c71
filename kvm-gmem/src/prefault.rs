//! `KVM_PRE_FAULT_MEMORY`: map guest memory before the guest touches it.

use crate::error::{Errno, Error, Result};
use crate::kvm::{Extension, KvmDevice};
use crate::sys::{ioctl_arg, page_size};
use kvm_gmem_sys as sys;
use std::ops::Range;
use std::os::fd::AsFd;

/// How far a pre-fault got.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PreFault {
    /// Bytes mapped, from the start of the request.
    pub done: u64,
    /// What was left when the kernel stopped (empty on full success).
    pub remaining: Range<u64>,
    /// Why it stopped early, if it did (`ENOENT`: no memslot covers
    /// `remaining.start`; `EFAULT`, `ENOMEM`, ...).
    pub stopped: Option<Errno>,
}

impl PreFault {
    /// Whether every byte was mapped.
    pub fn is_complete(&self) -> bool {
        self.stopped.is_none() && self.remaining.is_empty()
    }
}

/// `ioctl(vcpu, KVM_PRE_FAULT_MEMORY, &{gpa, size})`, repeated until the
/// range is done or the kernel stops: maps `range` of guest physical memory
/// into the stage-2 page tables (since Linux 6.11; vCPU ioctl).
///
/// The kernel reports partial progress by advancing `gpa` and shrinking
/// `size`; `EINTR` and `EAGAIN` are retried (bounded), any other error ends
/// the call with [`PreFault::stopped`] set and the progress kept.
///
/// A free function, not a [`VmOps`](crate::VmOps) method: it is a vCPU
/// ioctl, and the crate has no vCPU type, so it takes any vCPU fd (a
/// kvm-ioctls `VcpuFd` through `interop::vcpu_fd`).
///
/// # Errors
///
/// [`Error::Invalid`] unless `range` is non-empty and page aligned (size 0
/// would be `EINVAL`); [`Error::Unsupported`] naming
/// `KVM_CAP_PRE_FAULT_MEMORY` when the kernel has no pre-fault
/// (`ENOTTY`/`EOPNOTSUPP` before any progress).
///
/// # Examples
///
/// Mapping the guest's first 16 MiB before its vCPU first runs, so that
/// the first accesses take no stage-2 fault (with kvm-ioctls, pass
/// `&interop::vcpu_fd(&vcpu)`):
///
/// ```
/// use kvm_gmem::{Error, pre_fault_memory};
/// use std::os::fd::AsFd;
///
/// fn warm_up(vcpu: &impl AsFd) -> Result<(), Error> {
///     match pre_fault_memory(vcpu, 0..16 << 20) {
///         Ok(p) if p.is_complete() => {}
///         Ok(p) => eprintln!("pre-fault stopped at {:#x}: {:?}", p.remaining.start, p.stopped),
///         // Before Linux 6.11 the guest simply faults on first access.
///         Err(e) if e.is_unsupported() => {}
///         Err(e) => return Err(e),
///     }
///     Ok(())
/// }
/// ```
///
/// # References
///
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-pre-fault-memory>
#[doc(alias = "KVM_PRE_FAULT_MEMORY")]
pub fn pre_fault_memory(vcpu: &impl AsFd, range: Range<u64>) -> Result<PreFault> {
    let op = "KVM_PRE_FAULT_MEMORY";
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
    let mut arg = sys::kvm_pre_fault_memory {
        gpa: range.start,
        size: range.end - range.start,
        ..Default::default()
    };
    let mut retries = 0u32;
    loop {
        #[allow(unsafe_code)]
        // SAFETY: the request encodes `kvm_pre_fault_memory`, which holds no pointers.
        let r = unsafe { ioctl_arg::<{ sys::KVM_PRE_FAULT_MEMORY }, _>(vcpu.as_fd(), &mut arg) };
        let remaining = arg.gpa..arg.gpa + arg.size;
        let done = arg.gpa - range.start;
        match r {
            Ok(_) if arg.size == 0 => {
                return Ok(PreFault {
                    done,
                    remaining,
                    stopped: None,
                });
            }
            // A positive return with size left: keep going from where it stopped.
            Ok(_) => retries = 0,
            Err(Errno(libc::EINTR | libc::EAGAIN)) if retries < 1000 => retries += 1,
            Err(e) if done == 0 && !matches!(e.0, libc::EINTR | libc::EAGAIN) => {
                // Kernels without pre-fault answer variously (ENOTTY,
                // EOPNOTSUPP, ENOSPC without a memslot): ask the capability.
                if let Some(cap) = system_cap() {
                    if cap == 0 {
                        return Err(Error::Unsupported {
                            op,
                            capability: "KVM_CAP_PRE_FAULT_MEMORY",
                            evidence: format!(
                                "KVM_CAP_PRE_FAULT_MEMORY = 0; the ioctl answered {e}"
                            ),
                        });
                    }
                } else if matches!(e.0, libc::ENOTTY | libc::EOPNOTSUPP)
                    // arm64 answers EINVAL to a vCPU ioctl it does not know.
                    || (cfg!(target_arch = "aarch64") && e.0 == libc::EINVAL)
                {
                    return Err(Error::Unsupported {
                        op,
                        capability: "KVM_CAP_PRE_FAULT_MEMORY",
                        evidence: format!("the ioctl answered {e}"),
                    });
                }
                return Ok(PreFault {
                    done,
                    remaining,
                    stopped: Some(e),
                });
            }
            Err(e) => {
                return Ok(PreFault {
                    done,
                    remaining,
                    stopped: Some(e),
                });
            }
        }
    }
}

/// `KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY)` on `/dev/kvm`, when it
/// can be opened (only on the error path: a vCPU fd cannot answer it).
fn system_cap() -> Option<i32> {
    let kvm = KvmDevice::open().ok()?;
    kvm.extension(Extension::PRE_FAULT_MEMORY).ok()
}
