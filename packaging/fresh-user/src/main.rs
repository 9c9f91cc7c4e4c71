//! A fresh user of kvm-gmem and uffd-gmem, written from their public docs
//! only, depending on them by their published names (see
//! `packaging/README.md`). Three parts:
//!
//! 1. `vm-memory guest`: kvm-ioctls' `Kvm`, `VmFd` and a vCPU; guest memory
//!    a `kvm_gmem::vm_memory::GuestMemfdMemory`, the code written with
//!    vm-memory's `Bytes::write_slice`, the memory slot from
//!    `GuestMemfdRegion::memory_region` set with `VmOps::set_memory_region`;
//!    a real-mode x86_64 guest stores a word that the host reads back with
//!    `read_obj`.
//! 2. `serve`: a `uffd_gmem::serve::Server` serves the MISSING faults of an
//!    anonymous `HostMapping` from an in-memory page source while the main
//!    thread reads the pages and checks them.
//! 3. `? across crates`: `?` on a `kvm_gmem::Result` in a function
//!    returning `uffd_gmem::Result`, and the reverse.
//!
//! Prints `fresh-user: <part>: ok` per part, or `SKIP fresh-user <part>:
//! <what> = <value> on <kernel>` where the host lacks a capability (a failure
//! when `GMEM_REQUIRED_CAPS` names it, as in the kernel lane), or lacks
//! `/dev/kvm` or userfaultfd (a failure under `CI=true`). Exits 1 on any
//! failure.

use std::process::ExitCode;

type Res<T> = Result<T, Box<dyn std::error::Error>>;
/// One part: what it did, or why it failed.
type Part = fn() -> Res<Outcome>;

fn main() -> ExitCode {
    let parts: [(&str, Part); 3] = [
        ("vm-memory guest", vm_memory_guest),
        ("serve", serve),
        ("? across crates", question_mark_across_crates),
    ];
    let mut failed = 0;
    for (name, part) in parts {
        match part() {
            Ok(Outcome::Ok) => println!("fresh-user: {name}: ok"),
            Ok(Outcome::Skip(why)) => match skip(name, &why) {
                Ok(()) => {}
                Err(e) => {
                    eprintln!("fresh-user: {name}: FAILED: {e}");
                    failed += 1;
                }
            },
            Err(e) => {
                eprintln!("fresh-user: {name}: FAILED: {e}");
                failed += 1;
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("fresh-user: {failed} part(s) failed");
        ExitCode::FAILURE
    }
}

/// What a part did, when it did not fail.
enum Outcome {
    Ok,
    Skip(Why),
}

/// Why a part was skipped.
enum Why {
    /// A device is missing: `/dev/kvm`, userfaultfd.
    Device(String),
    /// The kernel lacks a capability: (name, value).
    Capability(&'static str, String),
    /// The part does not run on this architecture.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    Arch(String),
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "an unknown kernel".into())
}

/// The workspace's skip rules: print the SKIP line, or fail when the
/// environment says the host must have what is missing.
fn skip(part: &str, why: &Why) -> Res<()> {
    match why {
        Why::Device(what) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                return Err(format!("{what} (CI=true: a skip is a failure)").into());
            }
            println!("SKIP fresh-user {part}: {what}");
        }
        Why::Capability(cap, value) => {
            let required = std::env::var("GMEM_REQUIRED_CAPS").unwrap_or_default();
            if required.split(',').any(|c| c == *cap) {
                return Err(format!(
                    "{cap} = {value} on {}, which GMEM_REQUIRED_CAPS says this kernel has",
                    kernel()
                )
                .into());
            }
            println!("SKIP fresh-user {part}: {cap} = {value} on {}", kernel());
        }
        Why::Arch(what) => println!("SKIP fresh-user {part}: {what}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Part 1: a kvm-ioctls guest on vm-memory over a guest_memfd.

mod guest {
    use super::{Outcome, Res, Why};
    use kvm_gmem::vm_memory::{self as gmem_memory, GuestMemfdMemory, GuestMemfdRegion};
    use kvm_gmem::{Extension, GuestMemfd, GuestMemfdFlags, VmOps};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// Guest memory: 2 MiB at guest physical address 0.
    const SIZE: u64 = 2 << 20;
    /// Where the code goes (real mode, CS:IP = 0:0x1000).
    const CODE_GPA: u64 = 0x1000;
    /// Where the guest stores its word.
    const RESULT_GPA: u64 = 0x3000;
    const MAGIC: u16 = 0xbeef;
    /// `mov ax, 0xbeef; mov [0x3000], ax; hlt` (16-bit real mode).
    const GUEST: &[u8] = &[
        0xb8, 0xef, 0xbe, // mov ax, 0xbeef
        0xa3, 0x00, 0x30, // mov [0x3000], ax
        0xf4, //             hlt
    ];

    pub fn run() -> Res<Outcome> {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => return Ok(Outcome::Skip(Why::Device(format!("/dev/kvm: {e}")))),
        };
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;

        // guest_memfd, host-mappable and shared (Linux 6.18 and later).
        let cap = VmOps::extension(&vm, Extension::GUEST_MEMFD)?;
        if cap == 0 {
            return Ok(Outcome::Skip(Why::Capability(
                "KVM_CAP_GUEST_MEMFD",
                cap.to_string(),
            )));
        }
        let offered = vm.guest_memfd_flags()?;
        for (flag, name) in [
            (GuestMemfdFlags::MMAP, "GUEST_MEMFD_FLAG_MMAP"),
            (GuestMemfdFlags::INIT_SHARED, "GUEST_MEMFD_FLAG_INIT_SHARED"),
        ] {
            if !offered.contains(flag) {
                return Ok(Outcome::Skip(Why::Capability(name, "0".into())));
            }
        }
        let gmem = GuestMemfd::builder(SIZE)
            .mmap(true)
            .init_shared(true)
            .create(&vm)?;
        let mem: GuestMemfdMemory =
            gmem_memory::from_regions([GuestMemfdRegion::new(gmem, GuestAddress(0))?])?;

        // The guest's code, through vm-memory.
        mem.write_slice(GUEST, GuestAddress(CODE_GPA))?;
        mem.write_obj(0u16, GuestAddress(RESULT_GPA))?;

        // Memory slot 0: KVM_SET_USER_MEMORY_REGION2 with the guest_memfd.
        let region = mem
            .find_region(GuestAddress(0))
            .ok_or("no region at guest address 0")?;
        let slot = region.memory_region(0)?;
        // SAFETY: the slot's userspace address is the region's mapping,
        // which `mem` owns; the slot is deleted below before `mem` drops,
        // and on an early return `mem` is unmapped with no vCPU running and
        // the VM about to close, so KVM never uses the address.
        unsafe { VmOps::set_memory_region(&vm, &slot)? };

        let guest = run_guest(&vm, &mem);
        VmOps::delete_memory_region(&vm, 0)?;
        if let Some(skip) = guest? {
            return Ok(Outcome::Skip(skip));
        }

        // The guest's store, through vm-memory.
        let stored: u16 = mem.read_obj(GuestAddress(RESULT_GPA))?;
        if stored != MAGIC {
            return Err(format!(
                "the guest stored {stored:#06x} at {RESULT_GPA:#x}, expected {MAGIC:#06x}"
            )
            .into());
        }
        println!(
            "fresh-user: vm-memory guest: the guest stored {stored:#06x} at GPA {RESULT_GPA:#x} \
             in guest_memfd memory; read back with read_obj"
        );
        Ok(Outcome::Ok)
    }

    #[cfg(target_arch = "x86_64")]
    fn run_guest(vm: &kvm_ioctls::VmFd, _mem: &GuestMemfdMemory) -> Res<Option<Why>> {
        use kvm_ioctls::VcpuExit;
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let mut sregs = vcpu.get_sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)?;
        let mut regs = vcpu.get_regs()?;
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        vcpu.set_regs(&regs)?;
        // The guest stores its word and halts: the first exit is HLT.
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => Ok(None),
            Ok(exit) => Err(format!("unexpected vCPU exit: {exit:?}").into()),
            Err(e) => Err(format!("KVM_RUN: {e}").into()),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run_guest(_vm: &kvm_ioctls::VmFd, _mem: &GuestMemfdMemory) -> Res<Option<Why>> {
        Ok(Some(Why::Arch(format!(
            "the sample guest is x86_64 real-mode code, this is {}",
            std::env::consts::ARCH
        ))))
    }
}

fn vm_memory_guest() -> Res<Outcome> {
    guest::run()
}

// ---------------------------------------------------------------------------
// Part 2: serve MISSING faults of an anonymous mapping.

fn serve() -> Res<Outcome> {
    use uffd_gmem::serve::{Region, Server};
    use uffd_gmem::{HostMapping, RegisterMode, Uffd};

    const PAGES: usize = 64;
    let page = uffd_gmem::page_size() as usize;
    let len = PAGES * page;
    // No userfaultfd at all (no /dev/userfaultfd access and the system
    // call refused) is the device skip: a failure under CI=true.
    let uffd = match Uffd::builder().create() {
        Ok(uffd) => uffd,
        Err(e) => return Ok(Outcome::Skip(Why::Device(format!("userfaultfd: {e}")))),
    };
    println!("fresh-user: serve: userfaultfd from {:?}", uffd.origin());
    let mem = HostMapping::anonymous(len)?;
    uffd.register_mapping(&mem, RegisterMode::MISSING)?;

    // The page source: every page's bytes name it.
    let source: Vec<u8> = (0..len).map(|i| ((i / page) as u8) ^ (i as u8)).collect();
    let expected = source.clone();
    let server = Server::builder(uffd)
        .region(Region::new(mem.addr(), len as u64))
        .source(source)
        .workers(2)
        .spawn()?;

    // The main thread touches every page (backwards, one word in the
    // middle, then the whole page): each first touch faults, and the
    // server fills the page from the source.
    let mut buf = vec![0u8; page];
    let mut bad = None;
    for p in (0..PAGES).rev() {
        let off = (p * page) as u64;
        let mut word = [0u8; 8];
        mem.read_at(off + page as u64 / 2, &mut word)?;
        mem.read_at(off, &mut buf)?;
        if buf[..] != expected[p * page..(p + 1) * page] || word[..] != buf[page / 2..page / 2 + 8]
        {
            bad = Some(p);
            break;
        }
    }
    let stats = server.shutdown()?;
    println!(
        "fresh-user: serve: stats: {} faults, {} pages copied, {} EEXIST, {} EAGAIN, \
         latency p50 {:?} max {:?}, {} errors",
        stats.faults,
        stats.pages_copied,
        stats.eexist,
        stats.eagain,
        stats.latency_quantile(0.5),
        stats.max_latency,
        stats.errors.len()
    );
    if let Some(p) = bad {
        return Err(format!("page {p} does not hold the source's bytes").into());
    }
    if let Some(e) = stats.errors.first() {
        return Err(format!("the server reported an error: {e}").into());
    }
    if stats.faults == 0 || stats.pages_copied == 0 {
        return Err("the server saw no faults".into());
    }
    Ok(Outcome::Ok)
}

// ---------------------------------------------------------------------------
// Part 3: `?` across the two crates' error types.

/// `?` on a `kvm_gmem::Result` where a `uffd_gmem::Result` is returned.
fn kvm_error_in_uffd_result() -> uffd_gmem::Result<()> {
    let path = std::path::Path::new("/nonexistent/fresh-user/kvm");
    let _kvm = kvm_gmem::KvmDevice::open_path(path)?; // kvm_gmem::Error
    Ok(())
}

/// `?` on a `uffd_gmem::Result` where a `kvm_gmem::Result` is returned.
fn uffd_error_in_kvm_result(len: usize) -> kvm_gmem::Result<usize> {
    let mem = uffd_gmem::HostMapping::anonymous(len)?; // uffd_gmem::Error
    Ok(mem.len())
}

fn question_mark_across_crates() -> Res<Outcome> {
    match kvm_error_in_uffd_result() {
        Err(uffd_gmem::Error::GuestMemfd(inner)) => {
            println!("fresh-user: ? across crates: kvm_gmem::Error in uffd_gmem::Result: {inner}");
            if inner.errno().map(|e| e.0) != Some(2) {
                return Err(format!("expected ENOENT, got {inner:?}").into());
            }
        }
        other => return Err(format!("expected Error::GuestMemfd(ENOENT), got {other:?}").into()),
    }
    let page = uffd_gmem::page_size() as usize;
    if uffd_error_in_kvm_result(page)? != page {
        return Err("HostMapping::anonymous(page) has the wrong length".into());
    }
    match uffd_error_in_kvm_result(0) {
        Err(e @ kvm_gmem::Error::Invalid { .. }) => {
            println!("fresh-user: ? across crates: uffd_gmem::Error in kvm_gmem::Result: {e}");
        }
        other => return Err(format!("expected kvm_gmem::Error::Invalid, got {other:?}").into()),
    }
    Ok(Outcome::Ok)
}
