//! What the VMM tells the server: its [`Region`]s, how their faults are
//! resolved ([`Resolve`], [`Backing`]) and what `REMOVE` does
//! ([`RemovePolicy`]). Plain data: validated by
//! [`ServerBuilder::spawn`](super::ServerBuilder::spawn).
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use std::os::fd::OwnedFd;
use std::sync::Arc;

#[cfg(doc)]
use super::{MappedFile, PageSource};

/// How a region's faults are resolved.
///
/// # Examples
///
/// A server whose default is zero-copy `UFFDIO_CONTINUE` needs no page
/// source (a `Copy` region would):
///
/// ```
/// use uffd_gmem::serve::{Backing, Region, Resolve, Server};
/// use uffd_gmem::{HostMapping, Uffd};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::memfd("guest", 4 * page as usize)?;
/// let server = Server::builder(uffd)
///     .region(Region::new(mem.addr(), 4 * page))
///     .resolve(Resolve::Continue(Backing::Prefilled))
///     .spawn()?;
/// assert_eq!(server.shutdown()?.faults, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Resolve {
    /// `UFFDIO_COPY` from the source (MISSING registration; anonymous or
    /// shmem memory).
    Copy,
    /// Fill the page cache, then `UFFDIO_CONTINUE` (MINOR registration on
    /// shmem or guest_memfd); with [`Backing::Prefilled`], only
    /// `UFFDIO_CONTINUE`: zero-copy.
    Continue(Backing),
}

/// How the page cache of a [`Resolve::Continue`] region is filled.
///
/// # Examples
///
/// Zero-copy restore: the snapshot is already in a memfd's page cache, and
/// each `MINOR` fault is answered with `UFFDIO_CONTINUE` alone
/// ([`Backing::Prefilled`]):
///
/// ```
/// use std::os::unix::fs::FileExt;
/// use uffd_gmem::serve::{Region, Server};
/// use uffd_gmem::{Features, HostMapping, RegisterMode, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let wanted = Features::MINOR_SHMEM;
/// let Ok(uffd) = Uffd::builder().require_features(wanted).create() else {
///     return Ok(()); // no userfaultfd, or no MINOR faults on shmem
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::memfd("guest", 4 * page as usize)?;
/// // The snapshot goes into the page cache, not through the mapping.
/// let file = std::fs::File::from(mem.memfd_fd().unwrap().try_clone_to_owned()?);
/// file.write_all_at(&[0x5a; 16], 2 * page)?;
/// uffd.register_mapping(&mem, RegisterMode::MINOR)?;
/// let region = Region::new(mem.addr(), 4 * page).continue_prefilled();
/// let server = Server::builder(uffd).region(region).spawn()?;
/// let mut b = [0u8; 1];
/// mem.read_at(2 * page, &mut b)?; // a MINOR fault, continued
/// assert_eq!(b[0], 0x5a);
/// assert_eq!(server.shutdown()?.pages_continued, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Backing {
    /// It is not: the page cache already holds the region's data (a shmem
    /// memfd or hugetlbfs file the snapshot was written into before the
    /// VMM mapped it), and every fault is answered with `UFFDIO_CONTINUE`
    /// alone: no page source is read, nothing is copied, the server never
    /// writes the file. Built by [`Region::continue_prefilled`]; a server
    /// whose regions are all prefilled needs no
    /// [`source`](super::ServerBuilder::source).
    ///
    /// - **`MAP_SHARED`** guest memory: `UFFDIO_CONTINUE` maps the page
    ///   cache page itself; the guest's writes go to the file.
    /// - **`MAP_PRIVATE`** guest memory (clones of one snapshot, each its own
    ///   private mapping of the same file): `UFFDIO_CONTINUE` maps the page
    ///   cache page read-only, shared by every clone, and the guest's first
    ///   write to it copies it (copy on write): the file and the other
    ///   clones never see the write. (MINOR registration of a private
    ///   shmem mapping needs a kernel that allows it; hugetlbfs allows it.)
    ///
    /// Register the range `MINOR`. A `MISSING` fault (registered
    /// `MISSING | MINOR`) means the page cache lacks the page: after a
    /// `REMOVE` that punched it, it is answered with zeroes; otherwise the
    /// promise was broken, and it is reported in
    /// [`Stats::errors`](super::Stats::errors) (op `"fill"`, an
    /// [`Error::Protocol`]) and answered with zeroes too (as the kernel
    /// would fill a hole), so that the faulter does not fault forever. The
    /// zeroes are an `UFFDIO_COPY`, which on a `MAP_SHARED` mapping adds the
    /// page to the file. Fault-around, prefetch and the populated-page
    /// bitmap work as for the other backings (a window is one
    /// `UFFDIO_CONTINUE` per run of unmapped pages).
    ///
    /// `REMOVE` (see [`RemovePolicy`]): the server assumes the page cache
    /// is the truth, as the kernel does without a userfaultfd. Under
    /// [`RemovePolicy::Unregister`] the kernel serves the range from then
    /// on. Under [`RemovePolicy::ZeroOnNextFault`] the next fault of a
    /// dropped page is answered by what the kernel left: `MADV_DONTNEED`
    /// only unmaps (shared: the page cache keeps the guest's last writes;
    /// private: the private copy is dropped and the snapshot's page shows
    /// again), so its next fault is `MINOR` and is continued, not zeroed;
    /// `MADV_REMOVE` (or a hole punched with `fallocate`) drops the page
    /// cache page, so its next fault is `MISSING` and is answered with
    /// zeroes (or, registered `MINOR` only, the kernel zero-fills it
    /// itself). The server never zeroes a page the page cache still holds.
    Prefilled,
    /// Writes through a second, unregistered shared mapping of the same file
    /// in this process, at `addr` + (fault − region start).
    ///
    /// Built only by the `unsafe` [`Region::continue_via_alias`], whose
    /// contract makes `addr` valid (the variant is `#[non_exhaustive]` so
    /// that safe code elsewhere cannot build one with any address).
    #[non_exhaustive]
    Alias {
        /// The alias mapping's start for this region.
        addr: u64,
    },
    /// `pwrite` to the file at `offset` + (fault − region start) (shmem;
    /// guest_memfd with the RFC write() support). A guest_memfd answers
    /// `EEXIST` for a page that already holds data (filled by a KVM
    /// userfault handler, or faulted in): that page is left as it is and
    /// continued.
    Pwrite {
        /// The file.
        fd: Arc<OwnedFd>,
        /// The file offset of the region's start.
        offset: u64,
    },
}

/// One range the VMM registered: where it lives, where its contents are.
///
/// # Examples
///
/// ```
/// use uffd_gmem::serve::{Region, Server};
/// use uffd_gmem::{Error, Uffd};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let page = uffd_gmem::page_size();
/// // Guest RAM above 4 GiB, the second half of the snapshot.
/// let high = Region::new(0x7f00_0000_0000, 4 * page).source_offset(4 * page).gpa(1 << 32);
/// let shown = format!("{high:?}");
/// assert!(shown.contains(&format!("source_offset: {}", 4 * page)), "{shown}");
/// assert!(shown.contains("gpa: Some(4294967296)"), "{shown}");
/// // Spawning checks the regions: page aligned, inside the source.
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let source = vec![0u8; 4 * page as usize]; // too short for `high`
/// let e = Server::builder(uffd).region(high).source(source).spawn().unwrap_err();
/// assert!(matches!(e, Error::Invalid { .. }), "{e}");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Region {
    pub(super) host: u64,
    pub(super) len: u64,
    pub(super) source_offset: u64,
    /// Informational only: kept for the region's `Debug` output.
    gpa: Option<u64>,
    pub(super) resolve: Option<Resolve>,
}

impl Region {
    /// `len` bytes at `host` in the VMM's address space.
    pub fn new(host: u64, len: u64) -> Region {
        Region {
            host,
            len,
            source_offset: 0,
            gpa: None,
            resolve: None,
        }
    }

    /// Where the region's contents start in the page source.
    pub fn source_offset(mut self, offset: u64) -> Region {
        self.source_offset = offset;
        self
    }

    /// The region's guest physical address. Informational: it appears in
    /// the region's `Debug` output; the server resolves faults by host
    /// address and does not use it.
    pub fn gpa(mut self, gpa: u64) -> Region {
        self.gpa = Some(gpa);
        self
    }

    /// Resolve this region's faults with `UFFDIO_COPY` (overrides the
    /// server's default).
    pub fn resolve_copy(mut self) -> Region {
        self.resolve = Some(Resolve::Copy);
        self
    }

    /// Resolve with `UFFDIO_CONTINUE`, filling the page cache with `pwrite`
    /// on `fd` at `offset` + (fault − start).
    pub fn continue_via_pwrite(mut self, fd: Arc<OwnedFd>, offset: u64) -> Region {
        self.resolve = Some(Resolve::Continue(Backing::Pwrite { fd, offset }));
        self
    }

    /// Resolve with `UFFDIO_CONTINUE` only, never reading the page source:
    /// the page cache of the file the region maps already holds the data
    /// ([`Backing::Prefilled`], zero-copy restore; `MAP_SHARED` or
    /// `MAP_PRIVATE`).
    pub fn continue_prefilled(mut self) -> Region {
        self.resolve = Some(Resolve::Continue(Backing::Prefilled));
        self
    }

    /// Resolve with `UFFDIO_CONTINUE`, filling the page cache through the
    /// alias mapping at `addr`.
    ///
    /// # Safety
    ///
    /// `addr .. addr + len` must be a writable shared mapping, in this
    /// process, of the same file as the registered range, not registered
    /// with a userfaultfd, and it must stay mapped while the server runs;
    /// no Rust reference may point into it (the server writes it with plain
    /// copies).
    ///
    /// The server copies into the alias, in userspace, from the page
    /// source's [`PageSource::as_ptr`] when it returns one: the server's
    /// source must return only pointers valid for reads of the requested
    /// length while the server runs (the crate's [`MappedFile`] and
    /// `Vec<u8>` do).
    pub unsafe fn continue_via_alias(mut self, addr: u64) -> Region {
        self.resolve = Some(Resolve::Continue(Backing::Alias { addr }));
        self
    }
}

/// What to do when the VMM drops pages of a region (`UFFD_EVENT_REMOVE`:
/// `MADV_DONTNEED`/`MADV_REMOVE`, e.g. balloon inflation).
///
/// Under either policy, a fill of the region that was in flight when the
/// `REMOVE` was read (its source already read, its copy not yet issued) is
/// abandoned and its faulters woken, and fills that start while the
/// `REMOVE` is applied wait for it: a page the VMM dropped is not filled
/// again with the source's bytes behind its back. Two windows remain, both
/// found by the loom model of the protocol (`serve/state/loom_model.rs`):
/// a copy issued in the instant between the kernel handing the event to a
/// worker and that worker taking it in, and a fill preempted between its
/// last check and its `UFFDIO_COPY` while the whole `REMOVE` goes by (the
/// kernel drops the pages once the event is read, whatever the server is
/// doing). Either puts the source's bytes back into a dropped page; closing
/// them would take serialising every event read against every copy.
///
/// # Examples
///
/// A balloon drops a page; its next touch gets zeroes from the server:
///
/// ```
/// use uffd_gmem::serve::{Region, RemovePolicy, Server};
/// use uffd_gmem::{Features, HostMapping, RegisterMode, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let Ok(uffd) = Uffd::builder().require_features(Features::EVENT_REMOVE).create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let mem = HostMapping::anonymous(page as usize)?;
/// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
/// let server = Server::builder(uffd)
///     .region(Region::new(mem.addr(), page))
///     .source(vec![7u8; page as usize])
///     .on_remove(RemovePolicy::ZeroOnNextFault)
///     .spawn()?;
/// let mut b = [0u8; 1];
/// mem.read_at(0, &mut b)?; // filled from the source
/// assert_eq!(b[0], 7);
/// // SAFETY: the mapping holds no Rust references; it is only read again.
/// assert_eq!(unsafe { libc::madvise(mem.as_ptr().cast(), page as usize, libc::MADV_DONTNEED) }, 0);
/// mem.read_at(0, &mut b)?; // zeroed, not refilled
/// assert_eq!(b[0], 0);
/// assert_eq!(server.shutdown()?.pages_zeroed, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemovePolicy {
    /// Unregister the range: later faults get fresh zero pages from the
    /// kernel without involving the server (works for every memory type).
    Unregister,
    /// Keep the range registered and answer its next faults with zero pages.
    ZeroOnNextFault,
}

impl Resolve {
    /// Whether faults resolved so read the page source (all but
    /// [`Backing::Prefilled`]).
    pub(super) fn reads_source(&self) -> bool {
        !matches!(self, Resolve::Continue(Backing::Prefilled))
    }
}

/// Checks the regions: non-empty, aligned to `page`, not overlapping, and,
/// unless prefilled (their resolution, or `default`), inside a source of
/// `source_len` bytes (`None`: no source was set).
pub(super) fn validate(
    regions: &[Region],
    default: &Resolve,
    page: u64,
    source_len: Option<u64>,
) -> Result<()> {
    let op = "serve::spawn";
    let mut sorted: Vec<&Region> = regions.iter().collect();
    sorted.sort_by_key(|r| r.host);
    for (i, r) in sorted.iter().enumerate() {
        if r.len == 0
            || !r.host.is_multiple_of(page)
            || !r.len.is_multiple_of(page)
            || !r.source_offset.is_multiple_of(page)
        {
            return Err(Error::invalid(
                op,
                format!(
                    "region {:#x}+{:#x} (source offset {:#x}) must be non-empty and page aligned",
                    r.host, r.len, r.source_offset
                ),
            ));
        }
        if r.host.checked_add(r.len).is_none() {
            return Err(Error::invalid(
                op,
                format!("region {:#x}+{:#x} overflows", r.host, r.len),
            ));
        }
        let reads_source = r.resolve.as_ref().unwrap_or(default).reads_source();
        match (reads_source, source_len, r.source_offset.checked_add(r.len)) {
            (false, _, _) => {}
            (true, None, _) => {
                return Err(Error::invalid(
                    op,
                    format!(
                        "no page source was set, and region {:#x}+{:#x} reads one (only regions \
                         whose page cache is prefilled need none)",
                        r.host, r.len
                    ),
                ));
            }
            (true, Some(source_len), Some(end)) if end <= source_len => {}
            (true, Some(source_len), _) => {
                return Err(Error::invalid(
                    op,
                    format!(
                        "region {:#x}+{:#x} reads source {:#x}..+{:#x}, past its length {:#x}",
                        r.host, r.len, r.source_offset, r.len, source_len
                    ),
                ));
            }
        }
        if let Some(next) = sorted.get(i + 1)
            && r.host + r.len > next.host
        {
            return Err(Error::invalid(
                op,
                format!("regions at {:#x} and {:#x} overlap", r.host, next.host),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        const P: u64 = 4096;
        let ok = |rs: &[Region]| validate(rs, &Resolve::Copy, P, Some(16 * P)).is_ok();
        assert!(ok(&[
            Region::new(0, 4 * P),
            Region::new(4 * P, 4 * P).source_offset(4 * P)
        ]));
        assert!(!ok(&[Region::new(0, 4 * P), Region::new(3 * P, 4 * P)]));
        assert!(!ok(&[Region::new(1, 4 * P)]));
        assert!(!ok(&[Region::new(0, 0)]));
        assert!(!ok(&[Region::new(0, 4 * P).source_offset(13 * P)]));
        assert!(!ok(&[Region::new(u64::MAX - P + 1, P)]));
    }

    #[test]
    fn prefilled_regions_need_no_source() {
        const P: u64 = 4096;
        let prefilled = Resolve::Continue(Backing::Prefilled);
        let v = |rs: &[Region], default: &Resolve, len| validate(rs, default, P, len);
        // Prefilled by the region or by the default: no source, and no
        // source bounds.
        assert!(
            v(
                &[Region::new(0, 4 * P).continue_prefilled()],
                &Resolve::Copy,
                None
            )
            .is_ok()
        );
        assert!(
            v(
                &[Region::new(0, 4 * P).source_offset(64 * P)],
                &prefilled,
                None
            )
            .is_ok()
        );
        assert!(
            v(
                &[Region::new(0, 4 * P)
                    .continue_prefilled()
                    .source_offset(64 * P)],
                &Resolve::Copy,
                Some(P)
            )
            .is_ok()
        );
        // One region that reads the source: refused without one, naming it.
        let e = v(
            &[
                Region::new(0, 4 * P).continue_prefilled(),
                Region::new(4 * P, 4 * P).resolve_copy(),
            ],
            &prefilled,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        assert!(e.to_string().contains("no page source"), "{e}");
        assert!(v(&[Region::new(0, 4 * P)], &Resolve::Copy, None).is_err());
        // Alignment still applies.
        assert!(
            v(
                &[Region::new(1, 4 * P).continue_prefilled()],
                &Resolve::Copy,
                None
            )
            .is_err()
        );
    }
}
