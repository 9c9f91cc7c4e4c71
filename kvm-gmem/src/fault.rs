//! `KVM_EXIT_MEMORY_FAULT`: why a vCPU could not map guest memory.

use kvm_gmem_sys as sys;

bitflags::bitflags! {
    /// `KVM_MEMORY_EXIT_FLAG_*` of a memory-fault exit.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct MemoryFaultFlags: u64 {
        /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` (Linux 6.8): the access was to
        /// memory the guest holds as private.
        const PRIVATE = sys::KVM_MEMORY_EXIT_FLAG_PRIVATE;
        /// `KVM_MEMORY_EXIT_FLAG_USERFAULT` (RFC KVM Userfault): the page's
        /// bit is set in the slot's userfault bitmap
        /// (<https://lore.kernel.org/kvm/20250618042424.330664-1-jthoughton@google.com/>).
        #[cfg(feature = "rfc-kvm-userfault")]
        const USERFAULT = sys::rfc::kvm_userfault::KVM_MEMORY_EXIT_FLAG_USERFAULT;
    }
}

/// A `KVM_EXIT_MEMORY_FAULT` exit (`KVM_RUN` fails with `EFAULT` or
/// `EHWPOISON` and `exit_reason == KVM_EXIT_MEMORY_FAULT`; with
/// `KVM_CAP_MEMORY_FAULT_INFO`, Linux 6.8).
///
/// Flags the crate does not know are kept: test them with
/// [`MemoryFaultFlags::bits`]. The kernel may report more about a fault in
/// the future, so the struct is `#[non_exhaustive]`: build one with
/// [`MemoryFault::from_raw`].
///
/// # Examples
///
/// ```
/// use kvm_gmem::{MemoryFault, MemoryFaultFlags};
///
/// let fault = MemoryFault::from_raw(MemoryFaultFlags::PRIVATE.bits(), 0x20_0000, 0x1000);
/// assert!(fault.is_private());
/// assert_eq!(fault.gpa..fault.gpa + fault.size, 0x20_0000..0x20_1000);
/// ```
///
/// # References
///
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-exit-memory-fault>
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct MemoryFault {
    /// Why the fault exited.
    pub flags: MemoryFaultFlags,
    /// The faulting guest physical address (page aligned).
    pub gpa: u64,
    /// The size of the range.
    pub size: u64,
}

impl MemoryFault {
    /// From the three raw fields of `kvm_run.memory_fault`.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-exit-memory-fault>
    pub fn from_raw(flags: u64, gpa: u64, size: u64) -> MemoryFault {
        MemoryFault {
            flags: MemoryFaultFlags::from_bits_retain(flags),
            gpa,
            size,
        }
    }

    /// From the run structure, when its exit reason is
    /// `KVM_EXIT_MEMORY_FAULT`.
    ///
    /// A VMM calls it on the `kvm_run` it mapped from the vCPU fd after
    /// `KVM_RUN` failed with `EFAULT` (or `EHWPOISON`); with kvm-ioctls, use
    /// `MemoryFault::from_vcpu_exit` (feature `kvm-ioctls`).
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::sys_bindings as sys;
    /// use kvm_gmem::{MemoryAttributes, MemoryFault};
    ///
    /// // As the kernel leaves it after a private access to shared memory.
    /// let mut run = sys::kvm_run::default();
    /// run.exit_reason = sys::KVM_EXIT_MEMORY_FAULT;
    /// run.__bindgen_anon_1.memory_fault.flags = sys::KVM_MEMORY_EXIT_FLAG_PRIVATE;
    /// run.__bindgen_anon_1.memory_fault.gpa = 0x10_0000;
    /// run.__bindgen_anon_1.memory_fault.size = 0x1000;
    ///
    /// if let Some(fault) = MemoryFault::from_kvm_run(&run) {
    ///     // Convert the range to what the guest asked for, then re-enter.
    ///     let to = if fault.is_private() {
    ///         MemoryAttributes::PRIVATE
    ///     } else {
    ///         MemoryAttributes::empty()
    ///     };
    ///     assert_eq!((fault.gpa, fault.size, to), (0x10_0000, 0x1000, MemoryAttributes::PRIVATE));
    ///     // vm.set_attributes(fault.gpa..fault.gpa + fault.size, to)?;
    /// }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-exit-memory-fault>
    pub fn from_kvm_run(run: &sys::kvm_run) -> Option<MemoryFault> {
        if run.exit_reason != sys::KVM_EXIT_MEMORY_FAULT {
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: with exit_reason KVM_EXIT_MEMORY_FAULT the kernel wrote the
        // `memory_fault` member of the exit union; all its fields are
        // integers, valid for any bit pattern.
        let m = unsafe { run.__bindgen_anon_1.memory_fault };
        Some(MemoryFault::from_raw(m.flags, m.gpa, m.size))
    }

    /// Whether the guest accessed private memory.
    pub fn is_private(&self) -> bool {
        self.flags.contains(MemoryFaultFlags::PRIVATE)
    }

    /// Whether the KVM Userfault bitmap trapped the access (RFC).
    #[cfg(feature = "rfc-kvm-userfault")]
    pub fn is_userfault(&self) -> bool {
        self.flags.contains(MemoryFaultFlags::USERFAULT)
    }
}
