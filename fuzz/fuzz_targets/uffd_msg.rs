//! Arbitrary bytes through `Event::decode`: the whole input as one record,
//! then every 32-byte record (and the short tail) with and without
//! `UFFD_FEATURE_THREAD_ID`. Never a panic; every record that is not exactly
//! one record, or is a page fault with contradictory kind flags, is a typed
//! `Error::Protocol`; everything else decodes, unknown events keeping the
//! whole record.
//!
//! Then the same bytes (whole records) through the reading path: written
//! into a pipe adopted with `Uffd::from_initialized` (a hostile peer's
//! "userfaultfd") and read back with `read_events`: one event per record,
//! undecodable ones as `Event::Unknown`, and no fork record ever taken for a
//! descriptor to own (the pipe is not a userfaultfd).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};
use uffd_gmem::sys_bindings as sys;
use uffd_gmem::{Access, Error, Event, EventBuffer, MSG_SIZE, Uffd};

/// The pipe: the adopted read end, the write end, a reusable buffer.
struct Pipe {
    uffd: Uffd,
    tx: OwnedFd,
    buf: EventBuffer,
}

fn pipe() -> &'static Mutex<Pipe> {
    static P: OnceLock<Mutex<Pipe>> = OnceLock::new();
    P.get_or_init(|| {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0, "pipe2");
        // SAFETY: both were just returned by pipe2 and are owned by nobody else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Mutex::new(Pipe {
            uffd: Uffd::from_initialized(rx),
            tx,
            buf: EventBuffer::with_capacity(64),
        })
    })
}

fn through_the_reader(data: &[u8]) {
    let whole = &data[..(data.len() / MSG_SIZE).min(64) * MSG_SIZE];
    if whole.is_empty() {
        return;
    }
    let mut p = pipe().lock().unwrap_or_else(|e| e.into_inner());
    let p = &mut *p;
    // SAFETY: `whole` is readable for its length; at most 2 KiB, well under
    // the pipe's capacity, so the write is complete.
    let n = unsafe { libc::write(p.tx.as_raw_fd(), whole.as_ptr().cast(), whole.len()) };
    assert_eq!(n, whole.len() as isize);
    let events: Vec<Event<Uffd>> = p
        .uffd
        .read_events(&mut p.buf)
        .expect("read_events")
        .collect();
    assert_eq!(events.len(), whole.len() / MSG_SIZE);
    for (ev, rec) in events.iter().zip(whole.chunks_exact(MSG_SIZE)) {
        match ev {
            Event::Fork { .. } => panic!("a fork record from a pipe was trusted"),
            Event::Unknown { event, raw } => {
                assert_eq!(*event, rec[0]);
                assert_eq!(&raw[..], rec);
            }
            _ => assert!(Event::decode(rec, false).is_ok()),
        }
    }
}

fn check(rec: &[u8], tid: bool) {
    let r = Event::decode(rec, tid);
    if rec.len() != MSG_SIZE {
        assert!(
            matches!(
                &r,
                Err(Error::Protocol {
                    op: "decode uffd_msg",
                    ..
                })
            ),
            "{} bytes: {r:?}",
            rec.len()
        );
        return;
    }
    let event = rec[0];
    let arg = |i: usize| u64::from_ne_bytes(rec[8 + 8 * i..16 + 8 * i].try_into().unwrap());
    match r {
        Ok(Event::Pagefault {
            access,
            address,
            thread_id,
            ..
        }) => {
            assert_eq!(event, sys::UFFD_EVENT_PAGEFAULT);
            assert_eq!(address, arg(1));
            assert_eq!(thread_id.is_some(), tid);
            let write = arg(0) & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0;
            assert_eq!(access == Access::Write, write);
        }
        Ok(Event::Fork { uffd }) => {
            assert_eq!(event, sys::UFFD_EVENT_FORK);
            assert_eq!(u64::from(uffd), arg(0) & 0xffff_ffff);
        }
        Ok(Event::Remap { from, to, len }) => {
            assert_eq!(event, sys::UFFD_EVENT_REMAP);
            assert_eq!((from, to, len), (arg(0), arg(1), arg(2)));
        }
        Ok(Event::Remove { start, end }) => {
            assert_eq!(event, sys::UFFD_EVENT_REMOVE);
            assert_eq!((start, end), (arg(0), arg(1)));
        }
        Ok(Event::Unmap { start, end }) => {
            assert_eq!(event, sys::UFFD_EVENT_UNMAP);
            assert_eq!((start, end), (arg(0), arg(1)));
        }
        Ok(Event::Unknown { event: e, raw }) => {
            assert_eq!(e, rec[0]);
            assert_eq!(&raw[..], rec);
            assert!(!(sys::UFFD_EVENT_PAGEFAULT..=sys::UFFD_EVENT_UNMAP).contains(&event));
        }
        Ok(other) => panic!("a variant this target does not know: {other:?}"),
        Err(Error::Protocol { op, what }) => {
            assert_eq!(op, "decode uffd_msg");
            assert_eq!(event, sys::UFFD_EVENT_PAGEFAULT, "{what}");
            let kinds = [
                sys::UFFD_PAGEFAULT_FLAG_WP,
                sys::UFFD_PAGEFAULT_FLAG_MINOR,
                sys::UFFD_PAGEFAULT_FLAG_RWP,
            ]
            .iter()
            .filter(|&&f| arg(0) & f != 0)
            .count();
            assert!(kinds > 1, "refused a consistent page fault: {what}");
        }
        Err(e) => panic!("an untyped refusal: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    for tid in [false, true] {
        check(data, tid);
        for rec in data.chunks(MSG_SIZE) {
            check(rec, tid);
        }
    }
    through_the_reader(data);
});
