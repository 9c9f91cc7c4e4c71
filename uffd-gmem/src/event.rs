//! Decoding `struct uffd_msg` records: pure, no descriptor, no system call
//! (reading them, and owning the descriptor a fork record names, is
//! [`Uffd::read_events`](crate::Uffd::read_events)).

use crate::error::{Error, Result};
use kvm_gmem_sys as sys;

/// The size of one record.
///
/// # Examples
///
/// ```
/// use uffd_gmem::{Event, MSG_SIZE};
///
/// // `struct uffd_msg` is 32 bytes; a read returns whole records.
/// assert_eq!(MSG_SIZE, 32);
/// let bytes = [0u8; 2 * MSG_SIZE];
/// let events: Vec<Event> = bytes
///     .chunks_exact(MSG_SIZE)
///     .map(|rec| Event::decode(rec, false))
///     .collect::<Result<_, _>>()?;
/// assert!(matches!(events[1], Event::Unknown { event: 0, .. }));
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
pub const MSG_SIZE: usize = size_of::<sys::uffd_msg>();

/// What kind of fault a page-fault event reports.
///
/// # Examples
///
/// Each kind has its resolving ioctl:
///
/// ```
/// use uffd_gmem::sys_bindings as sys;
/// use uffd_gmem::{Event, FaultKind, MSG_SIZE};
///
/// let mut rec = [0u8; MSG_SIZE];
/// rec[0] = sys::UFFD_EVENT_PAGEFAULT;
/// rec[8..16].copy_from_slice(&sys::UFFD_PAGEFAULT_FLAG_MINOR.to_ne_bytes());
/// let Event::Pagefault { kind, .. } = Event::decode(&rec, false)? else {
///     unreachable!()
/// };
/// let ioctl = match kind {
///     FaultKind::Missing => "UFFDIO_COPY",
///     FaultKind::Minor => "UFFDIO_CONTINUE",
///     _ => "UFFDIO_WRITEPROTECT / UFFDIO_RWPROTECT",
/// };
/// assert_eq!((kind, ioctl), (FaultKind::Minor, "UFFDIO_CONTINUE"));
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
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
///
/// # Examples
///
/// ```
/// use uffd_gmem::sys_bindings as sys;
/// use uffd_gmem::{Access, Event, MSG_SIZE};
///
/// let mut rec = [0u8; MSG_SIZE];
/// rec[0] = sys::UFFD_EVENT_PAGEFAULT;
/// rec[24..28].copy_from_slice(&42u32.to_ne_bytes()); // the thread id
/// let read = Event::decode(&rec, true)?;
/// assert!(matches!(read, Event::Pagefault { access: Access::Read, thread_id: Some(42), .. }));
/// rec[8..16].copy_from_slice(&sys::UFFD_PAGEFAULT_FLAG_WRITE.to_ne_bytes());
/// let write = Event::decode(&rec, false)?;
/// assert!(matches!(write, Event::Pagefault { access: Access::Write, thread_id: None, .. }));
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Access {
    /// A read (or an instruction fetch).
    Read,
    /// A write (`UFFD_PAGEFAULT_FLAG_WRITE`).
    Write,
}

/// A userfaultfd event: one decoded `struct uffd_msg`. `Send`: addresses
/// are integers, never pointers.
///
/// `Fd` is what a fork record's new userfaultfd is:
///
/// - `Event` (`Fd = u32`), from [`Event::decode`]: the descriptor number the
///   record names, inert. Decoding is pure, so a forged record is harmless:
///   nothing is owned, nothing is closed.
/// - `Event<Uffd>`, from [`Uffd::read_events`]: the child's userfaultfd,
///   owned. The reader adopts it only from a userfaultfd it created or
///   confirmed (see [`Uffd::from_initialized`]); any other fork record
///   becomes [`Event::Unknown`].
///
/// # Examples
///
/// Decoding a hand-built record (a handler reads them with
/// [`Uffd::read_events`]):
///
/// ```
/// use uffd_gmem::sys_bindings as sys;
/// use uffd_gmem::{Access, Event, FaultKind, MSG_SIZE};
///
/// // `struct uffd_msg`: the event code at 0, its arguments from 8.
/// let mut rec = [0u8; MSG_SIZE];
/// rec[0] = sys::UFFD_EVENT_PAGEFAULT;
/// rec[8..16].copy_from_slice(&sys::UFFD_PAGEFAULT_FLAG_WRITE.to_ne_bytes());
/// rec[16..24].copy_from_slice(&0x7000u64.to_ne_bytes());
/// let event = Event::decode(&rec, false)?;
/// let fault = Event::Pagefault {
///     kind: FaultKind::Missing,
///     access: Access::Write,
///     address: 0x7000,
///     thread_id: None,
/// };
/// assert_eq!(event, fault);
/// // Anything but one whole record is an error, never a panic.
/// assert!(Event::decode(&rec[..MSG_SIZE - 1], false).is_err());
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
///
/// [`Uffd::read_events`]: crate::Uffd::read_events
/// [`Uffd::from_initialized`]: crate::Uffd::from_initialized
/// [`Uffd`]: crate::Uffd
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<Fd = u32> {
    /// `UFFD_EVENT_PAGEFAULT`: a page fault to resolve.
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
    /// `UFFD_EVENT_FORK`: the registered process forked; the child's
    /// userfaultfd, already initialised by the kernel.
    Fork {
        /// Its descriptor number (decoded), or the owned userfaultfd (read).
        uffd: Fd,
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
    /// An event this crate does not know, with the whole record. Read with
    /// [`Uffd::read_events`](crate::Uffd::read_events), also a record it
    /// could not decode (e.g. a page fault with contradictory flags), and a
    /// fork record that cannot be trusted to name a descriptor the kernel
    /// installed (read from an fd not confirmed to be a userfaultfd, see
    /// [`Uffd::from_initialized`](crate::Uffd::from_initialized), or naming
    /// no possible descriptor): the descriptor number in it is not taken
    /// over.
    Unknown {
        /// The event code.
        event: u8,
        /// The 32-byte record.
        raw: [u8; MSG_SIZE],
    },
}

static_assertions::assert_impl_all!(Event: Send);

fn u32_at(b: &[u8; MSG_SIZE], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8; MSG_SIZE], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

impl Event {
    /// Decodes one record. Pure: safe on any input; `thread_id` says whether
    /// `UFFD_FEATURE_THREAD_ID` was enabled (otherwise the field is not
    /// reported).
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] if `bytes` is not exactly one record, or a
    /// page-fault record carries flag bits that contradict each other.
    pub fn decode(bytes: &[u8], thread_id: bool) -> Result<Event> {
        Event::decode_with(bytes, thread_id, Some)
    }
}

impl<Fd> Event<Fd> {
    /// [`Event::decode`], a fork record's descriptor number handed to
    /// `fork`: its answer is the event's descriptor, and a record it refuses
    /// (`None`) becomes [`Event::Unknown`]. `fork` is called only once the
    /// record has decoded, so nothing it takes is lost to an error.
    pub(crate) fn decode_with(
        bytes: &[u8],
        thread_id: bool,
        fork: impl FnOnce(u32) -> Option<Fd>,
    ) -> Result<Event<Fd>> {
        let op = "decode uffd_msg";
        let b: &[u8; MSG_SIZE] = bytes.try_into().map_err(|_| Error::Protocol {
            op,
            what: format!("a record is {MSG_SIZE} bytes, got {}", bytes.len()),
        })?;
        // Field offsets of the packed record: event at 0, the argument union at 8.
        let a = |i: usize| u64_at(b, 8 + 8 * i);
        let unknown = || Event::Unknown {
            event: b[0],
            raw: *b,
        };
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
                Event::Pagefault {
                    kind,
                    access,
                    address: a(1),
                    thread_id: thread_id.then(|| u32_at(b, 24)),
                }
            }
            sys::UFFD_EVENT_FORK => {
                fork(u32_at(b, 8)).map_or_else(unknown, |uffd| Event::Fork { uffd })
            }
            sys::UFFD_EVENT_REMAP => Event::Remap {
                from: a(0),
                to: a(1),
                len: a(2),
            },
            sys::UFFD_EVENT_REMOVE => Event::Remove {
                start: a(0),
                end: a(1),
            },
            sys::UFFD_EVENT_UNMAP => Event::Unmap {
                start: a(0),
                end: a(1),
            },
            _ => unknown(),
        })
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
            Event::decode(&pf, true).unwrap(),
            Event::Pagefault {
                kind: FaultKind::Minor,
                access: Access::Write,
                address: 0x7000,
                thread_id: Some(42)
            }
        );
        assert_eq!(
            Event::decode(&rec(0x12, [0, 0x1000, 7]), false).unwrap(),
            Event::Pagefault {
                kind: FaultKind::Missing,
                access: Access::Read,
                address: 0x1000,
                thread_id: None
            }
        );
        assert_eq!(
            Event::decode(&rec(0x14, [1, 2, 3]), false).unwrap(),
            Event::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        );
        assert_eq!(
            Event::decode(&rec(0x15, [4, 5, 0]), false).unwrap(),
            Event::Remove { start: 4, end: 5 }
        );
        assert_eq!(
            Event::decode(&rec(0x16, [6, 7, 0]), false).unwrap(),
            Event::Unmap { start: 6, end: 7 }
        );
        assert_eq!(
            Event::decode(&rec(0x13, [9, 0, 0]), false).unwrap(),
            Event::Fork { uffd: 9 }
        );
        assert!(matches!(
            Event::decode(&rec(0x99, [0; 3]), false).unwrap(),
            Event::Unknown { event: 0x99, .. }
        ));
    }

    #[test]
    fn a_refused_fork_is_unknown_with_its_record() {
        let fork = rec(0x13, [9, 0, 0]);
        assert_eq!(
            Event::<u32>::decode_with(&fork, false, |_| None).unwrap(),
            Event::Unknown {
                event: 0x13,
                raw: fork
            }
        );
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert!(Event::decode(&[0u8; 31], false).is_err());
        assert!(Event::decode(&[0u8; 33], false).is_err());
        assert!(Event::decode(&[], false).is_err());
        assert!(Event::decode(&rec(0x12, [2 | 4, 0, 0]), false).is_err());
    }
}
