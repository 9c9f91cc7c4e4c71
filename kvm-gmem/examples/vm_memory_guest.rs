//! A guest whose RAM is a vm-memory `GuestRegionCollection` of guest_memfd
//! regions (`kvm_gmem::vm_memory`), run with kvm-ioctls.
//!
//! 1. kvm-ioctls makes the VM; kvm-gmem creates a guest_memfd (`MMAP |
//!    INIT_SHARED`, Linux 6.18) on it and wraps it in a `GuestMemfdRegion`,
//!    the only region of a `GuestMemfdMemory`.
//! 2. The guest's code is written with vm-memory's `Bytes::write_slice`,
//!    as a VMM's loader would; the memory slot is the region's own
//!    `memory_region(0)` (`KVM_SET_USER_MEMORY_REGION2` with
//!    `KVM_MEM_GUEST_MEMFD`).
//! 3. A kvm-ioctls vCPU runs it (x86_64, real mode): the guest stores a
//!    word, reports it on a port and halts.
//! 4. The host reads the guest's store back with `Bytes::read_obj`.
//!
//! Where the kernel has no guest_memfd, or cannot map one, it prints
//! `SKIP vm_memory_guest: <capability> = <value> on <kernel>` and exits 0.
//! On other architectures than x86_64 the vCPU part is skipped (the sample
//! guest is x86 code) and the host stores the word itself.
//!
//! Run: `cargo run -p kvm-gmem --example vm_memory_guest --features
//! vm-memory,kvm-ioctls` (root, or a user with access to /dev/kvm). Exits
//! non-zero on failure.

use kvm_gmem::vm_memory::{GuestMemfdRegion, from_regions};
use kvm_gmem::{Extension, GuestMemfd, GuestMemfdFlags, VmOps};
use std::process::ExitCode;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
            eprintln!("vm_memory_guest: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|e| format!("a kernel whose release cannot be read ({e})"))
}

fn run() -> Res<()> {
    // 1. The VM from kvm-ioctls, guest_memfd memory from kvm-gmem.
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("kvm-ioctls: open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("kvm-ioctls: KVM_CREATE_VM: {e}"))?;
    let cap = vm.extension(Extension::GUEST_MEMFD)?;
    if cap <= 0 {
        println!(
            "SKIP vm_memory_guest: KVM_CAP_GUEST_MEMFD = {cap} on {}",
            kernel()
        );
        return Ok(());
    }
    let offered = vm.guest_memfd_flags()?;
    for (flag, name) in [
        (GuestMemfdFlags::MMAP, "GUEST_MEMFD_FLAG_MMAP"),
        (GuestMemfdFlags::INIT_SHARED, "GUEST_MEMFD_FLAG_INIT_SHARED"),
    ] {
        if !offered.contains(flag) {
            println!(
                "SKIP vm_memory_guest: {name} = absent (KVM_CAP_GUEST_MEMFD_FLAGS = {offered}) on {}",
                kernel()
            );
            return Ok(());
        }
    }
    let gmem = GuestMemfd::builder(SIZE)
        .mmap(true)
        .init_shared(true)
        .create(&vm)?;
    let mem = from_regions([GuestMemfdRegion::new(gmem, GuestAddress(0))?])?;
    let region = mem
        .find_region(GuestAddress(0))
        .ok_or("the collection has no region at GPA 0")?;
    println!(
        "guest memory: {} region(s); guest_memfd of {} MiB, flags {}, mapped at {:#x}",
        mem.num_regions(),
        region.guest_memfd().size() >> 20,
        region.guest_memfd().flags(),
        region.userspace_addr()
    );

    // 2. The code through vm-memory, the slot from the region.
    mem.write_slice(GUEST, GuestAddress(CODE_GPA))?;
    let slot = region.memory_region(0)?;
    // SAFETY: `mem` owns the region's mapping and lives until the end of
    // `run`; the slot is deleted before that on success, and on an early
    // return the VM (declared first, dropped last) has no running vCPU, so
    // KVM never uses the address after `mem` is dropped.
    unsafe { vm.set_memory_region(&slot)? };
    println!(
        "memslot 0 (KVM_SET_USER_MEMORY_REGION2): GPA {:#x}..{:#x}, guest_memfd offset {:#x}, flags {:?}; \
         {} bytes of guest code at GPA {CODE_GPA:#x}",
        slot.gpa(),
        slot.gpa() + slot.size(),
        region.gmem_offset(),
        slot.flags(),
        GUEST.len()
    );

    // 3. The guest, on a kvm-ioctls vCPU.
    run_guest(&vm)?;
    #[cfg(not(target_arch = "x86_64"))]
    mem.write_obj(MAGIC, GuestAddress(RESULT_GPA))?;

    // 4. The guest's store, through vm-memory.
    let stored: u16 = mem.read_obj(GuestAddress(RESULT_GPA))?;
    vm.delete_memory_region(0)?;
    if stored != MAGIC {
        return Err(format!(
            "the guest stored {stored:#06x} at {RESULT_GPA:#x}, expected {MAGIC:#06x}"
        )
        .into());
    }
    println!("host read_obj::<u16>(GPA {RESULT_GPA:#x}) = {stored:#06x}: OK");
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
            Ok(exit) => return Err(format!("unexpected exit: {exit:?}").into()),
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
    Ok(())
}
