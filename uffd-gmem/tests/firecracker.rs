//! Firecracker handshake: round trips over a real socket with a real
//! userfaultfd, hostile messages (each error names the problem, every
//! received fd is closed), and property tests of the pure parser.
//!
//! The round trips need a userfaultfd (`/dev/userfaultfd` or the system
//! call); where none can be created they print `SKIP ...`, unless `CI=true`,
//! where they fail.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Mem, open_fds, serial, uffd_or_skip};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake, MAX_PAYLOAD};
use uffd_gmem::{Event, Features, Mode, Origin, RegisterMode};

const PAGE: u64 = 4096;

// The tests hold the file-wide lock (`serial`): the fd-leak checks read
// `/proc/self/fd` (`open_fds`), which other tests running in parallel would
// disturb.

fn memfd(name: &str) -> OwnedFd {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn region(base: u64, size: u64, offset: u64) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping::new(base, size, offset, PAGE)
}

fn sh_region(base: u64, size: u64, offset: u64, gpa: u64) -> GuestRegionUffdMapping {
    // `#[non_exhaustive]`: start from the constructor, set the public fields.
    let mut r = region(base, size, offset);
    r.gpa_start = Some(gpa);
    r.is_guest_memfd = Some(true);
    r
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

#[test]
fn round_trip_main_and_the_received_uffd_serves_a_fault() {
    let _g = serial();
    let before = open_fds();
    let Some(uffd) = uffd_or_skip("round_trip_main", Features::empty()) else {
        return;
    };
    {
        let (vmm, handler) = UnixStream::pair().unwrap();
        let mem = Mem::anon(2 * PAGE);
        let regions = vec![
            region(mem.addr, PAGE, 0),
            region(mem.addr + PAGE, PAGE, PAGE),
        ];
        firecracker::send(&vmm, &regions, &[uffd.as_fd()]).unwrap();
        let hs = Handshake::recv(&handler).unwrap();
        assert_eq!(hs.regions, regions);
        assert!(!hs.is_secret_hiding());
        assert!(hs.guest_memfd.is_none() && hs.userfault_bitmap.is_none());
        assert_eq!(hs.uffd.origin(), Origin::Adopted);
        assert_eq!(hs.page_size(), PAGE);
        assert_eq!(hs.total_size(), 2 * PAGE);
        hs.validate_against_snapshot(2 * PAGE).unwrap();
        let peer = hs.peer.expect("SO_PEERCRED");
        assert_eq!(peer.pid, std::process::id() as i32);
        // SAFETY: getuid has no preconditions.
        assert_eq!(peer.uid, unsafe { libc::getuid() });
        assert_eq!(hs.region_for(mem.addr + PAGE + 5), Some(&regions[1]));
        assert_eq!(hs.region_for(mem.addr + 2 * PAGE), None);
        assert_eq!(
            regions[1].snapshot_offset(mem.addr + PAGE + 5),
            Some(PAGE + 5)
        );

        // The adopted fd is the same userfaultfd: register through it, fault
        // from a thread, resolve with UFFDIO_COPY.
        // SAFETY: `mem` is a mapping no Rust reference points into; it stays
        // mapped until after the faulting thread is joined.
        let ioctls = unsafe {
            hs.uffd
                .register(mem.addr..mem.addr + 2 * PAGE, RegisterMode::MISSING)
                .unwrap()
        };
        assert!(ioctls.contains(uffd_gmem::Ioctls::COPY), "{ioctls:?}");
        let addr = mem.addr + PAGE;
        let toucher = std::thread::spawn(move || {
            // SAFETY: inside the live mapping; the read blocks until the
            // handler below fills the page.
            unsafe { std::ptr::read_volatile((addr + 8) as *const u64) }
        });
        assert!(hs.uffd.poll_readable(Duration::from_secs(5)).unwrap());
        let ev = hs.uffd.read_event().unwrap().expect("an event");
        let Event::Pagefault { address, .. } = ev else {
            panic!("expected a page fault, got {ev:?}");
        };
        assert_eq!(address & !(PAGE - 1), addr);
        let off = hs
            .region_for(address)
            .unwrap()
            .snapshot_offset(addr)
            .unwrap();
        assert_eq!(off, PAGE);
        let mut src = vec![0u8; PAGE as usize];
        src[8..16].copy_from_slice(&0xfeed_f00d_u64.to_ne_bytes());
        // SAFETY: `src` is PAGE readable bytes; `addr` is a registered,
        // missing page of `mem`.
        unsafe {
            hs.uffd
                .copy(addr, src.as_ptr(), PAGE, Mode::empty())
                .unwrap()
        };
        assert_eq!(toucher.join().unwrap(), 0xfeed_f00d);
        drop(hs);
        drop(uffd);
    }
    assert_eq!(open_fds(), before, "an fd leaked");
}

#[test]
fn round_trip_secret_hiding_three_fds() {
    let _g = serial();
    let Some(uffd) = uffd_or_skip("round_trip_secret_hiding", Features::empty()) else {
        return;
    };
    let before = open_fds();
    {
        let gmem = memfd("guest_memfd-stand-in");
        let bitmap = memfd("userfault-bitmap");
        let (vmm, handler) = UnixStream::pair().unwrap();
        let regions = vec![
            sh_region(0x7f00_0000_0000, 0x20_0000, 0, 0),
            sh_region(0x7f00_1000_0000, 0x10_0000, 0x20_0000, 0x1_0000_0000),
        ];
        firecracker::send(
            &vmm,
            &regions,
            &[uffd.as_fd(), gmem.as_fd(), bitmap.as_fd()],
        )
        .unwrap();
        let hs = Handshake::recv_timeout(&handler, Duration::from_secs(5)).unwrap();
        assert_eq!(hs.regions, regions);
        assert!(hs.is_secret_hiding());
        assert_eq!(hs.regions[1].gpa_start, Some(0x1_0000_0000));
        // The received fds are the sent files: write through one, read
        // through the other.
        let mut sent = std::fs::File::from(gmem);
        let mut got = std::fs::File::from(hs.guest_memfd.unwrap());
        got.write_all(b"guest").unwrap();
        let mut buf = [0u8; 5];
        sent.seek(SeekFrom::Start(0)).unwrap();
        sent.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"guest");
        let mut sent_bm = std::fs::File::from(bitmap);
        let mut got_bm = std::fs::File::from(hs.userfault_bitmap.unwrap());
        got_bm.write_all(&[0xff; 8]).unwrap();
        let mut bm = [0u8; 8];
        sent_bm.seek(SeekFrom::Start(0)).unwrap();
        sent_bm.read_exact(&mut bm).unwrap();
        assert_eq!(bm, [0xff; 8]);
    }
    assert_eq!(open_fds(), before, "an fd leaked");
}

#[test]
fn main_element_carries_no_secret_hiding_fields_on_the_wire() {
    let _g = serial();
    let (vmm, handler) = UnixStream::pair().unwrap();
    let regions = [region(0x1000, 0x1000, 0)];
    firecracker::send(&vmm, &regions, &[]).unwrap();
    drop(vmm);
    let mut wire = String::new();
    (&handler).read_to_string(&mut wire).unwrap();
    assert_eq!(
        wire,
        r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
    );
}

#[test]
fn large_handshake_split_across_socket_buffers_is_read_whole() {
    let _g = serial();
    let Some(uffd) = uffd_or_skip("large_handshake", Features::empty()) else {
        return;
    };
    // ~500 regions: about 60 KiB of JSON, more than one socket buffer chunk.
    let regions: Vec<_> = (0..480u64)
        .map(|i| region(0x7f00_0000_0000 + i * 0x10_0000, PAGE, i * PAGE))
        .collect();
    let len = serde_json::to_vec(&regions).unwrap().len();
    assert!(len > 40_000 && len <= MAX_PAYLOAD, "{len}");
    let (vmm, handler) = UnixStream::pair().unwrap();
    let sender = std::thread::spawn(move || {
        firecracker::send(&vmm, &regions, &[uffd.as_fd()]).unwrap();
        (vmm, regions)
    });
    let hs = Handshake::recv_timeout(&handler, Duration::from_secs(5)).unwrap();
    let (_vmm, regions) = sender.join().unwrap();
    assert_eq!(hs.regions, regions);
}

#[test]
fn non_blocking_socket_waits_for_a_late_sender() {
    let _g = serial();
    let Some(uffd) = uffd_or_skip("non_blocking_socket", Features::empty()) else {
        return;
    };
    let (vmm, handler) = UnixStream::pair().unwrap();
    handler.set_nonblocking(true).unwrap();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        firecracker::send(&vmm, &[region(0x10000, PAGE, 0)], &[uffd.as_fd()]).unwrap();
        vmm
    });
    let hs = Handshake::recv(&handler).unwrap();
    assert_eq!(hs.regions.len(), 1);
    drop(sender.join().unwrap());
}

#[test]
fn handshake_of_exactly_max_payload_is_accepted() {
    let _g = serial();
    let Some(uffd) = uffd_or_skip("exactly_max_payload", Features::empty()) else {
        return;
    };
    let head = br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}"#;
    let mut payload = head.to_vec();
    payload.resize(MAX_PAYLOAD - 1, b' ');
    payload.push(b']');
    let (vmm, handler) = UnixStream::pair().unwrap();
    let sender = std::thread::spawn(move || {
        firecracker::send_payload(&vmm, &payload, &[uffd.as_fd()]).unwrap();
        vmm
    });
    let hs = Handshake::recv_timeout(&handler, Duration::from_secs(5)).unwrap();
    assert_eq!(hs.regions, [region(4096, 4096, 0)]);
    drop(sender.join().unwrap());
}

// ---------------------------------------------------------------------------
// Hostile and malformed messages
// ---------------------------------------------------------------------------

/// Sends `payload` with `nfds` memfds (the sender keeps the socket open, as
/// Firecracker does), expects `recv_timeout` to fail, checks that no fd
/// leaked, and returns the error's text.
fn rejected(payload: &[u8], nfds: usize) -> String {
    let _g = serial();
    let before = open_fds();
    let msg = {
        let fds: Vec<OwnedFd> = (0..nfds).map(|i| memfd(&format!("fd{i}"))).collect();
        let (vmm, handler) = UnixStream::pair().unwrap();
        let payload = payload.to_vec();
        let sender = std::thread::spawn(move || {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            firecracker::send_payload(&vmm, &payload, &borrowed).unwrap();
            vmm
        });
        let err = Handshake::recv_timeout(&handler, Duration::from_secs(3))
            .expect_err("a hostile handshake was accepted");
        drop(sender.join().unwrap());
        assert!(
            matches!(
                err,
                uffd_gmem::Error::Protocol {
                    op: "firecracker handshake",
                    ..
                }
            ),
            "{err:?}"
        );
        err.to_string()
    };
    assert_eq!(open_fds(), before, "an fd leaked on the error path");
    msg
}

fn json(regions: &[GuestRegionUffdMapping]) -> Vec<u8> {
    serde_json::to_vec(regions).unwrap()
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

#[test]
fn not_json() {
    let m = rejected(b"hello, handler", 1);
    assert_mentions(&m, &["not a JSON array", "hello, handler"]);
    let m = rejected(b"\xff\xfe\x00garbage", 1);
    assert_mentions(&m, &["not a JSON array"]);
}

#[test]
fn json_but_not_an_array() {
    let m = rejected(br#"{"base_host_virt_addr":4096}"#, 1);
    assert_mentions(&m, &["not a JSON array", "expected a sequence"]);
    let m = rejected(b"42", 1);
    assert_mentions(&m, &["expected a sequence"]);
}

#[test]
fn wrong_field_types() {
    let m = rejected(
        br#"[{"base_host_virt_addr":4096,"size":"4096","offset":0,"page_size":4096,"page_size_kib":4096}]"#,
        1,
    );
    assert_mentions(&m, &["invalid type: string \"4096\"", "u64"]);
    let m = rejected(
        br#"[{"base_host_virt_addr":-4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#,
        1,
    );
    assert_mentions(&m, &["invalid value", "-4096"]);
    let m = rejected(
        br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0.5,"page_size":4096,"page_size_kib":4096}]"#,
        1,
    );
    assert_mentions(&m, &["invalid type: floating point"]);
    let m = rejected(
        br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096,"is_guest_memfd":"yes"}]"#,
        1,
    );
    assert_mentions(&m, &["invalid type", "boolean"]);
    let m = rejected(
        br#"[{"base_host_virt_addr":184467440737095516160,"size":4096,"offset":0,"page_size":4096}]"#,
        1,
    );
    assert_mentions(&m, &["not a JSON array"]);
}

#[test]
fn missing_fields() {
    let m = rejected(
        br#"[{"base_host_virt_addr":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#,
        1,
    );
    assert_mentions(&m, &["missing field `size`"]);
    let m = rejected(
        br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#,
        1,
    );
    assert_mentions(&m, &["missing field `page_size`"]);
}

#[test]
fn empty_array() {
    assert_mentions(&rejected(b"[]", 1), &["region array is empty"]);
}

#[test]
fn zero_size_region() {
    assert_mentions(
        &rejected(&json(&[region(0x1000, 0, 0)]), 1),
        &["region 0", "size is 0"],
    );
}

#[test]
fn unaligned_fields() {
    let m = rejected(
        &json(&[region(0x1000, 0x1000, 0), region(0x10800, 0x1000, 0x1000)]),
        1,
    );
    assert_mentions(
        &m,
        &[
            "region 1",
            "base_host_virt_addr 0x10800 is not a multiple of page_size 0x1000",
        ],
    );
    let m = rejected(&json(&[region(0x1000, 0x1800, 0)]), 1);
    assert_mentions(&m, &["size 0x1800 is not a multiple"]);
    let m = rejected(&json(&[region(0x1000, 0x1000, 0x10)]), 1);
    assert_mentions(&m, &["offset 0x10 is not a multiple"]);
    let mut huge = region(0x20_0000, 0x20_0000, 0x1000);
    huge.page_size = 0x20_0000;
    huge.page_size_kib = 0x20_0000;
    let m = rejected(&json(&[huge]), 1);
    assert_mentions(
        &m,
        &["offset 0x1000 is not a multiple of page_size 0x200000"],
    );
}

#[test]
fn overlapping_regions() {
    let m = rejected(
        &json(&[region(0x10000, 0x4000, 0), region(0x12000, 0x1000, 0x4000)]),
        1,
    );
    assert_mentions(&m, &["regions 0 and 1 overlap in the host address space"]);
    let m = rejected(
        &json(&[
            region(0x30000, 0x1000, 0),
            region(0x20000, 0x1000, 0x5000),
            region(0x10000, 0x2000, 0x4000),
        ]),
        1,
    );
    assert_mentions(&m, &["regions 1 and 2 overlap in the snapshot file"]);
    // Identical regions.
    let m = rejected(
        &json(&[region(0x10000, 0x1000, 0), region(0x10000, 0x1000, 0x1000)]),
        1,
    );
    assert_mentions(&m, &["overlap in the host address space"]);
}

#[test]
fn page_size_rules() {
    let mut odd = region(0x10000, 0x3000, 0);
    odd.page_size = 0x3000;
    odd.page_size_kib = 0x3000;
    assert_mentions(
        &rejected(&json(&[odd]), 1),
        &["page_size 0x3000 must be a power of two"],
    );
    let mut small = region(0x10000, 0x1000, 0);
    small.page_size = 512;
    small.page_size_kib = 512;
    assert_mentions(
        &rejected(&json(&[small]), 1),
        &["page_size 0x200 must be a power of two >= 0x1000"],
    );
    let mut huge = region(0x40_0000, 0x20_0000, 0x20_0000);
    huge.page_size = 0x20_0000;
    huge.page_size_kib = 0x20_0000;
    let m = rejected(&json(&[huge.clone(), region(0x1000, 0x1000, 0)]), 1);
    assert_mentions(
        &m,
        &["region 1", "differs from region 0's page_size 0x200000"],
    );
    // page_size_kib is bytes: 4 (as if KiB) is a mismatch.
    let mut kib = region(0x1000, 0x1000, 0);
    kib.page_size_kib = 4;
    assert_mentions(
        &rejected(&json(&[kib]), 1),
        &["page_size_kib 0x4 differs from page_size 0x1000"],
    );
}

#[test]
fn overflowing_regions() {
    let m = rejected(&json(&[region(0xffff_ffff_ffff_f000, 0x2000, 0)]), 1);
    assert_mentions(&m, &["base_host_virt_addr + size overflows u64"]);
    let m = rejected(&json(&[region(0x1000, 0x2000, 0xffff_ffff_ffff_f000)]), 1);
    assert_mentions(&m, &["offset + size overflows u64"]);
}

#[test]
fn wrong_fd_counts_close_every_fd() {
    let main = json(&[region(0x1000, 0x1000, 0)]);
    assert_mentions(
        &rejected(&main, 0),
        &["expected 1 fd (the userfaultfd), received 0 fds"],
    );
    assert_mentions(&rejected(&main, 2), &["expected 1 fd", "received 2 fds"]);
    assert_mentions(&rejected(&main, 3), &["expected 1 fd", "received 3 fds"]);
    assert_mentions(&rejected(&main, 4), &["expected 1 fd", "received 4 fds"]);
    let sh = json(&[sh_region(0x1000, 0x1000, 0, 0)]);
    assert_mentions(
        &rejected(&sh, 1),
        &[
            "expected 3 fds [uffd, guest_memfd, userfault_bitmap]",
            "received 1 fd",
        ],
    );
    assert_mentions(&rejected(&sh, 2), &["expected 3 fds", "received 2 fds"]);
    assert_mentions(&rejected(&sh, 4), &["expected 3 fds", "received 4 fds"]);
    // More than the control buffer holds: the kernel drops the rest.
    assert_mentions(&rejected(&main, 12), &["more than 8 fds (MSG_CTRUNC)"]);
}

#[test]
fn first_fd_must_be_a_userfaultfd() {
    let m = rejected(&json(&[region(0x1000, 0x1000, 0)]), 1);
    assert_mentions(&m, &["the first fd is not a userfaultfd", "memfd:fd0"]);
}

#[test]
fn oversized_message() {
    let mut payload = b"[".to_vec();
    payload.resize(MAX_PAYLOAD + 1000, b' ');
    payload.push(b']');
    assert_mentions(&rejected(&payload, 1), &["larger than 65536 bytes"]);
    // One byte over.
    let mut payload = json(&[region(0x1000, 0x1000, 0)]);
    payload.pop();
    payload.resize(MAX_PAYLOAD, b' ');
    payload.push(b']');
    assert_eq!(payload.len(), MAX_PAYLOAD + 1);
    assert_mentions(&rejected(&payload, 1), &["larger than 65536 bytes"]);
}

#[test]
fn truncated_message_then_close() {
    let _g = serial();
    let before = open_fds();
    {
        let fd = memfd("uffd-stand-in");
        let (vmm, handler) = UnixStream::pair().unwrap();
        firecracker::send_payload(&vmm, br#"[{"base_host_virt_addr":4096,"si"#, &[fd.as_fd()])
            .unwrap();
        drop(vmm);
        drop(fd);
        let err = Handshake::recv(&handler).unwrap_err().to_string();
        assert_mentions(
            &err,
            &[
                "closed the socket in the middle of the handshake",
                "after 32 bytes",
            ],
        );
    }
    assert_eq!(open_fds(), before, "an fd leaked");
}

#[test]
fn truncated_message_left_open_times_out() {
    let m = rejected(br#"[{"base_host_virt_addr":4096,"#, 1);
    assert_mentions(&m, &["timed out after 3s"]);
}

#[test]
fn peer_closes_before_sending() {
    let _g = serial();
    let (vmm, handler) = UnixStream::pair().unwrap();
    drop(vmm);
    let err = Handshake::recv(&handler).unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["peer closed the socket before the handshake"],
    );
    let (vmm, handler) = UnixStream::pair().unwrap();
    drop(vmm);
    let err = Handshake::recv_timeout(&handler, Duration::from_secs(5)).unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["peer closed the socket before the handshake"],
    );
}

#[test]
fn silent_peer_times_out() {
    let _g = serial();
    let (_vmm, handler) = UnixStream::pair().unwrap();
    let t = Instant::now();
    let err = Handshake::recv_timeout(&handler, Duration::from_millis(100)).unwrap_err();
    let took = t.elapsed();
    assert_mentions(
        &err.to_string(),
        &["timed out after 100ms waiting for the handshake"],
    );
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn validate_against_snapshot_rules() {
    let _g = serial();
    let regions = [region(0x10000, 0x2000, 0), region(0x40000, 0x1000, 0x2000)];
    firecracker::validate_against_snapshot(&regions, 0x3000).unwrap();
    let e = firecracker::validate_against_snapshot(&regions, 0x4000).unwrap_err();
    assert_mentions(
        &e.to_string(),
        &["add up to 0x3000 bytes but the memory file is 0x4000 bytes"],
    );
    let e = firecracker::validate_against_snapshot(&regions, 0x2800).unwrap_err();
    assert_mentions(
        &e.to_string(),
        &["region 1 reads snapshot bytes 0x2000..0x3000, past the end"],
    );
    // Sizes add up but a region is placed past the end.
    let gap = [
        region(0x10000, 0x1000, 0x1000),
        region(0x40000, 0x1000, 0x2000),
    ];
    let e = firecracker::validate_against_snapshot(&gap, 0x2000).unwrap_err();
    assert_mentions(
        &e.to_string(),
        &["region 1", "past the end of the 0x2000-byte memory file"],
    );
}

// ---------------------------------------------------------------------------
// Properties of the pure parser
// ---------------------------------------------------------------------------

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn parse_never_panics_on_arbitrary_bytes() {
    let _g = serial();
    runner(2000)
        .run(
            &(proptest::collection::vec(any::<u8>(), 0..512), 0usize..6),
            |(bytes, fds)| {
                let _ = firecracker::parse(&bytes, fds);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn parse_never_panics_on_json_shaped_input() {
    let _g = serial();
    let field = prop_oneof![
        Just("base_host_virt_addr"),
        Just("size"),
        Just("offset"),
        Just("page_size"),
        Just("page_size_kib"),
        Just("gpa_start"),
        Just("is_guest_memfd"),
        Just("other"),
    ];
    let value = prop_oneof![
        any::<u64>().prop_map(|v| v.to_string()),
        (0u64..64).prop_map(|v| (v * 4096).to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1e3".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        Just("\"x\"".to_string()),
        Just("[]".to_string()),
    ];
    let object = proptest::collection::vec((field, value), 0..9).prop_map(|kv| {
        let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    });
    let array = proptest::collection::vec(object, 0..6).prop_map(|o| format!("[{}]", o.join(",")));
    runner(3000)
        .run(&(array, 0usize..5), |(text, fds)| {
            let _ = firecracker::parse(text.as_bytes(), fds);
            Ok(())
        })
        .unwrap();
}

/// Valid region lists: disjoint in host space and in the file, in any order.
fn valid_regions() -> impl Strategy<Value = (Vec<GuestRegionUffdMapping>, usize)> {
    let page = prop_oneof![Just(4096u64), Just(0x20_0000u64)];
    let secret = any::<bool>();
    (
        page,
        secret,
        proptest::collection::vec((1u64..64, 0u64..16, 0u64..4), 1..12),
    )
        .prop_flat_map(|(page, secret, shapes)| {
            let mut base = 0x7f00_0000_0000u64;
            let mut offset = 0u64;
            let regions: Vec<_> = shapes
                .iter()
                .map(|&(pages, host_gap, file_gap)| {
                    base += host_gap * page;
                    offset += file_gap * page;
                    let mut r = GuestRegionUffdMapping::new(base, pages * page, offset, page);
                    if secret {
                        r.gpa_start = Some(offset);
                        r.is_guest_memfd = Some(true);
                    }
                    base += pages * page;
                    offset += pages * page;
                    r
                })
                .collect();
            let fds = if secret { 3 } else { 1 };
            (Just(regions).prop_shuffle(), Just(fds))
        })
}

#[test]
fn valid_region_lists_round_trip() {
    let _g = serial();
    runner(1000)
        .run(&valid_regions(), |(regions, fds)| {
            let payload = serde_json::to_vec(&regions).unwrap();
            let parsed = firecracker::parse(&payload, fds)
                .map_err(|e| TestCaseError::fail(format!("{e} for {regions:?}")))?;
            prop_assert_eq!(&parsed, &regions);
            // The wrong fd count is always refused.
            prop_assert!(firecracker::parse(&payload, fds + 1).is_err());
            // Every address of every region maps back into its region.
            for r in &regions {
                let last = r.base_host_virt_addr + r.size - 1;
                prop_assert_eq!(r.snapshot_offset(last), Some(r.offset + r.size - 1));
                prop_assert_eq!(r.snapshot_offset(r.base_host_virt_addr + r.size), None);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_moved_region_that_overlaps_is_refused() {
    let _g = serial();
    runner(500)
        .run(
            &(valid_regions(), any::<prop::sample::Index>()),
            |((mut regions, fds), ix)| {
                if regions.len() < 2 {
                    return Ok(());
                }
                let i = ix.index(regions.len());
                let j = (i + 1) % regions.len();
                regions[j].base_host_virt_addr = regions[i].base_host_virt_addr;
                let err = firecracker::parse(&serde_json::to_vec(&regions).unwrap(), fds)
                    .expect_err("overlap accepted")
                    .to_string();
                prop_assert!(err.contains("overlap in the host address space"), "{}", err);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn received_fds_are_close_on_exec() {
    let _g = serial();
    let Some(uffd) = uffd_or_skip("received_fds_are_close_on_exec", Features::empty()) else {
        return;
    };
    let (vmm, handler) = UnixStream::pair().unwrap();
    firecracker::send(&vmm, &[region(0x10000, PAGE, 0)], &[uffd.as_fd()]).unwrap();
    let hs = Handshake::recv(&handler).unwrap();
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(hs.uffd.as_raw_fd(), libc::F_GETFD) };
    assert!(flags >= 0 && flags & libc::FD_CLOEXEC != 0, "{flags:#x}");
}

#[test]
fn handshake_feeds_a_fault_server() {
    use uffd_gmem::serve::{Region, Server};
    let _g = serial();
    let Some(uffd) = uffd_or_skip("handshake_feeds_a_fault_server", Features::empty()) else {
        return;
    };
    // The VMM: two regions of guest memory, registered MISSING, handed over.
    let mem = Mem::anon(8 * PAGE);
    let regions = vec![
        region(mem.addr, 3 * PAGE, 0),
        region(mem.addr + 4 * PAGE, 4 * PAGE, 3 * PAGE),
    ];
    // SAFETY: `mem` is a mapping no Rust reference points into; it outlives
    // the server and is only read through raw pointers below.
    unsafe {
        uffd.register(mem.addr..mem.addr + 3 * PAGE, RegisterMode::MISSING)
            .unwrap();
        uffd.register(
            mem.addr + 4 * PAGE..mem.addr + 8 * PAGE,
            RegisterMode::MISSING,
        )
        .unwrap();
    }
    let (vmm, handler) = UnixStream::pair().unwrap();
    firecracker::send(&vmm, &regions, &[uffd.as_fd()]).unwrap();

    // The handler: snapshot bytes = page index in every u64.
    let snapshot: Vec<u8> = (0..7 * PAGE / 8)
        .flat_map(|i| (i * 8 / PAGE).to_ne_bytes())
        .collect();
    let hs = Handshake::recv_timeout(&handler, Duration::from_secs(5)).unwrap();
    hs.validate_against_snapshot(snapshot.len() as u64).unwrap();
    let mut builder = Server::builder(hs.uffd).source(snapshot).workers(2);
    for r in &hs.regions {
        builder =
            builder.region(Region::new(r.base_host_virt_addr, r.size).source_offset(r.offset));
    }
    let server = builder.spawn().unwrap();

    // The guest touches every page; each holds its snapshot page's index.
    for (host, file_page) in [(0, 0), (1, 1), (2, 2), (4, 3), (5, 4), (6, 5), (7, 6)] {
        let addr = mem.addr + host * PAGE + 16;
        // SAFETY: inside `mem`; the server fills the page before the read
        // returns.
        let v = unsafe { std::ptr::read_volatile(addr as *const u64) };
        assert_eq!(v, file_page, "host page {host}");
    }
    let stats = server.shutdown().unwrap();
    assert!(stats.errors.is_empty(), "{:?}", stats.errors);
    assert_eq!(stats.pages_copied, 7);
    drop(uffd);
}

// ---------------------------------------------------------------------------
// The parser against an independent oracle
// ---------------------------------------------------------------------------

/// The documented rules in the parser's order: the phrase the refusal of
/// `regions` with `fds` fds must contain, or `None` when it must be accepted.
fn broken_rule(regions: &[GuestRegionUffdMapping], fds: usize) -> Option<&'static str> {
    if regions.is_empty() {
        return Some("the region array is empty");
    }
    let secret = regions.iter().any(|r| r.is_guest_memfd == Some(true));
    match (secret, fds) {
        (true, 3) | (false, 1) => {}
        (true, _) => return Some("expected 3 fds [uffd, guest_memfd, userfault_bitmap]"),
        (false, _) => return Some("expected 1 fd (the userfaultfd)"),
    }
    let page = regions[0].page_size;
    for r in regions {
        if !r.page_size.is_power_of_two() || r.page_size < firecracker::MIN_PAGE_SIZE {
            return Some("must be a power of two >= 0x1000");
        }
        if r.page_size != page {
            return Some("differs from region 0's page_size");
        }
        if r.page_size_kib != r.page_size {
            return Some("differs from page_size");
        }
        if r.size == 0 {
            return Some("size is 0");
        }
        if r.size % page != 0 || r.base_host_virt_addr % page != 0 || r.offset % page != 0 {
            return Some("is not a multiple of page_size");
        }
        if r.base_host_virt_addr.checked_add(r.size).is_none() {
            return Some("base_host_virt_addr + size overflows u64");
        }
        if r.offset.checked_add(r.size).is_none() {
            return Some("offset + size overflows u64");
        }
    }
    let overlap = |f: &dyn Fn(&GuestRegionUffdMapping) -> (u64, u64)| {
        regions.iter().enumerate().any(|(i, a)| {
            regions[i + 1..].iter().any(|b| {
                let ((a0, a1), (b0, b1)) = (f(a), f(b));
                a0 < b1 && b0 < a1
            })
        })
    };
    if overlap(&|r| (r.base_host_virt_addr, r.base_host_virt_addr + r.size)) {
        return Some("overlap in the host address space");
    }
    if overlap(&|r| (r.offset, r.offset + r.size)) {
        return Some("overlap in the snapshot file");
    }
    None
}

/// Values near the rules' edges.
fn edgy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..48).prop_map(|n| n * PAGE),
        1 => (0u64..4).prop_map(|n| n * 0x20_0000),
        1 => (0u64..48).prop_map(|n| n * PAGE + 0x800),
        1 => (0u64..3).prop_map(|n| u64::MAX - PAGE + 1 - n * PAGE),
        1 => any::<u64>(),
    ]
}

fn page_sizes() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => Just(PAGE),
        2 => Just(0x20_0000u64),
        1 => Just(0u64),
        1 => Just(2048u64),
        1 => Just(PAGE + 1),
        1 => (0u32..64).prop_map(|b| 1u64 << b),
    ]
}

/// One region as JSON text, with the optional fields present or not, an
/// unknown field now and then, and (rarely) a required field left out or of
/// the wrong type. Returns the text and the mapping it should parse into
/// (`None` for a JSON-level defect).
fn region_json() -> impl Strategy<Value = (String, Option<GuestRegionUffdMapping>)> {
    (
        (edgy(), edgy(), edgy(), page_sizes()),
        prop_oneof![4 => Just(None), 1 => page_sizes().prop_map(Some)],
        proptest::option::of(edgy()),
        proptest::option::of(any::<bool>()),
        any::<bool>(),
        prop_oneof![12 => Just(None), 1 => (0usize..4, any::<bool>()).prop_map(Some)],
    )
        .prop_map(
            |((base, size, offset, page), kib, gpa, gmem, extra, defect)| {
                let mut fields = vec![
                    ("base_host_virt_addr", base.to_string()),
                    ("size", size.to_string()),
                    ("offset", offset.to_string()),
                    ("page_size", page.to_string()),
                ];
                let mut want = Some({
                    let mut r = GuestRegionUffdMapping::new(base, size, offset, page);
                    r.page_size_kib = kib.unwrap_or(page);
                    r.gpa_start = gpa;
                    r.is_guest_memfd = gmem;
                    r
                });
                if let Some((i, drop)) = defect {
                    if drop {
                        fields.remove(i);
                    } else {
                        fields[i].1 = "\"4096\"".into();
                    }
                    want = None;
                }
                if let Some(k) = kib {
                    fields.push(("page_size_kib", k.to_string()));
                }
                if let Some(g) = gpa {
                    fields.push(("gpa_start", g.to_string()));
                }
                if let Some(g) = gmem {
                    fields.push(("is_guest_memfd", g.to_string()));
                }
                if extra {
                    fields.push(("slot", "[1, {\"x\": null}]".into()));
                }
                let body: Vec<String> =
                    fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                (format!("{{{}}}", body.join(",")), want)
            },
        )
}

/// Arbitrary region lists and fd counts, as JSON with every optional field
/// present or absent: accepted exactly when the oracle finds every rule
/// kept, with the regions it describes; otherwise refused with
/// `Error::Protocol` whose text names the first broken rule.
#[test]
fn parse_agrees_with_the_documented_rules() {
    let _g = serial();
    let lists = proptest::collection::vec(region_json(), 0..5);
    runner(3000)
        .run(&(lists, 0usize..=4), |(list, fds)| {
            let text = format!(
                "[{}]",
                list.iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let want: Option<Vec<GuestRegionUffdMapping>> =
                list.into_iter().map(|(_, r)| r).collect();
            let got = firecracker::parse(text.as_bytes(), fds);
            let Some(want) = want else {
                // A field missing or of the wrong type.
                let msg = got
                    .expect_err("a defective region was accepted")
                    .to_string();
                prop_assert!(
                    msg.contains("not a JSON array of GuestRegionUffdMapping")
                        && (msg.contains("missing field") || msg.contains("invalid type")),
                    "{}",
                    msg
                );
                return Ok(());
            };
            match (broken_rule(&want, fds), got) {
                (None, Ok(regions)) => prop_assert_eq!(regions, want),
                (Some(rule), Err(uffd_gmem::Error::Protocol { op, what })) => {
                    prop_assert_eq!(op, firecracker::OP);
                    prop_assert!(what.contains(rule), "{:?} does not name {:?}", what, rule);
                }
                (rule, got) => {
                    return Err(TestCaseError::fail(format!(
                        "{text} with {fds} fds: oracle {rule:?}, parser {got:?}"
                    )));
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Valid payloads with a few bytes replaced, inserted or removed, and the
/// fd count sometimes wrong: never a panic; anything accepted keeps every
/// rule; anything refused is `Error::Protocol` naming a rule or the JSON
/// defect.
#[test]
fn mutated_valid_payloads() {
    let _g = serial();
    let edit = (0usize..3, any::<prop::sample::Index>(), any::<u8>());
    let phrases = [
        "not a JSON array of GuestRegionUffdMapping",
        "the payload is empty",
        "the region array is empty",
        "expected 3 fds",
        "expected 1 fd",
        "must be a power of two",
        "differs from region 0's page_size",
        "differs from page_size",
        "size is 0",
        "is not a multiple of page_size",
        "overflows u64",
        "overlap in the host address space",
        "overlap in the snapshot file",
    ];
    runner(3000)
        .run(
            &(
                valid_regions(),
                proptest::collection::vec(edit, 1..5),
                prop_oneof![4 => Just(0usize), 1 => 1usize..3],
            ),
            |((regions, fds), edits, fd_skew)| {
                let mut payload = serde_json::to_vec(&regions).unwrap();
                for (kind, at, byte) in edits {
                    match kind {
                        0 if !payload.is_empty() => {
                            let i = at.index(payload.len());
                            payload[i] = byte;
                        }
                        1 => payload.insert(at.index(payload.len() + 1), byte),
                        _ if !payload.is_empty() => {
                            payload.remove(at.index(payload.len()));
                        }
                        _ => {}
                    }
                }
                let fds = (fds + fd_skew) % 5;
                match firecracker::parse(&payload, fds) {
                    Ok(parsed) => {
                        prop_assert_eq!(broken_rule(&parsed, fds), None, "{:?}", parsed);
                    }
                    Err(uffd_gmem::Error::Protocol { op, what }) => {
                        prop_assert_eq!(op, firecracker::OP);
                        prop_assert!(phrases.iter().any(|p| what.contains(p)), "{}", what);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
                }
                Ok(())
            },
        )
        .unwrap();
}
