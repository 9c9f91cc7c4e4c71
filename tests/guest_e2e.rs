//! End to end: a real guest runs from guest_memfd memory that a *separate
//! process* populated through a received guest_memfd.
//!
//! 1. The test creates a VM (kvm-ioctls) and a guest_memfd with
//!    `MMAP | INIT_SHARED` (kvm-gmem), maps it, and writes a small program
//!    into it: 16-bit real mode on x86_64, EL1 with the MMU off on aarch64
//!    (the vCPU setup of both is in `tests/guest/mod.rs`).
//! 2. It re-executes this test binary as a child (`populator_child`), hands it
//!    the guest_memfd over a Unix socket (`kvm_gmem::share::send`), and the
//!    child — which has no VM — fills a 4 KiB data page with
//!    `Populate::detached(..).run(..)` and answers with a "done" byte.
//! 3. A memslot backed by the guest_memfd is installed with the
//!    `MemoryRegion2` builder, and a vCPU runs the program: it checksums the
//!    data page, stores the checksum at 0x3000, reports it (x86_64: `out` to
//!    port 0x10; aarch64: a store to 1 MiB, where no memslot is, which exits
//!    as MMIO) and stops (`hlt`; PSCI `SYSTEM_OFF`).
//! 4. The checksum the guest reported, the one it stored (read back through
//!    the host's `Mapping`) and the one computed on the host must all agree.
//!
//! Two memslot shapes:
//!
//! - `guest_runs_from_populated_guest_memfd`: `KVM_MEM_GUEST_MEMFD` with
//!   `userspace_addr` = the guest_memfd's own mapping. Runs everywhere
//!   guest_memfd mmap exists (Linux 6.18).
//! - `guest_memfd_only_memslot`: the data lives in a guest_memfd-only slot
//!   (`userspace_addr` 0), the code in ordinary anonymous memory. On a
//!   hardware-virtualisation host the guest sees the data; under PVM (shadow
//!   paging, as on the project's 6.18.44 machines) the read exits as MMIO at
//!   the data's address. The test accepts exactly those two outcomes on
//!   x86_64; on aarch64 (stage-2 paging always) only the first.
//!
//! Without `/dev/kvm` the tests print `SKIP <test>: <why>` and pass, except
//! under `CI=true`, where that is a failure. Where the kernel lacks guest_memfd
//! with MMAP|INIT_SHARED (or, for the guest_memfd-only slot, the TDP MMU) they
//! print `SKIP <test>: <capability> = <value> on <kernel>` and pass
//! (kvm-gmem's test helpers: `common::skip_capability`).

#[path = "../kvm-gmem/tests/common/mod.rs"]
mod common;
mod guest;

use kvm_gmem::populate::{Populate, Source};
use kvm_gmem::{GuestMemfd, GuestMemfdFlags, MemoryRegion2, VmOps};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Guest physical addresses of the program, the data page and the result.
const CODE_GPA: u64 = 0x1000;
const DATA_GPA: u64 = 0x2000;
const RESULT_GPA: u64 = 0x3000;
const DATA_LEN: usize = 0x1000;

/// The guest: a rotate-and-add checksum over the 4 KiB at 0x2000 (16-bit
/// real mode; `objdump -D -b binary -mi8086` shows it as below).
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const GUEST: guest::Program = &[
    0xbe, 0x00, 0x20, // mov si, 0x2000         ; DATA_GPA
    0xb9, 0x00, 0x10, // mov cx, 0x1000         ; DATA_LEN
    0x31, 0xc0,       // xor ax, ax
    0x31, 0xdb,       // xor bx, bx
    0xd1, 0xc0,       // loop: rol ax, 1
    0x8a, 0x1c,       //       mov bl, [si]
    0x01, 0xd8,       //       add ax, bx
    0x46,             //       inc si
    0x49,             //       dec cx
    0x75, 0xf6,       //       jnz loop
    0xa3, 0x00, 0x30, // mov [0x3000], ax       ; RESULT_GPA
    0xba, 0x10, 0x00, // mov dx, 0x10           ; guest::PORT
    0xef,             // out dx, ax
    0xf4,             // hlt
];

/// The same checksum on aarch64, up to its report (assembled with
/// aarch64-linux-gnu-as; `objdump -d` shows it as below). The loads use a
/// register offset, no writeback, so that a load KVM cannot satisfy exits as
/// MMIO.
#[cfg(target_arch = "aarch64")]
#[rustfmt::skip]
const GUEST: guest::Program = &[
    0xd2840000, //  0: mov  x0, #0x2000        ; DATA_GPA
    0xd2800001, //  4: mov  x1, #0             ; i
    0x52800002, //  8: mov  w2, #0             ; the 16-bit sum
    0x38616803, //  c: ldrb w3, [x0, x1]
    0x531f7844, // 10: lsl  w4, w2, #1         ; rotate the sum left by 1
    0x2a423c82, // 14: orr  w2, w4, w2, lsr #15
    0x0b030042, // 18: add  w2, w2, w3
    0x12003c42, // 1c: and  w2, w2, #0xffff
    0x91000421, // 20: add  x1, x1, #1
    0xf140043f, // 24: cmp  x1, #0x1000        ; DATA_LEN
    0x54ffff21, // 28: b.ne c
    0xd2860005, // 2c: mov  x5, #0x3000        ; RESULT_GPA
    0x790000a2, // 30: strh w2, [x5]
    0xd2a00206, // 34: mov  x6, #0x100000      ; guest::REPORT_GPA
    0x790000c2, // 38: strh w2, [x6]           ; the report: an MMIO exit
];

/// What the guest computes, computed on the host.
fn checksum(data: &[u8]) -> u16 {
    data.iter()
        .fold(0u16, |ax, &b| ax.rotate_left(1).wrapping_add(u16::from(b)))
}

/// The data page: xorshift64 from `seed`, so parent and child agree.
fn data_page(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..DATA_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const ENV_FD: &str = "GMEM_E2E_SOCK_FD";
const ENV_SEED: &str = "GMEM_E2E_SEED";
const ENV_OFFSET: &str = "GMEM_E2E_OFFSET";

/// kvm-ioctls' `/dev/kvm`, or why the test is skipped (`None`); under
/// `CI=true` a missing device is a failure.
fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            assert!(
                !common::ci(),
                "{test}: /dev/kvm is required under CI=true but cannot be opened: {e}"
            );
            eprintln!(
                "SKIP {test}: /dev/kvm cannot be opened ({e}); run on a KVM host as a user with access to it"
            );
            None
        }
    }
}

/// A guest_memfd of `size` bytes with MMAP|INIT_SHARED, or `None` after a
/// capability skip (no guest_memfd, or a kernel before guest_memfd mmap,
/// Linux 6.18).
fn shared_gmem(vm: &VmFd, size: u64) -> Option<GuestMemfd> {
    let want = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    if !common::has_guest_memfd(vm, want) {
        return None;
    }
    Some(
        GuestMemfd::builder(size)
            .flags(want)
            .create(vm)
            .expect("KVM_CREATE_GUEST_MEMFD"),
    )
}

/// Hands `gmem` to a child process that populates `offset .. offset + 4 KiB`
/// with `data_page(seed)`; returns once the child said "done" and exited
/// successfully.
fn populate_in_child(gmem: &GuestMemfd, offset: u64, seed: u64) {
    let (mut parent, child) = UnixStream::pair().expect("socketpair");
    let child_fd: RawFd = child.as_raw_fd();
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "populator_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV_FD, child_fd.to_string())
    .env(ENV_SEED, seed.to_string())
    .env(ENV_OFFSET, offset.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls only
    // fcntl, which is async-signal-safe; it clears FD_CLOEXEC on the child's
    // socket end there only, so no other process spawned by this one (tests
    // run in parallel threads) inherits the socket.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let proc = cmd.spawn().expect("spawn the populator child");
    drop(child);

    let sent = kvm_gmem::share::send(&parent, gmem);
    let mut done = [0u8; 1];
    let answer = sent.map_err(|e| e.to_string()).and_then(|()| {
        parent
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("SO_RCVTIMEO");
        match parent.read(&mut done) {
            Ok(1) if done[0] == b'd' => Ok(()),
            Ok(1) => Err(format!("unexpected answer byte {:#x}", done[0])),
            Ok(_) => Err("the child closed the socket without saying done".to_string()),
            Err(e) => Err(format!("no answer from the child: {e}")),
        }
    });
    let mut proc = proc;
    if answer.is_err() {
        let _ = proc.kill();
    }
    let out = proc.wait_with_output().expect("wait for the child");
    let log = format!(
        "child status {}\n--- child stdout ---\n{}\n--- child stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Err(e) = answer {
        panic!("populating in the child failed: {e}\n{log}");
    }
    assert!(out.status.success(), "the populator child failed\n{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 passed"),
        "the child did not run populator_child\n{log}"
    );
    if let Some(line) = stdout.lines().find(|l| l.contains("populator_child:")) {
        println!("child: {line}");
    }
}

/// The child's side: receive the guest_memfd, populate the data page
/// without any VM, say "done". Started by [`populate_in_child`] only.
#[test]
#[ignore = "the populator process of the e2e tests; started by them with GMEM_E2E_SOCK_FD set"]
fn populator_child() {
    let Ok(fd) = std::env::var(ENV_FD) else {
        eprintln!(
            "populator_child: {ENV_FD} is not set; this entry point is run by the e2e tests only"
        );
        return;
    };
    let fd: RawFd = fd.parse().expect("GMEM_E2E_SOCK_FD is a descriptor number");
    let seed: u64 = std::env::var(ENV_SEED).unwrap().parse().unwrap();
    let offset: u64 = std::env::var(ENV_OFFSET).unwrap().parse().unwrap();
    // SAFETY: the parent passed this descriptor (its socket end, inherited
    // across exec) for this process to own; nothing else here uses it.
    let mut sock = unsafe { UnixStream::from_raw_fd(fd) };
    let gmem = kvm_gmem::share::recv(&sock).expect("share::recv");
    assert!(
        gmem.flags()
            .contains(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED),
        "received flags {}",
        gmem.flags()
    );
    let data = data_page(seed);
    let report = Populate::detached(&gmem)
        .run(offset..offset + DATA_LEN as u64, Source::bytes(&data))
        .expect("Populate::detached(..).run");
    assert_eq!(report.bytes, DATA_LEN as u64);
    println!(
        "populator_child: {} bytes at guest_memfd offset {offset:#x} via {:?}",
        report.bytes, report.strategy
    );
    sock.write_all(b"d").expect("answer done");
}

/// How a guest run ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The guest reported this value, then stopped.
    Reported(u16),
    /// An MMIO read at this guest physical address.
    MmioRead(u64),
}

/// Runs until the guest stops; an MMIO read ends the run; any other exit
/// fails the test.
fn run_guest(vcpu: &mut VcpuFd) -> Outcome {
    let mut reported = None;
    for _ in 0..16 {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => panic!("KVM_RUN failed: {e}"),
        };
        if let Some(data) = guest::report(&exit) {
            assert!(reported.is_none(), "the guest reported twice");
            assert_eq!(data.len(), 2, "the guest reports 16 bits");
            reported = Some(u16::from_le_bytes([data[0], data[1]]));
        } else if guest::halted(&exit) {
            return Outcome::Reported(reported.expect("the guest stopped without reporting"));
        } else if let VcpuExit::MmioRead(addr, _) = exit {
            return Outcome::MmioRead(addr);
        } else {
            panic!("unexpected vCPU exit {exit:?}");
        }
    }
    panic!("the guest did not stop within 16 exits");
}

fn seed() -> u64 {
    u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed
}

/// The guest runs from a guest_memfd memslot whose `userspace_addr` is the
/// guest_memfd's own mapping; the data page came from another process.
#[test]
fn guest_runs_from_populated_guest_memfd() {
    const TEST: &str = "guest_runs_from_populated_guest_memfd";
    let Some(kvm) = kvm_or_skip(TEST) else {
        return;
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    const SIZE: u64 = 0x10000;
    let Some(gmem) = shared_gmem(&vm, SIZE) else {
        return;
    };
    let map = gmem.map().expect("map the guest_memfd");
    map.write_at(CODE_GPA, &guest::bytes(GUEST))
        .expect("write the guest code");
    map.fill(RESULT_GPA, 2, 0xee).unwrap();

    let seed = seed();
    // gmem offset == guest physical address in this layout.
    populate_in_child(&gmem, DATA_GPA, seed);
    let data = data_page(seed);
    let mut seen = vec![0u8; DATA_LEN];
    map.read_at(DATA_GPA, &mut seen).unwrap();
    assert!(
        seen == data,
        "the host's mapping does not show the child's data"
    );

    let region = MemoryRegion2::builder(0, 0, SIZE)
        .guest_memfd(&gmem, 0)
        .userspace(&map)
        .build()
        .expect("memslot");
    // SAFETY: the slot's userspace range is `map`, which stays mapped until
    // the slot is deleted below. On a panic before that, `vcpu` is dropped
    // first; KVM touches a slot's memory only for a running vCPU or an ioctl
    // on the VM, and none is issued after that, so the unmapping is never
    // observed.
    unsafe { vm.set_memory_region(&region) }.expect("KVM_SET_USER_MEMORY_REGION2");

    let mut vcpu = guest::vcpu(&vm, CODE_GPA);
    let outcome = run_guest(&mut vcpu);
    let want = checksum(&data);
    assert_eq!(
        outcome,
        Outcome::Reported(want),
        "the guest's checksum of the populated page"
    );
    let mut stored = [0u8; 2];
    map.read_at(RESULT_GPA, &mut stored).unwrap();
    assert_eq!(
        u16::from_le_bytes(stored),
        want,
        "the guest's store at {RESULT_GPA:#x}, read through the Mapping"
    );
    drop(vcpu);
    vm.delete_memory_region(0).expect("delete the slot");
}

/// The data lives in a guest_memfd-only memslot (`userspace_addr` 0): KVM
/// must fault it straight from guest_memfd (kernel-tests.md §1.16, §9).
#[test]
fn guest_memfd_only_memslot() {
    const TEST: &str = "guest_memfd_only_memslot";
    let Some(kvm) = kvm_or_skip(TEST) else {
        return;
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // Slot 0: ordinary memory at 0..DATA_GPA holding the code.
    // Slot 1: the guest_memfd, only, at DATA_GPA.. (data page, then result).
    const GMEM_SIZE: u64 = 0x2000;
    let Some(gmem) = shared_gmem(&vm, GMEM_SIZE) else {
        return;
    };
    let map = gmem.map().expect("map the guest_memfd");
    let result_off = RESULT_GPA - DATA_GPA;
    map.fill(result_off, 2, 0xee).unwrap();
    let seed = seed() ^ 0xabcd;
    populate_in_child(&gmem, 0, seed);
    let data = data_page(seed);

    let anon = guest::RawMap::anon(DATA_GPA);
    anon.write(CODE_GPA, &guest::bytes(GUEST));
    let code_slot = MemoryRegion2::builder(0, 0, DATA_GPA)
        .userspace_addr(anon.addr())
        .build()
        .expect("code memslot");
    let data_slot = MemoryRegion2::builder(1, DATA_GPA, GMEM_SIZE)
        .guest_memfd(&gmem, 0)
        .build()
        .expect("guest_memfd-only memslot");
    assert_eq!(data_slot.as_raw().userspace_addr, 0);
    // SAFETY: slot 0's memory is `anon`, which stays mapped until the slot is
    // deleted below. On a panic before that, `vcpu` is dropped first; KVM
    // touches a slot's memory only for a running vCPU or an ioctl on the VM,
    // and none is issued after that, so the unmapping is never observed.
    unsafe { vm.set_memory_region(&code_slot) }.expect("set the code slot");
    // SAFETY: a guest_memfd-only slot carries no userspace address.
    unsafe { vm.set_memory_region(&data_slot) }.expect("set the guest_memfd-only slot");

    let mut vcpu = guest::vcpu(&vm, CODE_GPA);
    let want = checksum(&data);
    match run_guest(&mut vcpu) {
        Outcome::Reported(sum) => {
            assert_eq!(
                sum, want,
                "the guest's checksum of the guest_memfd-only page"
            );
            let mut stored = [0u8; 2];
            map.read_at(result_off, &mut stored).unwrap();
            assert_eq!(
                u16::from_le_bytes(stored),
                want,
                "the guest's store, read through the Mapping"
            );
            println!("guest_memfd-only memslot runs on this host: checksum {sum:#06x}");
        }
        Outcome::MmioRead(gpa) => {
            assert_eq!(
                gpa, DATA_GPA,
                "an MMIO exit is the known shadow-paging outcome only at the first data byte"
            );
            shadow_paging_skip(gpa);
        }
    }
    drop(vcpu);
    vm.delete_memory_region(1).unwrap();
    vm.delete_memory_region(0).unwrap();
}

/// A guest_memfd-only slot's first data byte exited as MMIO at `gpa`: the
/// known outcome of shadow paging (PVM), a capability skip naming the TDP
/// MMU. With the TDP MMU (7.3 under QEMU with NPT) KVM faults such a slot
/// from the guest_memfd, so an MMIO exit there is a failure.
#[cfg(target_arch = "x86_64")]
fn shadow_paging_skip(gpa: u64) {
    let tdp_mmu = std::fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    assert_ne!(
        tdp_mmu, "Y",
        "KVM runs the TDP MMU, yet a guest_memfd-only slot gave an MMIO exit at {gpa:#x}"
    );
    println!(
        "guest_memfd-only memslot not runnable on this host (shadow paging): MMIO exit at gpa {gpa:#x}"
    );
    common::skip_capability(
        "KVM_TDP_MMU",
        format_args!("{tdp_mmu:?} (kvm.tdp_mmu; shadow paging)"),
    );
}

/// arm64 KVM always pages its guests through stage 2, which faults a
/// guest_memfd-only slot from the guest_memfd (Linux 6.18): an MMIO exit
/// there is a failure.
#[cfg(target_arch = "aarch64")]
fn shadow_paging_skip(gpa: u64) {
    panic!("a guest_memfd-only slot gave an MMIO exit at {gpa:#x} on aarch64");
}
