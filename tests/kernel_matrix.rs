//! The kernel matrix: one test that probes every guest_memfd and
//! userfaultfd feature the crates cover and, where the kernel supports it,
//! **exercises** it through the crates and asserts its effect.
//!
//! It prints one line per feature on standard output (written directly, so
//! libtest does not capture it):
//!
//! ```text
//! GMEM-MATRIX-FEATURE <id> <what the feature is>
//! GMEM-MATRIX <id> <verified|unsupported|n/a> <evidence>
//! ```
//!
//! - `verified`: the feature was used through `kvm-gmem` / `uffd-gmem` and
//!   its effect asserted (a guest read the host's data, a fault arrived with
//!   the right kind, a pre-fault reported exact progress, ...);
//! - `unsupported`: the kernel says no, and the test asserted that the crates
//!   say so too, consistently with [`kvm_gmem::Capabilities`] (a capability
//!   of 0 whose ioctl then succeeds is a failure, and so is a supported
//!   capability whose ioctl fails);
//! - `n/a`: a prerequisite is missing (e.g. no guest_memfd mmap to fill a
//!   guest_memfd from the host), so the feature cannot be tried.
//!
//! `scripts/kernel-lane.sh` runs this test on the host kernel and on Linux
//! 7.3 under QEMU and writes `docs/kernel-matrix.md` from the two sets of
//! lines. A feature whose check panics is printed as `FAILED` and fails the
//! test after every other feature has been reported.
//!
//! Without `/dev/kvm` the test prints `SKIP` and passes, and without
//! userfaultfd the userfaultfd rows are `n/a`; under `CI=true` either absence
//! is a failure.
//!
//! The guests are assembled by hand (below), and they are run by
//! `tests/guest/mod.rs`: on x86_64 a 16-bit real-mode program, with `ds` and
//! `es` based at the data slot (0x20000); on aarch64 an EL1 program with the
//! MMU off, addressing the data slot directly. Either starts at 0x1000 in an
//! ordinary memory slot and reports one byte (a port write on x86_64, an
//! MMIO store on aarch64). The rows, their descriptions and the statuses'
//! meaning are the same on both architectures, so that the kernel matrix can
//! put an x86_64 and an arm64 lane side by side.

use std::any::Any;
use std::io::Write as _;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use kvm_gmem::interop::vcpu_fd;
use kvm_gmem::populate::{Populate, Source, Strategy};
use kvm_gmem::{
    Capabilities, Errno, Extension, GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryAttributes,
    MemoryRegion2, UserfaultBitmap, VmOps, VmType, pre_fault_memory,
};
use uffd_gmem::{Event, FaultKind, Features, Ioctls, Mode, RegisterMode, Uffd};

mod guest;

use guest::{Guest, GuestExit, RawMap};

const PAGE: u64 = 4096;
/// The data slot (slot 1): 64 KiB at 0x20000; the guest reads and writes
/// its first page through `ds`/`es`.
const DATA_GPA: u64 = 0x20000;
const DATA_SIZE: u64 = 0x10000;
const GUEST_OK: u8 = 1;
const GUEST_MISMATCH: u8 = 2;
/// What the host writes for the guest to check, and what the guest writes
/// back.
const HOST_BYTE: u8 = 0xaa;
const GUEST_BYTE: u8 = 0xff;

/// The guest: checks that the 4 KiB at ds:0 are all 0xaa, fills them with
/// 0xff, and reports 1 (or 2 at the first mismatch, without writing) on port
/// 0x10 (`objdump -D -b binary -mi8086` shows it as below).
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const GUEST: guest::Program = &[
    0x31, 0xf6,       //  0: xor si, si
    0xb9, 0x00, 0x10, //  2: mov cx, 0x1000
    0xac,             //  5: lodsb                ; al = ds:[si++]
    0x3c, 0xaa,       //  6: cmp al, 0xaa         ; HOST_BYTE
    0x75, 0x10,       //  8: jne 26
    0xe2, 0xf9,       // 10: loop 5
    0x31, 0xff,       // 12: xor di, di
    0xb9, 0x00, 0x10, // 14: mov cx, 0x1000
    0xb0, 0xff,       // 17: mov al, 0xff         ; GUEST_BYTE
    0xf3, 0xaa,       // 19: rep stosb            ; es:[di++] = al
    0xb0, 0x01,       // 21: mov al, 1            ; GUEST_OK
    0xe6, 0x10,       // 23: out 0x10, al         ; guest::PORT
    0xf4,             // 25: hlt
    0xb0, 0x02,       // 26: mov al, 2            ; GUEST_MISMATCH
    0xe6, 0x10,       // 28: out 0x10, al
    0xf4,             // 30: hlt
];

/// The same guest on aarch64, up to its report, a byte store to
/// `guest::REPORT_GPA` (assembled with aarch64-linux-gnu-as; `objdump -d`
/// shows it as below). The accesses use a register offset, no writeback, so
/// that one KVM cannot satisfy from memory exits as MMIO.
#[cfg(target_arch = "aarch64")]
#[rustfmt::skip]
const GUEST: guest::Program = &[
    0xd2a00040, //  0: mov  x0, #0x20000       ; DATA_GPA
    0xd2800001, //  4: mov  x1, #0
    0x38616802, //  8: ldrb w2, [x0, x1]
    0x7102a85f, //  c: cmp  w2, #0xaa          ; HOST_BYTE
    0x54000181, // 10: b.ne 40
    0x91000421, // 14: add  x1, x1, #1
    0xf140043f, // 18: cmp  x1, #0x1000
    0x54ffff61, // 1c: b.ne 8
    0xd2800001, // 20: mov  x1, #0
    0x52801fe2, // 24: mov  w2, #0xff          ; GUEST_BYTE
    0x38216802, // 28: strb w2, [x0, x1]
    0x91000421, // 2c: add  x1, x1, #1
    0xf140043f, // 30: cmp  x1, #0x1000
    0x54ffffa1, // 34: b.ne 28
    0x52800023, // 38: mov  w3, #1             ; GUEST_OK
    0x14000002, // 3c: b    44
    0x52800043, // 40: mov  w3, #2             ; GUEST_MISMATCH
    0xd2a00204, // 44: mov  x4, #0x100000      ; guest::REPORT_GPA
    0x39000083, // 48: strb w3, [x4]           ; the report: an MMIO exit
];

/// The features, in the matrix's order: id and what is checked.
const FEATURES: &[(&str, &str, Check)] = &[
    (
        "guest_memfd",
        "KVM_CREATE_GUEST_MEMFD (6.8): create, fstat, fallocate allocate and punch",
        guest_memfd,
    ),
    (
        "guest_memfd_mmap",
        "GUEST_MEMFD_FLAG_MMAP + INIT_SHARED (6.18): host mapping; a punched page reads zero",
        guest_memfd_mmap,
    ),
    (
        "memslot_v2",
        "KVM_SET_USER_MEMORY_REGION2 (6.8): a guest runs from such slots and exchanges data with the host",
        memslot_v2,
    ),
    (
        "gmem_memslot_with_userspace_guest",
        "guest_memfd memslot whose userspace_addr is the guest_memfd mapping: guest and host see each other's writes",
        gmem_memslot_with_userspace_guest,
    ),
    (
        "gmem_only_memslot_guest",
        "guest_memfd-only memslot (userspace_addr 0): KVM faults guest memory from guest_memfd alone",
        gmem_only_memslot_guest,
    ),
    (
        "pre_fault",
        "KVM_PRE_FAULT_MEMORY (6.11) over a memslot completes; the guest then runs on it",
        pre_fault,
    ),
    (
        "pre_fault_partial",
        "KVM_PRE_FAULT_MEMORY across a slot's end stops with ENOENT after exactly the in-slot part",
        pre_fault_partial,
    ),
    (
        "memory_attributes_vm_fd",
        "KVM_CAP_MEMORY_ATTRIBUTES on a default VM fd; KVM_SET_MEMORY_ATTRIBUTES(PRIVATE)",
        memory_attributes_vm_fd,
    ),
    (
        "memory_attributes_dev_kvm",
        "KVM_CAP_MEMORY_ATTRIBUTES on /dev/kvm, reported apart from the VM's answer",
        memory_attributes_dev_kvm,
    ),
    (
        "uffd",
        "userfaultfd MISSING fault on anonymous memory, resolved with UFFDIO_COPY",
        uffd_missing,
    ),
    (
        "uffd_minor_shmem",
        "userfaultfd MINOR fault on shmem (5.14), resolved with UFFDIO_CONTINUE",
        uffd_minor_shmem,
    ),
    (
        "uffd_rwp",
        "UFFD_FEATURE_RWP (7.3): UFFDIO_RWPROTECT makes a touch fault with kind ReadWriteProtect",
        uffd_rwp,
    ),
    (
        "uffd_rwp_async",
        "UFFD_FEATURE_RWP_ASYNC (7.3): UFFDIO_SET_MODE switches to faults resolved without events, and back",
        uffd_rwp_async,
    ),
    (
        "uffd_on_guest_memfd",
        "UFFDIO_REGISTER (MINOR) on a guest_memfd mapping (the guest_memfd userfaultfd series)",
        uffd_on_guest_memfd,
    ),
    (
        "rfc_populate",
        "KVM_GUEST_MEMFD_POPULATE (RFC 0/4, Oct 2024) through Populate with Strategy::PopulateIoctl",
        rfc_populate,
    ),
    (
        "rfc_gmem_write",
        "GUEST_MEMFD_FLAG_WRITE, pwrite() on guest_memfd (RFC v7 / Firecracker 6.18), through Strategy::Write",
        rfc_gmem_write,
    ),
    (
        "rfc_no_direct_map",
        "GUEST_MEMFD_FLAG_NO_DIRECT_MAP (RFC v9 / Firecracker 6.18)",
        rfc_no_direct_map,
    ),
    (
        "rfc_kvm_userfault",
        "KVM_MEM_USERFAULT with a bitmap (RFC v3 / Firecracker 6.18): a vCPU fault exits with the USERFAULT flag",
        rfc_kvm_userfault,
    ),
    (
        "sw_protected_attributes",
        "KVM_X86_SW_PROTECTED_VM: set_attributes(PRIVATE) and back on a slot backed by a guest_memfd and host memory; the guest sees the guest_memfd while private, host memory once shared",
        sw_protected_attributes,
    ),
    (
        "sw_protected_private_fault",
        "KVM_X86_SW_PROTECTED_VM: a guest touching a private gfn with no guest_memfd behind it exits KVM_EXIT_MEMORY_FAULT with the PRIVATE flag, decoded by MemoryFault",
        sw_protected_private_fault,
    ),
];

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Verified,
    Unsupported,
    NotApplicable,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Verified => "verified",
            Status::Unsupported => "unsupported",
            Status::NotApplicable => "n/a",
        }
    }
}

type Row = (Status, String);
type Check = fn(&Ctx) -> Row;

/// What every check shares: the crates' view of the kernel, queried once.
struct Ctx {
    kvm: KvmDevice,
    kvm_io: kvm_ioctls::Kvm,
    caps: Capabilities,
    /// Why userfaultfd cannot be used, if it cannot.
    uffd_missing: Option<String>,
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// One line on standard output, past libtest's capture.
fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").expect("stdout");
    out.flush().expect("stdout");
}

fn panic_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

#[test]
fn kernel_matrix() {
    let kvm = match KvmDevice::open() {
        Ok(kvm) => kvm,
        Err(e) => {
            assert!(
                !ci(),
                "kernel_matrix: /dev/kvm is required under CI=true but cannot be opened: {e}"
            );
            eprintln!(
                "SKIP kernel_matrix: /dev/kvm cannot be opened ({e}); run on a KVM host as a user with access to it"
            );
            return;
        }
    };
    let kvm_io = kvm_ioctls::Kvm::new().expect("kvm-ioctls: open /dev/kvm");
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("Capabilities::query");
    drop(vm);
    let uffd_missing = match Uffd::builder().create() {
        Ok(_) => None,
        Err(e) => {
            assert!(
                !ci(),
                "kernel_matrix: userfaultfd is required under CI=true but cannot be created: {e}"
            );
            eprintln!("kernel_matrix: userfaultfd unavailable ({e}); its rows are n/a");
            Some(format!("userfaultfd unavailable: {e}"))
        }
    };
    let cx = Ctx {
        kvm,
        kvm_io,
        caps,
        uffd_missing,
    };
    // A newline first: libtest has printed "test kernel_matrix ... " without one.
    line(&format!("\nGMEM-MATRIX-KERNEL {}", cx.caps.kernel_release));
    let mut failed = Vec::new();
    for &(id, what, check) in FEATURES {
        line(&format!("GMEM-MATRIX-FEATURE {id} {what}"));
        match catch_unwind(AssertUnwindSafe(|| check(&cx))) {
            Ok((status, evidence)) => {
                let evidence = evidence.replace('\n', " ");
                line(&format!("GMEM-MATRIX {id} {} {evidence}", status.word()))
            }
            Err(p) => {
                let why = panic_text(p.as_ref()).replace('\n', " ");
                line(&format!("GMEM-MATRIX {id} FAILED {why}"));
                failed.push(format!("{id}: {why}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} feature check(s) failed:\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Whether every byte of `bytes` is `b`; else the first offset that is not.
fn all(bytes: &[u8], b: u8) -> Result<(), String> {
    match bytes.iter().position(|&x| x != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "byte {i:#x} is {:#04x}, expected {b:#04x}",
            bytes[i]
        )),
    }
}

fn read_map(map: &kvm_gmem::Mapping, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0; len as usize];
    map.read_at(offset, &mut buf).expect("Mapping::read_at");
    buf
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"gmem-kernel-matrix".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    file.set_len(len).expect("ftruncate(memfd)");
    OwnedFd::from(file)
}

fn tdp_mmu() -> String {
    std::fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------

/// A data slot of `DATA_SIZE` in anonymous memory, first page = HOST_BYTE.
fn anon_data_slot(g: &mut Guest) -> Arc<RawMap> {
    let data = Arc::new(RawMap::anon(DATA_SIZE));
    data.fill(0, PAGE, HOST_BYTE);
    let region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE)
        .userspace_addr(data.addr())
        .build()
        .expect("data slot");
    g.set_slot(&region, Some(data.clone()))
        .expect("KVM_SET_USER_MEMORY_REGION2 (data slot)");
    data
}

/// Runs the guest and asserts that it read HOST_BYTE and wrote GUEST_BYTE
/// into the first data page, which `read` returns.
fn assert_guest_exchanges(g: &mut Guest, read: impl Fn() -> Vec<u8>) {
    match g.run() {
        GuestExit::Report(GUEST_OK) => {}
        GuestExit::Report(GUEST_MISMATCH) => {
            panic!("the guest did not read {HOST_BYTE:#x} in its data page")
        }
        other => panic!("the guest ended with {other:?}"),
    }
    if let Err(e) = all(&read(), GUEST_BYTE) {
        panic!("after the guest ran, the host's view of the data page: {e}");
    }
}

fn shared_flags() -> GuestMemfdFlags {
    GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED
}

/// Why a guest_memfd filled from the host cannot be had, if it cannot.
fn shared_gmem_missing(cx: &Ctx) -> Option<String> {
    if !cx.caps.guest_memfd.supported {
        return Some(format!(
            "needs guest_memfd ({})",
            cx.caps.guest_memfd.evidence
        ));
    }
    if !cx.caps.guest_memfd_flags.contains(shared_flags()) {
        return Some(format!(
            "needs MMAP|INIT_SHARED to fill the guest_memfd from the host (KVM_CAP_GUEST_MEMFD_FLAGS = {})",
            cx.caps.guest_memfd_flags
        ));
    }
    None
}

// ---------------------------------------------------------------------------
// guest_memfd
// ---------------------------------------------------------------------------

fn guest_memfd(cx: &Ctx) -> Row {
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let size = 4 * PAGE;
    let created = GuestMemfd::builder(size).create(&vm);
    if !cx.caps.guest_memfd.supported {
        let e = created.expect_err("Capabilities says no guest_memfd, yet creating one succeeded");
        assert!(e.is_unsupported(), "expected Error::Unsupported, got {e}");
        return (
            Status::Unsupported,
            format!("{}; GuestMemfd::create: {e}", cx.caps.guest_memfd.evidence),
        );
    }
    let gmem = created.expect("KVM_CREATE_GUEST_MEMFD");
    let file = std::fs::File::from(gmem.as_fd().try_clone_to_owned().expect("dup"));
    let meta = file.metadata().expect("fstat(guest_memfd)");
    assert_eq!(meta.len(), size, "fstat size of the guest_memfd");
    gmem.allocate(0..size).expect("fallocate(KEEP_SIZE)");
    gmem.punch_hole(PAGE..2 * PAGE)
        .expect("fallocate(PUNCH_HOLE)");
    let link = std::fs::read_link(format!("/proc/self/fd/{}", gmem.as_fd().as_raw_fd()))
        .expect("readlink(/proc/self/fd/N)");
    // SAFETY: an all-zero statfs is a valid output buffer.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call; `sfs` is a writable statfs.
    let r = unsafe { libc::fstatfs(gmem.as_fd().as_raw_fd(), &mut sfs) };
    assert_eq!(r, 0, "fstatfs(guest_memfd)");
    (
        Status::Verified,
        format!(
            "{}; a {size}-byte guest_memfd: fstat size {size}, allocate 0..{size:#x} and punch_hole {PAGE:#x}..{:#x} succeeded; /proc/self/fd link {:?}, fstatfs f_type {:#x}",
            cx.caps.guest_memfd.evidence,
            2 * PAGE,
            link,
            sfs.f_type
        ),
    )
}

fn guest_memfd_mmap(cx: &Ctx) -> Row {
    if !cx.caps.guest_memfd.supported {
        return (Status::NotApplicable, "needs guest_memfd".into());
    }
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let size = 4 * PAGE;
    let created = GuestMemfd::builder(size).flags(shared_flags()).create(&vm);
    let offered = cx.caps.guest_memfd_flags;
    if !offered.contains(shared_flags()) {
        let e = created.expect_err("MMAP|INIT_SHARED not offered, yet creating succeeded");
        assert!(e.is_unsupported(), "expected UnsupportedFlags, got {e}");
        return (
            Status::Unsupported,
            format!("KVM_CAP_GUEST_MEMFD_FLAGS = {offered}; GuestMemfd::create: {e}"),
        );
    }
    let gmem = created.expect("KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED)");
    let map = gmem.map().expect("GuestMemfd::map");
    map.fill(0, size as usize, HOST_BYTE).expect("fill");
    all(&read_map(&map, 0, size), HOST_BYTE).expect("read back");
    gmem.punch_hole(0..PAGE).expect("punch_hole");
    all(&read_map(&map, 0, PAGE), 0).expect("a punched page reads zero");
    all(&read_map(&map, PAGE, 3 * PAGE), HOST_BYTE).expect("the other pages keep their data");
    map.fill(0, PAGE as usize, HOST_BYTE).expect("refill");
    all(&read_map(&map, 0, PAGE), HOST_BYTE).expect("the punched page refaults");
    (
        Status::Verified,
        format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS = {offered}; mapped a 4-page guest_memfd, wrote and read it back; after punch_hole page 0 read zero, pages 1-3 kept {HOST_BYTE:#x}, page 0 refaulted"
        ),
    )
}

// ---------------------------------------------------------------------------
// Guests on memslots
// ---------------------------------------------------------------------------

fn memslot_v2(cx: &Ctx) -> Row {
    if !cx.caps.user_memory2.supported {
        let data = RawMap::anon(DATA_SIZE);
        let vm = cx.kvm_io.create_vm().expect("KVM_CREATE_VM");
        let region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE)
            .userspace_addr(data.addr())
            .build()
            .expect("slot");
        // SAFETY: `data` is declared before `vm`, so it is unmapped only
        // after the VM is gone.
        let r = unsafe { vm.set_memory_region(&region) };
        let e = r.expect_err("KVM_CAP_USER_MEMORY2 = 0, yet the ioctl succeeded");
        return (
            Status::Unsupported,
            format!(
                "{}; KVM_SET_USER_MEMORY_REGION2: {e}",
                cx.caps.user_memory2.evidence
            ),
        );
    }
    let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
    let data = anon_data_slot(&mut g);
    assert_guest_exchanges(&mut g, || data.read(0, PAGE));
    all(&data.read(PAGE, PAGE), 0).expect("the guest touched only its page");
    (
        Status::Verified,
        format!(
            "{}; {} ran from a region2 slot at 0 and, through a second one at {DATA_GPA:#x} (anonymous memory), read the host's {HOST_BYTE:#x} page and wrote {GUEST_BYTE:#x} that the host read back",
            cx.caps.user_memory2.evidence,
            guest::A_GUEST
        ),
    )
}

/// The guest on a guest_memfd data slot; with `userspace` the slot's
/// userspace_addr is the guest_memfd's own mapping, else 0.
fn gmem_guest(cx: &Ctx, userspace: bool) -> Row {
    if let Some(why) = shared_gmem_missing(cx) {
        return (Status::NotApplicable, why);
    }
    let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
    let gmem = GuestMemfd::builder(DATA_SIZE)
        .flags(shared_flags())
        .create(&g.vm)
        .expect("KVM_CREATE_GUEST_MEMFD");
    let map = Arc::new(gmem.map().expect("GuestMemfd::map"));
    map.fill(0, PAGE as usize, HOST_BYTE).expect("fill");
    let mut region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE).guest_memfd(&gmem, 0);
    if userspace {
        region = region.userspace(&map);
    }
    let region = region.build().expect("guest_memfd slot");
    g.set_slot(
        &region,
        userspace.then(|| map.clone() as Arc<dyn Any + Send + Sync>),
    )
    .expect("KVM_SET_USER_MEMORY_REGION2 (KVM_MEM_GUEST_MEMFD)");
    let mut pre = String::new();
    if cx.caps.pre_fault_memory.supported {
        let pf = pre_fault_memory(&vcpu_fd(&g.vcpu), DATA_GPA..DATA_GPA + DATA_SIZE)
            .expect("KVM_PRE_FAULT_MEMORY over the guest_memfd slot");
        assert!(
            pf.is_complete(),
            "pre-fault of the guest_memfd slot: {pf:?}"
        );
        pre = format!(
            "; KVM_PRE_FAULT_MEMORY of the slot completed ({:#x} bytes) first",
            pf.done
        );
    }
    let shape = if userspace {
        "KVM_MEM_GUEST_MEMFD slot with userspace_addr = the guest_memfd mapping"
    } else {
        "guest_memfd-only slot (userspace_addr 0)"
    };
    match g.run() {
        GuestExit::Report(GUEST_OK) => {}
        GuestExit::Mmio { gpa, write }
            if !userspace && (DATA_GPA..DATA_GPA + PAGE).contains(&gpa) =>
        {
            return (
                Status::Unsupported,
                format!(
                    "the guest's first {} of the {shape} at {DATA_GPA:#x} exited KVM_EXIT_MMIO at {gpa:#x}: KVM does not fault guest memory from guest_memfd alone here (kvm.tdp_mmu = {}; shadow paging){pre}",
                    if write { "write" } else { "read" },
                    tdp_mmu()
                ),
            );
        }
        GuestExit::Report(GUEST_MISMATCH) => {
            panic!("the guest did not read {HOST_BYTE:#x} through the {shape}")
        }
        other => panic!("the guest on the {shape} ended with {other:?}"),
    }
    all(&read_map(&map, 0, PAGE), GUEST_BYTE).expect("the host sees the guest's write");
    (
        Status::Verified,
        format!(
            "{} read the host's {HOST_BYTE:#x} page through a {shape} at {DATA_GPA:#x} and wrote {GUEST_BYTE:#x}, which the host read back through its mapping{pre}",
            guest::A_GUEST
        ),
    )
}

fn gmem_memslot_with_userspace_guest(cx: &Ctx) -> Row {
    gmem_guest(cx, true)
}

fn gmem_only_memslot_guest(cx: &Ctx) -> Row {
    gmem_guest(cx, false)
}

// ---------------------------------------------------------------------------
// Pre-fault
// ---------------------------------------------------------------------------

/// `None` when pre-fault is supported; else the row for an unsupported
/// kernel, after checking that the crate refuses it consistently.
fn pre_fault_refused(cx: &Ctx, g: &Guest) -> Option<Row> {
    let r = pre_fault_memory(&vcpu_fd(&g.vcpu), DATA_GPA..DATA_GPA + DATA_SIZE);
    if cx.caps.pre_fault_memory.supported {
        return None;
    }
    match r {
        Err(e) if e.is_unsupported() => Some((
            Status::Unsupported,
            format!(
                "{}; pre_fault_memory: {e}",
                cx.caps.pre_fault_memory.evidence
            ),
        )),
        other => panic!(
            "{}, yet pre_fault_memory answered {other:?}",
            cx.caps.pre_fault_memory.evidence
        ),
    }
}

fn pre_fault(cx: &Ctx) -> Row {
    let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
    let data = anon_data_slot(&mut g);
    if let Some(row) = pre_fault_refused(cx, &g) {
        return row;
    }
    let pf = pre_fault_memory(&vcpu_fd(&g.vcpu), DATA_GPA..DATA_GPA + DATA_SIZE)
        .expect("KVM_PRE_FAULT_MEMORY");
    assert!(pf.is_complete(), "pre-fault of the whole slot: {pf:?}");
    assert_eq!(pf.done, DATA_SIZE);
    assert_guest_exchanges(&mut g, || data.read(0, PAGE));
    (
        Status::Verified,
        format!(
            "{}; pre_fault_memory({DATA_GPA:#x}..{:#x}) over a slot completed (done {:#x}); the guest then exchanged data through it",
            cx.caps.pre_fault_memory.evidence,
            DATA_GPA + DATA_SIZE,
            pf.done
        ),
    )
}

fn pre_fault_partial(cx: &Ctx) -> Row {
    let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
    let _data = anon_data_slot(&mut g);
    if let Some((_, why)) = pre_fault_refused(cx, &g) {
        return (Status::Unsupported, why);
    }
    let end = DATA_GPA + DATA_SIZE;
    let vcpu = vcpu_fd(&g.vcpu);
    let half = pre_fault_memory(&vcpu, end - PAGE..end + PAGE).expect("pre-fault across the end");
    assert_eq!(half.done, PAGE, "{half:?}");
    assert_eq!(half.remaining, end..end + PAGE, "{half:?}");
    assert_eq!(half.stopped, Some(Errno(libc::ENOENT)), "{half:?}");
    let outside =
        pre_fault_memory(&vcpu, end + PAGE..end + 2 * PAGE).expect("pre-fault outside any slot");
    assert_eq!(outside.done, 0, "{outside:?}");
    assert_eq!(outside.remaining, end + PAGE..end + 2 * PAGE, "{outside:?}");
    assert_eq!(outside.stopped, Some(Errno(libc::ENOENT)), "{outside:?}");
    (
        Status::Verified,
        format!(
            "pre_fault_memory({:#x}..{:#x}), one page in the slot and one past it: done {:#x}, stopped ENOENT, remaining {:#x}..{:#x}; a range wholly outside: done 0, ENOENT",
            end - PAGE,
            end + PAGE,
            half.done,
            half.remaining.start,
            half.remaining.end
        ),
    )
}

// ---------------------------------------------------------------------------
// Memory attributes
// ---------------------------------------------------------------------------

fn attrs_text(v: i32) -> String {
    let a = MemoryAttributes::from_bits_retain(v.max(0) as u64);
    if a.contains(MemoryAttributes::PRIVATE) {
        format!("{v:#x} (PRIVATE)")
    } else {
        format!("{v:#x}")
    }
}

/// The raw answers of /dev/kvm and of a fresh default VM, checked against
/// what `Capabilities` reported for each.
fn attribute_answers(cx: &Ctx) -> (i32, i32, kvm_gmem::Vm) {
    let dev = cx
        .kvm
        .extension(Extension::MEMORY_ATTRIBUTES)
        .expect("KVM_CHECK_EXTENSION on /dev/kvm");
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let on_vm = vm
        .extension(Extension::MEMORY_ATTRIBUTES)
        .expect("KVM_CHECK_EXTENSION on the VM");
    assert_eq!(
        cx.caps.memory_attributes_system.bits(),
        dev.max(0) as u64,
        "Capabilities::memory_attributes_system must be /dev/kvm's answer"
    );
    assert_eq!(
        cx.caps.memory_attributes.bits(),
        on_vm.max(0) as u64,
        "Capabilities::memory_attributes must be the VM fd's answer"
    );
    assert_eq!(
        vm.supported_attributes()
            .expect("supported_attributes")
            .bits(),
        on_vm.max(0) as u64
    );
    (dev, on_vm, vm)
}

fn memory_attributes_vm_fd(cx: &Ctx) -> Row {
    let (dev, on_vm, vm) = attribute_answers(cx);
    let range = DATA_GPA..DATA_GPA + PAGE;
    if MemoryAttributes::from_bits_retain(on_vm.max(0) as u64).contains(MemoryAttributes::PRIVATE) {
        drop(vm);
        // Private memory on an ordinary slot: the guest's access must exit
        // as a private memory fault.
        let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
        let _data = anon_data_slot(&mut g);
        g.vm.set_attributes(range.clone(), MemoryAttributes::PRIVATE)
            .expect("KVM_SET_MEMORY_ATTRIBUTES(PRIVATE)");
        match g.run() {
            GuestExit::MemoryFault(f) if f.is_private() && f.gpa == DATA_GPA => {}
            other => panic!("expected a private memory fault at {DATA_GPA:#x}, got {other:?}"),
        }
        g.vm.set_attributes(range, MemoryAttributes::empty())
            .expect("KVM_SET_MEMORY_ATTRIBUTES(0)");
        return (
            Status::Verified,
            format!(
                "the VM fd answers {}; with PRIVATE set on an ordinary slot's page the guest's read exited KVM_EXIT_MEMORY_FAULT (PRIVATE) at {DATA_GPA:#x}",
                attrs_text(on_vm)
            ),
        );
    }
    let e = vm
        .set_attributes(range, MemoryAttributes::PRIVATE)
        .expect_err("the VM offers no attributes, yet KVM_SET_MEMORY_ATTRIBUTES succeeded");
    assert!(e.is_unsupported(), "expected Error::Unsupported, got {e}");
    (
        Status::Unsupported,
        format!(
            "a default VM fd answers {} (/dev/kvm {}; KVM_CAP_VM_TYPES = {:#x}); set_memory_attributes refuses: {e}",
            attrs_text(on_vm),
            attrs_text(dev),
            cx.caps.vm_types
        ),
    )
}

fn memory_attributes_dev_kvm(cx: &Ctx) -> Row {
    let (dev, on_vm, _vm) = attribute_answers(cx);
    if dev <= 0 {
        return (
            Status::Unsupported,
            format!(
                "KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES) on /dev/kvm = {}; Capabilities agrees",
                attrs_text(dev)
            ),
        );
    }
    (
        Status::Verified,
        format!(
            "/dev/kvm answers {} and a default VM fd {}: Capabilities reports each fd's own answer (memory_attributes_system, memory_attributes)",
            attrs_text(dev),
            attrs_text(on_vm)
        ),
    )
}

// ---------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------

/// Reads the byte at `addr` on a new thread, which sends it on the returned
/// channel once the read completes (a blocked read sends nothing until the
/// caller resolves or unregisters the fault).
fn read_on_thread(addr: u64) -> mpsc::Receiver<u8> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `addr` lies in a mapping that the test keeps until this
        // thread has sent its byte (every caller waits for it or unblocks
        // the fault and waits); a volatile load, no reference formed.
        let b = unsafe { (addr as *const u8).read_volatile() };
        let _ = tx.send(b);
    });
    rx
}

/// Touches `addr` (in `registered`) on a thread, waits up to 10 s for the
/// fault on `uffd`, and lets `resolve` resolve it. Returns the fault's kind
/// and address and the byte the thread read. On any failure the range is
/// unregistered first, which wakes the thread.
fn touch_and_serve(
    uffd: &Uffd,
    registered: Range<u64>,
    addr: u64,
    resolve: impl FnOnce(&Uffd) -> Result<(), String>,
) -> (FaultKind, u64, u8) {
    let rx = read_on_thread(addr);
    let fail = |why: String| -> ! {
        let _ = uffd.unregister(registered.clone());
        let _ = rx.recv_timeout(Duration::from_secs(10));
        panic!("{why}");
    };
    match uffd.poll_readable(Duration::from_secs(10)) {
        Ok(true) => {}
        Ok(false) => fail(format!(
            "no userfaultfd event within 10 s of touching {addr:#x}"
        )),
        Err(e) => fail(format!("poll: {e}")),
    }
    let (kind, address) = match uffd.read_event() {
        Ok(Some(Event::Pagefault { kind, address, .. })) => (kind, address),
        other => fail(format!("expected a page fault event, got {other:?}")),
    };
    if let Err(e) = resolve(uffd) {
        fail(format!("resolving the {kind:?} fault at {address:#x}: {e}"));
    }
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(b) => (kind, address, b),
        Err(_) => fail(format!(
            "the {kind:?} fault at {address:#x} was resolved, but the thread did not finish"
        )),
    }
}

fn uffd_or_na(cx: &Ctx) -> Result<(), Row> {
    match &cx.uffd_missing {
        Some(why) => Err((Status::NotApplicable, why.clone())),
        None => Ok(()),
    }
}

fn offered() -> Features {
    Uffd::builder()
        .create()
        .expect("userfaultfd")
        .supported_features()
        .expect("a handshake reports the offered features")
}

/// The row for a feature the kernel does not offer, after checking that
/// asking for it fails with `MissingFeatures` naming it.
fn feature_refused(feature: Features, name: &str) -> Row {
    let e = Uffd::builder()
        .require_features(feature)
        .create()
        .expect_err("a feature the kernel does not offer was accepted");
    let missing = match &e {
        uffd_gmem::Error::MissingFeatures { missing, .. } => *missing,
        other => panic!("expected MissingFeatures, got {other}"),
    };
    assert!(missing.contains(feature), "{e}");
    (
        Status::Unsupported,
        format!(
            "UFFDIO_API offers {:#x}, without {name}; require_features({name}) fails with MissingFeatures {{ missing: {:#x} }}",
            offered().bits(),
            missing.bits()
        ),
    )
}

fn uffd_missing(cx: &Ctx) -> Row {
    if let Err(row) = uffd_or_na(cx) {
        return row;
    }
    let mem = RawMap::anon(4 * PAGE);
    let uffd = Uffd::builder()
        .non_blocking(true)
        .create()
        .expect("userfaultfd");
    // SAFETY: `mem` is an anonymous mapping that nothing references (only
    // its address is used) and that outlives `uffd` (declared before it).
    let ioctls = unsafe { uffd.register(mem.range(), RegisterMode::MISSING) }
        .expect("UFFDIO_REGISTER(MISSING)");
    assert!(ioctls.contains(Ioctls::COPY | Ioctls::WAKE), "{ioctls:?}");
    let target = mem.addr() + PAGE;
    let src = vec![0xabu8; PAGE as usize];
    let (kind, address, byte) = touch_and_serve(&uffd, mem.range(), target, |u| {
        // SAFETY: `src` is readable for PAGE bytes for the whole call.
        let n = unsafe { u.copy(target, src.as_ptr(), PAGE, Mode::empty()) }
            .map_err(|e| e.to_string())?;
        (n == PAGE).then_some(()).ok_or(format!("copied {n} bytes"))
    });
    assert_eq!(kind, FaultKind::Missing);
    assert_eq!(address, target);
    assert_eq!(byte, 0xab);
    (
        Status::Verified,
        format!(
            "origin {:?}; a read of a registered anonymous page faulted (Missing at the page), UFFDIO_COPY of one page resolved it and the reader saw 0xab",
            uffd.origin()
        ),
    )
}

fn uffd_minor_shmem(cx: &Ctx) -> Row {
    if let Err(row) = uffd_or_na(cx) {
        return row;
    }
    if !offered().contains(Features::MINOR_SHMEM) {
        return feature_refused(Features::MINOR_SHMEM, "UFFD_FEATURE_MINOR_SHMEM");
    }
    let fd = memfd(4 * PAGE);
    let view = RawMap::shared(&fd, 4 * PAGE);
    let alias = RawMap::shared(&fd, 4 * PAGE);
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::MINOR_SHMEM)
        .create()
        .expect("userfaultfd with MINOR_SHMEM");
    alias.fill(PAGE, PAGE, 0xcd);
    // SAFETY: `view` is a shared mapping that nothing references and that
    // outlives `uffd` (declared before it).
    let ioctls = unsafe { uffd.register(view.range(), RegisterMode::MINOR) }
        .expect("UFFDIO_REGISTER(MINOR) on shmem");
    assert!(ioctls.contains(Ioctls::CONTINUE), "{ioctls:?}");
    let target = view.addr() + PAGE;
    let (kind, address, byte) = touch_and_serve(&uffd, view.range(), target, |u| {
        let n = u
            .r#continue(target..target + PAGE, Mode::empty())
            .map_err(|e| e.to_string())?;
        (n == PAGE).then_some(()).ok_or(format!("mapped {n} bytes"))
    });
    assert_eq!(kind, FaultKind::Minor);
    assert_eq!(address, target);
    assert_eq!(byte, 0xcd);
    (
        Status::Verified,
        "a page written through a second shmem mapping faulted Minor when read through the registered one; UFFDIO_CONTINUE resolved it and the reader saw 0xcd".into(),
    )
}

fn uffd_rwp(cx: &Ctx) -> Row {
    if let Err(row) = uffd_or_na(cx) {
        return row;
    }
    if !offered().contains(Features::RWP) {
        return feature_refused(Features::RWP, "UFFD_FEATURE_RWP");
    }
    let mem = RawMap::anon(4 * PAGE);
    mem.fill(0, 4 * PAGE, 0x5a);
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::RWP)
        .create()
        .expect("userfaultfd with RWP");
    // SAFETY: `mem` is an anonymous mapping that nothing references and that
    // outlives `uffd` (declared before it).
    let ioctls =
        unsafe { uffd.register(mem.range(), RegisterMode::RWP) }.expect("UFFDIO_REGISTER(RWP)");
    assert!(ioctls.contains(Ioctls::RWPROTECT), "{ioctls:?}");
    uffd.rwprotect(mem.range(), true, Mode::empty())
        .expect("UFFDIO_RWPROTECT");
    let target = mem.addr() + 2 * PAGE;
    let (kind, address, byte) = touch_and_serve(&uffd, mem.range(), target, |u| {
        u.rwprotect(target..target + PAGE, false, Mode::empty())
            .map_err(|e| e.to_string())
    });
    assert_eq!(kind, FaultKind::ReadWriteProtect);
    assert_eq!(address, target);
    assert_eq!(byte, 0x5a, "read-write protection must keep the contents");
    (
        Status::Verified,
        format!(
            "UFFDIO_API offers {:#x}; after UFFDIO_RWPROTECT of 4 populated anonymous pages a read faulted with kind ReadWriteProtect at the page; unprotecting it woke the reader, which saw the old 0x5a",
            offered().bits()
        ),
    )
}

fn uffd_rwp_async(cx: &Ctx) -> Row {
    if let Err(row) = uffd_or_na(cx) {
        return row;
    }
    let features = offered();
    if !features.contains(Features::RWP_ASYNC) {
        if features.contains(Features::RWP) {
            let uffd = Uffd::builder()
                .require_features(Features::RWP)
                .create()
                .expect("userfaultfd with RWP");
            let e = uffd
                .set_mode(Features::RWP_ASYNC, Features::empty())
                .expect_err("RWP_ASYNC not offered, yet UFFDIO_SET_MODE succeeded");
            assert!(e.is_unsupported(), "{e}");
        }
        return feature_refused(Features::RWP_ASYNC, "UFFD_FEATURE_RWP_ASYNC");
    }
    let mem = RawMap::anon(4 * PAGE);
    mem.fill(0, 4 * PAGE, 0x5a);
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::RWP)
        .create()
        .expect("userfaultfd with RWP");
    // SAFETY: as in `uffd_rwp`: `mem` outlives `uffd` and nothing references it.
    unsafe { uffd.register(mem.range(), RegisterMode::RWP) }.expect("UFFDIO_REGISTER(RWP)");
    uffd.set_mode(Features::RWP_ASYNC, Features::empty())
        .expect("UFFDIO_SET_MODE(enable RWP_ASYNC)");
    uffd.rwprotect(mem.range(), true, Mode::empty())
        .expect("UFFDIO_RWPROTECT");
    let target = mem.addr() + PAGE;
    let rx = read_on_thread(target);
    let byte = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(b) => b,
        Err(_) => {
            // Unblock the reader (and let it finish) before `mem` goes away.
            let _ = uffd.unregister(mem.range());
            let _ = rx.recv_timeout(Duration::from_secs(10));
            panic!("in RWP_ASYNC mode a read of a protected page still blocked after 10 s");
        }
    };
    assert_eq!(byte, 0x5a, "async resolution must keep the contents");
    assert!(
        !uffd
            .poll_readable(Duration::from_millis(200))
            .expect("poll"),
        "async mode must resolve the fault without an event"
    );
    // And back to synchronous faults.
    uffd.set_mode(Features::empty(), Features::RWP_ASYNC)
        .expect("UFFDIO_SET_MODE(disable RWP_ASYNC)");
    uffd.rwprotect(mem.range(), true, Mode::empty())
        .expect("UFFDIO_RWPROTECT");
    let target = mem.addr() + 3 * PAGE;
    let (kind, address, byte) = touch_and_serve(&uffd, mem.range(), target, |u| {
        u.rwprotect(target..target + PAGE, false, Mode::empty())
            .map_err(|e| e.to_string())
    });
    assert_eq!(kind, FaultKind::ReadWriteProtect);
    assert_eq!(address, target);
    assert_eq!(byte, 0x5a);
    (
        Status::Verified,
        "with UFFDIO_SET_MODE(enable RWP_ASYNC) a read of an rw-protected page completed without an event and saw its contents; after disabling it the next read faulted ReadWriteProtect again".into(),
    )
}

fn uffd_on_guest_memfd(cx: &Ctx) -> Row {
    if let Err(row) = uffd_or_na(cx) {
        return row;
    }
    if let Some(why) = shared_gmem_missing(cx) {
        return (Status::NotApplicable, why);
    }
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let gmem = GuestMemfd::builder(4 * PAGE)
        .flags(shared_flags())
        .create(&vm)
        .expect("KVM_CREATE_GUEST_MEMFD");
    let view = gmem.map().expect("map");
    let alias = gmem.map().expect("map");
    let uffd = Uffd::builder()
        .non_blocking(true)
        .create()
        .expect("userfaultfd");
    match uffd.register_guest_memfd(&view, RegisterMode::MINOR) {
        Err(e) if e.is_unsupported() => {
            return (
                Status::Unsupported,
                format!("register_guest_memfd(MINOR): {e}"),
            );
        }
        Err(e) => panic!("register_guest_memfd(MINOR): {e}"),
        Ok(_) => {}
    }
    alias.fill(PAGE, PAGE as usize, 0xcd).expect("fill");
    let range = view.addr()..view.addr() + view.len() as u64;
    let target = view.addr() + PAGE;
    let (kind, address, byte) = touch_and_serve(&uffd, range, target, |u| {
        u.r#continue(target..target + PAGE, Mode::empty())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert_eq!(kind, FaultKind::Minor);
    assert_eq!(address, target);
    assert_eq!(byte, 0xcd);
    (
        Status::Verified,
        format!(
            "a guest_memfd mapping registered MINOR: a page written through a second mapping faulted Minor, UFFDIO_CONTINUE resolved it and the reader saw 0xcd; {}",
            serve_guest_memfd(cx, &vm)
        ),
    )
}

/// `serve` on a guest_memfd registered MISSING|MINOR, as a snapshot
/// restore does it: each fault's page is put into the guest_memfd (with
/// `pwrite` where GUEST_MEMFD_FLAG_WRITE is offered, else through a second
/// mapping) and mapped with UFFDIO_CONTINUE.
fn serve_guest_memfd(cx: &Ctx, vm: &kvm_gmem::Vm) -> String {
    use uffd_gmem::serve::{Region, Server};
    const PAGES: u64 = 8;
    let write = cx.caps.rfc.gmem_write.supported;
    let gmem = GuestMemfd::builder(PAGES * PAGE)
        .flags(shared_flags())
        .write(write)
        .create(vm)
        .expect("KVM_CREATE_GUEST_MEMFD");
    let view = gmem.map().expect("map");
    let alias = gmem.map().expect("map");
    let uffd = Uffd::builder()
        .non_blocking(true)
        .create()
        .expect("userfaultfd");
    uffd.register_guest_memfd(&view, RegisterMode::MISSING | RegisterMode::MINOR)
        .expect("register_guest_memfd(MISSING|MINOR)");
    let snapshot: Vec<u8> = (0..PAGES * PAGE).map(|i| (i / PAGE) as u8 + 0x10).collect();
    // Page 5 is in the guest_memfd before its fault, as a KVM userfault
    // handler leaves it: its fault is MINOR, and serve must continue it
    // (pwrite answers EEXIST there) without an error.
    let early = 5 * PAGE..6 * PAGE;
    let src = &snapshot[early.start as usize..early.end as usize];
    if write {
        Populate::detached(&gmem)
            .strategy(Strategy::Write)
            .run(early.clone(), Source::bytes(src))
            .expect("Populate(Write) of page 5");
    } else {
        alias
            .write_at(early.start, src)
            .expect("page 5 through the second mapping");
    }
    let region = Region::new(view.addr(), PAGES * PAGE);
    let (region, how) = if write {
        let fd = Arc::new(gmem.as_fd().try_clone_to_owned().expect("dup"));
        (region.continue_via_pwrite(fd, 0), "pwrite")
    } else {
        // SAFETY: `alias` is a second shared mapping of the same
        // guest_memfd, not registered, alive until the server is shut down
        // below, and no reference points into it.
        (
            unsafe { region.continue_via_alias(alias.addr()) },
            "the second mapping",
        )
    };
    let server = Server::builder(uffd)
        .region(region)
        .source(snapshot.clone())
        .spawn()
        .expect("serve");
    for page in [3u64, 0, 7, 5] {
        let rx = read_on_thread(view.addr() + page * PAGE + 5);
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("serve resolved the fault within 10 s");
        assert_eq!(got, snapshot[(page * PAGE) as usize], "page {page}");
    }
    let stats = server.shutdown().expect("shutdown");
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    assert_eq!(stats.pages_continued, 4, "{stats:?}");
    all(&read_map(&alias, 3 * PAGE, PAGE), 0x13).expect("the guest_memfd holds page 3");
    drop(alias);
    format!(
        "serve on a MISSING|MINOR registration: 3 MISSING faults, each page put into the guest_memfd with {how} and mapped with UFFDIO_CONTINUE, and a MINOR fault on a page filled before it, continued as it was ({} continued, 0 errors)",
        stats.pages_continued
    )
}

// ---------------------------------------------------------------------------
// RFC series
// ---------------------------------------------------------------------------

fn rfc_populate(cx: &Ctx) -> Row {
    let probe = &cx.caps.rfc.populate;
    if !cx.caps.guest_memfd.supported {
        return (Status::NotApplicable, "needs guest_memfd".into());
    }
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let mmap = cx.caps.guest_memfd_flags.contains(shared_flags());
    let flags = if mmap {
        shared_flags()
    } else {
        GuestMemfdFlags::empty()
    };
    let gmem = GuestMemfd::builder(DATA_SIZE)
        .flags(flags)
        .create(&vm)
        .expect("KVM_CREATE_GUEST_MEMFD");
    let region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE)
        .guest_memfd(&gmem, 0)
        .build()
        .expect("guest_memfd slot");
    // SAFETY: a guest_memfd-only slot: no userspace address for the kernel
    // to trust.
    unsafe { vm.set_memory_region(&region) }.expect("KVM_SET_USER_MEMORY_REGION2");
    let src = vec![0x3cu8; 2 * PAGE as usize];
    let r = Populate::new(&vm, &gmem)
        .strategy(Strategy::PopulateIoctl)
        .gpa_base(DATA_GPA)
        .run(0..2 * PAGE, Source::bytes(&src));
    if !probe.supported {
        let e = r.expect_err("the populate probe failed, yet Strategy::PopulateIoctl ran");
        assert!(e.is_unsupported(), "expected Error::Unsupported, got {e}");
        return (
            Status::Unsupported,
            format!("{}; Populate(PopulateIoctl): {e}", probe.evidence),
        );
    }
    let report = r.expect("Populate(PopulateIoctl)");
    assert_eq!(report.strategy, Strategy::PopulateIoctl);
    assert_eq!(report.bytes, 2 * PAGE);
    let populate = |range: Range<u64>, src: &[u8]| {
        Populate::new(&vm, &gmem)
            .strategy(Strategy::PopulateIoctl)
            .gpa_base(DATA_GPA)
            .run(range, Source::bytes(src))
    };
    let again = populate(0..PAGE, &src[..PAGE as usize]).expect_err("populating page 0 twice");
    assert_eq!(again.errno(), Some(Errno(libc::EEXIST)), "{again}");
    gmem.punch_hole(0..PAGE).expect("punch page 0");
    populate(0..PAGE, &[0x3du8; PAGE as usize]).expect("repopulating page 0 after the punch");
    let mut seen = "";
    if mmap {
        let map = gmem.map().expect("map");
        all(&read_map(&map, 0, PAGE), 0x3d).expect("the repopulated page");
        all(&read_map(&map, PAGE, PAGE), 0x3c).expect("the populated page");
        seen = "; the mapping shows the bytes";
    }
    (
        Status::Verified,
        format!(
            "{}; Populate with Strategy::PopulateIoctl filled 2 pages at gpa {DATA_GPA:#x}; again: {again}; after PUNCH_HOLE page 0 took new contents{seen}",
            probe.evidence
        ),
    )
}

fn rfc_gmem_write(cx: &Ctx) -> Row {
    let probe = &cx.caps.rfc.gmem_write;
    if !cx.caps.guest_memfd.supported {
        return (Status::NotApplicable, "needs guest_memfd".into());
    }
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let src = vec![0x4bu8; 2 * PAGE as usize];
    if !probe.supported {
        let created = GuestMemfd::builder(4 * PAGE).write(true).create(&vm);
        let refused = match created {
            Err(e) => {
                assert!(e.is_unsupported(), "expected UnsupportedFlags, got {e}");
                format!("GuestMemfd::create(WRITE): {e}")
            }
            // The bit is offered but pwrite failed in the probe: Strategy::Write must refuse.
            Ok(g) => {
                let e = Populate::detached(&g)
                    .strategy(Strategy::Write)
                    .run(0..2 * PAGE, Source::bytes(&src))
                    .expect_err("the probe's pwrite failed, yet Strategy::Write ran");
                format!("Populate(Write): {e}")
            }
        };
        return (
            Status::Unsupported,
            format!("{}; {refused}", probe.evidence),
        );
    }
    let mmap = cx.caps.guest_memfd_flags.contains(shared_flags());
    let mut b = GuestMemfd::builder(4 * PAGE).write(true);
    if mmap {
        b = b.mmap(true).init_shared(true);
    }
    let gmem = b.create(&vm).expect("KVM_CREATE_GUEST_MEMFD(WRITE)");
    let write = |range: Range<u64>, src: &[u8]| {
        Populate::detached(&gmem)
            .strategy(Strategy::Write)
            .run(range, Source::bytes(src))
    };
    let report = write(0..2 * PAGE, &src).expect("Populate(Write)");
    assert_eq!(report.strategy, Strategy::Write);
    assert_eq!(report.bytes, 2 * PAGE);
    let again = write(0..PAGE, &src[..PAGE as usize]).expect_err("writing page 0 twice");
    assert_eq!(again.errno(), Some(Errno(libc::EEXIST)), "{again}");
    gmem.punch_hole(0..PAGE).expect("punch page 0");
    write(0..PAGE, &[0x4cu8; PAGE as usize]).expect("rewriting page 0 after the punch");
    let mut seen = "";
    if mmap {
        let map = gmem.map().expect("map");
        all(&read_map(&map, 0, PAGE), 0x4c).expect("the rewritten page");
        all(&read_map(&map, PAGE, PAGE), 0x4b).expect("the written page");
        seen = "; the mapping shows the bytes";
    }
    (
        Status::Verified,
        format!(
            "{}; Populate with Strategy::Write wrote 2 pages; again: {again}; after PUNCH_HOLE page 0 took new contents{seen}",
            probe.evidence
        ),
    )
}

fn rfc_no_direct_map(cx: &Ctx) -> Row {
    let probe = &cx.caps.rfc.no_direct_map;
    if !cx.caps.guest_memfd.supported {
        return (Status::NotApplicable, "needs guest_memfd".into());
    }
    let vm = cx.kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    if !probe.supported {
        if !cx
            .caps
            .guest_memfd_flags
            .contains(GuestMemfdFlags::NO_DIRECT_MAP)
        {
            let e = GuestMemfd::builder(PAGE)
                .no_direct_map(true)
                .create(&vm)
                .expect_err("NO_DIRECT_MAP not offered, yet creating succeeded");
            assert!(e.is_unsupported(), "expected UnsupportedFlags, got {e}");
        }
        return (Status::Unsupported, probe.evidence.clone());
    }
    let mmap = cx.caps.guest_memfd_flags.contains(shared_flags());
    let mut b = GuestMemfd::builder(4 * PAGE).no_direct_map(true);
    if mmap {
        b = b.mmap(true).init_shared(true);
    }
    let gmem = b
        .create(&vm)
        .expect("KVM_CREATE_GUEST_MEMFD(NO_DIRECT_MAP)");
    let mut seen = String::new();
    if mmap {
        let map = gmem.map().expect("map");
        map.fill(0, PAGE as usize, 0x6e).expect("fill");
        all(&read_map(&map, 0, PAGE), 0x6e).expect("read back");
        gmem.punch_hole(0..PAGE).expect("punch");
        all(&read_map(&map, 0, PAGE), 0).expect("a punched page reads zero");
        seen = format!(
            "; its mapping reads back what was written, and zeroes after a punch; {}",
            no_direct_map_guest(cx)
        );
    }
    (
        Status::Verified,
        format!(
            "{}; created a 4-page NO_DIRECT_MAP guest_memfd{seen}",
            probe.evidence
        ),
    )
}

/// A guest on a NO_DIRECT_MAP|MMAP|INIT_SHARED guest_memfd slot (the
/// mapping as userspace_addr): it reads the host's page and writes back.
fn no_direct_map_guest(cx: &Ctx) -> String {
    let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
    let gmem = GuestMemfd::builder(DATA_SIZE)
        .flags(shared_flags())
        .no_direct_map(true)
        .create(&g.vm)
        .expect("KVM_CREATE_GUEST_MEMFD(NO_DIRECT_MAP|MMAP|INIT_SHARED)");
    let map = Arc::new(gmem.map().expect("GuestMemfd::map"));
    map.fill(0, PAGE as usize, HOST_BYTE).expect("fill");
    let region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE)
        .guest_memfd(&gmem, 0)
        .userspace(&map)
        .build()
        .expect("guest_memfd slot");
    g.set_slot(&region, Some(map.clone()))
        .expect("KVM_SET_USER_MEMORY_REGION2 (NO_DIRECT_MAP guest_memfd)");
    assert_guest_exchanges(&mut g, || read_map(&map, 0, PAGE));
    format!(
        "{} ran on it (a KVM_MEM_GUEST_MEMFD slot at {DATA_GPA:#x}): it read the host's {HOST_BYTE:#x} and the host read back its {GUEST_BYTE:#x}",
        guest::A_GUEST
    )
}

fn rfc_kvm_userfault(cx: &Ctx) -> Row {
    let probe = &cx.caps.rfc.kvm_userfault;
    let pages = DATA_SIZE / PAGE;
    let mut g = Guest::new(&cx.kvm_io, GUEST, DATA_GPA);
    let data = Arc::new(RawMap::anon(DATA_SIZE));
    data.fill(0, PAGE, HOST_BYTE);
    let bitmap = Arc::new(UserfaultBitmap::new(pages, true));
    let region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE)
        .userspace_addr(data.addr())
        .userfault_bitmap(&bitmap)
        .build()
        .expect("userfault slot");
    g.keep.push(bitmap.clone());
    let r = g.set_slot(&region, Some(data.clone()));
    if !probe.supported {
        let e =
            r.expect_err("the userfault probe failed, yet a KVM_MEM_USERFAULT slot was accepted");
        return (
            Status::Unsupported,
            format!("{}; the slot here: {e}", probe.evidence),
        );
    }
    r.expect("KVM_SET_USER_MEMORY_REGION2(KVM_MEM_USERFAULT)");
    match g.run() {
        GuestExit::MemoryFault(f) if f.is_userfault() && f.gpa == DATA_GPA => {}
        other => panic!("expected a USERFAULT memory fault at {DATA_GPA:#x}, got {other:?}"),
    }
    bitmap.clear(0);
    assert_guest_exchanges(&mut g, || data.read(0, PAGE));
    (
        Status::Verified,
        format!(
            "{}; the guest's first read exited KVM_EXIT_MEMORY_FAULT with USERFAULT at {DATA_GPA:#x}; after clearing the page's bit it ran on",
            probe.evidence
        ),
    )
}

// ---------------------------------------------------------------------------
// Software-protected VMs (private memory without hardware protection)
// ---------------------------------------------------------------------------

/// A guest in a `KVM_X86_SW_PROTECTED_VM` whose VM fd offers
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`, or the row saying why there is none.
#[cfg(target_arch = "x86_64")]
fn sw_protected_guest(cx: &Ctx) -> Result<Guest, Row> {
    let ty = VmType::SW_PROTECTED;
    if cx.caps.vm_types & (1 << ty.0) == 0 {
        return Err((
            Status::Unsupported,
            format!(
                "KVM_CAP_VM_TYPES = {:#x} lacks KVM_X86_SW_PROTECTED_VM",
                cx.caps.vm_types
            ),
        ));
    }
    let g = Guest::of_type(&cx.kvm_io, ty, GUEST, DATA_GPA);
    let attrs =
        g.vm.supported_attributes()
            .expect("KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES)");
    if !attrs.contains(MemoryAttributes::PRIVATE) {
        return Err((
            Status::Unsupported,
            format!(
                "KVM_CAP_MEMORY_ATTRIBUTES on a SW_PROTECTED VM fd = {:#x}, without PRIVATE",
                attrs.bits()
            ),
        ));
    }
    Ok(g)
}

#[cfg(not(target_arch = "x86_64"))]
fn sw_protected_attributes(_cx: &Ctx) -> Row {
    (Status::NotApplicable, "an x86 VM type".into())
}

#[cfg(not(target_arch = "x86_64"))]
fn sw_protected_private_fault(_cx: &Ctx) -> Row {
    (Status::NotApplicable, "an x86 VM type".into())
}

#[cfg(target_arch = "x86_64")]
fn sw_protected_attributes(cx: &Ctx) -> Row {
    if !cx.caps.guest_memfd.supported {
        return (Status::NotApplicable, "needs guest_memfd".into());
    }
    let mut g = match sw_protected_guest(cx) {
        Ok(g) => g,
        Err(row) => return row,
    };
    // The slot's private half: a guest_memfd that starts private (no
    // INIT_SHARED), never written, so it reads zeroes; its shared half:
    // host memory holding HOST_BYTE.
    let gmem = GuestMemfd::builder(DATA_SIZE)
        .create(&g.vm)
        .expect("KVM_CREATE_GUEST_MEMFD on a SW_PROTECTED VM");
    let data = Arc::new(RawMap::anon(DATA_SIZE));
    data.fill(0, PAGE, HOST_BYTE);
    let region = MemoryRegion2::builder(1, DATA_GPA, DATA_SIZE)
        .guest_memfd(&gmem, 0)
        .userspace_addr(data.addr())
        .build()
        .expect("a slot with a guest_memfd and host memory");
    g.set_slot(&region, Some(data.clone()))
        .expect("KVM_SET_USER_MEMORY_REGION2 (guest_memfd + host memory)");
    let range = DATA_GPA..DATA_GPA + DATA_SIZE;
    g.vm.set_attributes(range.clone(), MemoryAttributes::PRIVATE)
        .expect("set_attributes(PRIVATE)");
    match g.run() {
        GuestExit::Report(GUEST_MISMATCH) => {}
        other => panic!(
            "while private the guest should read the guest_memfd's zeroes (report {GUEST_MISMATCH}), got {other:?}"
        ),
    }
    all(&data.read(0, PAGE), HOST_BYTE).expect("host memory while the range is private");
    g.vm.set_attributes(range, MemoryAttributes::empty())
        .expect("set_attributes(shared)");
    g.restart();
    assert_guest_exchanges(&mut g, || data.read(0, PAGE));
    (
        Status::Verified,
        format!(
            "set_attributes(PRIVATE) on {DATA_GPA:#x}+{DATA_SIZE:#x}: the guest read the guest_memfd's zeroes and host memory kept {HOST_BYTE:#x}; set_attributes(empty): the guest read {HOST_BYTE:#x} from host memory and wrote {GUEST_BYTE:#x} there"
        ),
    )
}

#[cfg(target_arch = "x86_64")]
fn sw_protected_private_fault(cx: &Ctx) -> Row {
    let mut g = match sw_protected_guest(cx) {
        Ok(g) => g,
        Err(row) => return row,
    };
    let data = anon_data_slot(&mut g);
    let range = DATA_GPA..DATA_GPA + DATA_SIZE;
    g.vm.set_attributes(range.clone(), MemoryAttributes::PRIVATE)
        .expect("set_attributes(PRIVATE)");
    let fault = match g.run() {
        GuestExit::MemoryFault(f) => f,
        other => {
            panic!("expected KVM_EXIT_MEMORY_FAULT with PRIVATE at {DATA_GPA:#x}, got {other:?}")
        }
    };
    assert!(fault.is_private(), "flags {:?}", fault.flags);
    assert_eq!(fault.gpa, DATA_GPA, "{fault:?}");
    assert_eq!(fault.size, PAGE, "{fault:?}");
    // Resolve it as a VMM would for a slot without a guest_memfd: share it.
    g.vm.set_attributes(range, MemoryAttributes::empty())
        .expect("set_attributes(shared)");
    assert_guest_exchanges(&mut g, || data.read(0, PAGE));
    (
        Status::Verified,
        format!(
            "a private data slot in host memory only: KVM_EXIT_MEMORY_FAULT decoded as {fault:?}; after set_attributes(shared) the guest re-entered and exchanged data"
        ),
    )
}
