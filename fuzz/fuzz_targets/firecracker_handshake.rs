//! Arbitrary bytes as a Firecracker handshake body with an arbitrary fd
//! count (0..=4; 1 is the main branch's, 3 the secret-hiding branch's), into
//! `firecracker::parse`, and what it accepts into the lookups and
//! `validate_against_snapshot`.
//!
//! Never a panic; a refusal is always `Error::Protocol` with op
//! `firecracker handshake`; an accepted list satisfies every documented rule
//! (checked here independently) and survives a serialise/parse round trip.
//!
//! Input layout: byte 0 picks the fd count, bytes 1..9 a snapshot length,
//! the rest is the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uffd_gmem::Error;
use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, MIN_PAGE_SIZE, OP};

/// The documented rules, independently of the parser.
fn rules_hold(regions: &[GuestRegionUffdMapping], fds: usize) -> Result<(), String> {
    if regions.is_empty() {
        return Err("empty".into());
    }
    let secret = regions.iter().any(|r| r.is_guest_memfd == Some(true));
    if fds != if secret { 3 } else { 1 } {
        return Err(format!("fd count {fds}"));
    }
    let page = regions[0].page_size;
    for r in regions {
        let ok = r.page_size.is_power_of_two()
            && r.page_size >= MIN_PAGE_SIZE
            && r.page_size == page
            && r.page_size_kib == r.page_size
            && r.size > 0
            && r.size % page == 0
            && r.base_host_virt_addr % page == 0
            && r.offset % page == 0
            && r.base_host_virt_addr.checked_add(r.size).is_some()
            && r.offset.checked_add(r.size).is_some();
        if !ok {
            return Err(format!("region {r:?}"));
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let host = a.base_host_virt_addr < b.base_host_virt_addr + b.size
                && b.base_host_virt_addr < a.base_host_virt_addr + a.size;
            let file = a.offset < b.offset + b.size && b.offset < a.offset + a.size;
            if host || file {
                return Err(format!("overlap {a:?} {b:?}"));
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let fds = usize::from(sel % 5);
    let (snap, payload) = if rest.len() >= 8 {
        let (a, b) = rest.split_at(8);
        (u64::from_le_bytes(a.try_into().unwrap()), b)
    } else {
        (0, rest)
    };
    for payload in [payload, rest] {
        let regions = match firecracker::parse(payload, fds) {
            Ok(r) => r,
            Err(Error::Protocol { op, what }) => {
                assert_eq!(op, OP);
                assert!(!what.is_empty());
                continue;
            }
            Err(e) => panic!("an untyped refusal: {e:?}"),
        };
        if let Err(why) = rules_hold(&regions, fds) {
            panic!("accepted a list that breaks a rule ({why}): {regions:?}");
        }
        let again = serde_json::to_vec(&regions).unwrap();
        assert_eq!(firecracker::parse(&again, fds).unwrap(), regions);
        for r in &regions {
            assert!(r.contains(r.base_host_virt_addr));
            let last = r.base_host_virt_addr + r.size - 1;
            assert_eq!(r.snapshot_offset(last), Some(r.offset + r.size - 1));
            assert_eq!(r.snapshot_offset(r.base_host_virt_addr + r.size), None);
            assert_eq!(r.host_range().end - r.host_range().start, r.size);
        }
        // The snapshot check: Ok exactly when every region lies inside a
        // file of `len` bytes and the sizes add up to it.
        let total: u128 = regions.iter().map(|r| u128::from(r.size)).sum();
        for len in [snap, total.min(u128::from(u64::MAX)) as u64] {
            let inside = regions
                .iter()
                .all(|r| u128::from(r.offset) + u128::from(r.size) <= u128::from(len));
            let want = inside && total == u128::from(len);
            match firecracker::validate_against_snapshot(&regions, len) {
                Ok(()) => assert!(want, "accepted {len:#x} for {regions:?}"),
                Err(Error::Protocol { op, .. }) => {
                    assert_eq!(op, OP);
                    assert!(!want, "refused {len:#x} for {regions:?}");
                }
                Err(e) => panic!("an untyped refusal: {e:?}"),
            }
        }
    }
});
