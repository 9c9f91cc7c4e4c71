//! The hand-assembled guests' runner, shared by `tests/guest_e2e.rs`,
//! `tests/kernel_matrix.rs` and `tests/rfc_userfault.rs` (each includes
//! this file with `mod guest;`; it is not a test target of its own): the
//! vCPU they run on and how they end, per architecture, and [`Guest`], a VM
//! running one program from a code slot, with [`RawMap`] for the memory the
//! tests map themselves.
//!
//! - x86_64: 16-bit real mode with flat segments; a guest reports with `out`
//!   to [`PORT`] and stops with `hlt`;
//! - aarch64: EL1 with the MMU off (PSTATE = EL1h, interrupts masked); a
//!   guest reports with a store to [`REPORT_GPA`], where no memslot is (an
//!   MMIO exit), and stops with PSCI `SYSTEM_OFF` (`hvc #0`), which KVM
//!   turns into a shutdown system event.

// Each includer uses a part of this file.
#![allow(dead_code)]

use std::any::Any;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use kvm_gmem::{MemoryFault, MemoryRegion2, VmOps, VmType};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

/// [`Guest`]'s code slot (slot 0): guest physical 0..64 KiB, the program at
/// 0x1000.
pub const CODE_SLOT_SIZE: u64 = 0x10000;
pub const CODE_GPA: u64 = 0x1000;

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

/// An anonymous or shared mapping, unmapped on drop. Held by address only,
/// never by reference: the guest, the kernel and other threads change it.
pub struct RawMap {
    addr: usize,
    len: usize,
}

impl RawMap {
    fn new(len: u64, flags: i32, fd: i32) -> RawMap {
        let len = len as usize;
        // SAFETY: a fresh mapping at an address the kernel picks; it replaces
        // nothing, and `fd` (if any) is open for the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        RawMap {
            addr: p as usize,
            len,
        }
    }

    pub fn anon(len: u64) -> RawMap {
        RawMap::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    pub fn shared(fd: &OwnedFd, len: u64) -> RawMap {
        RawMap::new(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn range(&self) -> Range<u64> {
        self.addr()..self.addr() + self.len as u64
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        assert!(offset as usize + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: inside the mapping (asserted above), which lives as long
            // as `self`; a volatile store, no reference formed.
            unsafe { ((self.addr + offset as usize + i) as *mut u8).write_volatile(*b) };
        }
    }

    pub fn fill(&self, offset: u64, len: u64, byte: u8) {
        self.write(offset, &vec![byte; len as usize]);
    }

    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        assert!((offset + len) as usize <= self.len);
        (0..len as usize)
            // SAFETY: inside the mapping (asserted above); a volatile load.
            .map(|i| unsafe { ((self.addr + offset as usize + i) as *const u8).read_volatile() })
            .collect()
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; nothing refers into it (only
        // addresses are handed out, and their users are gone by now).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// How a run of a [`Guest`] ended.
#[derive(Debug)]
pub enum GuestExit {
    /// The guest reported this byte.
    Report(u8),
    /// The guest stopped (`hlt`, or PSCI `SYSTEM_OFF`).
    Halted,
    /// The guest touched `gpa` and KVM found no memory there.
    Mmio { gpa: u64, write: bool },
    /// `KVM_EXIT_MEMORY_FAULT`.
    MemoryFault(MemoryFault),
    /// Anything else (read through `Debug` in the failure messages).
    Other(String),
}

/// A VM with one vCPU about to run a program. Field order matters: the
/// vCPU and the VM are dropped before the memory the slots point at.
pub struct Guest {
    pub vcpu: VcpuFd,
    pub vm: VmFd,
    /// The memory behind the slots' userspace addresses and userfault
    /// bitmaps.
    pub keep: Vec<Arc<dyn Any + Send + Sync>>,
}

impl Guest {
    /// [`Guest::of_type`] in a default VM.
    pub fn new(kvm: &kvm_ioctls::Kvm, program: Program, data_gpa: u64) -> Guest {
        Guest::of_type(kvm, VmType::DEFAULT, program, data_gpa)
    }

    /// `program` in a VM of type `ty`: at [`CODE_GPA`] in an ordinary code
    /// slot 0 of [`CODE_SLOT_SIZE`], where the vCPU starts. On x86_64 `ds`
    /// and `es` are based at `data_gpa`; aarch64 programs address their data
    /// directly.
    pub fn of_type(kvm: &kvm_ioctls::Kvm, ty: VmType, program: Program, data_gpa: u64) -> Guest {
        let vm = kvm
            .create_vm_with_type(ty.0)
            .unwrap_or_else(|e| panic!("KVM_CREATE_VM({ty:?}): {e}"));
        // Intel needs a TSS for real mode; others ignore it.
        #[cfg(target_arch = "x86_64")]
        let _ = vm.set_tss_address(0xfffb_d000);
        let code = RawMap::anon(CODE_SLOT_SIZE);
        code.write(CODE_GPA, &bytes(program));
        let code_addr = code.addr();
        let vcpu = vcpu(&vm, CODE_GPA);
        let mut g = Guest {
            vcpu,
            vm,
            keep: Vec::new(),
        };
        let region = MemoryRegion2::builder(0, 0, CODE_SLOT_SIZE)
            .userspace_addr(code_addr)
            .build()
            .expect("code slot");
        g.set_slot(&region, Some(Arc::new(code)))
            .expect("KVM_SET_USER_MEMORY_REGION2 (code slot)");
        #[cfg(target_arch = "x86_64")]
        {
            let mut sregs = g.vcpu.get_sregs().expect("KVM_GET_SREGS");
            for seg in [&mut sregs.ds, &mut sregs.es] {
                seg.base = data_gpa;
                seg.selector = (data_gpa >> 4) as u16;
            }
            g.vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = data_gpa;
        g
    }

    /// Installs (or re-sets) `region`; `backing` is the memory behind its
    /// userspace address (none for a guest_memfd-only slot), kept until the
    /// VM is gone. Other memory the slot points at (its userfault bitmap, a
    /// mapping kept already) the caller puts in `keep` first.
    pub fn set_slot(
        &mut self,
        region: &MemoryRegion2,
        backing: Option<Arc<dyn Any + Send + Sync>>,
    ) -> kvm_gmem::Result<()> {
        if let Some(b) = backing {
            self.keep.push(b);
        }
        // SAFETY: the memory behind the region's userspace address and its
        // userfault bitmap (where it has them) is in `self.keep` (`backing`,
        // or pushed there by the caller), which is dropped after `self.vm`
        // (field order), so the slot never points at unmapped memory.
        unsafe { self.vm.set_memory_region(region) }
    }

    /// Puts the vCPU back at the program's first instruction, with the
    /// registers [`vcpu`] sets (the segments stay as they are), to run it
    /// again.
    #[cfg(target_arch = "x86_64")]
    pub fn restart(&mut self) {
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_GPA,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    }

    /// Runs the vCPU to the guest's next report, its stop, or any other exit
    /// (retrying `EINTR`/`EAGAIN`).
    pub fn run(&mut self) -> GuestExit {
        for _ in 0..1000 {
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return GuestExit::Other(format!("KVM_RUN: {e}")),
            };
            if let Some(&[byte, ..]) = report(&exit) {
                return GuestExit::Report(byte);
            }
            if halted(&exit) {
                return GuestExit::Halted;
            }
            return match exit {
                VcpuExit::MmioRead(gpa, _) => GuestExit::Mmio { gpa, write: false },
                VcpuExit::MmioWrite(gpa, _) => GuestExit::Mmio { gpa, write: true },
                ref e @ VcpuExit::MemoryFault { .. } => GuestExit::MemoryFault(
                    MemoryFault::from_vcpu_exit(e).expect("a memory-fault exit"),
                ),
                other => GuestExit::Other(format!("{other:?}")),
            };
        }
        GuestExit::Other("KVM_RUN kept answering EINTR/EAGAIN".into())
    }
}
