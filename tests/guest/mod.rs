//! The vCPU that the hand-assembled guests of `tests/guest_e2e.rs` and
//! `tests/kernel_matrix.rs` run on, and how those guests end, per
//! architecture (each test includes this file with `mod guest;`; it is not a
//! test target of its own):
//!
//! - x86_64: 16-bit real mode with flat segments; a guest reports with `out`
//!   to [`PORT`] and stops with `hlt`;
//! - aarch64: EL1 with the MMU off (PSTATE = EL1h, interrupts masked); a
//!   guest reports with a store to [`REPORT_GPA`], where no memslot is (an
//!   MMIO exit), and stops with PSCI `SYSTEM_OFF` (`hvc #0`), which KVM
//!   turns into a shutdown system event.

#![allow(dead_code)]

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

/// The guests, in words, for evidence and messages.
#[cfg(target_arch = "x86_64")]
pub const A_GUEST: &str = "a real-mode guest";
#[cfg(target_arch = "aarch64")]
pub const A_GUEST: &str = "an aarch64 guest (EL1, MMU off)";

/// The I/O port a guest reports on.
#[cfg(target_arch = "x86_64")]
pub const PORT: u16 = 0x10;

/// The guest physical address a guest reports to: 1 MiB, above every
/// memslot of the tests, so the store exits as MMIO.
#[cfg(target_arch = "aarch64")]
pub const REPORT_GPA: u64 = 0x10_0000;

/// vCPU 0 of `vm`, in real mode with flat segments, about to run the code at
/// guest physical `pc`.
#[cfg(target_arch = "x86_64")]
pub fn vcpu(vm: &VmFd, pc: u64) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let regs = kvm_bindings::kvm_regs {
        rip: pc,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    vcpu
}

/// vCPU 0 of `vm` (the preferred target, with PSCI 0.2 for `SYSTEM_OFF`),
/// at EL1h with the MMU off and DAIF masked, about to run the code at guest
/// physical `pc`.
#[cfg(target_arch = "aarch64")]
pub fn vcpu(vm: &VmFd, pc: u64) -> VcpuFd {
    use kvm_bindings::{
        KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM_CORE, KVM_REG_ARM64, KVM_REG_SIZE_U64, kvm_regs,
        kvm_vcpu_init,
    };
    use std::mem::offset_of;
    /// PSTATE: D, A, I and F masked (bits 9-6), EL1 with SP_EL1 (0b0101).
    const PSTATE_EL1H_MASKED: u64 = 0x3c5;

    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .expect("KVM_ARM_PREFERRED_TARGET");
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&init).expect("KVM_ARM_VCPU_INIT");
    // A core register's id: its offset in struct kvm_regs, in 32-bit words.
    let core_reg = |offset: usize| {
        KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4) as u64
    };
    for (name, offset, value) in [
        ("pc", offset_of!(kvm_regs, regs.pc), pc),
        (
            "pstate",
            offset_of!(kvm_regs, regs.pstate),
            PSTATE_EL1H_MASKED,
        ),
    ] {
        vcpu.set_one_reg(core_reg(offset), &value.to_le_bytes())
            .unwrap_or_else(|e| panic!("KVM_SET_ONE_REG({name}): {e}"));
    }
    vcpu
}

/// The bytes a guest reported, if `exit` is its report.
pub fn report<'a>(exit: &'a VcpuExit<'_>) -> Option<&'a [u8]> {
    match exit {
        #[cfg(target_arch = "x86_64")]
        VcpuExit::IoOut(PORT, data) => Some(*data),
        #[cfg(target_arch = "aarch64")]
        VcpuExit::MmioWrite(REPORT_GPA, data) => Some(*data),
        _ => None,
    }
}

/// Whether `exit` is the guest stopping (`hlt`, or PSCI `SYSTEM_OFF`).
pub fn halted(exit: &VcpuExit<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(exit, VcpuExit::Hlt);
    #[cfg(target_arch = "aarch64")]
    return matches!(
        exit,
        VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, _)
    );
}

/// A guest program as the tests write it: machine code on x86_64 (ending
/// with its `hlt`); instruction words on aarch64, up to its report
/// ([`bytes`] appends the PSCI `SYSTEM_OFF`).
#[cfg(target_arch = "x86_64")]
pub type Program = &'static [u8];
#[cfg(target_arch = "aarch64")]
pub type Program = &'static [u32];

/// What every aarch64 guest runs after its report (assembled with
/// aarch64-linux-gnu-as).
#[cfg(target_arch = "aarch64")]
#[rustfmt::skip]
const SYSTEM_OFF: [u32; 4] = [
    0x52800100, // mov  w0, #0x8
    0x72b08000, // movk w0, #0x8400, lsl #16 ; PSCI SYSTEM_OFF (0x84000008)
    0xd4000002, // hvc  #0
    0x14000000, // b    .                    ; not reached
];

/// The bytes to load at the guest's entry point.
pub fn bytes(program: Program) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    return program.to_vec();
    #[cfg(target_arch = "aarch64")]
    return program
        .iter()
        .chain(&SYSTEM_OFF)
        .flat_map(|w| w.to_le_bytes())
        .collect();
}
