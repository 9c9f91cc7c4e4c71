//! Property tests of the crate's validation: the guest_memfd hand-over
//! header decoder (pure) and the builders fed arbitrary sizes, offsets and
//! flag bits ([`GuestMemfd::builder`], [`MemoryRegion2::builder`],
//! `punch_hole`/`allocate`, [`Populate`]).
//!
//! Each property compares the crate with an independent oracle written from
//! the documentation: the result is `Ok` exactly when every rule holds, and
//! otherwise the typed error names the operation and the rule. No property
//! may panic.
//!
//! The builder properties need `/dev/kvm` (one VM for the whole file); they
//! print `SKIP <test>: <why>` and pass where it cannot be opened, except
//! under `CI=true`, where that is a failure. Case counts are capped so that
//! each test runs in well under a few seconds.

mod common;

use common::{gmem_vm_or_skip, has_guest_memfd, header, lock, open_fds, vm_or_skip};
use kvm_gmem::populate::{Populate, Source, Strategy as PopStrategy};
use kvm_gmem::{
    Error, GuestMemfd, GuestMemfdFlags, MemoryRegion2, RegionFlags, VmOps, page_size, share,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::os::fd::AsRawFd;

// Every test holds the file-wide lock (`lock`):
// `no_fd_leaks_after_the_properties` counts fds.

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// A u64 drawn mostly near the interesting edges: small page multiples,
/// off-by-one values, the top of the range, and anything.
fn edgy_u64() -> impl Strategy<Value = u64> {
    let p = page_size();
    prop_oneof![
        3 => (0u64..64).prop_map(move |n| n * p),
        1 => (0u64..64).prop_map(move |n| (n * p).wrapping_add(1)),
        1 => (0u64..64).prop_map(move |n| (n * p).wrapping_sub(1)),
        1 => (0u64..4).prop_map(move |n| (i64::MAX as u64 + 1).wrapping_sub(n * p)),
        1 => (0u64..4).prop_map(move |n| u64::MAX - n * p),
        1 => (1u64..=64).prop_map(|s| 1u64 << (s - 1)),
        2 => any::<u64>(),
    ]
}

/// Flag bits: mostly the named ones, sometimes any.
fn flag_bits() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..16,
        1 => (0u32..64).prop_map(|b| 1u64 << b),
        1 => any::<u64>(),
    ]
}

fn expect_invalid<T: std::fmt::Debug>(
    r: kvm_gmem::Result<T>,
    op: &str,
    rule: &str,
) -> Result<(), TestCaseError> {
    match r {
        Err(Error::Invalid { op: o, rule: text }) if o == op && text.contains(rule) => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "expected Error::Invalid {{ op: {op:?}, rule containing {rule:?} }}, got {other:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// The hand-over header (pure)
// ---------------------------------------------------------------------------

/// The oracle: the decoded (size, flags), or the phrase the error must
/// contain, following the module docs' rule order.
fn header_oracle(b: &[u8], fds: usize) -> Result<(u64, u64), &'static str> {
    if b.len() != 32 {
        return Err("the header is exactly 32");
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if &b[..8] != b"KVMGMEM1" {
        return Err("wrong magic");
    }
    if u32_at(8) != 1 {
        return Err("wire format version");
    }
    if u32_at(12) != 0 {
        return Err("reserved field");
    }
    if fds != 1 {
        return Err("expected exactly 1");
    }
    let (size, flags) = (u64_at(16), u64_at(24));
    if flags & !GuestMemfdFlags::all().bits() != 0 {
        return Err("does not name");
    }
    if size == 0 || !size.is_multiple_of(page_size()) {
        return Err("multiple of the page size");
    }
    if size > i64::MAX as u64 {
        return Err("largest file size");
    }
    Ok((size, flags))
}

fn check_header(bytes: &[u8], fds: usize) -> Result<(), TestCaseError> {
    let got = share::decode_header(bytes, fds);
    match (header_oracle(bytes, fds), got) {
        (Ok((size, flags)), Ok((s, f))) => {
            prop_assert_eq!((s, f.bits()), (size, flags));
        }
        (Err(rule), Err(Error::Protocol { op, what })) => {
            prop_assert_eq!(op, "decode(guest_memfd header)");
            prop_assert!(what.contains(rule), "{what:?} does not name {rule:?}");
        }
        (want, got) => {
            return Err(TestCaseError::fail(format!(
                "{bytes:02x?} with {fds} fds: oracle {want:?}, decoder {got:?}"
            )));
        }
    }
    Ok(())
}

/// A valid header, then up to three bytes overwritten anywhere, and the
/// message cut or extended: the decoder agrees with the oracle, and a value
/// it returns is exactly what the bytes encode.
#[test]
fn handover_header_mutations() {
    let _g = lock();
    let p = page_size();
    let strategy = (
        1u64..1 << 20,
        0u64..4,
        proptest::collection::vec((0usize..32, any::<u8>()), 0..4),
        prop_oneof![8 => Just(32usize), 1 => 0usize..32, 1 => 33usize..64],
        prop_oneof![8 => Just(1usize), 1 => 0usize..=3],
    );
    runner(4000)
        .run(&strategy, |(pages, flags, edits, len, fds)| {
            let flags = flags & GuestMemfdFlags::all().bits();
            let mut b = header(b"KVMGMEM1", 1, 0, pages * p, flags);
            if edits.is_empty() && len == 32 && fds == 1 {
                // Unmutated: the round trip.
                let (s, f) = share::decode_header(&b, 1)
                    .map_err(|e| TestCaseError::fail(format!("valid header refused: {e}")))?;
                prop_assert_eq!((s, f.bits()), (pages * p, flags));
            }
            for (at, v) in edits {
                b[at] = v;
            }
            b.resize(len, 0xa5);
            check_header(&b, fds)
        })
        .unwrap();
}

/// Arbitrary bytes of any length with 0..=3 fds.
#[test]
fn handover_header_arbitrary_bytes() {
    let _g = lock();
    runner(3000)
        .run(
            &(proptest::collection::vec(any::<u8>(), 0..80), 0usize..=3),
            |(bytes, fds)| check_header(&bytes, fds),
        )
        .unwrap();
}

/// Every field value is checked on its own: a header that differs from a
/// valid one in a single field is refused for that field's rule.
#[test]
fn handover_header_fields() {
    let _g = lock();
    runner(2000)
        .run(
            &(
                any::<[u8; 8]>(),
                prop_oneof![Just(1u32), any::<u32>()],
                prop_oneof![Just(0u32), any::<u32>()],
                edgy_u64(),
                flag_bits(),
                0usize..=3,
            ),
            |(magic, version, reserved, size, flags, fds)| {
                let magic = if magic[0] & 1 == 0 {
                    *b"KVMGMEM1"
                } else {
                    magic
                };
                check_header(&header(&magic, version, reserved, size, flags), fds)
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------
// The builders (one VM)
// ---------------------------------------------------------------------------

/// `GuestMemfd::builder(size).flags(bits).create(vm)`: `Ok` exactly when the
/// size is a non-zero page multiple that fits a file and every flag is
/// offered; otherwise `Invalid` (size rules, checked first) or
/// `UnsupportedFlags` with exactly the bits not offered.
#[test]
fn guest_memfd_builder_arbitrary_sizes_and_flags() {
    let _g = lock();
    let test = "guest_memfd_builder_arbitrary_sizes_and_flags";
    let Some((_kvm, vm)) = vm_or_skip(test) else {
        return;
    };
    // Without guest_memfd the kernel part is a capability skip, and the
    // property becomes: the rules checked before the ioctl, else Unsupported.
    let has = has_guest_memfd(&vm, GuestMemfdFlags::empty());
    let offered = vm.guest_memfd_flags().unwrap();
    let op = "KVM_CREATE_GUEST_MEMFD";
    let p = page_size();
    runner(400)
        .run(&(edgy_u64(), flag_bits()), |(size, bits)| {
            let flags = GuestMemfdFlags::from_bits_retain(bits);
            let r = GuestMemfd::builder(size).flags(flags).create(&vm);
            if size == 0 {
                return expect_invalid(r, op, "non-zero");
            }
            if !size.is_multiple_of(p) {
                return expect_invalid(r, op, "multiple of the page size");
            }
            if size > i64::MAX as u64 {
                return expect_invalid(r, op, "largest file size");
            }
            if !has {
                return match r {
                    Err(Error::Unsupported {
                        op: o, capability, ..
                    }) => {
                        prop_assert_eq!((o, capability), (op, "KVM_CAP_GUEST_MEMFD"));
                        Ok(())
                    }
                    other => Err(TestCaseError::fail(format!(
                        "{size:#x} {flags} without guest_memfd: expected Unsupported, got {other:?}"
                    ))),
                };
            }
            let missing = flags.difference(offered);
            if !missing.is_empty() {
                match r {
                    Err(Error::UnsupportedFlags {
                        op: o,
                        unsupported,
                        supported,
                    }) => {
                        prop_assert_eq!(o, op);
                        prop_assert_eq!(unsupported, missing);
                        prop_assert_eq!(supported, offered);
                    }
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "flags {flags}: expected UnsupportedFlags, got {other:?}"
                        )));
                    }
                }
                return Ok(());
            }
            let g = r.map_err(|e| TestCaseError::fail(format!("{size:#x} {flags}: {e}")))?;
            prop_assert_eq!((g.size(), g.flags()), (size, flags));
            Ok(())
        })
        .unwrap();
}

/// `MemoryRegion2::builder(..).build()` with any slot, address, size,
/// guest_memfd offset, userspace address and flag bits.
#[test]
fn memslot_builder_arbitrary_fields() {
    let _g = lock();
    let test = "memslot_builder_arbitrary_fields";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, GuestMemfdFlags::empty()) else {
        return;
    };
    let p = page_size();
    let file = 16 * p;
    let gmem = GuestMemfd::builder(file).create(&vm).unwrap();
    let op = "KVM_SET_USER_MEMORY_REGION2";
    let strategy = (
        any::<u32>(),
        edgy_u64(),
        edgy_u64(),
        prop::option::of(edgy_u64()),
        edgy_u64(),
        prop_oneof![3 => 0u32..16, 1 => any::<u32>()],
    );
    runner(3000)
        .run(&strategy, |(slot, gpa, size, offset, uaddr, bits)| {
            let flags = RegionFlags::from_bits_retain(bits);
            let b = MemoryRegion2::builder(slot, gpa, size)
                .userspace_addr(uaddr)
                .flags(flags);
            let r = match offset {
                Some(off) => b.guest_memfd(&gmem, off).build(),
                None => b.build(),
            };
            let all = if offset.is_some() {
                flags | RegionFlags::GUEST_MEMFD
            } else {
                flags
            };
            if size == 0 {
                return expect_invalid(r, op, "non-zero");
            }
            if !size.is_multiple_of(p) {
                return expect_invalid(r, op, "multiple of the page size");
            }
            if !gpa.is_multiple_of(p) {
                return expect_invalid(r, op, "guest address");
            }
            if gpa.checked_add(size).is_none() {
                return expect_invalid(r, op, "overflows");
            }
            if !uaddr.is_multiple_of(p) {
                return expect_invalid(r, op, "userspace address");
            }
            if all.bits() & !RegionFlags::all().bits() != 0 {
                return expect_invalid(r, op, "no KVM_MEM_* flag of this build names");
            }
            if offset.is_none() && all.contains(RegionFlags::GUEST_MEMFD) {
                return expect_invalid(r, op, "no guest_memfd was given");
            }
            if let Some(off) = offset {
                if !off.is_multiple_of(p) {
                    return expect_invalid(r, op, "guest_memfd offset");
                }
                if off.checked_add(size).is_none_or(|end| end > file) {
                    return expect_invalid(r, op, "past the file size");
                }
            }
            let region = r.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
            prop_assert_eq!(
                (region.slot(), region.gpa(), region.size(), region.flags()),
                (slot, gpa, size, all)
            );
            let raw = region.as_raw();
            prop_assert_eq!(raw.userspace_addr, uaddr);
            match offset {
                Some(off) => {
                    prop_assert_eq!(raw.guest_memfd, gmem.as_raw_fd() as u32);
                    prop_assert_eq!(raw.guest_memfd_offset, off);
                }
                None => prop_assert_eq!((raw.guest_memfd, raw.guest_memfd_offset), (0, 0)),
            }
            Ok(())
        })
        .unwrap();
}

/// `punch_hole` and `allocate` with any range: `Ok` exactly for non-empty,
/// page-aligned ranges inside the file.
#[test]
fn fallocate_arbitrary_ranges() {
    let _g = lock();
    let test = "fallocate_arbitrary_ranges";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, GuestMemfdFlags::empty()) else {
        return;
    };
    let p = page_size();
    let file = 16 * p;
    let gmem = GuestMemfd::builder(file).create(&vm).unwrap();
    runner(500)
        .run(&(edgy_u64(), edgy_u64(), any::<bool>()), |(a, b, punch)| {
            let (op, r) = if punch {
                ("fallocate(PUNCH_HOLE)", gmem.punch_hole(a..b))
            } else {
                ("fallocate(KEEP_SIZE)", gmem.allocate(a..b))
            };
            if a >= b {
                return expect_invalid(r, op, "empty range");
            }
            if !a.is_multiple_of(p) || !b.is_multiple_of(p) {
                return expect_invalid(r, op, "not page aligned");
            }
            if b > file {
                return expect_invalid(r, op, "past the file size");
            }
            r.map_err(|e| TestCaseError::fail(format!("{a:#x}..{b:#x}: {e}")))
        })
        .unwrap();
    gmem.punch_hole(0..file).unwrap();
}

fn pop_strategy() -> impl Strategy<Value = PopStrategy> {
    prop_oneof![
        Just(PopStrategy::Auto),
        Just(PopStrategy::PopulateIoctl),
        Just(PopStrategy::Write),
        Just(PopStrategy::MmapCopy),
        Just(PopStrategy::UffdCopy),
    ]
}

/// `Populate::run` with any range, thread count, strategy, `gpa_base` and
/// source length, on a guest_memfd that no strategy of a stock kernel can
/// fill (no `MMAP`): it never writes, and every refusal is typed: the
/// up-front rules as `Invalid` naming `Populate::run`, then the strategy's
/// own refusal (`Invalid` or `Unsupported`).
#[test]
fn populate_arbitrary_parameters() {
    let _g = lock();
    let test = "populate_arbitrary_parameters";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, GuestMemfdFlags::empty()) else {
        return;
    };
    let p = page_size();
    let file = 16 * p;
    let gmem = GuestMemfd::builder(file).create(&vm).unwrap();
    let src = vec![0x5au8; (4 * p) as usize];
    let strategy = (
        edgy_u64(),
        edgy_u64(),
        prop::option::of(prop_oneof![Just(0usize), 1usize..8, Just(usize::MAX)]),
        pop_strategy(),
        prop::option::of(edgy_u64()),
        0usize..=src.len(),
        any::<bool>(),
    );
    let op = "Populate::run";
    runner(600)
        .run(
            &strategy,
            |(a, b, threads, strategy, gpa_base, src_len, detached)| {
                let mut pop = if detached {
                    Populate::detached(&gmem)
                } else {
                    Populate::new(&vm, &gmem)
                };
                pop = pop.strategy(strategy);
                if let Some(t) = threads {
                    pop = pop.threads(t);
                }
                if let Some(g) = gpa_base {
                    pop = pop.gpa_base(g);
                }
                let r = pop.run(a..b, Source::bytes(&src[..src_len]));
                if threads == Some(0) {
                    return expect_invalid(r, op, "threads must be at least 1");
                }
                if a >= b {
                    return expect_invalid(r, op, "empty range");
                }
                if !a.is_multiple_of(p) || !b.is_multiple_of(p) {
                    return expect_invalid(r, op, "not page aligned");
                }
                if b > file {
                    return expect_invalid(r, op, "past the guest_memfd's size");
                }
                if ((b - a) as usize) > src_len {
                    return expect_invalid(r, op, "the source must cover the whole range");
                }
                // A kernel with the RFC populate ioctl fills the range even
                // without a mapping; a stock one refuses it.
                let ioctl_possible = !detached && gpa_base.is_some();
                match (strategy, r) {
                    (PopStrategy::Auto | PopStrategy::PopulateIoctl, Ok(report))
                        if ioctl_possible =>
                    {
                        prop_assert_eq!(report.strategy, PopStrategy::PopulateIoctl);
                    }
                    (PopStrategy::MmapCopy, Err(Error::Invalid { op, .. })) => {
                        prop_assert_eq!(op, "mmap(guest_memfd)");
                    }
                    (
                        PopStrategy::PopulateIoctl,
                        Err(Error::Invalid { op: o, .. } | Error::Unsupported { op: o, .. }),
                    ) => prop_assert_eq!(o, op),
                    (
                        PopStrategy::Auto | PopStrategy::Write | PopStrategy::UffdCopy,
                        Err(Error::Unsupported { op: o, .. }),
                    ) => prop_assert_eq!(o, op),
                    (s, other) => {
                        return Err(TestCaseError::fail(format!("{s:?}: {other:?}")));
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// The properties above, run again, leave no descriptor open.
#[test]
fn no_fd_leaks_after_the_properties() {
    let _g = lock();
    let Some((kvm, vm)) =
        gmem_vm_or_skip("no_fd_leaks_after_the_properties", GuestMemfdFlags::empty())
    else {
        return;
    };
    let before = open_fds();
    let p = page_size();
    let gmem = GuestMemfd::builder(16 * p).create(&vm).unwrap();
    runner(200)
        .run(
            &(edgy_u64(), flag_bits(), edgy_u64()),
            |(size, bits, off)| {
                let _ = GuestMemfd::builder(size)
                    .flags(GuestMemfdFlags::from_bits_retain(bits))
                    .create(&vm);
                let _ = MemoryRegion2::builder(0, 0, size)
                    .guest_memfd(&gmem, off)
                    .build();
                let _ = gmem.allocate(off..size);
                let _ = Populate::detached(&gmem).run(off..size, Source::bytes(&[]));
                Ok(())
            },
        )
        .unwrap();
    drop(gmem);
    assert_eq!(open_fds(), before, "descriptors leaked");
    drop((vm, kvm));
}
