//! `kvm_gmem::vm_memory` on the real kernel: guest_memfd regions in a
//! vm-memory `GuestRegionCollection`, used the way a VMM's device emulation
//! uses guest memory (vm-memory's `Bytes` and `GuestMemoryBackend` only),
//! checked against the guest_memfd's own mapping, set as memory slots, and
//! punched.
//!
//! Tests need `/dev/kvm`; without it they print `SKIP` and pass, except
//! under `CI=true`, where that is a failure. They also need guest_memfd with
//! `MMAP | INIT_SHARED` (Linux 6.18): where the kernel lacks it they print
//! `SKIP <test>: <capability> = <value> on <kernel>` and pass. The region's
//! rules and accesses are also unit-tested without a kernel, on a memfd
//! standing in for the guest_memfd (`src/vm_memory.rs`). Every test holds
//! the file-wide lock (`common::lock`).

#![allow(unsafe_code)]

mod common;

use common::{gmem, page, shared};
use kvm_gmem::vm_memory::{GuestMemfdMemory, GuestMemfdRegion, from_regions};
use kvm_gmem::{Error, GuestMemfdFlags, KvmDevice, RegionFlags, VmOps, VmType};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// The rule of an `Invalid` error, after checking its op.
fn invalid<T: std::fmt::Debug>(r: Result<T, Error>, op: &str) -> String {
    match r {
        Err(Error::Invalid { op: got, rule }) => {
            assert_eq!(got, op, "{rule}");
            rule
        }
        other => panic!("{op}: expected Invalid, got {other:?}"),
    }
}

fn vm(kvm: &KvmDevice) -> kvm_gmem::Vm {
    kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM")
}

/// A guest_memfd of `pages` pages split in two regions: file pages
/// `pages/2..` at GPA 0, file pages `..pages/2` at `high`.
fn two_regions(vm: &kvm_gmem::Vm, pages: u64, high: u64) -> GuestMemfdMemory {
    let p = page();
    let half = pages / 2 * p;
    let g = gmem(vm, pages * p, shared());
    let low = GuestMemfdRegion::from_range(g, half, half, GuestAddress(0)).expect("low region");
    let high = low
        .sibling(0, half, GuestAddress(high))
        .expect("high region");
    from_regions([high, low]).expect("the collection")
}

/// Bytes, objects and slices across two adjacent regions of one
/// guest_memfd land at the right file offsets.
fn case_bytes_across_regions(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    let mem = two_regions(&vm, 8, 4 * p);
    assert_eq!(mem.num_regions(), 2);
    assert_eq!(mem.last_addr(), GuestAddress(8 * p - 1));

    // A write across the boundary at GPA 4 pages: its first half ends the
    // file, its second half starts it.
    let data: Vec<u8> = (0..=255u8).cycle().take(3 * p as usize).collect();
    let at = GuestAddress(4 * p - p / 2);
    mem.write_slice(&data, at).unwrap();
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back, at).unwrap();
    assert!(back == data, "read_slice returns what write_slice wrote");

    let low = mem.find_region(GuestAddress(0)).expect("the low region");
    let high = mem
        .find_region(GuestAddress(4 * p))
        .expect("the high region");
    assert_eq!(low.start_addr(), GuestAddress(0));
    assert_eq!(low.gmem_offset(), 4 * p);
    assert_eq!(high.start_addr(), GuestAddress(4 * p));
    assert_eq!(high.gmem_offset(), 0);
    assert_eq!(
        mem.find_region(GuestAddress(8 * p - 1))
            .map(|r| r.gmem_offset()),
        Some(0)
    );
    assert!(mem.find_region(GuestAddress(8 * p)).is_none());
    let map = low.mapping();
    assert_eq!(
        map.addr(),
        high.mapping().addr(),
        "siblings share one mapping"
    );
    let mut file = vec![0u8; p as usize / 2];
    map.read_at(8 * p - p / 2, &mut file).unwrap();
    assert!(
        file == data[..p as usize / 2],
        "the first half ends the file"
    );
    let mut file = vec![0u8; data.len() - p as usize / 2];
    map.read_at(0, &mut file).unwrap();
    assert!(file == data[p as usize / 2..], "the rest starts the file");

    mem.write_obj(0x0123_4567_89ab_cdef_u64, GuestAddress(0x18))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x18)).unwrap(),
        0x0123_4567_89ab_cdef
    );
    let mut word = [0u8; 8];
    map.read_at(4 * p + 0x18, &mut word).unwrap();
    assert_eq!(u64::from_ne_bytes(word), 0x0123_4567_89ab_cdef);

    // A slice of guest memory, and a write through the mapping seen by it.
    map.write_at(p, &[0x5a; 16]).unwrap();
    let slice = mem.get_slice(GuestAddress(5 * p), 16).unwrap();
    let mut got = [0u8; 16];
    slice.read_slice(&mut got, 0).unwrap();
    assert_eq!(got, [0x5a; 16]);
    assert_eq!(
        high.get_host_address(MemoryRegionAddress(p)).unwrap() as u64,
        map.addr() + p
    );

    // vm-memory's file paths (loaders, snapshots) over guest_memfd memory.
    let mut src: &[u8] = &[0xc3; 100];
    mem.read_exact_volatile_from(GuestAddress(4 * p - 50), &mut src, 100)
        .unwrap();
    let mut out = Vec::new();
    mem.write_all_volatile_to(GuestAddress(4 * p - 50), &mut out, 100)
        .unwrap();
    assert_eq!(out, vec![0xc3; 100]);
}

/// Accesses outside the regions are errors of the collection, not signals.
fn case_out_of_range(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    let hole_end = 0x10_0000;
    let mem = two_regions(&vm, 4, hole_end);
    for gpa in [2 * p, hole_end - 8, hole_end + 2 * p, u64::MAX - 7] {
        assert!(
            matches!(
                mem.read_obj::<u64>(GuestAddress(gpa)),
                Err(GuestMemoryError::InvalidGuestAddress(_))
            ),
            "read at {gpa:#x}"
        );
        assert!(mem.write_obj(1u64, GuestAddress(gpa)).is_err(), "{gpa:#x}");
        assert!(mem.get_slice(GuestAddress(gpa), 1).is_err(), "{gpa:#x}");
        let mut buf = [0u8; 8];
        assert!(mem.read_slice(&mut buf, GuestAddress(gpa)).is_err());
    }
    // Starting in a region and running into the hole: partial, an error.
    let r = mem.read_obj::<u64>(GuestAddress(2 * p - 4));
    assert!(
        matches!(
            r,
            Err(GuestMemoryError::PartialBuffer {
                expected: 8,
                completed: 4
            })
        ),
        "{r:?}"
    );
    assert!(
        mem.write_slice(&[1u8; 16], GuestAddress(hole_end + 2 * p - 8))
            .is_err()
    );
    let region = mem.find_region(GuestAddress(0)).unwrap();
    assert!(matches!(
        region.get_slice(MemoryRegionAddress(2 * p - 4), 8),
        Err(GuestMemoryError::InvalidBackendAddress)
    ));
    assert!(region.get_host_address(MemoryRegionAddress(2 * p)).is_err());
    // The bytes next to the refused accesses are untouched.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(2 * p - 8)).unwrap(), 0);
}

/// After `punch_hole`, reads through vm-memory return zeros (no SIGBUS), the
/// pages around keep their contents, and the punched page refaults writable.
fn case_punch_hole_reads_zero(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    let base = 0x4000_0000;
    let g = gmem(&vm, 6 * p, shared());
    let region = GuestMemfdRegion::from_range(g, p, 4 * p, GuestAddress(base)).unwrap();
    let mem = from_regions([region]).unwrap();
    mem.write_slice(&vec![0xaa; 4 * p as usize], GuestAddress(base))
        .unwrap();
    let region = mem.find_region(GuestAddress(base)).unwrap();
    region
        .punch_hole(GuestAddress(base + p)..GuestAddress(base + 3 * p))
        .unwrap();
    let mut all = vec![0u8; 4 * p as usize];
    mem.read_slice(&mut all, GuestAddress(base)).unwrap();
    let pu = p as usize;
    assert!(all[..pu].iter().all(|&b| b == 0xaa), "page 0 kept");
    assert!(
        all[pu..3 * pu].iter().all(|&b| b == 0),
        "punched pages read zero"
    );
    assert!(all[3 * pu..].iter().all(|&b| b == 0xaa), "page 3 kept");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(base + 2 * p)).unwrap(), 0);
    // The hole is in the file at the region's offset: file pages 2..4.
    let mut file = vec![0u8; pu];
    region.mapping().read_at(2 * p, &mut file).unwrap();
    assert!(file.iter().all(|&b| b == 0));
    region.mapping().read_at(p, &mut file).unwrap();
    assert!(file.iter().all(|&b| b == 0xaa));
    mem.write_obj(0x77u8, GuestAddress(base + p)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(base + p)).unwrap(), 0x77);

    let op = "GuestMemfdRegion::punch_hole";
    let r = |a: u64, b: u64| GuestAddress(base + a)..GuestAddress(base + b);
    assert!(invalid(region.punch_hole(r(0, 0)), op).contains("empty"));
    assert!(invalid(region.punch_hole(r(0, p / 2)), op).contains("page aligned"));
    assert!(invalid(region.punch_hole(r(2 * p, 5 * p)), op).contains("not inside"));
}

/// The constructors refuse a guest_memfd the host cannot map safely and a
/// range that breaks a rule, before any system call.
fn case_rules(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    let new = "GuestMemfdRegion::new";
    let from_range = "GuestMemfdRegion::from_range";

    let rule = invalid(
        GuestMemfdRegion::new(gmem(&vm, 2 * p, GuestMemfdFlags::empty()), GuestAddress(0)),
        new,
    );
    assert!(rule.contains("GUEST_MEMFD_FLAG_MMAP"), "{rule}");
    let rule = invalid(
        GuestMemfdRegion::new(gmem(&vm, 2 * p, GuestMemfdFlags::MMAP), GuestAddress(0)),
        new,
    );
    assert!(
        rule.contains("GUEST_MEMFD_FLAG_INIT_SHARED") && rule.contains("SIGBUS"),
        "{rule}"
    );

    let g = Arc::new(gmem(&vm, 4 * p, shared()));
    for (off, len, gpa, want) in [
        (0, 0, 0, "non-zero"),
        (0, p / 2, 0, "multiple of the page size"),
        (p / 2, p, 0, "not page aligned"),
        (0, p, p / 2, "not page aligned"),
        (0, 5 * p, 0, "ends past the file size"),
        (3 * p, 2 * p, 0, "ends past the file size"),
        (u64::MAX - p + 1, 2 * p, 0, "ends past the file size"),
        (0, p, 0u64.wrapping_sub(p), "overflows"),
    ] {
        let rule = invalid(
            GuestMemfdRegion::from_range(Arc::clone(&g), off, len, GuestAddress(gpa)),
            from_range,
        );
        assert!(rule.contains(want), "{off:#x}+{len:#x} at {gpa:#x}: {rule}");
    }
    let whole = GuestMemfdRegion::new(Arc::clone(&g), GuestAddress(0)).unwrap();
    assert_eq!(whole.len(), 4 * p);
    assert_eq!(whole.guest_memfd().as_raw_fd(), g.as_raw_fd());
    let rule = invalid(
        whole.sibling(4 * p, p, GuestAddress(0)),
        "GuestMemfdRegion::sibling",
    );
    assert!(rule.contains("ends past the file size"), "{rule}");

    // The collection's rules.
    let op = "kvm_gmem::vm_memory::from_regions";
    let a = whole.sibling(0, 2 * p, GuestAddress(0x10_0000)).unwrap();
    let rule = invalid(from_regions([whole, a]), op);
    assert!(rule.contains("overlap in the guest_memfd"), "{rule}");
    let a = GuestMemfdRegion::from_range(Arc::clone(&g), 0, 2 * p, GuestAddress(0)).unwrap();
    let b = a.sibling(2 * p, 2 * p, GuestAddress(p)).unwrap();
    let rule = invalid(from_regions([a, b]), op);
    assert!(rule.contains("guest addresses"), "{rule}");
}

/// Each region is a memory slot (KVM_SET_USER_MEMORY_REGION2 with
/// KVM_MEM_GUEST_MEMFD at its offset and its address in the mapping); KVM
/// takes both slots of one guest_memfd, and the VMM's writes through
/// vm-memory are what the slot's userspace address shows.
fn case_memory_slots(kvm: &KvmDevice) {
    let p = page();
    let vm = vm(kvm);
    let mem = two_regions(&vm, 8, 0x10_0000);
    let fd = mem.iter().next().unwrap().guest_memfd().as_raw_fd();
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let desc = region.memory_region(slot).unwrap();
        let raw = desc.as_raw();
        assert_eq!(raw.slot, slot);
        assert_eq!(raw.guest_phys_addr, region.start_addr().0);
        assert_eq!(raw.memory_size, 4 * p);
        assert_eq!(raw.guest_memfd_offset, region.gmem_offset());
        assert_eq!(raw.guest_memfd, fd as u32);
        assert_eq!(
            raw.userspace_addr,
            region.mapping().addr() + region.gmem_offset()
        );
        assert!(desc.flags().contains(RegionFlags::GUEST_MEMFD));
        // SAFETY: `mem` owns the mapping and outlives the slot, which is
        // deleted below (and the VM is closed after `mem` is dropped only
        // once no slot refers to it).
        unsafe { vm.set_memory_region(&desc) }
            .unwrap_or_else(|e| panic!("slot {slot} from {region:?}: {e}"));
    }
    mem.write_obj(0xfeed_u16, GuestAddress(0x10_0000 + 0x10))
        .unwrap();
    let high = mem.find_region(GuestAddress(0x10_0000)).unwrap();
    let mut two = [0u8; 2];
    high.mapping().read_at(0x10, &mut two).unwrap();
    assert_eq!(u16::from_ne_bytes(two), 0xfeed);
    for slot in 0..2 {
        vm.delete_memory_region(slot).unwrap();
    }

    // The FileOffset vm-memory users may pass on: a duplicate of the
    // guest_memfd's descriptor, at the region's offset.
    let fo = high.file_offset().expect("a FileOffset");
    assert_eq!(fo.start(), 0);
    assert_ne!(fo.file().as_raw_fd(), fd);
    let meta = |f: i32| {
        // SAFETY: an all-zero stat is valid; fstat fills it for an open fd.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `f` is open for the call; `st` is writable.
        assert_eq!(unsafe { libc::fstat(f, &mut st) }, 0);
        (st.st_dev, st.st_ino)
    };
    assert_eq!(meta(fo.file().as_raw_fd()), meta(fd));
}

kvm_test!(
    bytes_across_two_regions,
    needs guest_memfd(shared()),
    case_bytes_across_regions
);
kvm_test!(
    out_of_range_accesses_are_errors,
    needs guest_memfd(shared()),
    case_out_of_range
);
kvm_test!(
    punch_hole_then_read_zeros,
    needs guest_memfd(shared()),
    case_punch_hole_reads_zero
);
kvm_test!(region_rules, needs guest_memfd(shared()), case_rules);
kvm_test!(
    regions_as_memory_slots,
    needs guest_memfd(shared()),
    case_memory_slots
);

/// No kernel needed: an empty collection is refused with the rule named,
/// and the types are what a VMM's vm-memory code requires of them.
#[test]
fn empty_collection_and_trait_bounds() {
    let rule = invalid(
        from_regions(Vec::new()),
        "kvm_gmem::vm_memory::from_regions",
    );
    assert!(rule.contains("at least one region"), "{rule}");
    fn bounds<M: GuestMemoryBackend + Bytes<GuestAddress> + Send + Sync + Clone>() {}
    bounds::<GuestMemfdMemory>();
    fn region<R: GuestMemoryRegion + Send + Sync + std::fmt::Debug>() {}
    region::<GuestMemfdRegion>();
}
