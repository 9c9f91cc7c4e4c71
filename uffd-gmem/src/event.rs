//! Reading and decoding `struct uffd_msg` records.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::uffd::Uffd;
use kvm_gmem_sys as sys;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The size of one record.
pub const MSG_SIZE: usize = size_of::<sys::uffd_msg>();

/// What kind of fault a page-fault event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// The page is missing (`MISSING` registration).
    Missing,
    /// A write to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP`).
    WriteProtect,
    /// The page is in the page cache but not mapped (`UFFD_PAGEFAULT_FLAG_MINOR`).
    Minor,
    /// An access to a read-write-protected page (`UFFD_PAGEFAULT_FLAG_RWP`, 7.3).
    ReadWriteProtect,
}

/// Whether the faulting access was a read or a write (the kernel may learn
/// to tell more, e.g. instruction fetches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Access {
    /// A read (or an instruction fetch).
    Read,
    /// A write (`UFFD_PAGEFAULT_FLAG_WRITE`).
    Write,
}

/// A decoded record, before any descriptor in it is owned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Msg {
    /// `UFFD_EVENT_PAGEFAULT`.
    Pagefault {
        /// The kind of fault.
        kind: FaultKind,
        /// Read or write.
        access: Access,
        /// The faulting address (page aligned unless `EXACT_ADDRESS`).
        address: u64,
        /// The faulting thread, with `UFFD_FEATURE_THREAD_ID`.
        thread_id: Option<u32>,
    },
    /// `UFFD_EVENT_FORK`: the child's userfaultfd number in this process.
    Fork {
        /// The descriptor number the kernel installed.
        ufd: u32,
    },
    /// `UFFD_EVENT_REMAP`: `mremap` moved `[from, from + len)` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `UFFD_EVENT_REMOVE`: `madvise(MADV_DONTNEED/REMOVE)` dropped `[start, end)`.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `UFFD_EVENT_UNMAP`: `[start, end)` was unmapped.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// An event this crate does not know, with the whole record.
    Unknown {
        /// The event code.
        event: u8,
        /// The 32-byte record.
        raw: [u8; MSG_SIZE],
    },
}

fn u32_at(b: &[u8; MSG_SIZE], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8; MSG_SIZE], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

impl Msg {
    /// Decodes one record. Pure: safe on any input; `thread_id` says whether
    /// `UFFD_FEATURE_THREAD_ID` was enabled (otherwise the field is not
    /// reported).
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] if `bytes` is not exactly one record, or a
    /// page-fault record carries flag bits that contradict each other.
    pub fn decode(bytes: &[u8], thread_id: bool) -> Result<Msg> {
        let op = "decode uffd_msg";
        let b: &[u8; MSG_SIZE] = bytes.try_into().map_err(|_| Error::Protocol {
            op,
            what: format!("a record is {MSG_SIZE} bytes, got {}", bytes.len()),
        })?;
        // Field offsets of the packed record: event at 0, the argument union at 8.
        let a = |i: usize| u64_at(b, 8 + 8 * i);
        Ok(match b[0] {
            sys::UFFD_EVENT_PAGEFAULT => {
                let flags = a(0);
                let wp = flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0;
                let minor = flags & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0;
                let rwp = flags & sys::UFFD_PAGEFAULT_FLAG_RWP != 0;
                let kind = match (wp, minor, rwp) {
                    (false, false, false) => FaultKind::Missing,
                    (true, false, false) => FaultKind::WriteProtect,
                    (false, true, false) => FaultKind::Minor,
                    (false, false, true) => FaultKind::ReadWriteProtect,
                    _ => {
                        return Err(Error::Protocol {
                            op,
                            what: format!("page fault with contradictory flags {flags:#x}"),
                        });
                    }
                };
                let access = if flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0 {
                    Access::Write
                } else {
                    Access::Read
                };
                Msg::Pagefault {
                    kind,
                    access,
                    address: a(1),
                    thread_id: thread_id.then(|| u32_at(b, 24)),
                }
            }
            sys::UFFD_EVENT_FORK => Msg::Fork { ufd: u32_at(b, 8) },
            sys::UFFD_EVENT_REMAP => Msg::Remap {
                from: a(0),
                to: a(1),
                len: a(2),
            },
            sys::UFFD_EVENT_REMOVE => Msg::Remove {
                start: a(0),
                end: a(1),
            },
            sys::UFFD_EVENT_UNMAP => Msg::Unmap {
                start: a(0),
                end: a(1),
            },
            _ => Msg::Unknown {
                event: b[0],
                raw: *b,
            },
        })
    }
}

/// An event, with any descriptor it carries owned. `Send`: it holds
/// addresses as integers, never pointers.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A page fault to resolve.
    Pagefault {
        /// The kind of fault.
        kind: FaultKind,
        /// Read or write.
        access: Access,
        /// The faulting address.
        address: u64,
        /// The faulting thread, with `UFFD_FEATURE_THREAD_ID`.
        thread_id: Option<u32>,
    },
    /// The registered process forked; this is the child's userfaultfd.
    Fork {
        /// The child's userfaultfd, already initialised by the kernel.
        uffd: Uffd,
    },
    /// A registered range moved.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Pages were dropped (`MADV_DONTNEED`/`MADV_REMOVE`).
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// A registered range was unmapped.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// An event this crate does not know, or a record it could not decode
    /// (e.g. a page fault with contradictory flags), with the raw record.
    /// Also a fork record that cannot be trusted to name a descriptor the
    /// kernel installed (read from an fd not confirmed to be a userfaultfd,
    /// see [`Uffd::from_initialized`], or naming no possible descriptor): the
    /// descriptor number in it is not taken over.
    Unknown {
        /// The event code.
        event: u8,
        /// The whole record.
        raw: [u8; MSG_SIZE],
    },
}

static_assertions::assert_impl_all!(Event: Send);

impl Event {
    fn own(msg: Msg) -> Event {
        match msg {
            Msg::Pagefault {
                kind,
                access,
                address,
                thread_id,
            } => Event::Pagefault {
                kind,
                access,
                address,
                thread_id,
            },
            Msg::Fork { ufd } => {
                // SAFETY: `fill` passes fork records on only when they come
                // from a userfaultfd (so the kernel wrote them) and name a
                // valid descriptor number: the kernel installed this
                // descriptor in our table for the event just read, and
                // nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(ufd as i32) };
                Event::Fork {
                    uffd: Uffd::from_initialized(fd),
                }
            }
            Msg::Remap { from, to, len } => Event::Remap { from, to, len },
            Msg::Remove { start, end } => Event::Remove { start, end },
            Msg::Unmap { start, end } => Event::Unmap { start, end },
            Msg::Unknown { event, raw } => Event::Unknown { event, raw },
        }
    }
}

/// A reusable buffer for batched reads.
#[derive(Debug)]
pub struct EventBuffer {
    raw: Vec<u8>,
    events: Vec<Event>,
}

impl EventBuffer {
    /// Room for `n` records per read (at least 1).
    pub fn with_capacity(n: usize) -> EventBuffer {
        let n = n.max(1);
        EventBuffer {
            raw: vec![0; n * MSG_SIZE],
            events: Vec::with_capacity(n),
        }
    }

    /// Reads and decodes a batch. `forks_trusted`: whether fork records come
    /// from the kernel (`fd` is known to be a userfaultfd), so that the
    /// descriptor each names may be owned.
    pub(crate) fn fill(
        &mut self,
        fd: BorrowedFd<'_>,
        thread_id: bool,
        forks_trusted: bool,
    ) -> Result<()> {
        self.events.clear();
        let n = loop {
            // SAFETY: `raw` is a writable buffer of `raw.len()` bytes.
            let n =
                unsafe { libc::read(fd.as_raw_fd(), self.raw.as_mut_ptr().cast(), self.raw.len()) };
            if n >= 0 {
                break n as usize;
            }
            match Errno::last() {
                Errno(libc::EINTR) => continue,
                Errno(libc::EAGAIN) => return Ok(()),
                e => return Err(Error::kernel("read(userfaultfd)", e)),
            }
        };
        if !n.is_multiple_of(MSG_SIZE) {
            return Err(Error::Protocol {
                op: "read(userfaultfd)",
                what: format!("read returned {n} bytes, not a multiple of {MSG_SIZE}"),
            });
        }
        for rec in self.raw[..n].chunks_exact(MSG_SIZE) {
            // A record the crate cannot decode still reaches the caller, raw,
            // so that no event (and no fork descriptor) is lost.
            let raw = || {
                let mut raw = [0u8; MSG_SIZE];
                raw.copy_from_slice(rec);
                Msg::Unknown { event: raw[0], raw }
            };
            let msg = match Msg::decode(rec, thread_id) {
                // Owning the descriptor a fork record names is sound only
                // when the kernel wrote the record (and installed the fd):
                // anything else could name, and so close, any fd of this
                // process. No descriptor number exceeds i32::MAX.
                Ok(Msg::Fork { ufd }) if !forks_trusted || ufd > i32::MAX as u32 => raw(),
                Ok(msg) => msg,
                Err(_) => raw(),
            };
            self.events.push(Event::own(msg));
        }
        Ok(())
    }

    pub(crate) fn drain(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(event: u8, args: [u64; 3]) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[0] = event;
        for (i, a) in args.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        b
    }

    #[test]
    fn decodes_every_event_kind() {
        let pf = rec(0x12, [1 | 4, 0x7000, 42]);
        assert_eq!(
            Msg::decode(&pf, true).unwrap(),
            Msg::Pagefault {
                kind: FaultKind::Minor,
                access: Access::Write,
                address: 0x7000,
                thread_id: Some(42)
            }
        );
        assert_eq!(
            Msg::decode(&rec(0x12, [0, 0x1000, 7]), false).unwrap(),
            Msg::Pagefault {
                kind: FaultKind::Missing,
                access: Access::Read,
                address: 0x1000,
                thread_id: None
            }
        );
        assert_eq!(
            Msg::decode(&rec(0x14, [1, 2, 3]), false).unwrap(),
            Msg::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        );
        assert_eq!(
            Msg::decode(&rec(0x15, [4, 5, 0]), false).unwrap(),
            Msg::Remove { start: 4, end: 5 }
        );
        assert_eq!(
            Msg::decode(&rec(0x16, [6, 7, 0]), false).unwrap(),
            Msg::Unmap { start: 6, end: 7 }
        );
        assert_eq!(
            Msg::decode(&rec(0x13, [9, 0, 0]), false).unwrap(),
            Msg::Fork { ufd: 9 }
        );
        assert!(matches!(
            Msg::decode(&rec(0x99, [0; 3]), false).unwrap(),
            Msg::Unknown { event: 0x99, .. }
        ));
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert!(Msg::decode(&[0u8; 31], false).is_err());
        assert!(Msg::decode(&[0u8; 33], false).is_err());
        assert!(Msg::decode(&[], false).is_err());
        assert!(Msg::decode(&rec(0x12, [2 | 4, 0, 0]), false).is_err());
    }
}
