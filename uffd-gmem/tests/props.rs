//! Property tests of the pure parts: the `uffd_msg` decoder and the flag sets.

mod common;

use proptest::prelude::*;
use uffd_gmem::sys_bindings as sys;
use uffd_gmem::{
    Access, Error, Event, FaultKind, Features, Ioctls, MSG_SIZE, Mode, RegisterMode, Uffd,
};

const PAGEFAULT: u8 = sys::UFFD_EVENT_PAGEFAULT;
const FORK: u8 = sys::UFFD_EVENT_FORK;
const REMAP: u8 = sys::UFFD_EVENT_REMAP;
const REMOVE: u8 = sys::UFFD_EVENT_REMOVE;
const UNMAP: u8 = sys::UFFD_EVENT_UNMAP;

const WRITE: u64 = sys::UFFD_PAGEFAULT_FLAG_WRITE;
const WP: u64 = sys::UFFD_PAGEFAULT_FLAG_WP;
const MINOR: u64 = sys::UFFD_PAGEFAULT_FLAG_MINOR;
const RWP: u64 = sys::UFFD_PAGEFAULT_FLAG_RWP;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A 32-byte record: arbitrary `noise` (reserved bytes and unused argument
/// bytes), with the event code at 0 and `fields` written at their offsets.
fn record(noise: [u8; MSG_SIZE], event: u8, fields: &[(usize, &[u8])]) -> [u8; MSG_SIZE] {
    let mut b = noise;
    b[0] = event;
    for (off, bytes) in fields {
        b[*off..*off + bytes.len()].copy_from_slice(bytes);
    }
    b
}

/// The event code: mostly the known ones, sometimes anything.
fn event_code() -> impl Strategy<Value = u8> {
    prop_oneof![3 => PAGEFAULT..=UNMAP, 1 => any::<u8>()]
}

fn kind_flag(kind: FaultKind) -> u64 {
    match kind {
        FaultKind::Missing => 0,
        FaultKind::WriteProtect => WP,
        FaultKind::Minor => MINOR,
        FaultKind::ReadWriteProtect => RWP,
        _ => unreachable!("a kind this test does not know"),
    }
}

fn fault_kind() -> impl Strategy<Value = FaultKind> {
    prop_oneof![
        Just(FaultKind::Missing),
        Just(FaultKind::WriteProtect),
        Just(FaultKind::Minor),
        Just(FaultKind::ReadWriteProtect),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any byte string: never a panic; anything but one record is a
    /// `Protocol` error.
    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..100), tid in any::<bool>()) {
        let r = Event::decode(&bytes, tid);
        if bytes.len() != MSG_SIZE {
            prop_assert!(matches!(r, Err(Error::Protocol { .. })), "{r:?}");
        }
    }

    /// Exactly one record: decodes unless it is a page fault whose flags name
    /// more than one of WP, MINOR, RWP.
    #[test]
    fn records_decode_unless_contradictory(
        noise in any::<[u8; MSG_SIZE]>(),
        event in event_code(),
        tid in any::<bool>(),
    ) {
        let b = record(noise, event, &[]);
        let flags = u64::from_ne_bytes(b[8..16].try_into().unwrap());
        let kinds = [WP, MINOR, RWP].iter().filter(|&&f| flags & f != 0).count();
        let contradictory = event == PAGEFAULT && kinds > 1;
        let r = Event::decode(&b, tid);
        if contradictory {
            prop_assert!(matches!(r, Err(Error::Protocol { .. })), "{r:?}");
        } else {
            prop_assert!(r.is_ok(), "{r:?}");
        }
    }

    #[test]
    fn pagefault_round_trip(
        noise in any::<[u8; MSG_SIZE]>(),
        kind in fault_kind(),
        write in any::<bool>(),
        other_flags in any::<u64>(),
        address in any::<u64>(),
        ptid in any::<u32>(),
        tid in any::<bool>(),
    ) {
        // Flag bits the decoder does not interpret are carried along.
        let mut flags = other_flags & !(WRITE | WP | MINOR | RWP);
        flags |= kind_flag(kind);
        if write {
            flags |= WRITE;
        }
        // `arg.pagefault`: flags at 8, address at 16, `feat.ptid` (u32) at 24.
        let b = record(noise, PAGEFAULT, &[
            (8, &flags.to_ne_bytes()),
            (16, &address.to_ne_bytes()),
            (24, &ptid.to_ne_bytes()),
        ]);
        let want = Event::Pagefault {
            kind,
            access: if write { Access::Write } else { Access::Read },
            address,
            thread_id: tid.then_some(ptid),
        };
        prop_assert_eq!(Event::decode(&b, tid).unwrap(), want);
    }

    #[test]
    fn fork_round_trip(noise in any::<[u8; MSG_SIZE]>(), ufd in any::<u32>(), tid in any::<bool>()) {
        // `arg.fork.ufd` (u32) at 8.
        let b = record(noise, FORK, &[(8, &ufd.to_ne_bytes())]);
        prop_assert_eq!(Event::decode(&b, tid).unwrap(), Event::Fork { uffd: ufd });
    }

    #[test]
    fn remap_round_trip(
        noise in any::<[u8; MSG_SIZE]>(),
        from in any::<u64>(),
        to in any::<u64>(),
        len in any::<u64>(),
        tid in any::<bool>(),
    ) {
        let b = record(noise, REMAP, &[
            (8, &from.to_ne_bytes()),
            (16, &to.to_ne_bytes()),
            (24, &len.to_ne_bytes()),
        ]);
        prop_assert_eq!(Event::decode(&b, tid).unwrap(), Event::Remap { from, to, len });
    }

    #[test]
    fn remove_and_unmap_round_trip(
        noise in any::<[u8; MSG_SIZE]>(),
        start in any::<u64>(),
        end in any::<u64>(),
        tid in any::<bool>(),
    ) {
        let fields: &[(usize, &[u8])] = &[(8, &start.to_ne_bytes()), (16, &end.to_ne_bytes())];
        prop_assert_eq!(
            Event::decode(&record(noise, REMOVE, fields), tid).unwrap(),
            Event::Remove { start, end }
        );
        prop_assert_eq!(
            Event::decode(&record(noise, UNMAP, fields), tid).unwrap(),
            Event::Unmap { start, end }
        );
    }

    #[test]
    fn unknown_events_keep_the_record(
        noise in any::<[u8; MSG_SIZE]>(),
        event in any::<u8>().prop_filter("an unknown event", |e| !(PAGEFAULT..=UNMAP).contains(e)),
        tid in any::<bool>(),
    ) {
        let b = record(noise, event, &[]);
        prop_assert_eq!(Event::decode(&b, tid).unwrap(), Event::Unknown { event, raw: b });
    }

    /// Unknown bits are kept and printed, never a panic.
    #[test]
    fn flag_sets_debug(bits in any::<u64>()) {
        let f = Features::from_bits_retain(bits);
        prop_assert_eq!(f.bits(), bits);
        let text = format!("{f:?}");
        prop_assert!(!text.is_empty());
        let r = RegisterMode::from_bits_retain(bits);
        prop_assert_eq!(r.bits(), bits);
        let text = format!("{r:?}");
        prop_assert!(!text.is_empty());
        let i = Ioctls::from_bits_retain(bits);
        prop_assert_eq!(i.bits(), bits);
        let text = format!("{i:?}");
        prop_assert!(!text.is_empty());
        let m = Mode::from_bits_retain(bits as u8);
        prop_assert_eq!(m.bits(), bits as u8);
        let text = format!("{m:?}");
        prop_assert!(!text.is_empty());
    }
}

/// Arbitrary records read through `Uffd::read_events` from a pipe adopted
/// as a userfaultfd (what a peer controls when it passes off another fd as
/// its userfaultfd): one event per record, each record that does not decode
/// as `Event::Unknown` with its bytes, and no fork record ever taken for a
/// descriptor to own (it would close an fd of this process).
#[test]
fn records_read_from_a_fake_userfaultfd() {
    use std::os::fd::AsRawFd;
    use uffd_gmem::EventBuffer;

    let (uffd, tx) = common::fake_uffd();
    let buf = std::cell::RefCell::new(EventBuffer::with_capacity(16));
    let record = (event_code(), any::<[u8; MSG_SIZE]>()).prop_map(|(e, mut b)| {
        b[0] = e;
        b
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(record, 1..16), |recs| {
            let bytes = recs.concat();
            // SAFETY: `bytes` is readable for its length (at most 512 bytes,
            // well under a pipe buffer, so the write is whole).
            let n = unsafe { libc::write(tx.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            prop_assert_eq!(n, bytes.len() as isize);
            let mut buf = buf.borrow_mut();
            let events: Vec<Event<Uffd>> = uffd.read_events(&mut buf).unwrap().collect();
            prop_assert_eq!(events.len(), recs.len());
            for (ev, rec) in events.iter().zip(&recs) {
                match ev {
                    Event::Fork { .. } => prop_assert!(false, "a forged fork record was trusted"),
                    Event::Unknown { event, raw } => {
                        prop_assert_eq!(*event, rec[0]);
                        prop_assert_eq!(raw, rec);
                    }
                    _ => prop_assert!(Event::decode(rec, false).is_ok()),
                }
            }
            Ok(())
        })
        .unwrap();
}
