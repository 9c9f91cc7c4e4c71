//! The ioctl request numbers, named as in C, each computed by the `const fn`
//! encoders over the generated argument struct. Instantiated once per
//! architecture module; the ABI tests check every value against the C macro.

use super::ioctl::{_IO, _IOR, _IOW, _IOWR};
use super::uapi::*;

/// `_IO(KVMIO, 0x00)`: on /dev/kvm, returns [`KVM_API_VERSION`].
pub const KVM_GET_API_VERSION: u32 = _IO(KVMIO, 0x00);
/// `_IO(KVMIO, 0x01)`: on /dev/kvm, creates a VM; the argument is the VM type.
pub const KVM_CREATE_VM: u32 = _IO(KVMIO, 0x01);
/// `_IO(KVMIO, 0x03)`: on /dev/kvm or a VM fd; the argument is a `KVM_CAP_*`.
pub const KVM_CHECK_EXTENSION: u32 = _IO(KVMIO, 0x03);
/// `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`: VM ioctl, since Linux 6.8.
pub const KVM_SET_USER_MEMORY_REGION2: u32 = _IOW::<kvm_userspace_memory_region2>(KVMIO, 0x49);
/// `_IOW(KVMIO, 0xd2, struct kvm_memory_attributes)`: VM ioctl, since Linux 6.8.
pub const KVM_SET_MEMORY_ATTRIBUTES: u32 = _IOW::<kvm_memory_attributes>(KVMIO, 0xd2);
/// `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`: VM ioctl, since Linux 6.8; returns an fd.
pub const KVM_CREATE_GUEST_MEMFD: u32 = _IOWR::<kvm_create_guest_memfd>(KVMIO, 0xd4);
/// `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`: vCPU ioctl, since Linux 6.11.
pub const KVM_PRE_FAULT_MEMORY: u32 = _IOWR::<kvm_pre_fault_memory>(KVMIO, 0xd5);

/// `_IO(USERFAULTFD_IOC, 0x00)`: on /dev/userfaultfd, creates a userfaultfd (since Linux 6.1).
pub const USERFAULTFD_IOC_NEW: u32 = _IO(USERFAULTFD_IOC, 0x00);
/// `_IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)`: the API handshake.
pub const UFFDIO_API: u32 = _IOWR::<uffdio_api>(UFFDIO, _UFFDIO_API);
/// `_IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u32 = _IOWR::<uffdio_register>(UFFDIO, _UFFDIO_REGISTER);
/// `_IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)` (an `_IOR` by history).
pub const UFFDIO_UNREGISTER: u32 = _IOR::<uffdio_range>(UFFDIO, _UFFDIO_UNREGISTER);
/// `_IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)` (an `_IOR` by history).
pub const UFFDIO_WAKE: u32 = _IOR::<uffdio_range>(UFFDIO, _UFFDIO_WAKE);
/// `_IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)`.
pub const UFFDIO_COPY: u32 = _IOWR::<uffdio_copy>(UFFDIO, _UFFDIO_COPY);
/// `_IOWR(UFFDIO, _UFFDIO_ZEROPAGE, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u32 = _IOWR::<uffdio_zeropage>(UFFDIO, _UFFDIO_ZEROPAGE);
/// `_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)`, since Linux 6.8.
pub const UFFDIO_MOVE: u32 = _IOWR::<uffdio_move>(UFFDIO, _UFFDIO_MOVE);
/// `_IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u32 = _IOWR::<uffdio_writeprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);
/// `_IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)`, since Linux 5.13.
pub const UFFDIO_CONTINUE: u32 = _IOWR::<uffdio_continue>(UFFDIO, _UFFDIO_CONTINUE);
/// `_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)`, since Linux 6.6.
pub const UFFDIO_POISON: u32 = _IOWR::<uffdio_poison>(UFFDIO, _UFFDIO_POISON);
/// `_IOWR(UFFDIO, _UFFDIO_RWPROTECT, struct uffdio_rwprotect)`, since Linux 7.3.
pub const UFFDIO_RWPROTECT: u32 = _IOWR::<uffdio_rwprotect>(UFFDIO, _UFFDIO_RWPROTECT);
/// `_IOW(UFFDIO, _UFFDIO_SET_MODE, struct uffdio_set_mode)`, since Linux 7.3.
pub const UFFDIO_SET_MODE: u32 = _IOW::<uffdio_set_mode>(UFFDIO, _UFFDIO_SET_MODE);
