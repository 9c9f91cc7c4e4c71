//! kvm-ioctls and kvm-gmem together: the VM and the vCPU come from
//! kvm-ioctls, the guest memory from kvm-gmem.
//!
//! 1. `kvm_ioctls::Kvm::new()` and `create_vm()` make the VM; a `VmFd` is a
//!    `kvm_gmem::VmOps`, so kvm-gmem takes it as it is.
//! 2. kvm-gmem creates a guest_memfd (`MMAP | INIT_SHARED`, Linux 6.18),
//!    maps it, writes the guest's code, and makes it memory slot 0 with
//!    `KVM_SET_USER_MEMORY_REGION2`.
//! 3. A kvm-ioctls vCPU runs the code (x86_64): it stores a word in guest
//!    memory, reports it on a port and halts. A `VcpuExit::MemoryFault`
//!    would be converted with `MemoryFault::from_vcpu_exit` and answered by
//!    flipping the page's attribute (see `on_memory_fault`).
//! 4. The host reads the guest's store back through the mapping.
//!
//! Run: `cargo run -p kvm-gmem --example kvm_ioctls_interop --features kvm-ioctls`
//! (root, or a user with access to /dev/kvm). Exits non-zero on failure.

use kvm_gmem::{GuestMemfd, GuestMemfdFlags, MemoryAttributes, MemoryFault, MemoryRegion2, VmOps};
use std::process::ExitCode;

/// Guest memory: 2 MiB at guest physical address 0.
const SIZE: u64 = 2 << 20;
/// Where the code goes (real mode starts at CS:IP = 0:0x1000 below).
const CODE_GPA: u64 = 0x1000;
/// Where the guest stores its word.
const RESULT_GPA: u64 = 0x3000;
#[cfg(target_arch = "x86_64")]
const PORT: u16 = 0x10;
const MAGIC: u16 = 0xbeef;

/// `mov ax, 0xbeef; mov [0x3000], ax; mov dx, 0x10; out dx, ax; hlt`
/// (16-bit real mode).
const GUEST: &[u8] = &[
    0xb8, 0xef, 0xbe, // mov ax, 0xbeef
    0xa3, 0x00, 0x30, // mov [0x3000], ax
    0xba, 0x10, 0x00, // mov dx, 0x10
    0xef, //             out dx, ax
    0xf4, //             hlt
];

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvm_ioctls_interop: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    // 1. kvm-ioctls owns the VM; kvm-gmem works on it through `VmOps`.
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("kvm-ioctls: open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("kvm-ioctls: KVM_CREATE_VM: {e}"))?;
    println!("kvm-ioctls VmFd as kvm_gmem::VmOps: {:?}", vm.vm_fd());

    // 2. A guest_memfd the host can map.
    let want = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let offered = vm.guest_memfd_flags()?;
    println!("KVM_CAP_GUEST_MEMFD_FLAGS on this VM: {offered}");
    if !offered.contains(want) {
        return Err(format!(
            "this kernel does not offer {want} (Linux 6.18 or later is needed to map a guest_memfd)"
        )
        .into());
    }
    let gmem = GuestMemfd::builder(SIZE)
        .mmap(true)
        .init_shared(true)
        .create(&vm)?;
    let map = gmem.map()?;
    map.write_at(CODE_GPA, GUEST)?;
    println!(
        "guest_memfd: {} MiB, flags {}, mapped at {:#x}; {} bytes of guest code at GPA {CODE_GPA:#x}",
        gmem.size() >> 20,
        gmem.flags(),
        map.addr(),
        GUEST.len()
    );
    let region = MemoryRegion2::builder(0, 0, SIZE)
        .guest_memfd(&gmem, 0)
        .userspace(&map)
        .build()?;
    // SAFETY: `map` is declared before the vCPU and the slot is deleted at
    // the end of `run` before `map` drops; on an early return `map` is
    // unmapped with the VM about to close and no vCPU running, so KVM never
    // uses the address.
    unsafe { vm.set_memory_region(&region)? };
    println!(
        "memslot 0 (KVM_SET_USER_MEMORY_REGION2): GPA 0..{SIZE:#x}, flags {:?}",
        region.flags()
    );

    // 3. The guest, on a kvm-ioctls vCPU.
    run_guest(&vm)?;
    #[cfg(not(target_arch = "x86_64"))]
    map.write_at(RESULT_GPA, &MAGIC.to_le_bytes())?;

    // 4. The guest's store, through the host mapping.
    let mut stored = [0u8; 2];
    map.read_at(RESULT_GPA, &mut stored)?;
    let stored = u16::from_le_bytes(stored);
    vm.delete_memory_region(0)?;
    if stored != MAGIC {
        return Err(format!(
            "the guest stored {stored:#06x} at {RESULT_GPA:#x}, expected {MAGIC:#06x}"
        )
        .into());
    }
    println!("host read GPA {RESULT_GPA:#x} through the mapping: {stored:#06x}: OK");
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn run_guest(vm: &kvm_ioctls::VmFd) -> Res<()> {
    use kvm_ioctls::VcpuExit;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("kvm-ioctls: KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        ..Default::default()
    })?;
    let mut reported = None;
    for _ in 0..1000 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT, data)) if data.len() >= 2 => {
                reported = Some(u16::from_le_bytes([data[0], data[1]]));
            }
            Ok(VcpuExit::Hlt) => {
                println!(
                    "vCPU: reported {:#06x} on port {PORT:#x}, then halted",
                    reported.unwrap_or(0)
                );
                return match reported {
                    Some(MAGIC) => Ok(()),
                    other => Err(format!("the guest reported {other:?}").into()),
                };
            }
            Ok(exit) => match MemoryFault::from_vcpu_exit(&exit) {
                Some(fault) => on_memory_fault(vm, fault)?,
                None => return Err(format!("unexpected exit: {exit:?}").into()),
            },
            // A memory fault is KVM_RUN failing with EFAULT plus exit data;
            // kvm-ioctls turns it into Ok(VcpuExit::MemoryFault) above.
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        }
    }
    Err("the guest did not halt".into())
}

#[cfg(not(target_arch = "x86_64"))]
fn run_guest(_vm: &kvm_ioctls::VmFd) -> Res<()> {
    println!(
        "vCPU: skipped (the sample guest is x86 real-mode code); the host stores the word instead"
    );
    let _ = on_memory_fault;
    Ok(())
}

/// What a VMM does with `KVM_EXIT_MEMORY_FAULT`: the guest accessed memory
/// whose private/shared state differs from what it asked for, so convert
/// the range and re-enter. Only VM types with private memory (x86
/// `KVM_X86_SW_PROTECTED_VM`, SEV-SNP, TDX) exit this way; this example's
/// default VM never does.
fn on_memory_fault(vm: &kvm_ioctls::VmFd, fault: MemoryFault) -> Res<()> {
    let to = if fault.is_private() {
        MemoryAttributes::PRIVATE
    } else {
        MemoryAttributes::empty()
    };
    println!(
        "vCPU: memory fault at GPA {:#x} (+{:#x}), flags {:?}: converting to {to:?}",
        fault.gpa, fault.size, fault.flags
    );
    // Method syntax: VmFd's own is `set_memory_attributes` (kvm-bindings'
    // raw struct, which `MemoryAttributes::to_kvm_bindings` builds), so
    // `set_attributes` is the VmOps method, with its checks.
    vm.set_attributes(fault.gpa..fault.gpa + fault.size, to)?;
    Ok(())
}
