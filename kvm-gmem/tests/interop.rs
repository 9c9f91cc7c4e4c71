//! kvm-ioctls and kvm-bindings with this crate (feature `kvm-ioctls`): the
//! conversions to and from kvm-bindings' structs, compared field by field,
//! and a file that imports `kvm_ioctls::{Kvm, Cap, VmFd}` next to
//! `kvm_gmem::*` and calls this crate's VM operations on a `VmFd` with
//! method syntax.
//!
//! Tests that need `/dev/kvm` print `SKIP <test>: <why>` and pass when it
//! cannot be opened (a failure under `CI=true`); a part that needs a
//! capability the kernel lacks asserts the typed `Unsupported` error, then
//! prints `SKIP <test>: <capability> = <value> on <kernel>`
//! (`common::skip_capability`).

mod common;

use common::{lock, page, skip_capability, slot_flags};
use kvm_gmem::*;
use kvm_ioctls::{Cap, Kvm, VmFd};

#[test]
fn region_converts_field_by_field() {
    let p = page();
    let region = MemoryRegion2::builder(0x1_0007, 0x4000_0000, 8 * p)
        .userspace_addr(0x7f12_3400_0000)
        .flags(RegionFlags::LOG_DIRTY_PAGES | RegionFlags::READONLY)
        .build()
        .unwrap();
    let ours = region.as_raw();
    for theirs in [
        kvm_bindings::kvm_userspace_memory_region2::from(&region),
        kvm_bindings::kvm_userspace_memory_region2::from(region),
    ] {
        assert_eq!(theirs.slot, ours.slot);
        assert_eq!(theirs.flags, ours.flags);
        assert_eq!(theirs.guest_phys_addr, ours.guest_phys_addr);
        assert_eq!(theirs.memory_size, ours.memory_size);
        assert_eq!(theirs.userspace_addr, ours.userspace_addr);
        assert_eq!(theirs.guest_memfd_offset, ours.guest_memfd_offset);
        assert_eq!(theirs.guest_memfd, ours.guest_memfd);
        assert_eq!(theirs.pad1, ours.pad1);
        assert_eq!(theirs.pad2, ours.pad2);
        // And against what was asked, in kvm-bindings' own constants.
        assert_eq!(theirs.slot, 0x1_0007);
        assert_eq!(
            theirs.flags,
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES | kvm_bindings::KVM_MEM_READONLY
        );
        assert_eq!(theirs.guest_phys_addr, 0x4000_0000);
        assert_eq!(theirs.memory_size, 8 * p);
        assert_eq!(theirs.userspace_addr, 0x7f12_3400_0000);
        assert_eq!((theirs.guest_memfd_offset, theirs.guest_memfd), (0, 0));
        assert_eq!(theirs.pad2, [0; 14]);
    }
}

#[test]
fn attributes_convert_both_ways() {
    let p = page();
    let raw = MemoryAttributes::PRIVATE.to_kvm_bindings(p..5 * p);
    assert_eq!(raw.address, p);
    assert_eq!(raw.size, 4 * p);
    assert_eq!(
        raw.attributes,
        u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE)
    );
    assert_eq!(raw.flags, 0);
    assert_eq!(MemoryAttributes::from(raw), MemoryAttributes::PRIVATE);
    assert_eq!(
        MemoryAttributes::from_kvm_bindings(&raw).unwrap(),
        (p..5 * p, MemoryAttributes::PRIVATE)
    );
    // Clearing: attributes 0.
    let clear = MemoryAttributes::empty().to_kvm_bindings(0..p);
    assert_eq!((clear.address, clear.size, clear.attributes), (0, p, 0));

    // Bits the crate does not name are kept.
    let unknown = kvm_bindings::kvm_memory_attributes {
        attributes: 1 << 40 | raw.attributes,
        ..raw
    };
    assert_eq!(
        MemoryAttributes::from(unknown).bits(),
        1 << 40 | raw.attributes
    );

    // What the kernel answers EINVAL is refused, with that errno.
    for bad in [
        kvm_bindings::kvm_memory_attributes { flags: 1, ..raw },
        kvm_bindings::kvm_memory_attributes {
            address: u64::MAX - p + 1,
            size: 2 * p,
            ..raw
        },
    ] {
        let e = MemoryAttributes::from_kvm_bindings(&bad).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        assert_eq!(e.errno(), Some(Errno(libc::EINVAL)));
    }
}

#[test]
fn memory_fault_from_kvm_bindings() {
    let mut run = kvm_bindings::kvm_run::default();
    assert_eq!(MemoryFault::from_kvm_bindings_run(&run), None);
    run.exit_reason = kvm_bindings::KVM_EXIT_MEMORY_FAULT;
    run.__bindgen_anon_1.memory_fault.flags =
        u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE) | 1 << 63;
    run.__bindgen_anon_1.memory_fault.gpa = 0x8_0000;
    run.__bindgen_anon_1.memory_fault.size = 0x2000;
    let fault = MemoryFault::from_kvm_bindings_run(&run).unwrap();
    assert_eq!(fault.gpa, 0x8_0000);
    assert_eq!(fault.size, 0x2000);
    assert!(fault.is_private());
    assert_eq!(
        fault.flags.bits(),
        u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE) | 1 << 63
    );
    // The same exit as this crate's bindings decode it.
    // SAFETY: both run structs are `repr(C)` with the same size, alignment
    // and offsets (checked at compile time in `interop`); every field is
    // plain data.
    let ours: kvm_gmem::sys_bindings::kvm_run = unsafe { std::mem::transmute(run) };
    assert_eq!(MemoryFault::from_kvm_run(&ours), Some(fault));

    // And kvm-ioctls' exit.
    let exit = kvm_ioctls::VcpuExit::MemoryFault {
        flags: fault.flags.bits(),
        gpa: fault.gpa,
        size: fault.size,
    };
    assert_eq!(MemoryFault::from_vcpu_exit(&exit), Some(fault));
    assert_eq!(
        MemoryFault::from_vcpu_exit(&kvm_ioctls::VcpuExit::Hlt),
        None
    );
}

/// kvm-ioctls' `Kvm`, `Cap` and `VmFd` next to `kvm_gmem::*` (whose
/// `KvmDevice` and `Extension` do not clash with them), and this crate's VM
/// operations on a `VmFd` by method syntax.
#[test]
fn kvm_ioctls_vm_fd_with_method_syntax() {
    let _guard = lock();
    let Some(ours) = common::kvm_or_skip("kvm_ioctls_vm_fd_with_method_syntax") else {
        return;
    };
    let kvm = Kvm::new().expect("kvm-ioctls: open /dev/kvm");
    let vm_fd: VmFd = kvm.create_vm().expect("kvm-ioctls: KVM_CREATE_VM");
    assert!(kvm.check_extension(Cap::UserMemory));

    // VmOps by method syntax, answering as this crate's own VM does.
    let gmem_cap = vm_fd.extension(Extension::GUEST_MEMFD).unwrap();
    let own_vm = ours.create_vm(VmType::DEFAULT).unwrap();
    assert_eq!(gmem_cap, own_vm.extension(Extension::GUEST_MEMFD).unwrap());
    assert_eq!(
        vm_fd.guest_memfd_flags().unwrap(),
        own_vm.guest_memfd_flags().unwrap()
    );

    // Memory attributes by method syntax (VmFd's own is
    // `set_memory_attributes`): done, or the typed refusal.
    let supported = vm_fd.supported_attributes().unwrap();
    match vm_fd.set_attributes(0..page(), MemoryAttributes::PRIVATE) {
        Ok(()) => assert!(supported.contains(MemoryAttributes::PRIVATE)),
        Err(Error::Unsupported { capability, .. }) => {
            assert_eq!(capability, "KVM_CAP_MEMORY_ATTRIBUTES");
            assert!(!supported.contains(MemoryAttributes::PRIVATE));
        }
        Err(e) => panic!("set_attributes on a VmFd: {e}"),
    }

    // A guest_memfd for the VmFd.
    let created = GuestMemfd::builder(2 << 20)
        .flags(slot_flags())
        .create(&vm_fd);
    if gmem_cap <= 0 {
        match created {
            Err(Error::Unsupported { capability, .. }) => {
                assert_eq!(capability, "KVM_CAP_GUEST_MEMFD");
            }
            other => panic!("KVM_CAP_GUEST_MEMFD = {gmem_cap}, yet create gave {other:?}"),
        }
        skip_capability("KVM_CAP_GUEST_MEMFD", gmem_cap);
        return;
    }
    if !vm_fd.guest_memfd_flags().unwrap().contains(slot_flags()) {
        assert!(created.unwrap_err().is_unsupported());
        skip_capability(
            "GUEST_MEMFD_FLAG_MMAP",
            format!(
                "absent (KVM_CAP_GUEST_MEMFD_FLAGS = {})",
                vm_fd.guest_memfd_flags().unwrap()
            ),
        );
        return;
    }
    let gmem = created.unwrap();
    let region = MemoryRegion2::builder(0, 0, gmem.size())
        .guest_memfd(&gmem, 0)
        .build()
        .unwrap();
    // The slot, set through kvm-ioctls with kvm-bindings' struct.
    // SAFETY: a guest_memfd-only slot names no userspace memory; `gmem` is
    // open until after the ioctl.
    unsafe { vm_fd.set_user_memory_region2((&region).into()) }
        .expect("kvm-ioctls: KVM_SET_USER_MEMORY_REGION2 from a converted region");
    // Deleted through this crate's VmOps on the same VmFd.
    vm_fd.delete_memory_region(0).unwrap();
    // And set again through VmOps.
    // SAFETY: as above.
    unsafe { vm_fd.set_memory_region(&region) }.unwrap();
    vm_fd.delete_memory_region(0).unwrap();
}
