//! Serving the secret-hiding branch's sync vCPU faults: a vCPU touched a
//! page whose KVM userfault bit is set, Firecracker sent a [`FaultRequest`];
//! the handler `pwrite`s the page from the snapshot into the guest_memfd
//! (`GUEST_MEMFD_FLAG_WRITE`), clears the page's bit and answers with a
//! [`FaultReply`].
#![allow(unsafe_code)]

use super::{FaultReply, FaultRequest, GuestRegionUffdMapping};
use crate::error::{Errno, Error, Result};
use crate::sys;
use kvm_gmem::{GuestMemfd, GuestMemfdFlags, UserfaultBitmap};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};

/// The operation named in [`UserfaultServer`]'s errors.
pub const USERFAULT_OP: &str = "firecracker userfault";

/// Where a [`FaultRequest`] lands: computed by [`locate`], pure.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct FaultTarget {
    /// Index of the region in the handshake's list.
    pub region: usize,
    /// The file offset of the faulting page, the same in the guest_memfd and
    /// in the snapshot memory file (Firecracker lays both out region after
    /// region, at the regions' `offset`).
    pub offset: u64,
    /// Bytes to populate: the region's page size.
    pub len: u64,
    /// The page's bits in the userfault bitmap (one bit per host page, in
    /// file-offset order).
    pub pages: Range<u64>,
}

fn bad_request(what: String) -> Error {
    Error::Protocol {
        op: USERFAULT_OP,
        what,
    }
}

/// Maps `req` to its page: with a `gpa`, through the guest_memfd region
/// whose `gpa_start .. + size` holds it (file offset = `offset + gpa -
/// gpa_start`); without one, `req.offset` is taken as the file offset. The
/// address is rounded down to the region's page size. `host_page` is the
/// bitmap's page ([`crate::page_size`]).
///
/// # Errors
///
/// [`Error::Protocol`] (op [`USERFAULT_OP`]) when no region with
/// `is_guest_memfd: true` holds the address, or the region has no
/// `gpa_start`.
///
/// # Examples
///
/// ```
/// use uffd_gmem::firecracker::{FaultRequest, GuestRegionUffdMapping, locate};
///
/// // Two regions: GPA 0..1 MiB at file offset 0, GPA 4 GiB.. at 1 MiB.
/// let mut low = GuestRegionUffdMapping::new(0x7f00_0000_0000, 1 << 20, 0, 4096);
/// (low.gpa_start, low.is_guest_memfd) = (Some(0), Some(true));
/// let mut high = GuestRegionUffdMapping::new(0x7f00_0010_0000, 1 << 20, 1 << 20, 4096);
/// (high.gpa_start, high.is_guest_memfd) = (Some(1 << 32), Some(true));
///
/// let t = locate(&[low, high], &FaultRequest::sync(0, (1 << 32) + 0x2345, 16), 4096)?;
/// assert_eq!((t.region, t.offset, t.len), (1, (1 << 20) + 0x2000, 4096));
/// assert_eq!(t.pages, 258..259);
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
pub fn locate(
    regions: &[GuestRegionUffdMapping],
    req: &FaultRequest,
    host_page: u64,
) -> Result<FaultTarget> {
    let gmem = || {
        regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_guest_memfd())
    };
    let (region, r, offset) = match req.gpa {
        Some(gpa) => {
            let mut hit = None;
            for (i, r) in gmem() {
                let start = r.gpa_start.ok_or_else(|| {
                    bad_request(format!(
                        "region {i} has is_guest_memfd but no gpa_start: a GPA cannot be mapped \
                         to it"
                    ))
                })?;
                if gpa >= start && gpa - start < r.size {
                    let offset = r.offset.checked_add(gpa - start).ok_or_else(|| {
                        bad_request(format!("region {i}: offset + (gpa - gpa_start) overflows"))
                    })?;
                    hit = Some((i, r, offset));
                    break;
                }
            }
            hit.ok_or_else(|| {
                bad_request(format!(
                    "vcpu {}: gpa {gpa:#x} lies in no guest_memfd region",
                    req.vcpu
                ))
            })?
        }
        None => gmem()
            .find(|(_, r)| r.snapshot_range().contains(&req.offset))
            .map(|(i, r)| (i, r, req.offset))
            .ok_or_else(|| {
                bad_request(format!(
                    "vcpu {}: no gpa, and file offset {:#x} lies in no guest_memfd region",
                    req.vcpu, req.offset
                ))
            })?,
    };
    let page = r.page_size.max(1);
    let offset = offset - offset % page;
    let host_page = host_page.max(1);
    Ok(FaultTarget {
        region,
        offset,
        len: page,
        pages: offset / host_page..offset.saturating_add(page).div_ceil(host_page),
    })
}

/// Serves [`FaultRequest`]s of the sync vCPU fault flow: for each, the
/// faulting page is `pwrite`n from the snapshot into the guest_memfd (which
/// needs `GUEST_MEMFD_FLAG_WRITE`) unless its userfault bit is already
/// clear, the bit is cleared (release ordering, after the write) and the
/// [`FaultReply`] is built, echoing `vcpu`, `flags` and `gpa`, with the
/// page's file offset and length.
///
/// The kernel refuses to write a page that is already populated (`EEXIST`,
/// `ENOSPC`, or a short write); that page is skipped, not an error: it is
/// there, which is all the vCPU needs.
///
/// It borrows everything it uses and holds no lock: share one between
/// threads (`&UserfaultServer` is `Send`), serving faults concurrently.
///
/// # Examples
///
/// With the handshake's fds (`guest_memfd`, `userfault_bitmap`) and the
/// fault channel, a handler's loop is:
///
/// ```no_run
/// use std::os::unix::net::UnixStream;
/// use uffd_gmem::firecracker::{FaultChannel, Handshake, UserfaultServer};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let (stream, snapshot): (UnixStream, Vec<u8>) = todo!();
/// let hs = Handshake::recv(&stream)?;
/// let (Some(gmem), Some(bitmap_fd)) = (hs.guest_memfd, hs.userfault_bitmap) else {
///     return Err("not a secret-hiding handshake".into());
/// };
/// let pages = hs.regions.iter().map(|r| r.offset + r.size).max().unwrap_or(0)
///     / uffd_gmem::page_size();
/// let bitmap = kvm_gmem::UserfaultBitmap::from_fd(bitmap_fd, pages)?;
/// let server = UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &hs.regions, &snapshot)?;
/// let channel = FaultChannel::new(stream);
/// while let Some(req) = channel.recv_request()? {
///     channel.send_reply(&server.serve(&req)?)?;
/// }
/// # Ok(())
/// # }
/// # use std::os::fd::AsFd;
/// ```
///
/// Served for real on a plain memfd standing in for the guest_memfd (a
/// memfd takes `pwrite` too, but never refuses one):
///
/// ```
/// use std::os::fd::{AsFd, FromRawFd, OwnedFd};
/// use kvm_gmem::UserfaultBitmap;
/// use uffd_gmem::firecracker::{FaultRequest, GuestRegionUffdMapping, UserfaultServer};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let page = uffd_gmem::page_size();
/// let snapshot: Vec<u8> = (0..8 * page).map(|i| (i / page) as u8).collect();
/// let mut region = GuestRegionUffdMapping::new(0x7f00_0000_0000, 8 * page, 0, page);
/// (region.gpa_start, region.is_guest_memfd) = (Some(0x10_0000), Some(true));
/// // SAFETY: memfd_create returns a new fd, owned by nobody else.
/// let gmem = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"gmem".as_ptr(), 0)) };
/// std::fs::File::from(gmem.try_clone()?).set_len(8 * page)?;
/// let bitmap = UserfaultBitmap::new(8, true);
///
/// let regions = [region];
/// let server = UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot)?;
/// let reply = server.serve(&FaultRequest::sync(3, 0x10_0000 + 5 * page, 1 << 4))?;
/// assert_eq!((reply.vcpu, reply.offset, reply.len), (Some(3), 5 * page, page));
/// assert!(!bitmap.is_set(5) && bitmap.is_set(4));
/// let mut byte = [0u8];
/// std::os::unix::fs::FileExt::read_at(&std::fs::File::from(gmem), &mut byte, 5 * page)?;
/// assert_eq!(byte, [5]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UserfaultServer<'a> {
    gmem: BorrowedFd<'a>,
    bitmap: &'a UserfaultBitmap,
    regions: &'a [GuestRegionUffdMapping],
    snapshot: &'a [u8],
    host_page: u64,
}

impl<'a> UserfaultServer<'a> {
    /// A server populating `gmem`, which must have been created with
    /// `GUEST_MEMFD_FLAG_WRITE`.
    ///
    /// For the guest_memfd of Firecracker's handshake, which arrives as a
    /// bare fd whose flags the handshake does not carry, adopt it with
    /// [`GuestMemfd::adopt_with_flags`] and `WRITE` (what Firecracker
    /// creates it with on restore): the fd is checked to be a guest_memfd,
    /// which [`UserfaultServer::from_fd`] does not check. Claim only
    /// `WRITE`: claiming `INIT_SHARED` makes the check fault the first page
    /// in, after which `pwrite` can no longer populate it. `GuestMemfd::adopt`
    /// alone reports no `WRITE` (the kernel cannot tell), and is refused
    /// here.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when `gmem` lacks `GUEST_MEMFD_FLAG_WRITE`;
    /// otherwise as [`UserfaultServer::from_fd`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, UserfaultBitmap};
    /// use std::os::unix::net::UnixStream;
    /// use uffd_gmem::firecracker::{FaultChannel, Handshake, UserfaultServer};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let (stream, snapshot): (UnixStream, Vec<u8>) = todo!();
    /// let hs = Handshake::recv(&stream)?;
    /// let (Some(gmem_fd), Some(bitmap_fd)) = (hs.guest_memfd, hs.userfault_bitmap) else {
    ///     return Err("not a secret-hiding handshake".into());
    /// };
    /// let gmem = GuestMemfd::adopt_with_flags(gmem_fd, GuestMemfdFlags::WRITE)?;
    /// let bitmap = UserfaultBitmap::from_fd(bitmap_fd, gmem.size() / uffd_gmem::page_size())?;
    /// let server = UserfaultServer::new(&gmem, &bitmap, &hs.regions, &snapshot)?;
    /// let channel = FaultChannel::new(stream);
    /// while let Some(req) = channel.recv_request()? {
    ///     channel.send_reply(&server.serve(&req)?)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(
        gmem: &'a GuestMemfd,
        bitmap: &'a UserfaultBitmap,
        regions: &'a [GuestRegionUffdMapping],
        snapshot: &'a [u8],
    ) -> Result<UserfaultServer<'a>> {
        if !gmem.flags().contains(GuestMemfdFlags::WRITE) {
            return Err(Error::Unsupported {
                op: USERFAULT_OP,
                what: "GUEST_MEMFD_FLAG_WRITE",
                evidence: format!(
                    "the guest_memfd was created with flags {}; pwrite populates only one \
                     created with WRITE",
                    gmem.flags()
                ),
            });
        }
        Self::checked(gmem.as_fd(), gmem.size(), bitmap, regions, snapshot)
    }

    /// A server populating the guest_memfd `gmem` as Firecracker hands it
    /// over: the handshake's second fd
    /// ([`Handshake::guest_memfd`](super::Handshake::guest_memfd)), whose
    /// flags the handshake does not carry (Firecracker creates it with
    /// `WRITE` on restore). Its size is read with `fstat`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] (op [`USERFAULT_OP`]) naming the rule: at least one
    /// region has `is_guest_memfd: true`; each such region has a
    /// `gpa_start` aligned to its page size, without overflow, and no two
    /// overlap in guest-physical space; its page size is a multiple of the
    /// host page size; its file range lies inside the snapshot, inside the
    /// guest_memfd, and inside the bitmap (one bit per host page).
    /// [`Error::Io`] naming `fstat(guest_memfd)`.
    pub fn from_fd(
        gmem: BorrowedFd<'a>,
        bitmap: &'a UserfaultBitmap,
        regions: &'a [GuestRegionUffdMapping],
        snapshot: &'a [u8],
    ) -> Result<UserfaultServer<'a>> {
        let io = |source| Error::Io {
            op: "fstat(guest_memfd)",
            source,
        };
        let size = std::fs::File::from(gmem.try_clone_to_owned().map_err(io)?)
            .metadata()
            .map_err(io)?
            .len();
        Self::checked(gmem, size, bitmap, regions, snapshot)
    }

    fn checked(
        gmem: BorrowedFd<'a>,
        gmem_size: u64,
        bitmap: &'a UserfaultBitmap,
        regions: &'a [GuestRegionUffdMapping],
        snapshot: &'a [u8],
    ) -> Result<UserfaultServer<'a>> {
        let host_page = crate::page_size();
        let bad = |rule: String| Err(Error::invalid(USERFAULT_OP, rule));
        let mut gpas = Vec::new();
        for (i, r) in regions
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_guest_memfd())
        {
            let Some(start) = r.gpa_start else {
                return bad(format!("region {i} has is_guest_memfd but no gpa_start"));
            };
            let page = r.page_size;
            if page == 0 || !page.is_multiple_of(host_page) {
                return bad(format!(
                    "region {i}: page_size {page:#x} is not a multiple of the host page size \
                     {host_page:#x} (the bitmap's unit)"
                ));
            }
            if !r.offset.is_multiple_of(page) || !r.size.is_multiple_of(page) {
                return bad(format!(
                    "region {i}: offset {:#x} and size {:#x} must be multiples of page_size \
                     {page:#x}",
                    r.offset, r.size
                ));
            }
            if !start.is_multiple_of(page) || start.checked_add(r.size).is_none() {
                return bad(format!(
                    "region {i}: gpa_start {start:#x} is not aligned to page_size {page:#x}, or \
                     gpa_start + size overflows"
                ));
            }
            let Some(end) = r.offset.checked_add(r.size) else {
                return bad(format!("region {i}: offset + size overflows"));
            };
            for (what, have) in [
                ("the snapshot", snapshot.len() as u64),
                ("the guest_memfd", gmem_size),
                (
                    "the userfault bitmap",
                    bitmap.pages().saturating_mul(host_page),
                ),
            ] {
                if end > have {
                    return bad(format!(
                        "region {i}: file range {:#x}..{end:#x} ends past {what} ({have:#x} bytes)",
                        r.offset
                    ));
                }
            }
            gpas.push((start, start + r.size, i));
        }
        if gpas.is_empty() {
            return bad("no region has is_guest_memfd: true".into());
        }
        gpas.sort_unstable();
        for w in gpas.windows(2) {
            if w[0].1 > w[1].0 {
                return bad(format!(
                    "regions {} and {} overlap in guest-physical space",
                    w[0].2, w[1].2
                ));
            }
        }
        Ok(UserfaultServer {
            gmem,
            bitmap,
            regions,
            snapshot,
            host_page,
        })
    }

    /// Where `req` lands; see [`locate`].
    ///
    /// # Errors
    ///
    /// As [`locate`].
    pub fn locate(&self, req: &FaultRequest) -> Result<FaultTarget> {
        locate(self.regions, req, self.host_page)
    }

    /// Serves `req`: populates the page (each host page whose bit is still
    /// set), clears its bits, and returns the reply to send.
    ///
    /// # Errors
    ///
    /// As [`locate`], and [`Error::Kernel`] naming `pwrite(guest_memfd)`
    /// for an errno other than `EEXIST`/`ENOSPC` (the page's bits are then
    /// left set: the vCPU faults again).
    pub fn serve(&self, req: &FaultRequest) -> Result<FaultReply> {
        let t = self.locate(req)?;
        for (k, bit) in t.pages.clone().enumerate() {
            if !self.bitmap.is_set(bit) {
                continue; // populated already (this path or a uffd COPY)
            }
            let off = t.offset + k as u64 * self.host_page;
            // Inside the snapshot: checked for the whole (page-aligned)
            // region at construction, and `locate` stays inside the region.
            let src = usize::try_from(off)
                .ok()
                .and_then(|o| {
                    self.snapshot
                        .get(o..o.checked_add(self.host_page as usize)?)
                })
                .ok_or_else(|| {
                    bad_request(format!("file offset {off:#x} lies past the snapshot"))
                })?;
            self.write_page(src, off)?;
        }
        self.bitmap.clear_range(t.pages.clone());
        Ok(FaultReply::for_request(req, t.offset, t.len))
    }

    /// One page into the guest_memfd: `true` when written, `false` when the
    /// kernel says it is already populated.
    fn write_page(&self, src: &[u8], offset: u64) -> Result<bool> {
        loop {
            // SAFETY: `src` is a live slice, readable for its length during
            // the call.
            match unsafe { sys::pwrite(self.gmem, src.as_ptr(), src.len(), offset) } {
                Ok(n) => return Ok(n == src.len()),
                Err(Errno(libc::EEXIST | libc::ENOSPC)) => return Ok(false),
                Err(Errno(libc::EINTR)) => {}
                Err(e) => return Err(Error::kernel("pwrite(guest_memfd)", e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, size: u64, offset: u64, gpa: u64) -> GuestRegionUffdMapping {
        let mut r = GuestRegionUffdMapping::new(base, size, offset, 4096);
        r.gpa_start = Some(gpa);
        r.is_guest_memfd = Some(true);
        r
    }

    #[test]
    fn gpa_to_file_offset_and_bits() {
        let regions = [
            region(0x7f00_0000_0000, 0x8_0000, 0, 0),
            region(0x7f00_1000_0000, 0x4_0000, 0x8_0000, 0x1_0000_0000),
        ];
        let t = locate(&regions, &FaultRequest::sync(0, 0x7_f000, 16), 4096).unwrap();
        assert_eq!(
            (t.region, t.offset, t.len, t.pages),
            (0, 0x7_f000, 4096, 127..128)
        );
        // Unaligned GPA: rounded down.
        let t = locate(&regions, &FaultRequest::sync(0, 0x1_0000_1fff, 16), 4096).unwrap();
        assert_eq!((t.region, t.offset, t.pages), (1, 0x8_1000, 129..130));
        // Last byte of the last region; one past it.
        assert!(locate(&regions, &FaultRequest::sync(0, 0x1_0003_ffff, 16), 4096).is_ok());
        let e = locate(&regions, &FaultRequest::sync(7, 0x1_0004_0000, 16), 4096).unwrap_err();
        assert!(
            matches!(&e, Error::Protocol { op: USERFAULT_OP, what } if what.contains("vcpu 7"))
        );
        // Between the regions.
        assert!(locate(&regions, &FaultRequest::sync(0, 0x8_0000, 16), 4096).is_err());
        // No gpa: the offset is the file offset.
        let req = FaultRequest {
            offset: 0x8_2010,
            ..FaultRequest::default()
        };
        let t = locate(&regions, &req, 4096).unwrap();
        assert_eq!((t.region, t.offset), (1, 0x8_2000));
    }

    #[test]
    fn regions_without_guest_memfd_are_not_targets() {
        let mut r = region(0x1000, 0x1000, 0, 0);
        r.is_guest_memfd = Some(false);
        assert!(locate(&[r.clone()], &FaultRequest::sync(0, 0, 0), 4096).is_err());
        r.is_guest_memfd = Some(true);
        r.gpa_start = None;
        let e = locate(&[r], &FaultRequest::sync(0, 0, 0), 4096).unwrap_err();
        assert!(e.to_string().contains("no gpa_start"), "{e}");
    }

    #[test]
    fn huge_region_pages_span_several_bits() {
        let mut r = region(0x20_0000, 0x40_0000, 0x20_0000, 0);
        r.page_size = 0x20_0000;
        let t = locate(&[r], &FaultRequest::sync(0, 0x21_0000, 0), 4096).unwrap();
        assert_eq!(
            (t.offset, t.len, t.pages),
            (0x20_0000 + 0x20_0000, 0x20_0000, 1024..1536)
        );
    }

    #[test]
    fn reply_echoes_the_request() {
        let req = FaultRequest {
            vcpu: 9,
            offset: 0,
            flags: 0x30,
            gpa: Some(0xabc000),
        };
        let r = FaultReply::for_request(&req, 0x1000, 0x2000);
        assert_eq!(
            r,
            FaultReply {
                vcpu: Some(9),
                offset: 0x1000,
                len: 0x2000,
                flags: 0x30,
                gpa: Some(0xabc000),
                zero: false
            }
        );
    }
}
