//! The ioctl request numbers that RFC series add, one module per series,
//! computed like the upstream ones in `numbers.rs`.

/// ioctl numbers of the POPULATE RFC.
pub mod populate {
    use super::super::ioctl::_IOW;
    use super::super::rfc_populate::kvm_guest_memfd_populate;
    use super::super::uapi::KVMIO;

    /// `_IOW(KVMIO, 0xd6, struct kvm_guest_memfd_populate)` = `0x4020AED6`.
    ///
    /// The same number as Firecracker's `KVM_ASYNC_PF`: issue it only after
    /// the size-0 probe (see the module docs).
    pub const KVM_GUEST_MEMFD_POPULATE: u32 = _IOW::<kvm_guest_memfd_populate>(KVMIO, 0xd6);
}
