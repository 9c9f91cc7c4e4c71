//! The secret-hiding fault channel: framing, bitcode bytes, partial I/O,
//! malformed frames, and (feature `firecracker-secret-hiding`)
//! `UserfaultServer` end to end on a memfd standing in for the guest_memfd.

use proptest::prelude::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;
use uffd_gmem::Error;
use uffd_gmem::firecracker::{
    CHANNEL_OP, FRAME_HEADER, FaultChannel, FaultReply, FaultRequest, MAX_FRAME,
};

/// Firecracker's definitions, field for field (`uffd_broker.rs`): the bytes
/// the crate puts on the wire must be what bitcode makes of these.
mod firecracker_side {
    #[derive(bitcode::Encode, bitcode::Decode, Debug, PartialEq)]
    pub struct FaultRequest {
        pub vcpu: u32,
        pub offset: u64,
        pub flags: u64,
        pub gpa: Option<u64>,
    }

    #[derive(bitcode::Encode, bitcode::Decode, Debug, PartialEq)]
    pub struct FaultReply {
        pub vcpu: Option<u32>,
        pub offset: u64,
        pub len: u64,
        pub flags: u64,
        pub gpa: Option<u64>,
        pub zero: bool,
    }
}

fn pair() -> (FaultChannel, FaultChannel) {
    let (a, b) = UnixStream::pair().unwrap();
    // Firecracker's end is non-blocking; the handler's end is left blocking
    // here, so both modes are exercised.
    a.set_nonblocking(true).unwrap();
    (FaultChannel::new(a), FaultChannel::new(b))
}

fn req(i: u32) -> FaultRequest {
    FaultRequest {
        vcpu: i,
        offset: u64::from(i) * 3,
        flags: 1 << 4 | u64::from(i),
        gpa: i
            .is_multiple_of(2)
            .then_some(0x10_0000 + u64::from(i) * 0x1000),
    }
}

fn reply(i: u32) -> FaultReply {
    FaultReply {
        vcpu: (!i.is_multiple_of(3)).then_some(i),
        offset: u64::from(i) << 12,
        len: 4096,
        flags: u64::from(i),
        gpa: Some(u64::MAX - u64::from(i)),
        zero: i % 2 == 1,
    }
}

fn is_channel_protocol(e: &Error, needle: &str) -> bool {
    matches!(e, Error::Protocol { op: CHANNEL_OP, what } if what.contains(needle))
}

#[test]
fn round_trip_both_ways_interleaved() {
    let (vmm, handler) = pair();
    // Requests and replies cross on one socket in both directions at once.
    for i in 0..4 {
        vmm.send_request(&req(i)).unwrap();
        handler.send_reply(&reply(i)).unwrap();
    }
    for i in 0..4 {
        assert_eq!(handler.recv_request().unwrap(), Some(req(i)));
        assert_eq!(vmm.recv_reply().unwrap(), Some(reply(i)));
    }
    // Extreme values survive.
    let max = FaultRequest {
        vcpu: u32::MAX,
        offset: u64::MAX,
        flags: u64::MAX,
        gpa: Some(u64::MAX),
    };
    vmm.send_request(&max).unwrap();
    vmm.send_request(&FaultRequest::default()).unwrap();
    assert_eq!(handler.recv_request().unwrap(), Some(max));
    assert_eq!(
        handler.recv_request().unwrap(),
        Some(FaultRequest::default())
    );
}

#[test]
fn concurrent_senders_and_a_receiver_keep_frames_whole() {
    let (vmm, handler) = pair();
    let n = 200u32;
    thread::scope(|s| {
        // Four threads reply at once on the handler's blocking end; the
        // non-blocking VMM end polls for each frame.
        for t in 0..4 {
            let handler = &handler;
            s.spawn(move || {
                for i in (t..n).step_by(4) {
                    handler.send_reply(&reply(i)).unwrap();
                }
            });
        }
        let mut seen: Vec<u32> = (0..n)
            .map(|_| {
                let r = vmm.recv_reply().unwrap().unwrap();
                u32::try_from(r.offset >> 12).unwrap()
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    });
}

#[test]
fn frames_split_across_partial_writes() {
    let (mut raw, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let handler = FaultChannel::new(theirs);
    let mut bytes = Vec::new();
    for i in 0..3 {
        bytes.extend_from_slice(&req(i).to_frame());
    }
    let writer = thread::spawn(move || {
        // One byte at a time, pausing inside the header and the payload, so
        // the non-blocking reader sees EAGAIN mid-frame.
        for b in bytes {
            raw.write_all(&[b]).unwrap();
            thread::sleep(Duration::from_micros(300));
        }
        raw
    });
    for i in 0..3 {
        assert_eq!(handler.recv_request().unwrap(), Some(req(i)));
    }
    drop(writer.join().unwrap());
    assert_eq!(handler.recv_request().unwrap(), None, "EOF between frames");

    // Several frames in one write, read one at a time.
    let (mut raw, theirs) = UnixStream::pair().unwrap();
    let vmm = FaultChannel::new(theirs);
    let all: Vec<u8> = (0..5).flat_map(|i| reply(i).to_frame()).collect();
    raw.write_all(&all).unwrap();
    for i in 0..5 {
        assert_eq!(vmm.recv_reply().unwrap(), Some(reply(i)));
    }
}

#[test]
fn frame_is_length_prefix_then_bitcode_bytes() {
    for i in 0..6 {
        let r = req(i);
        let fc = firecracker_side::FaultRequest {
            vcpu: r.vcpu,
            offset: r.offset,
            flags: r.flags,
            gpa: r.gpa,
        };
        let payload = bitcode::encode(&r);
        assert_eq!(
            payload,
            bitcode::encode(&fc),
            "Firecracker's struct, same bytes"
        );
        let frame = r.to_frame();
        assert_eq!(frame[..FRAME_HEADER], (payload.len() as u32).to_le_bytes());
        assert_eq!(frame[FRAME_HEADER..], payload[..]);
        // Firecracker decodes what we send.
        assert_eq!(
            bitcode::decode::<firecracker_side::FaultRequest>(&payload).unwrap(),
            fc
        );

        let p = reply(i);
        let fc = firecracker_side::FaultReply {
            vcpu: p.vcpu,
            offset: p.offset,
            len: p.len,
            flags: p.flags,
            gpa: p.gpa,
            zero: p.zero,
        };
        let payload = bitcode::encode(&fc);
        let frame = p.to_frame();
        assert_eq!(frame[..FRAME_HEADER], (payload.len() as u32).to_le_bytes());
        assert_eq!(frame[FRAME_HEADER..], payload[..]);
        // We decode what Firecracker sends.
        assert_eq!(
            FaultReply::from_frame(&frame).unwrap(),
            Some((p, frame.len()))
        );
    }

    // The bytes themselves, as bitcode 0.6.9 writes them, pinned: a change
    // here is a wire-format change (a bitcode upgrade or a field reordered)
    // that breaks Firecracker.
    let pinned = FaultRequest::sync(1, 0x10_2000, 16).to_frame();
    assert_eq!(hex(&pinned), PINNED_REQUEST, "{}", hex(&pinned));
    let pinned = FaultReply::for_request(&FaultRequest::sync(1, 0x10_2000, 16), 0x2000, 4096);
    assert_eq!(
        hex(&pinned.to_frame()),
        PINNED_REPLY,
        "{}",
        hex(&pinned.to_frame())
    );
}

const PINNED_REQUEST: &str = "0c000000040106000610010200201000";
const PINNED_REPLY: &str = "12000000010401040020040010061001020020100000";

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` from the VMM's side, closes it, and returns the handler's
/// channel.
fn fed(bytes: &[u8]) -> FaultChannel {
    let (mut raw, theirs) = UnixStream::pair().unwrap();
    raw.write_all(bytes).unwrap();
    drop(raw);
    FaultChannel::new(theirs)
}

#[test]
fn malformed_frames_are_typed_errors() {
    // Length 0.
    let e = fed(&0u32.to_le_bytes()).recv_request().unwrap_err();
    assert!(is_channel_protocol(&e, "payload length 0"), "{e}");
    // Too long: refused from the header alone (nothing follows it).
    let e = fed(&(MAX_FRAME + 1).to_le_bytes())
        .recv_request()
        .unwrap_err();
    assert!(is_channel_protocol(&e, "exceeds MAX_FRAME"), "{e}");
    let e = fed(&u32::MAX.to_le_bytes()).recv_reply().unwrap_err();
    assert!(is_channel_protocol(&e, "exceeds MAX_FRAME"), "{e}");
    // Firecracker's unframed exitless-APF text is named.
    let e = fed(b"no_exitless_apf").recv_request().unwrap_err();
    assert!(is_channel_protocol(&e, "exitless-APF"), "{e}");
    // Truncated: in the header, and in the payload.
    let frame = req(2).to_frame();
    let e = fed(&frame[..2]).recv_request().unwrap_err();
    assert!(is_channel_protocol(&e, "after 2 bytes"), "{e}");
    let e = fed(&frame[..frame.len() - 1]).recv_request().unwrap_err();
    assert!(is_channel_protocol(&e, "middle of the frame"), "{e}");
    // Garbage payload of a plausible length, and a valid message with a
    // byte too many: not a FaultRequest.
    let mut garbage = 9u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 9]);
    let e = fed(&garbage).recv_request().unwrap_err();
    assert!(
        is_channel_protocol(&e, "not a bitcode 0.6 FaultRequest"),
        "{e}"
    );
    let payload = bitcode::encode(&req(2));
    let mut long = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    long.extend_from_slice(&payload);
    long.push(0);
    let e = fed(&long).recv_request().unwrap_err();
    assert!(
        is_channel_protocol(&e, "not a bitcode 0.6 FaultRequest"),
        "{e}"
    );
    // A reply is not a request (different shape, different length).
    let e = fed(&reply(1).to_frame()).recv_request().unwrap_err();
    assert!(is_channel_protocol(&e, "FaultRequest"), "{e}");
}

#[test]
fn stream_state_after_errors() {
    // A payload that does not decode was consumed whole: the next frame is
    // read normally.
    let mut bytes = 9u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0xff; 9]);
    bytes.extend_from_slice(&req(4).to_frame());
    let ch = fed(&bytes);
    assert!(ch.recv_request().is_err());
    assert_eq!(ch.recv_request().unwrap(), Some(req(4)));
    assert_eq!(ch.recv_request().unwrap(), None);

    // An over-long length leaves its payload unread: out of step for good.
    let mut bytes = (MAX_FRAME + 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(&req(4).to_frame());
    let ch = fed(&bytes);
    assert!(ch.recv_request().is_err());
    let e = ch.recv_request().unwrap_err();
    assert!(is_channel_protocol(&e, "out of step"), "{e}");

    // Sending to a closed peer: the kernel's EPIPE, no SIGPIPE.
    let (vmm, handler) = pair();
    drop(handler);
    let e = vmm.send_request(&req(0)).unwrap_err();
    assert!(
        matches!(e, Error::Kernel { op, errno } if op.starts_with("sendmsg") && errno.0 == libc::EPIPE),
        "{e}"
    );
}

#[test]
fn the_socket_stays_usable_after_the_channel() {
    let (vmm, handler) = pair();
    vmm.send_request(&req(1)).unwrap();
    let mut raw = handler.into_inner();
    let mut buf = vec![0u8; req(1).to_frame().len()];
    raw.read_exact(&mut buf).unwrap();
    assert_eq!(buf, req(1).to_frame());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any bytes, cut anywhere: typed errors or messages, never a panic,
    /// and the stream ends (`None` or an error) once the bytes run out.
    #[test]
    fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let ch = fed(&bytes);
        for _ in 0..=bytes.len() {
            match ch.recv_request() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    prop_assert!(matches!(e, Error::Protocol { op: CHANNEL_OP, .. }), "{e}");
                    break;
                }
            }
        }
        let _ = FaultReply::from_frame(&bytes);
        let _ = FaultRequest::from_frame(&bytes);
    }

    /// A valid header with a random payload: decoded or refused, never a
    /// panic, and a decoded one re-encodes to the same payload.
    #[test]
    fn random_payloads_decode_or_refuse(payload in proptest::collection::vec(any::<u8>(), 1..80)) {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        match FaultReply::from_frame(&frame) {
            Ok(Some((r, used))) => {
                prop_assert_eq!(used, frame.len());
                prop_assert_eq!(r.to_frame(), frame.clone());
            }
            Ok(None) => prop_assert!(false, "a whole frame is never incomplete"),
            Err(e) => prop_assert!(matches!(e, Error::Protocol { op: CHANNEL_OP, .. }), "{e}"),
        }
        let ch = fed(&frame);
        match ch.recv_request() {
            Ok(Some(r)) => prop_assert_eq!(r.to_frame(), frame),
            Ok(None) => prop_assert!(false, "a whole frame was sent"),
            Err(e) => prop_assert!(matches!(e, Error::Protocol { op: CHANNEL_OP, .. }), "{e}"),
        }
    }

    /// Every request and reply round-trips through the socket.
    #[test]
    fn messages_round_trip(
        vcpu in any::<u32>(), offset in any::<u64>(), flags in any::<u64>(),
        gpa in any::<Option<u64>>(), len in any::<u64>(), zero in any::<bool>(),
        rvcpu in any::<Option<u32>>(),
    ) {
        let (vmm, handler) = pair();
        let q = FaultRequest { vcpu, offset, flags, gpa };
        let r = FaultReply { vcpu: rvcpu, offset, len, flags, gpa, zero };
        vmm.send_request(&q).unwrap();
        handler.send_reply(&r).unwrap();
        prop_assert_eq!(handler.recv_request().unwrap(), Some(q));
        prop_assert_eq!(vmm.recv_reply().unwrap(), Some(r));
    }
}

#[cfg(feature = "firecracker-secret-hiding")]
mod userfault_server {
    use super::*;
    use kvm_gmem::UserfaultBitmap;
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::FileExt;
    use uffd_gmem::firecracker::{GuestRegionUffdMapping, USERFAULT_OP, UserfaultServer};

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create returns a new fd (checked), owned by nobody else.
        let raw = unsafe { libc::memfd_create(c"gmem-stand-in".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is that new fd.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        f.set_len(len).unwrap();
        f
    }

    fn region(base: u64, size: u64, offset: u64, gpa: u64) -> GuestRegionUffdMapping {
        let mut r = GuestRegionUffdMapping::new(base, size, offset, uffd_gmem::page_size());
        r.gpa_start = Some(gpa);
        r.is_guest_memfd = Some(true);
        r
    }

    /// The sync vCPU fault flow end to end: Firecracker's side sends a
    /// request over the channel, the handler serves it into the stand-in
    /// guest_memfd through a bitmap shared as a memfd, and the reply goes
    /// back.
    #[test]
    fn serves_requests_over_the_channel() {
        let page = uffd_gmem::page_size();
        let total = 16 * page;
        let snapshot: Vec<u8> = (0..total).map(|i| (i / page) as u8 ^ 0xa5).collect();
        // Two regions: GPA 0.. (8 pages, file 0..) and GPA 4 GiB.. (8 pages).
        let regions = [
            region(0x7f00_0000_0000, 8 * page, 0, 0),
            region(0x7f00_1000_0000, 8 * page, 8 * page, 1 << 32),
        ];
        let gmem = memfd(total);
        // The VMM's bitmap, handed over as a memfd to the handler.
        let vmm_bitmap = UserfaultBitmap::memfd(16, true).unwrap();
        let fd = vmm_bitmap.fd().unwrap().try_clone_to_owned().unwrap();
        let bitmap = UserfaultBitmap::from_fd(fd, 16).unwrap();
        let server = UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot).unwrap();

        let (vmm, handler) = pair();
        let gpa = (1 << 32) + 3 * page + 0x10; // page 3 of region 1 = file page 11
        vmm.send_request(&FaultRequest::sync(5, gpa, 1 << 4))
            .unwrap();
        let req = handler.recv_request().unwrap().unwrap();
        handler.send_reply(&server.serve(&req).unwrap()).unwrap();
        let reply = vmm.recv_reply().unwrap().unwrap();
        assert_eq!(
            reply,
            FaultReply {
                vcpu: Some(5),
                offset: 11 * page,
                len: page,
                flags: 1 << 4,
                gpa: Some(gpa),
                zero: false,
            }
        );
        // The page holds the snapshot's page; its neighbours are untouched.
        let mut buf = vec![0u8; page as usize];
        gmem.read_exact_at(&mut buf, 11 * page).unwrap();
        assert_eq!(
            buf[..],
            snapshot[(11 * page) as usize..(12 * page) as usize]
        );
        gmem.read_exact_at(&mut buf, 10 * page).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // The bit is clear in the VMM's mapping too, and only that bit.
        assert!(!vmm_bitmap.is_set(11));
        assert_eq!((0..16).filter(|&i| vmm_bitmap.is_set(i)).count(), 15);

        // A second request for the page (its bit clear: populated) writes
        // nothing: the stand-in's page, changed meanwhile, keeps its bytes.
        gmem.write_all_at(&[0x11], 11 * page).unwrap();
        let again = server.serve(&FaultRequest::sync(6, gpa, 1 << 4)).unwrap();
        assert_eq!((again.vcpu, again.offset), (Some(6), 11 * page));
        let mut b = [0u8];
        gmem.read_exact_at(&mut b, 11 * page).unwrap();
        assert_eq!(b, [0x11]);

        // A page the VMM cleared itself (kvm-clock) is not written either.
        vmm_bitmap.clear(0);
        server.serve(&FaultRequest::sync(0, 0, 1 << 4)).unwrap();
        gmem.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0]);

        // A GPA outside every region: typed, and no bit changes.
        let e = server
            .serve(&FaultRequest::sync(1, 8 * page, 1 << 4))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Protocol {
                    op: USERFAULT_OP,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!((0..16).filter(|&i| vmm_bitmap.is_set(i)).count(), 14);
    }

    #[test]
    fn construction_checks_sizes() {
        let page = uffd_gmem::page_size();
        let regions = [region(0x7f00_0000_0000, 8 * page, 0, 0)];
        let snapshot = vec![0u8; (8 * page) as usize];
        let bitmap = UserfaultBitmap::new(8, true);
        let invalid = |e: Error, needle: &str| {
            assert!(
                matches!(&e, Error::Invalid { op: USERFAULT_OP, rule } if rule.contains(needle)),
                "{e}"
            );
        };
        let small = memfd(4 * page);
        invalid(
            UserfaultServer::from_fd(small.as_fd(), &bitmap, &regions, &snapshot).unwrap_err(),
            "the guest_memfd",
        );
        let gmem = memfd(8 * page);
        invalid(
            UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot[..10]).unwrap_err(),
            "the snapshot",
        );
        let short = UserfaultBitmap::new(7, true);
        invalid(
            UserfaultServer::from_fd(gmem.as_fd(), &short, &regions, &snapshot).unwrap_err(),
            "the userfault bitmap",
        );
        let mut plain = regions.clone();
        plain[0].is_guest_memfd = Some(false);
        invalid(
            UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &plain, &snapshot).unwrap_err(),
            "no region has is_guest_memfd",
        );
        let overlapping = [
            region(0x7f00_0000_0000, 4 * page, 0, 0),
            region(0x7f00_1000_0000, 4 * page, 4 * page, 2 * page),
        ];
        invalid(
            UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &overlapping, &snapshot).unwrap_err(),
            "overlap",
        );
        assert!(UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot).is_ok());
    }
}
