//! The KVM Userfault selftests (kernel-tests.md §6.4), re-run through
//! `kvm-gmem` on a real-mode guest (x86_64 only: the guest is a 16-bit
//! program; `tests/guest/mod.rs` runs it).
//!
//! - `userfault_demand_paging`: demand_paging_test `-k` without
//!   userfaultfd: the data slot starts with every bit of its userfault
//!   bitmap set; each page the guest touches exits `KVM_RUN` (EFAULT) with
//!   `KVM_EXIT_MEMORY_FAULT`, flags exactly `KVM_MEMORY_EXIT_FLAG_USERFAULT`
//!   and the page's gpa; the handler fills the page (a plain copy), clears
//!   its bit and re-enters.
//! - `userfault_toggle_guest_memfd_slot`: set_memory_region_test's toggle:
//!   a guest_memfd slot is re-set with `KVM_MEM_GUEST_MEMFD |
//!   KVM_MEM_USERFAULT` and back (flags-only changes), and the vCPU's exits
//!   follow the flag.
//!
//! The guest (slot 0, at 0x1000) reads the first byte of each of the 16
//! pages of the data slot (slot 1, 64 KiB at 0x20000, through `ds`),
//! reports 2 on port 0x10 at the first that is not 0xaa, else writes 0xff
//! there and goes on; then it reports 1 and halts.
//!
//! Without `/dev/kvm` a test prints `SKIP` and passes (a failure under
//! `CI=true`). Where the kernel lacks KVM Userfault (as
//! `Capabilities::query` probes it: a `KVM_MEM_USERFAULT` slot is
//! accepted) the test prints `SKIP <test>: KVM_MEM_USERFAULT = <evidence>
//! on <kernel>` and passes; the guest_memfd test also needs
//! `KVM_CAP_GUEST_MEMFD` and `GUEST_MEMFD_FLAG_INIT_SHARED`. A kernel lane
//! that lists the capability in `GMEM_REQUIRED_CAPS` fails on such a skip.

#![cfg(target_arch = "x86_64")]

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_gmem::{
    Capabilities, Extension, GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryFault, MemoryFaultFlags,
    MemoryRegion2, UserfaultBitmap, VmOps, VmType,
};
use kvm_gmem_sys::rfc::kvm_userfault::KVM_CAP_USERFAULT;

mod guest;

use guest::{Guest, GuestExit, RawMap};

// kvm-gmem's skip rule, shared by every kernel test of the workspace.
#[allow(dead_code)]
#[path = "../kvm-gmem/tests/common/capability.rs"]
mod capability;

use capability::{ci, skip_capability};

const PAGE: u64 = 4096;
/// The data slot (slot 1): 64 KiB at 0x20000, `ds` based there.
const DATA_SLOT: u32 = 1;
const DATA_GPA: u64 = 0x20000;
const DATA_SIZE: u64 = 0x10000;
const DATA_PAGES: u64 = DATA_SIZE / PAGE;
const GUEST_OK: u8 = 1;
const GUEST_MISMATCH: u8 = 2;
/// What every data page holds for the guest, and what it writes back into
/// each page's first byte.
const HOST_BYTE: u8 = 0xaa;
const GUEST_BYTE: u8 = 0xff;

/// The guest (`objdump -D -b binary -mi8086` shows it as below).
#[rustfmt::skip]
const GUEST: guest::Program = &[
    0x31, 0xf6,             // 0x00: xor si, si
    0xb9, 0x10, 0x00,       // 0x02: mov cx, 16            ; DATA_PAGES
    0x8a, 0x04,             // 0x05: mov al, [si]          ; the page's first byte
    0x3c, 0xaa,             // 0x07: cmp al, 0xaa          ; HOST_BYTE
    0x75, 0x0e,             // 0x09: jne 0x19
    0xc6, 0x04, 0xff,       // 0x0b: mov byte [si], 0xff   ; GUEST_BYTE
    0x81, 0xc6, 0x00, 0x10, // 0x0e: add si, 0x1000        ; the next page
    0xe2, 0xf1,             // 0x12: loop 0x05
    0xb0, 0x01,             // 0x14: mov al, 1             ; GUEST_OK
    0xe6, 0x10,             // 0x16: out 0x10, al          ; guest::PORT
    0xf4,                   // 0x18: hlt
    0xb0, 0x02,             // 0x19: mov al, 2             ; GUEST_MISMATCH
    0xe6, 0x10,             // 0x1b: out 0x10, al
    0xf4,                   // 0x1d: hlt
];

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// `/dev/kvm` and the capability report of a default VM, or `None` after a
/// device skip (a failure under `CI=true`) or a capability skip naming
/// `KVM_MEM_USERFAULT`.
fn userfault_or_skip(test: &str) -> Option<(KvmDevice, Capabilities)> {
    let kvm = match KvmDevice::open() {
        Ok(kvm) => kvm,
        Err(e) => {
            assert!(
                !ci(),
                "{test}: /dev/kvm is required under CI=true but cannot be opened: {e}"
            );
            eprintln!("SKIP {test}: /dev/kvm cannot be opened ({e})");
            return None;
        }
    };
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("Capabilities::query");
    if !caps.rfc.kvm_userfault.supported {
        skip_capability("KVM_MEM_USERFAULT", &caps.rfc.kvm_userfault.evidence);
        return None;
    }
    // The RFC's capability; its number is shared upstream, so it is checked
    // only where the slot flag works.
    let cap = vm
        .extension(Extension(KVM_CAP_USERFAULT))
        .expect("KVM_CHECK_EXTENSION(KVM_CAP_USERFAULT)");
    assert_eq!(
        cap, 1,
        "{test}: KVM_CAP_USERFAULT ({KVM_CAP_USERFAULT}) on x86_64"
    );
    Some((kvm, caps))
}

// The userfault handling of this file's tests, on the shared runner.
impl Guest {
    /// Runs the guest to its report, resolving every userfault exit with
    /// `resolve(page)` and clearing the page's bit in `bitmap`; returns the
    /// pages that exited, in order. Each exit must be exactly
    /// `KVM_MEMORY_EXIT_FLAG_USERFAULT` for one page of the data slot whose
    /// bit is set; the guest must report OK, and is then run to its `hlt`
    /// (which completes the port write, so that [`Guest::restart`] may set
    /// its registers).
    fn run_resolving(
        &mut self,
        test: &str,
        bitmap: &UserfaultBitmap,
        mut resolve: impl FnMut(u64),
    ) -> Vec<u64> {
        let mut exits = Vec::new();
        loop {
            match self.run() {
                GuestExit::Report(GUEST_OK) => match self.run() {
                    GuestExit::Halted => return exits,
                    other => panic!("{test}: after its report the guest ended with {other:?}"),
                },
                GuestExit::Report(GUEST_MISMATCH) => {
                    panic!("{test}: the guest read a page without {HOST_BYTE:#x}")
                }
                GuestExit::MemoryFault(f) => {
                    let i = assert_userfault(test, &f);
                    assert!(
                        bitmap.is_set(i),
                        "{test}: a userfault exit for page {i}, whose bit is clear"
                    );
                    assert!(
                        exits.len() <= DATA_PAGES as usize,
                        "{test}: more exits than pages: {exits:?}"
                    );
                    resolve(i);
                    bitmap.clear(i);
                    exits.push(i);
                }
                other => panic!("{test}: the guest ended with {other:?}"),
            }
        }
    }
}

/// Asserts `f` is a userfault exit for one page of the data slot, flags
/// exactly `KVM_MEMORY_EXIT_FLAG_USERFAULT` (a default VM: no PRIVATE);
/// returns the page's index in the slot.
#[track_caller]
fn assert_userfault(test: &str, f: &MemoryFault) -> u64 {
    assert!(f.is_userfault(), "{test}: {f:?}");
    assert_eq!(
        f.flags,
        MemoryFaultFlags::USERFAULT,
        "{test}: the flags of {f:?}"
    );
    assert!(
        (DATA_GPA..DATA_GPA + DATA_SIZE).contains(&f.gpa) && f.gpa.is_multiple_of(PAGE),
        "{test}: the gpa of {f:?} is not a page of the data slot"
    );
    assert_eq!(f.size, PAGE, "{test}: the size of {f:?}");
    (f.gpa - DATA_GPA) / PAGE
}

/// §6.4 demand_paging_test `-k` (no userfaultfd): an anonymous data slot
/// that starts empty, with every bit set. Re-entering without clearing the
/// bit exits again at the same page. Every page exits exactly once, in the
/// guest's order, and is filled by the handler before its bit is cleared:
/// the guest reads every page's 0xaa and the host sees its 0xff writes.
#[test]
fn userfault_demand_paging() {
    let test = "userfault_demand_paging";
    let _guard = lock();
    if userfault_or_skip(test).is_none() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().expect("kvm-ioctls: open /dev/kvm");
    let mut g = Guest::new(&kvm, GUEST, DATA_GPA);
    let data = Arc::new(RawMap::anon(DATA_SIZE));
    let bitmap = Arc::new(UserfaultBitmap::new(DATA_PAGES, true));
    let region = MemoryRegion2::builder(DATA_SLOT, DATA_GPA, DATA_SIZE)
        .userspace_addr(data.addr())
        .userfault_bitmap(&bitmap)
        .build()
        .expect("userfault slot");
    g.keep.push(bitmap.clone());
    g.set_slot(&region, Some(data.clone()))
        .expect("KVM_SET_USER_MEMORY_REGION2(KVM_MEM_USERFAULT)");
    assert_eq!(bitmap.first_set(0), Some(0));

    // The first touch, twice without clearing the bit.
    for _ in 0..2 {
        match g.run() {
            GuestExit::MemoryFault(f) => assert_eq!(assert_userfault(test, &f), 0),
            other => panic!("{test}: expected a userfault exit at {DATA_GPA:#x}, got {other:?}"),
        }
    }
    let exits = g.run_resolving(test, &bitmap, |i| data.fill(i * PAGE, PAGE, HOST_BYTE));
    assert_eq!(
        exits,
        (0..DATA_PAGES).collect::<Vec<_>>(),
        "{test}: one exit per page, in the guest's order"
    );
    assert_eq!(bitmap.first_set(0), None, "{test}: every bit was cleared");
    for i in 0..DATA_PAGES {
        let page = data.read(i * PAGE, PAGE);
        assert_eq!(page[0], GUEST_BYTE, "{test}: the guest's write to page {i}");
        assert!(
            page[1..].iter().all(|&b| b == HOST_BYTE),
            "{test}: page {i} keeps the handler's bytes"
        );
    }
}

/// §6.4 set_memory_region_test's toggle on a guest_memfd slot (`MMAP |
/// INIT_SHARED`, its mapping as the slot's userspace address): the guest
/// first runs on the plain slot without an exit; a flags-only re-set adds
/// `KVM_MEM_USERFAULT` with every bit set, and although the pages were
/// mapped, each page then exits once, in order, until its bit is cleared;
/// re-set back to `KVM_MEM_GUEST_MEMFD` alone, the guest runs through
/// although every bit is set again. The host sees the guest's writes
/// through the guest_memfd's mapping each time.
#[test]
fn userfault_toggle_guest_memfd_slot() {
    let test = "userfault_toggle_guest_memfd_slot";
    let _guard = lock();
    let Some((_kvm, caps)) = userfault_or_skip(test) else {
        return;
    };
    if !caps.guest_memfd.supported {
        skip_capability("KVM_CAP_GUEST_MEMFD", &caps.guest_memfd.evidence);
        return;
    }
    let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    if !caps.guest_memfd_flags.contains(shared) {
        skip_capability(
            "GUEST_MEMFD_FLAG_INIT_SHARED",
            format_args!(
                "absent (KVM_CAP_GUEST_MEMFD_FLAGS = {})",
                caps.guest_memfd_flags
            ),
        );
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().expect("kvm-ioctls: open /dev/kvm");
    let mut g = Guest::new(&kvm, GUEST, DATA_GPA);
    let gmem = GuestMemfd::builder(DATA_SIZE)
        .flags(shared)
        .create(&g.vm)
        .expect("KVM_CREATE_GUEST_MEMFD");
    let map = Arc::new(gmem.map().expect("GuestMemfd::map"));
    g.keep.push(map.clone());
    let bitmap = Arc::new(UserfaultBitmap::new(DATA_PAGES, true));
    g.keep.push(bitmap.clone());
    let plain = MemoryRegion2::builder(DATA_SLOT, DATA_GPA, DATA_SIZE)
        .guest_memfd(&gmem, 0)
        .userspace(&map)
        .build()
        .expect("guest_memfd slot");
    let userfault = MemoryRegion2::builder(DATA_SLOT, DATA_GPA, DATA_SIZE)
        .guest_memfd(&gmem, 0)
        .userspace(&map)
        .userfault_bitmap(&bitmap)
        .build()
        .expect("guest_memfd slot with KVM_MEM_USERFAULT");
    let fill = || map.fill(0, DATA_SIZE as usize, HOST_BYTE).expect("fill");
    let check = |what: &str| {
        let mut all = vec![0u8; DATA_SIZE as usize];
        map.read_at(0, &mut all).expect("read_at");
        for (i, page) in all.chunks(PAGE as usize).enumerate() {
            assert_eq!(page[0], GUEST_BYTE, "{test}: {what}: page {i}'s first byte");
            assert!(
                page[1..].iter().all(|&b| b == HOST_BYTE),
                "{test}: {what}: page {i}"
            );
        }
    };

    // 1. The plain guest_memfd slot: no exit.
    fill();
    g.set_slot(&plain, None)
        .expect("KVM_SET_USER_MEMORY_REGION2(KVM_MEM_GUEST_MEMFD)");
    let exits = g.run_resolving(test, &bitmap, |_| {});
    assert!(
        exits.is_empty(),
        "{test}: exits without USERFAULT: {exits:?}"
    );
    check("the plain slot");

    // 2. USERFAULT on (a flags-only change), every bit set.
    fill();
    g.set_slot(&userfault, None)
        .expect("re-set the guest_memfd slot with KVM_MEM_USERFAULT");
    g.restart();
    let exits = g.run_resolving(test, &bitmap, |_| {});
    assert_eq!(
        exits,
        (0..DATA_PAGES).collect::<Vec<_>>(),
        "{test}: with USERFAULT on, one exit per page, in order"
    );
    check("with USERFAULT on");

    // 3. USERFAULT off again, every bit set: the bitmap no longer counts.
    for i in 0..DATA_PAGES {
        bitmap.set(i);
    }
    fill();
    g.set_slot(&plain, None)
        .expect("re-set the guest_memfd slot without KVM_MEM_USERFAULT");
    g.restart();
    let exits = g.run_resolving(test, &bitmap, |_| {});
    assert!(
        exits.is_empty(),
        "{test}: exits after USERFAULT was turned off: {exits:?}"
    );
    check("after USERFAULT was turned off");
}
