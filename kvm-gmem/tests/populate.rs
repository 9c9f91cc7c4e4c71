//! `kvm_gmem::populate` on the real kernel: every strategy this kernel has
//! fills a guest_memfd byte for byte, `Report` says which ran and why the
//! others were skipped, and misuse is refused before anything is written,
//! without leaking an fd.
//!
//! The tests are correct with and without the `rfc-*` features (`cargo test
//! --workspace` enables them through the root package) and on kernels with
//! or without the RFC series: RFC expectations follow `cfg!(feature)` and
//! the capability report.
//!
//! Tests need `/dev/kvm`; without it they print `SKIP` and pass, except under
//! `CI=true`, where that is a failure. They also need guest_memfd (most with
//! MMAP|INIT_SHARED): where the kernel lacks it they print `SKIP <test>:
//! <capability> = <value> on <kernel>` and pass. Every test holds the file-wide lock
//! (`common::lock`), because some count this process's fds.

mod common;

use common::{gmem_vm_or_skip, lock, open_fds, shared};
use kvm_gmem::populate::{Populate, Source, Strategy};
use kvm_gmem::{Capabilities, Error, GuestMemfd, GuestMemfdFlags, Vm, VmType};
use std::io::Write;

const SIZE: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

/// A guest_memfd of `size` bytes the host can map (`MMAP | INIT_SHARED`,
/// Linux 6.18).
fn gmem(vm: &Vm, size: u64) -> GuestMemfd {
    common::gmem(vm, size, shared())
}

/// Byte `i` of the test pattern: differs from page to page and within a
/// page, so a misplaced copy shows.
fn pat(i: u64) -> u8 {
    (i.wrapping_add(0x5bd1_e995)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> 56) as u8
}

fn pattern(start: u64, len: u64) -> Vec<u8> {
    (start..start + len).map(pat).collect()
}

/// Checks that `gmem` holds `expect` at `offset` and zeros elsewhere in
/// `0..size`, reading through a fresh mapping.
fn verify(test: &str, gmem: &GuestMemfd, offset: u64, expect: &[u8]) {
    let map = gmem.map().expect("map");
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0u64;
    while at < gmem.size() {
        map.read_at(at, &mut buf).expect("read_at");
        for (k, &got) in buf.iter().enumerate() {
            let pos = at + k as u64;
            let want = if pos >= offset && pos < offset + expect.len() as u64 {
                expect[(pos - offset) as usize]
            } else {
                0
            };
            assert_eq!(got, want, "{test}: byte at guest_memfd offset {pos:#x}");
        }
        at += MIB;
    }
}

fn temp_file(name: &str, contents: &[u8]) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("kvm-gmem-{name}-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("create temp file");
    f.write_all(contents).expect("write temp file");
    drop(f);
    let f = std::fs::File::open(&path).expect("open temp file");
    let _ = std::fs::remove_file(&path);
    f
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// The reasons `Auto` must give for skipping the RFC strategies here.
fn check_tried(test: &str, tried: &[(Strategy, String)], detached: bool, caps: &Capabilities) {
    let reason = |s: Strategy| {
        tried
            .iter()
            .find(|(t, _)| *t == s)
            .map(|(_, why)| why.as_str())
            .unwrap_or_else(|| panic!("{test}: {s:?} not in tried: {tried:?}"))
    };
    assert_eq!(tried.len(), 2, "{test}: {tried:?}");
    assert_eq!(
        tried[0].0,
        Strategy::PopulateIoctl,
        "{test}: order {tried:?}"
    );
    assert_eq!(tried[1].0, Strategy::Write, "{test}: order {tried:?}");
    let ioctl = reason(Strategy::PopulateIoctl);
    if detached {
        assert!(ioctl.contains("detached"), "{test}: {ioctl}");
    } else if !cfg!(feature = "rfc-populate") {
        assert!(ioctl.contains("feature rfc-populate"), "{test}: {ioctl}");
    } else if caps.rfc.populate.supported {
        // The ioctl exists, but no memslot maps the guest_memfd at gpa_base:
        // its first page is refused with EINVAL, nothing written.
        assert!(ioctl.contains("no memslot"), "{test}: {ioctl}");
    } else {
        assert!(
            ioctl.contains("size-0 probe")
                && (ioctl.contains("ENOTTY") || ioctl.contains("EINVAL")),
            "{test}: {ioctl}"
        );
    }
    let write = reason(Strategy::Write);
    if cfg!(feature = "rfc-gmem-write") {
        assert!(write.contains("created without it"), "{test}: {write}");
    } else {
        assert!(write.contains("feature rfc-gmem-write"), "{test}: {write}");
    }
}

#[test]
fn mmap_copy_from_bytes_fills_every_byte() {
    let _g = lock();
    let test = "mmap_copy_from_bytes_fills_every_byte";
    let Some((kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("capabilities");
    let fds = open_fds();
    let src = pattern(0, SIZE);
    for (strategy, threads, expect_threads) in [
        (Strategy::MmapCopy, Some(1), 1),
        (Strategy::MmapCopy, Some(2), 2),
        (Strategy::Auto, None, default_threads()),
    ] {
        let g = gmem(&vm, SIZE);
        // Populate::new with gpa_base: the ioctl is considered (and probed).
        let mut p = Populate::new(&vm, &g).strategy(strategy).gpa_base(0);
        if let Some(n) = threads {
            p = p.threads(n);
        }
        let report = p.run(0..SIZE, Source::bytes(&src)).expect("populate");
        println!("{test}: {strategy:?} {threads:?}: {report:?}");
        assert_eq!(report.strategy, Strategy::MmapCopy, "{test}");
        assert_eq!(report.bytes, SIZE);
        assert_eq!(report.threads, expect_threads, "{test}: {strategy:?}");
        if strategy == Strategy::Auto {
            check_tried(test, &report.tried, false, &caps);
        } else {
            assert!(report.tried.is_empty(), "{test}: {:?}", report.tried);
        }
        verify(test, &g, 0, &src);
    }
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}

#[test]
fn mmap_copy_from_a_file_at_an_unaligned_offset() {
    let _g = lock();
    let test = "mmap_copy_from_a_file_at_an_unaligned_offset";
    let Some((kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("capabilities");
    let off = 12_345u64;
    let file = temp_file("populate-file", &pattern(0, SIZE + off));
    let fds = open_fds();
    for (strategy, threads, expect_threads) in [
        (Strategy::MmapCopy, Some(1), 1),
        (Strategy::MmapCopy, Some(2), 2),
        (Strategy::Auto, None, default_threads()),
    ] {
        let g = gmem(&vm, SIZE);
        let mut p = Populate::detached(&g).strategy(strategy);
        if let Some(n) = threads {
            p = p.threads(n);
        }
        let report = p.run(0..SIZE, Source::file(&file, off)).expect("populate");
        println!("{test}: {strategy:?} {threads:?}: {report:?}");
        assert_eq!(report.strategy, Strategy::MmapCopy);
        assert_eq!(report.threads, expect_threads);
        if strategy == Strategy::Auto {
            check_tried(test, &report.tried, true, &caps);
        }
        verify(test, &g, 0, &pattern(off, SIZE));
    }
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}

#[test]
fn a_sub_range_is_filled_and_nothing_else() {
    let _g = lock();
    let test = "a_sub_range_is_filled_and_nothing_else";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let g = gmem(&vm, 16 * MIB);
    let range = 3 * MIB + 0x3000..9 * MIB + 0x5000;
    let len = range.end - range.start;
    // A longer source is fine: its first `len` bytes are used.
    let src = pattern(77, len + 4096);
    let report = Populate::detached(&g)
        .threads(3)
        .run(range.clone(), Source::bytes(&src))
        .expect("populate");
    assert_eq!(report.bytes, len);
    assert_eq!(report.threads, 3);
    verify(test, &g, range.start, &src[..len as usize]);

    // From a file too, into a second sub-range of the same guest_memfd.
    let file = temp_file("populate-sub", &pattern(1000, 2 * MIB));
    Populate::detached(&g)
        .run(12 * MIB..14 * MIB, Source::file(&file, 0))
        .expect("populate from file");
    let map = g.map().expect("map");
    let mut buf = vec![0u8; 2 * MIB as usize];
    map.read_at(12 * MIB, &mut buf).expect("read_at");
    assert!(buf == pattern(1000, 2 * MIB), "{test}: file sub-range");
    let mut buf = vec![0u8; len as usize];
    map.read_at(range.start, &mut buf).expect("read_at");
    assert!(
        buf[..] == src[..len as usize],
        "{test}: first sub-range kept"
    );
}

#[test]
fn explicit_strategies_that_cannot_run_are_refused() {
    let _g = lock();
    let test = "explicit_strategies_that_cannot_run_are_refused";
    let Some((kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("capabilities");
    let fds = open_fds();
    let g = gmem(&vm, 4 * MIB);
    let src = pattern(0, 4 * MIB);

    // Write: no guest_memfd here was created with GUEST_MEMFD_FLAG_WRITE.
    let e = Populate::new(&vm, &g)
        .strategy(Strategy::Write)
        .run(0..4 * MIB, Source::bytes(&src))
        .expect_err("Write without GUEST_MEMFD_FLAG_WRITE");
    println!("{test}: Write: {e}");
    assert!(
        matches!(e, Error::Unsupported { capability, .. } if capability == "GUEST_MEMFD_FLAG_WRITE"),
        "{e:?}"
    );

    // PopulateIoctl without gpa_base, and without a VM: the request is invalid.
    let e = Populate::new(&vm, &g)
        .strategy(Strategy::PopulateIoctl)
        .run(0..4 * MIB, Source::bytes(&src))
        .expect_err("PopulateIoctl without gpa_base");
    println!("{test}: PopulateIoctl, no gpa_base: {e}");
    assert!(
        matches!(&e, Error::Invalid { rule, .. } if rule.contains("gpa_base")),
        "{e:?}"
    );
    let e = Populate::detached(&g)
        .strategy(Strategy::PopulateIoctl)
        .gpa_base(0)
        .run(0..4 * MIB, Source::bytes(&src))
        .expect_err("PopulateIoctl detached");
    assert!(
        matches!(&e, Error::Invalid { rule, .. } if rule.contains("detached")),
        "{e:?}"
    );

    // PopulateIoctl with everything set: this kernel lacks the ioctl.
    if !caps.rfc.populate.supported {
        let e = Populate::new(&vm, &g)
            .strategy(Strategy::PopulateIoctl)
            .gpa_base(0)
            .run(0..4 * MIB, Source::bytes(&src))
            .expect_err("PopulateIoctl on a kernel without it");
        println!("{test}: PopulateIoctl: {e}");
        assert!(
            matches!(e, Error::Unsupported { capability, .. } if capability == "KVM_GUEST_MEMFD_POPULATE"),
            "{e:?}"
        );
    }

    // UffdCopy: not implemented.
    let e = Populate::detached(&g)
        .strategy(Strategy::UffdCopy)
        .run(0..4 * MIB, Source::bytes(&src))
        .expect_err("UffdCopy");
    assert!(
        e.is_unsupported()
            && e.to_string()
                .contains("not yet implemented: needs uffd-gmem"),
        "{e}"
    );

    // Nothing was written by any of them.
    verify(test, &g, 0, &[]);
    drop(g);
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}

#[test]
fn a_guest_memfd_that_cannot_be_mapped_is_refused() {
    let _g = lock();
    let test = "a_guest_memfd_that_cannot_be_mapped_is_refused";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, GuestMemfdFlags::MMAP) else {
        return;
    };
    let fds = open_fds();
    let src = pattern(0, 2 * MIB);
    for (mmap, init_shared) in [(false, false), (true, false)] {
        let g = GuestMemfd::builder(2 * MIB)
            .mmap(mmap)
            .init_shared(init_shared)
            .create(&vm)
            .expect("guest_memfd");
        let e = Populate::detached(&g)
            .strategy(Strategy::MmapCopy)
            .run(0..2 * MIB, Source::bytes(&src))
            .expect_err("MmapCopy without MMAP|INIT_SHARED");
        println!("{test}: MmapCopy mmap={mmap}: {e}");
        assert!(
            matches!(&e, Error::Invalid { rule, .. } if rule.contains("SIGBUS") || rule.contains("ENODEV")),
            "{e:?}"
        );
        let e = Populate::detached(&g)
            .run(0..2 * MIB, Source::bytes(&src))
            .expect_err("Auto without any strategy");
        println!("{test}: Auto mmap={mmap}: {e}");
        assert!(e.is_unsupported(), "{e:?}");
        let text = e.to_string();
        for s in ["PopulateIoctl", "Write", "MmapCopy", "UffdCopy"] {
            assert!(text.contains(s), "{test}: {s} missing from {text}");
        }
    }
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}

#[test]
fn misuse_is_invalid_before_any_write() {
    let _g = lock();
    let test = "misuse_is_invalid_before_any_write";
    let Some((_kvm, vm)) = gmem_vm_or_skip(test, shared()) else {
        return;
    };
    let size = 4 * MIB;
    let file = temp_file("populate-misuse", &pattern(0, MIB));
    let fds = open_fds();
    let g = gmem(&vm, size);
    let src = pattern(0, size);
    let short = pattern(0, size - 1);
    let cases: Vec<(&str, Populate<'_>, std::ops::Range<u64>, Source<'_>, &str)> = vec![
        (
            "empty range",
            Populate::detached(&g),
            4096..4096,
            Source::bytes(&src),
            "empty",
        ),
        (
            "unaligned start",
            Populate::detached(&g),
            1..8192,
            Source::bytes(&src),
            "page aligned",
        ),
        (
            "unaligned end",
            Populate::detached(&g),
            0..4097,
            Source::bytes(&src),
            "page aligned",
        ),
        (
            "past the end",
            Populate::detached(&g),
            0..size + 4096,
            Source::bytes(&src),
            "past",
        ),
        (
            "reversed",
            Populate::detached(&g),
            std::ops::Range {
                start: 8192,
                end: 4096,
            },
            Source::bytes(&src),
            "empty",
        ),
        (
            "short buffer",
            Populate::detached(&g),
            0..size,
            Source::bytes(&short),
            "fewer",
        ),
        (
            "short file",
            Populate::detached(&g),
            0..2 * MIB,
            Source::file(&file, 0),
            "fewer",
        ),
        (
            "file offset past its end",
            Populate::detached(&g),
            0..4096,
            Source::file(&file, 2 * MIB),
            "fewer",
        ),
        (
            "file offset leaves too little",
            Populate::detached(&g),
            0..MIB,
            Source::file(&file, 1),
            "fewer",
        ),
        (
            "threads 0",
            Populate::detached(&g).threads(0),
            0..size,
            Source::bytes(&src),
            "threads",
        ),
        (
            "threads 0, explicit",
            Populate::detached(&g)
                .threads(0)
                .strategy(Strategy::MmapCopy),
            0..size,
            Source::bytes(&src),
            "threads",
        ),
    ];
    for (name, p, range, source, needle) in cases {
        let e = p.run(range, source).expect_err(name);
        println!("{test}: {name}: {e}");
        assert!(
            matches!(&e, Error::Invalid { rule, .. } if rule.contains(needle)),
            "{test}: {name}: {e:?}"
        );
    }
    verify(test, &g, 0, &[]);
    drop(g);
    assert_eq!(open_fds(), fds, "{test}: fd leak");
}
