//! Misuse: every rule the API checks up front returns its typed error before
//! any system call, every refusal the kernel makes comes back as
//! [`Error::Kernel`] / [`Error::Unsupported`] with the operation and errno,
//! and the descriptors the crate creates are close-on-exec and never leak.
//!
//! Tests that need `/dev/kvm` print `SKIP <test>: <why>` and pass when it
//! cannot be opened, except under `CI=true`, where that is a failure; a part
//! that needs a capability the kernel lacks (guest_memfd, its flags) prints
//! `SKIP <test>: <capability> = <value> on <kernel>` and is left out
//! (`common::skip_capability`). Every test holds the file-wide lock (`common::lock`): `no_fd_leaks` counts this
//! process's descriptors.

mod common;

use common::{assert_no_fd_leaks, has_guest_memfd, page, shared, slot_flags};
use kvm_gmem::{
    Error, GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryAttributes, MemoryRegion2, Vm, VmOps,
    VmType, pre_fault_memory,
};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

fn vm(kvm: &KvmDevice) -> Vm {
    kvm.create_vm(VmType::DEFAULT)
        .expect("KVM_CREATE_VM(default)")
}

/// A VM without guest_memfd: creating one is [`Error::Unsupported`] naming
/// `KVM_CAP_GUEST_MEMFD`, whatever the flags.
fn assert_no_guest_memfd(vm: &Vm) {
    for flags in [GuestMemfdFlags::empty(), shared()] {
        unsupported(
            GuestMemfd::builder(page()).flags(flags).create(vm),
            "KVM_CREATE_GUEST_MEMFD",
            "KVM_CAP_GUEST_MEMFD",
        );
    }
}

/// Every error's Display names the operation; a kernel error also names the
/// errno symbolically; an unsupported one names the capability.
#[track_caller]
fn check_display(e: &Error) {
    let text = e.to_string();
    match e {
        Error::Kernel { op, errno } => {
            assert!(
                text.starts_with(op),
                "{text:?} should start with the op {op:?}"
            );
            let name = errno.name().expect("an errno the crate names");
            assert!(text.contains(name), "{text:?} should name {name}");
            assert_eq!(e.errno(), Some(*errno));
            assert!(!e.is_unsupported());
        }
        Error::Invalid { op, rule } => {
            assert!(
                text.starts_with(op) && text.contains(rule.as_str()),
                "{text:?}"
            );
            // Refused before the ioctl: what the kernel would answer.
            assert_eq!(e.errno(), Some(kvm_gmem::Errno(libc::EINVAL)));
            assert!(!e.is_unsupported());
        }
        Error::Unsupported {
            op,
            capability,
            evidence,
        } => {
            assert!(text.starts_with(op), "{text:?}");
            assert!(
                text.contains(capability) && text.contains(evidence.as_str()),
                "{text:?}"
            );
            assert!(e.is_unsupported());
        }
        Error::UnsupportedFlags {
            op,
            unsupported,
            supported,
        } => {
            assert!(text.starts_with(op), "{text:?}");
            assert!(
                text.contains(&format!("{:#x}", unsupported.bits())),
                "{text:?}"
            );
            assert!(
                text.contains(&format!("{:#x}", supported.bits())),
                "{text:?}"
            );
            assert!(text.contains("KVM_CAP_GUEST_MEMFD_FLAGS"), "{text:?}");
            assert!(e.is_unsupported());
        }
        Error::Protocol { op, what } => {
            assert!(
                text.starts_with(op) && text.contains(what.as_str()),
                "{text:?}"
            );
        }
        other => panic!("an Error variant this test does not know: {other:?}"),
    }
    // The io::Error conversion keeps the kernel's errno as the error kind,
    // and the message.
    if let Error::Kernel { op, errno } = e {
        let io: std::io::Error = Error::Kernel { op, errno: *errno }.into();
        assert_eq!(io.kind(), std::io::Error::from_raw_os_error(errno.0).kind());
        assert_eq!(io.to_string(), text);
    }
}

/// Expects `Error::Invalid` from `op` whose rule contains `needle`.
#[track_caller]
fn invalid<T: std::fmt::Debug>(r: kvm_gmem::Result<T>, op: &str, needle: &str) {
    match r {
        Err(ref e @ Error::Invalid { op: o, ref rule }) => {
            assert_eq!(o, op);
            assert!(
                rule.contains(needle),
                "{op}: rule {rule:?} should mention {needle:?}"
            );
            check_display(e);
        }
        other => panic!("{op}: expected Invalid ({needle}), got {other:?}"),
    }
}

/// Expects `Error::Kernel` from `op` with one of `errnos`; returns it.
#[track_caller]
fn kernel<T: std::fmt::Debug>(r: kvm_gmem::Result<T>, op: &str, errnos: &[i32]) -> i32 {
    match r {
        Err(ref e @ Error::Kernel { op: o, errno }) => {
            assert_eq!(o, op);
            assert!(errnos.contains(&errno.0), "{op}: unexpected errno {errno}");
            check_display(e);
            errno.0
        }
        other => panic!("{op}: expected a kernel refusal {errnos:?}, got {other:?}"),
    }
}

/// Expects `Error::Unsupported` from `op` naming `capability`.
#[track_caller]
fn unsupported<T: std::fmt::Debug>(r: kvm_gmem::Result<T>, op: &str, capability: &str) -> String {
    match r {
        Err(
            ref e @ Error::Unsupported {
                op: o,
                capability: c,
                ref evidence,
            },
        ) => {
            assert_eq!(o, op);
            assert_eq!(c, capability);
            check_display(e);
            evidence.clone()
        }
        other => panic!("{op}: expected Unsupported({capability}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Rules checked before the system call
// ---------------------------------------------------------------------------

fn case_gmem_builder(kvm: &KvmDevice) {
    let op = "KVM_CREATE_GUEST_MEMFD";
    let p = page();
    let vm = vm(kvm);
    invalid(GuestMemfd::builder(0).create(&vm), op, "non-zero");
    invalid(
        GuestMemfd::builder(1).create(&vm),
        op,
        "multiple of the page size",
    );
    invalid(
        GuestMemfd::builder(p + 1).create(&vm),
        op,
        "multiple of the page size",
    );
    invalid(
        GuestMemfd::builder(p - 1).mmap(true).create(&vm),
        op,
        "multiple of the page size",
    );
    invalid(
        GuestMemfd::builder(1 << 63).create(&vm),
        op,
        "largest file size",
    );
    invalid(
        GuestMemfd::builder(u64::MAX - p + 1).create(&vm),
        op,
        "largest file size",
    );

    if !has_guest_memfd(&vm, GuestMemfdFlags::empty()) {
        assert_no_guest_memfd(&vm);
        return;
    }
    // A flag the VM does not offer: typed, naming the bit and the offer.
    let offered = vm.guest_memfd_flags().unwrap();
    let bit = (0..64)
        .find(|b| offered.bits() & (1 << b) == 0)
        .expect("some bit is not offered");
    let f = GuestMemfdFlags::from_bits_retain(1 << bit);
    match GuestMemfd::builder(p).flags(f | offered).create(&vm) {
        Err(
            ref e @ Error::UnsupportedFlags {
                op: o,
                unsupported,
                supported,
            },
        ) => {
            assert_eq!(o, op);
            assert_eq!(unsupported, f, "only the offending bit is reported");
            assert_eq!(supported, offered);
            check_display(e);
        }
        other => panic!("flag bit {bit}: expected UnsupportedFlags, got {other:?}"),
    }
    // The size rule comes first: no kernel query decides a malformed request.
    invalid(
        GuestMemfd::builder(3).flags(f).create(&vm),
        op,
        "multiple of the page size",
    );

    #[cfg(feature = "rfc-no-direct-map")]
    if !offered.contains(GuestMemfdFlags::NO_DIRECT_MAP) {
        match GuestMemfd::builder(p).no_direct_map(true).create(&vm) {
            Err(Error::UnsupportedFlags { unsupported, .. }) => {
                assert_eq!(unsupported, GuestMemfdFlags::NO_DIRECT_MAP)
            }
            other => panic!("NO_DIRECT_MAP on a kernel that does not offer it: {other:?}"),
        }
    }
    #[cfg(feature = "rfc-gmem-write")]
    if !offered.contains(GuestMemfdFlags::WRITE) {
        match GuestMemfd::builder(p).write(true).create(&vm) {
            Err(Error::UnsupportedFlags { unsupported, .. }) => {
                assert_eq!(unsupported, GuestMemfdFlags::WRITE)
            }
            other => panic!("WRITE on a kernel that does not offer it: {other:?}"),
        }
    }

    // map() refuses where any access would SIGBUS.
    let g = GuestMemfd::builder(p).create(&vm).unwrap();
    invalid(g.map(), "mmap(guest_memfd)", "GUEST_MEMFD_FLAG_MMAP");
    if offered.contains(GuestMemfdFlags::MMAP) {
        let g = GuestMemfd::builder(p).mmap(true).create(&vm).unwrap();
        invalid(g.map(), "mmap(guest_memfd)", "SIGBUS");
    }
}

fn case_fallocate_rules(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    if !has_guest_memfd(&vm, GuestMemfdFlags::empty()) {
        return;
    }
    let g = GuestMemfd::builder(4 * p).create(&vm).unwrap();
    for (op, f) in [
        (
            "fallocate(PUNCH_HOLE)",
            GuestMemfd::punch_hole as fn(&GuestMemfd, std::ops::Range<u64>) -> _,
        ),
        ("fallocate(KEEP_SIZE)", GuestMemfd::allocate),
    ] {
        invalid(f(&g, p..p), op, "empty");
        #[allow(clippy::reversed_empty_ranges)]
        invalid(f(&g, 2 * p..p), op, "empty");
        invalid(f(&g, 1..p), op, "aligned");
        invalid(f(&g, 0..p + 1), op, "aligned");
        invalid(f(&g, 0..5 * p), op, "past the file size");
        invalid(f(&g, 4 * p..5 * p), op, "past the file size");
        let top = u64::MAX - p + 1;
        invalid(f(&g, top - p..top), op, "past the file size");
        f(&g, 0..4 * p).unwrap_or_else(|e| panic!("{op} of the whole file: {e}"));
    }
}

fn case_memslot_builder(kvm: &KvmDevice) {
    let op = "KVM_SET_USER_MEMORY_REGION2";
    let p = page();
    let vm = vm(kvm);
    if !has_guest_memfd(&vm, GuestMemfdFlags::empty()) {
        return;
    }
    let g = GuestMemfd::builder(4 * p).create(&vm).unwrap();
    let b = |gpa, size| MemoryRegion2::builder(0, gpa, size).guest_memfd(&g, 0);

    invalid(b(0, 0).build(), op, "non-zero");
    invalid(b(0, p + 1).build(), op, "multiple of the page size");
    invalid(b(0, p - 1).build(), op, "multiple of the page size");
    invalid(b(1, p).build(), op, "guest address");
    invalid(b(p + 8, p).build(), op, "guest address");
    let top = u64::MAX - p + 1;
    invalid(b(top, 2 * p).build(), op, "overflows");
    invalid(
        MemoryRegion2::builder(0, top, 2 * p).build(),
        op,
        "overflows",
    );
    invalid(
        b(0, p).userspace_addr(0x1001).build(),
        op,
        "userspace address",
    );
    invalid(
        MemoryRegion2::builder(0, 0, p).guest_memfd(&g, 1).build(),
        op,
        "guest_memfd offset",
    );
    invalid(
        MemoryRegion2::builder(0, 0, p)
            .guest_memfd(&g, p / 2)
            .build(),
        op,
        "guest_memfd offset",
    );
    invalid(b(0, 5 * p).build(), op, "past the file size");
    invalid(
        MemoryRegion2::builder(0, 0, 2 * p)
            .guest_memfd(&g, 3 * p)
            .build(),
        op,
        "past the file size",
    );
    invalid(
        MemoryRegion2::builder(0, 0, 2 * p)
            .guest_memfd(&g, top)
            .build(),
        op,
        "past the file size",
    );
    // Flag bits no KVM_MEM_* flag names, and GUEST_MEMFD without a
    // guest_memfd (the slot would name fd 0): refused before the ioctl.
    invalid(
        b(0, p)
            .flags(kvm_gmem::RegionFlags::from_bits_retain(1 << 20))
            .build(),
        op,
        "0x100000 that no KVM_MEM_* flag of this build names",
    );
    invalid(
        MemoryRegion2::builder(0, 0, p)
            .flags(kvm_gmem::RegionFlags::GUEST_MEMFD)
            .build(),
        op,
        "no guest_memfd was given",
    );
    // Exactly the file is fine.
    let r = b(0x10_0000, 4 * p).build().unwrap();
    assert_eq!((r.slot(), r.gpa(), r.size()), (0, 0x10_0000, 4 * p));
    assert!(r.flags().contains(kvm_gmem::RegionFlags::GUEST_MEMFD));
    assert_eq!(r.as_raw().guest_memfd, g.as_raw_fd() as u32);

    if has_guest_memfd(&vm, shared()) {
        let small = GuestMemfd::builder(2 * p)
            .flags(shared())
            .create(&vm)
            .unwrap();
        let map = small.map().unwrap();
        invalid(b(0, 4 * p).userspace(&map).build(), op, "mapping");
        let r = b(0, 2 * p).userspace(&map).build().unwrap();
        assert_eq!(r.as_raw().userspace_addr, map.addr());
    }
}

fn case_mapping_bounds(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    if !has_guest_memfd(&vm, shared()) {
        return;
    }
    let g = GuestMemfd::builder(4 * p)
        .flags(shared())
        .create(&vm)
        .unwrap();
    let map = g.map().unwrap();
    let len = map.len() as u64;
    let mut buf = [0u8; 16];

    invalid(
        map.read_at(len, &mut buf[..1]),
        "Mapping::read_at",
        "outside",
    );
    invalid(
        map.read_at(len - 8, &mut buf),
        "Mapping::read_at",
        "outside",
    );
    invalid(
        map.write_at(len - 1, &buf[..2]),
        "Mapping::write_at",
        "outside",
    );
    invalid(
        map.copy_from(len, &buf[..1]),
        "Mapping::write_at",
        "outside",
    );
    invalid(map.fill(0, len as usize + 1, 0), "Mapping::fill", "outside");
    // offset + len overflows u64.
    invalid(
        map.read_at(u64::MAX, &mut buf[..2]),
        "Mapping::read_at",
        "outside",
    );
    invalid(
        map.write_at(u64::MAX - 7, &buf),
        "Mapping::write_at",
        "outside",
    );
    invalid(
        map.fill(u64::MAX, usize::MAX, 0),
        "Mapping::fill",
        "outside",
    );
    invalid(
        map.read_at(u64::MAX, &mut []),
        "Mapping::read_at",
        "outside",
    );
    let op = "madvise(MADV_POPULATE_WRITE)";
    invalid(map.populate_write(1, p as usize), op, "aligned");
    invalid(map.populate_write(0, len as usize + 1), op, "outside");
    invalid(
        map.populate_write(u64::MAX - p + 1, p as usize),
        op,
        "outside",
    );

    // The edges themselves are fine.
    map.write_at(len - 16, &[7; 16]).unwrap();
    map.read_at(len - 16, &mut buf).unwrap();
    assert_eq!(buf, [7; 16]);
    map.read_at(len, &mut []).unwrap();
    map.populate_write(0, len as usize).unwrap();
}

// ---------------------------------------------------------------------------
// Features this kernel lacks
// ---------------------------------------------------------------------------

fn case_memory_attributes(kvm: &KvmDevice) {
    let op = "KVM_SET_MEMORY_ATTRIBUTES";
    let p = page();
    let vm = vm(kvm);
    // The range rule comes before the capability check.
    invalid(
        vm.set_attributes(1..p, MemoryAttributes::PRIVATE),
        op,
        "page aligned",
    );
    invalid(
        vm.set_attributes(0..p + 1, MemoryAttributes::PRIVATE),
        op,
        "page aligned",
    );
    invalid(
        vm.set_attributes(p..p, MemoryAttributes::PRIVATE),
        op,
        "non-empty",
    );

    let supported = vm.supported_attributes().unwrap();
    let cap = vm
        .extension(kvm_gmem::Extension::MEMORY_ATTRIBUTES)
        .unwrap();
    assert_eq!(supported.bits(), cap.max(0) as u64);
    // An attribute no kernel defines is refused on every kernel.
    unsupported(
        vm.set_attributes(0..p, MemoryAttributes::from_bits_retain(1 << 40)),
        op,
        "KVM_CAP_MEMORY_ATTRIBUTES",
    );
    if supported.contains(MemoryAttributes::PRIVATE) {
        eprintln!(
            "note: this VM supports PRIVATE ({supported:?}); the refusal case does not apply"
        );
    } else {
        let evidence = unsupported(
            vm.set_attributes(0..p, MemoryAttributes::PRIVATE),
            op,
            "KVM_CAP_MEMORY_ATTRIBUTES",
        );
        assert!(
            evidence.contains(&format!("{:#x}", supported.bits())),
            "{evidence}"
        );
    }
}

fn case_pre_fault(kvm: &KvmDevice) {
    let op = "KVM_PRE_FAULT_MEMORY";
    let p = page();
    let ki = kvm_ioctls::Kvm::new().expect("kvm-ioctls: open /dev/kvm");
    let vm_fd = ki.create_vm().expect("kvm-ioctls: create_vm");
    let vcpu = vm_fd.create_vcpu(0).expect("kvm-ioctls: create_vcpu(0)");
    #[cfg(feature = "kvm-ioctls")]
    let vcpu_fd = kvm_gmem::interop::vcpu_fd(&vcpu);
    #[cfg(not(feature = "kvm-ioctls"))]
    // SAFETY: `vcpu` owns its descriptor and outlives this borrow (both live
    // to the end of this function, the borrow declared after it).
    let vcpu_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };

    invalid(pre_fault_memory(&vcpu_fd, 1..p), op, "page aligned");
    invalid(pre_fault_memory(&vcpu_fd, 0..0), op, "non-empty");
    invalid(pre_fault_memory(&vcpu_fd, 0..p + 1), op, "page aligned");

    let cap = kvm
        .extension(kvm_gmem::Extension::PRE_FAULT_MEMORY)
        .unwrap();
    if cap > 0 {
        eprintln!(
            "note: KVM_CAP_PRE_FAULT_MEMORY = {cap}; the refusal case does not apply on this kernel"
        );
        return;
    }
    // No memslot yet: this kernel's answer is not EOPNOTSUPP here (ENOSPC on
    // 6.18 PVM), yet the missing feature must still be reported as such.
    let no_slot = unsupported(
        pre_fault_memory(&vcpu_fd, 0..4 * p),
        op,
        "KVM_CAP_PRE_FAULT_MEMORY",
    );
    assert!(
        no_slot.contains("KVM_CAP_PRE_FAULT_MEMORY = 0"),
        "the evidence should name the capability value: {no_slot}"
    );

    // A memslot covering the range, so that the only reason to refuse is the
    // missing feature.
    if !has_guest_memfd(&vm_fd_as_borrowed(&vm_fd), slot_flags()) {
        return;
    }
    let g = GuestMemfd::builder(4 * p)
        .flags(slot_flags())
        .create(&vm_fd_as_borrowed(&vm_fd))
        .unwrap();
    let region = MemoryRegion2::builder(0, 0, 4 * p)
        .guest_memfd(&g, 0)
        .build()
        .unwrap();
    // SAFETY: the slot has no userspace address (guest_memfd only), so the
    // kernel is trusted with no memory of ours.
    unsafe { vm_fd_as_borrowed(&vm_fd).set_memory_region(&region) }
        .expect("guest_memfd-only memslot");
    let evidence = unsupported(
        pre_fault_memory(&vcpu_fd, 0..4 * p),
        op,
        "KVM_CAP_PRE_FAULT_MEMORY",
    );
    eprintln!("pre-fault refused: {evidence}");
    // x86 answers EOPNOTSUPP (ENOTTY before the ioctl existed); arm64, which
    // has no KVM_PRE_FAULT_MEMORY, answers EINVAL as to any vCPU ioctl it
    // does not know.
    let answers: &[&str] = if cfg!(target_arch = "aarch64") {
        &["EINVAL"]
    } else {
        &["EOPNOTSUPP", "ENOTTY"]
    };
    assert!(
        answers.iter().any(|a| evidence.contains(a)),
        "the evidence should be the kernel's answer, one of {answers:?}: {evidence}"
    );
}

fn vm_fd_as_borrowed(vm: &kvm_ioctls::VmFd) -> std::os::fd::BorrowedFd<'_> {
    #[cfg(feature = "kvm-ioctls")]
    {
        vm.vm_fd()
    }
    #[cfg(not(feature = "kvm-ioctls"))]
    // SAFETY: `vm` owns its descriptor for its lifetime, which bounds the borrow.
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(vm.as_raw_fd())
    }
}

fn case_vm_types(kvm: &KvmDevice) {
    let op = "KVM_CREATE_VM";
    #[cfg(not(target_arch = "aarch64"))]
    {
        let types = kvm.extension(kvm_gmem::Extension::VM_TYPES).unwrap();
        let absent = (1..64).find(|t| types as u64 & (1 << t) == 0);
        match absent {
            Some(t) => {
                let evidence = unsupported(kvm.create_vm(VmType(t)), op, "KVM_CAP_VM_TYPES");
                assert!(evidence.contains("EINVAL"), "{evidence}");
                assert!(evidence.contains(&format!("{types:#x}")), "{evidence}");
                #[cfg(target_arch = "x86_64")]
                if t == 1 {
                    assert!(evidence.contains("KVM_X86_SW_PROTECTED_VM"), "{evidence}");
                }
            }
            None => eprintln!("note: every VM type 1..63 is listed ({types:#x})"),
        }
        // A type number past the 64-bit mask is a plain kernel refusal.
        kernel(kvm.create_vm(VmType(1000)), op, &[libc::EINVAL]);
    }
    // On arm64 the type is the guest's IPA size in bits (0: the default,
    // 40), which KVM_CAP_VM_TYPES (0 there) does not list: sizes from 32 up
    // to KVM_CAP_ARM_VM_IPA_SIZE are created, others are refused, typed by
    // that capability.
    #[cfg(target_arch = "aarch64")]
    {
        let max = kvm.extension(kvm_gmem::Extension::ARM_VM_IPA_SIZE).unwrap();
        assert!((40..=64).contains(&max), "KVM_CAP_ARM_VM_IPA_SIZE = {max}");
        for bits in [32, 40] {
            kvm.create_vm(VmType::arm_ipa(bits))
                .unwrap_or_else(|e| panic!("KVM_CREATE_VM with a {bits}-bit IPA: {e}"));
        }
        for bits in [1, 31, max as u8 + 1] {
            let evidence = unsupported(
                kvm.create_vm(VmType::arm_ipa(bits)),
                op,
                "KVM_CAP_ARM_VM_IPA_SIZE",
            );
            assert!(evidence.contains("EINVAL"), "{evidence}");
            assert!(
                evidence.contains(&format!("KVM_CAP_ARM_VM_IPA_SIZE = {max}")),
                "{evidence}"
            );
        }
    }
}

/// arm64 binds only a guest_memfd the host can map: a slot on one created
/// without `GUEST_MEMFD_FLAG_MMAP` is refused, typed by that flag.
#[cfg(target_arch = "aarch64")]
fn case_arm_slot_needs_mmap(kvm: &KvmDevice) {
    let vm = vm(kvm);
    if !has_guest_memfd(&vm, GuestMemfdFlags::empty()) {
        return;
    }
    let g = GuestMemfd::builder(2 * page()).create(&vm).unwrap();
    let r = MemoryRegion2::builder(0, 0, 2 * page())
        .guest_memfd(&g, 0)
        .build()
        .unwrap();
    // SAFETY: a guest_memfd-only slot: no userspace memory is handed over.
    let evidence = unsupported(
        unsafe { vm.set_memory_region(&r) },
        "KVM_SET_USER_MEMORY_REGION2",
        "GUEST_MEMFD_FLAG_MMAP",
    );
    assert!(evidence.contains("EINVAL"), "{evidence}");
}

// ---------------------------------------------------------------------------
// Refusals only the kernel can make
// ---------------------------------------------------------------------------

fn case_overlapping_memslots(kvm: &KvmDevice) {
    let op = "KVM_SET_USER_MEMORY_REGION2";
    let p = page();
    let vm = vm(kvm);
    if !has_guest_memfd(&vm, slot_flags()) {
        return;
    }
    let g1 = GuestMemfd::builder(2 * p)
        .flags(slot_flags())
        .create(&vm)
        .unwrap();
    let g2 = GuestMemfd::builder(2 * p)
        .flags(slot_flags())
        .create(&vm)
        .unwrap();
    let a = MemoryRegion2::builder(0, 0, 2 * p)
        .guest_memfd(&g1, 0)
        .build()
        .unwrap();
    let b = MemoryRegion2::builder(1, p, 2 * p)
        .guest_memfd(&g2, 0)
        .build()
        .unwrap();
    // SAFETY: guest_memfd-only slots (no userspace address): the kernel is
    // trusted with no memory of ours.
    unsafe { vm.set_memory_region(&a) }.expect("first slot");
    // SAFETY: as above.
    kernel(unsafe { vm.set_memory_region(&b) }, op, &[libc::EEXIST]);
    vm.delete_memory_region(0).unwrap();
    // SAFETY: as above; with slot 0 gone the range is free.
    unsafe { vm.set_memory_region(&b) }.expect("the second slot once the first is deleted");
    vm.delete_memory_region(1).unwrap();
}

/// Whether the running kernel's release is `major.minor` or later.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = common::kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

#[test]
fn kernel_at_least_reads_the_release() {
    assert!(kernel_at_least(2, 6));
    assert!(!kernel_at_least(u32::MAX, 0));
}

fn case_same_gmem_range_twice(kvm: &KvmDevice) {
    let op = "KVM_SET_USER_MEMORY_REGION2";
    let p = page();
    let vm = vm(kvm);
    if !has_guest_memfd(&vm, slot_flags()) {
        return;
    }
    let g = GuestMemfd::builder(4 * p)
        .flags(slot_flags())
        .create(&vm)
        .unwrap();
    let a = MemoryRegion2::builder(0, 0, 2 * p)
        .guest_memfd(&g, 0)
        .build()
        .unwrap();
    let b = MemoryRegion2::builder(1, 0x10_0000, 2 * p)
        .guest_memfd(&g, p)
        .build()
        .unwrap();
    let c = MemoryRegion2::builder(2, 0x20_0000, 2 * p)
        .guest_memfd(&g, 2 * p)
        .build()
        .unwrap();
    // SAFETY: guest_memfd-only slots: no userspace memory is handed over.
    unsafe { vm.set_memory_region(&a) }.expect("first binding");
    // Overlapping file range (page 1): EINVAL up to 7.1, EEXIST from 7.2
    // (as `VmOps::set_memory_region` documents; a 7.1 or older kernel may
    // carry the change as a backport).
    let expected: &[i32] = if kernel_at_least(7, 2) {
        &[libc::EEXIST]
    } else {
        &[libc::EINVAL, libc::EEXIST]
    };
    // SAFETY: as above.
    let e = kernel(unsafe { vm.set_memory_region(&b) }, op, expected);
    eprintln!(
        "binding an already bound guest_memfd range: {}",
        kvm_gmem::Errno(e)
    );
    // The disjoint rest of the file binds fine.
    // SAFETY: as above.
    unsafe { vm.set_memory_region(&c) }.expect("a disjoint range of the same guest_memfd");
    vm.delete_memory_region(0).unwrap();
    vm.delete_memory_region(2).unwrap();
}

fn case_gmem_of_other_vm(kvm: &KvmDevice) {
    let op = "KVM_SET_USER_MEMORY_REGION2";
    let p = page();
    let vm1 = vm(kvm);
    let vm2 = vm(kvm);
    if !has_guest_memfd(&vm1, slot_flags()) {
        return;
    }
    // Flags this architecture can bind (arm64 needs MMAP), so that the other
    // VM is the only reason to refuse.
    let g = GuestMemfd::builder(p)
        .flags(slot_flags())
        .create(&vm1)
        .unwrap();
    let r = MemoryRegion2::builder(0, 0, p)
        .guest_memfd(&g, 0)
        .build()
        .unwrap();
    // SAFETY: a guest_memfd-only slot: no userspace memory is handed over.
    kernel(unsafe { vm2.set_memory_region(&r) }, op, &[libc::EINVAL]);
}

fn case_other_kernel_refusals(kvm: &KvmDevice) {
    // Not a KVM device.
    kernel(
        KvmDevice::open_path(Path::new("/nonexistent/kvm-gmem-test")),
        "open /dev/kvm",
        &[libc::ENOENT],
    );
    invalid(
        KvmDevice::open_path(Path::new("/dev/kvm\0x")),
        "open /dev/kvm",
        "NUL",
    );
    let null = std::fs::File::open("/dev/null").unwrap();
    kernel(
        null.as_fd().extension(kvm_gmem::Extension::GUEST_MEMFD),
        "KVM_CHECK_EXTENSION",
        &[libc::ENOTTY, libc::EINVAL],
    );
    // KVM_CREATE_GUEST_MEMFD is a VM ioctl: /dev/kvm answers the capability
    // query but refuses the creation (where /dev/kvm says guest_memfd is
    // absent, the refusal is typed as such).
    let create = GuestMemfd::builder(page()).create(&kvm.as_fd());
    if kvm.extension(kvm_gmem::Extension::GUEST_MEMFD).unwrap() > 0 {
        let e = kernel(
            create,
            "KVM_CREATE_GUEST_MEMFD",
            &[libc::EINVAL, libc::ENOTTY],
        );
        eprintln!("KVM_CREATE_GUEST_MEMFD on /dev/kvm: {}", kvm_gmem::Errno(e));
    } else {
        unsupported(create, "KVM_CREATE_GUEST_MEMFD", "KVM_CAP_GUEST_MEMFD");
    }
    assert_eq!(kvm.api_version().unwrap(), 12);
}

fn fd_flags(fd: RawFd) -> i32 {
    // SAFETY: F_GETFD reads the descriptor's flags only.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert!(
        r >= 0,
        "fcntl(F_GETFD): {}",
        std::io::Error::last_os_error()
    );
    r
}

fn case_cloexec(kvm: &KvmDevice) {
    assert_ne!(
        fd_flags(kvm.as_raw_fd()) & libc::FD_CLOEXEC,
        0,
        "KvmDevice fd"
    );
    let vm = vm(kvm);
    assert_ne!(fd_flags(vm.as_raw_fd()) & libc::FD_CLOEXEC, 0, "Vm fd");
    for flags in [GuestMemfdFlags::empty(), shared()] {
        if !has_guest_memfd(&vm, flags) {
            continue;
        }
        let g = GuestMemfd::builder(page())
            .flags(flags)
            .create(&vm)
            .unwrap();
        assert_ne!(
            fd_flags(g.as_raw_fd()) & libc::FD_CLOEXEC,
            0,
            "GuestMemfd fd ({flags})"
        );
    }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

kvm_test!(guest_memfd_builder_rules, case_gmem_builder);
kvm_test!(fallocate_range_rules, case_fallocate_rules);
kvm_test!(memslot_builder_rules, case_memslot_builder);
kvm_test!(mapping_bounds, case_mapping_bounds);
kvm_test!(memory_attributes_refused, case_memory_attributes);
kvm_test!(pre_fault_refused, case_pre_fault);
kvm_test!(unsupported_vm_type, case_vm_types);
#[cfg(target_arch = "aarch64")]
kvm_test!(arm64_guest_memfd_slot_needs_mmap, case_arm_slot_needs_mmap);
kvm_test!(overlapping_memslots_eexist, case_overlapping_memslots);
kvm_test!(
    same_guest_memfd_range_in_two_slots,
    case_same_gmem_range_twice
);
kvm_test!(guest_memfd_of_another_vm, case_gmem_of_other_vm);
kvm_test!(other_kernel_refusals, case_other_kernel_refusals);
kvm_test!(descriptors_are_cloexec, case_cloexec);

/// The whole set, run once more, leaves no descriptor behind.
#[test]
fn no_fd_leaks() {
    assert_no_fd_leaks("no_fd_leaks", "descriptors leaked", |kvm| {
        case_gmem_builder(kvm);
        case_fallocate_rules(kvm);
        case_memslot_builder(kvm);
        case_mapping_bounds(kvm);
        case_memory_attributes(kvm);
        case_pre_fault(kvm);
        case_vm_types(kvm);
        case_overlapping_memslots(kvm);
        case_same_gmem_range_twice(kvm);
        case_gmem_of_other_vm(kvm);
        case_other_kernel_refusals(kvm);
        case_cloexec(kvm);
    });
}
