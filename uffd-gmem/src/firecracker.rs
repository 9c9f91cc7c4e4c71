//! Firecracker's UFFD handler handshake, both sides.
//!
//! When Firecracker restores a snapshot with a `Uffd` memory backend it
//! creates guest memory, a userfaultfd on which it has already done
//! `UFFDIO_API` and registered every region (MISSING mode), connects to the
//! handler's Unix socket and makes **one `sendmsg`**:
//!
//! - payload: a UTF-8 JSON array of [`GuestRegionUffdMapping`], no length
//!   prefix, no trailing newline;
//! - ancillary data (`SCM_RIGHTS`): the userfaultfd, and on the
//!   `feature/secret-hiding` branch, when guest memory is a guest_memfd
//!   ("secret free" VMs), also the guest_memfd and the KVM userfault bitmap
//!   memfd: `[uffd, guest_memfd, userfault_bitmap]`.
//!
//! [`Handshake::recv`] is the handler's side: it takes ownership of every
//! received fd at once (so unexpected ones are closed on every error path),
//! [`parse`]s and validates the regions, checks that the first fd is a
//! userfaultfd, and adopts it with [`Uffd::from_initialized`] (the VMM did
//! the API handshake; a second one would fail). [`send`] is the VMM's side,
//! for tests and demos.
//!
//! ```no_run
//! use std::os::unix::net::UnixListener;
//! use std::time::Duration;
//! use uffd_gmem::firecracker::Handshake;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = UnixListener::bind("/run/fc-uffd.sock")?;
//! let (stream, _) = listener.accept()?;
//! let hs = Handshake::recv_timeout(&stream, Duration::from_secs(10))?;
//! hs.validate_against_snapshot(std::fs::metadata("mem.snap")?.len())?;
//! for r in &hs.regions {
//!     println!("{:#x}+{:#x} <- file offset {:#x}", r.base_host_virt_addr, r.size, r.offset);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`Handshake::recv`] reads no further than the handshake itself. On the
//! secret-hiding branch the socket stays in use: [`FaultChannel`] reads and
//! writes its length-prefixed bitcode [`FaultRequest`]/[`FaultReply`]
//! frames, and `UserfaultServer` (feature `firecracker-secret-hiding`)
//! serves the sync vCPU faults they carry. The exitless-APF message is not
//! handled here.

use crate::error::{Errno, Error, Result};
use crate::sys;
use crate::uffd::{USERFAULTFD_LINK, Uffd, proc_fd_link};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

mod channel;
pub use channel::*;

#[cfg(feature = "firecracker-secret-hiding")]
mod userfault;
#[cfg(feature = "firecracker-secret-hiding")]
#[cfg_attr(docsrs, doc(cfg(feature = "firecracker-secret-hiding")))]
pub use userfault::*;

/// The operation named in this module's [`Error::Protocol`] errors.
pub const OP: &str = "firecracker handshake";

/// The largest handshake payload [`Handshake::recv`] accepts, in bytes.
/// Firecracker's own example handler reads 1 KiB; a few regions take about
/// 130 bytes each.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The most fds one handshake may carry (Firecracker sends 1 or 3); more are
/// received up to this many, closed, and reported.
pub const MAX_FDS: usize = 8;

/// The smallest page size a region may declare.
pub const MIN_PAGE_SIZE: u64 = 4096;

/// One guest memory region as Firecracker describes it (`GuestRegionUffdMapping`
/// in `src/vmm/src/persist.rs`): where the region lives in Firecracker's
/// address space and where its contents are in the snapshot memory file.
///
/// Serialized in Firecracker's field order; the secret-hiding fields are
/// written only when set, so a main-branch element is byte-identical to
/// Firecracker's. Unknown fields are ignored when parsing. The deprecated
/// `page_size_kib` may be absent (Firecracker 2.0 removes it); it then reads
/// as `page_size`.
///
/// Firecracker adds fields (the secret-hiding branch added two), so the
/// struct is `#[non_exhaustive]`: start from [`GuestRegionUffdMapping::new`]
/// and set the public fields.
///
/// # Examples
///
/// ```
/// use uffd_gmem::firecracker::GuestRegionUffdMapping;
///
/// // 128 KiB at 0x7f00_0000_0000, its contents at 64 KiB into the file.
/// let r = GuestRegionUffdMapping::new(0x7f00_0000_0000, 0x20000, 0x10000, 4096);
/// assert_eq!(r.snapshot_offset(0x7f00_0000_1008), Some(0x11008));
/// // On the wire, byte for byte what Firecracker sends.
/// let json = serde_json::to_string(&r).unwrap();
/// assert_eq!(
///     json,
///     r#"{"base_host_virt_addr":139637976727552,"size":131072,"offset":65536,"page_size":4096,"page_size_kib":4096}"#
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "RegionWire")]
#[non_exhaustive]
pub struct GuestRegionUffdMapping {
    /// Start of the region in the VMM's address space: where pages must be
    /// placed (`UFFDIO_COPY` destination).
    pub base_host_virt_addr: u64,
    /// Length of the region in bytes.
    pub size: u64,
    /// Where the region's contents start in the snapshot memory file (regions
    /// are laid out back to back in region order).
    pub offset: u64,
    /// The region's page size in bytes (4096, or 2097152 for 2 MiB
    /// hugetlbfs).
    pub page_size: u64,
    /// Deprecated by Firecracker (#4948, to be removed in 2.0): the same value
    /// as `page_size`, **in bytes** despite the name.
    pub page_size_kib: u64,
    /// Secret-hiding branch: the region's guest-physical start address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpa_start: Option<u64>,
    /// Secret-hiding branch: whether the region is backed by the guest_memfd
    /// sent as the handshake's second fd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_guest_memfd: Option<bool>,
}

/// The accepted wire form: `page_size_kib` optional.
#[derive(Deserialize)]
struct RegionWire {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
    #[serde(default)]
    page_size_kib: Option<u64>,
    #[serde(default)]
    gpa_start: Option<u64>,
    #[serde(default)]
    is_guest_memfd: Option<bool>,
}

impl From<RegionWire> for GuestRegionUffdMapping {
    fn from(w: RegionWire) -> Self {
        GuestRegionUffdMapping {
            base_host_virt_addr: w.base_host_virt_addr,
            size: w.size,
            offset: w.offset,
            page_size: w.page_size,
            page_size_kib: w.page_size_kib.unwrap_or(w.page_size),
            gpa_start: w.gpa_start,
            is_guest_memfd: w.is_guest_memfd,
        }
    }
}

impl GuestRegionUffdMapping {
    /// A main-branch region (`page_size_kib` = `page_size`, no secret-hiding
    /// fields).
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::firecracker::GuestRegionUffdMapping;
    ///
    /// let r = GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0, 4096);
    /// assert_eq!((r.page_size_kib, r.gpa_start, r.is_guest_memfd), (4096, None, None));
    /// ```
    pub fn new(base_host_virt_addr: u64, size: u64, offset: u64, page_size: u64) -> Self {
        GuestRegionUffdMapping {
            base_host_virt_addr,
            size,
            offset,
            page_size,
            page_size_kib: page_size,
            gpa_start: None,
            is_guest_memfd: None,
        }
    }

    /// The host address range `base_host_virt_addr .. + size` (saturating; a
    /// validated region never saturates).
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::firecracker::GuestRegionUffdMapping;
    ///
    /// let r = GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0x8000, 4096);
    /// assert_eq!(r.host_range(), 0x10_0000..0x10_4000);
    /// ```
    pub fn host_range(&self) -> Range<u64> {
        self.base_host_virt_addr..self.base_host_virt_addr.saturating_add(self.size)
    }

    /// The snapshot file range `offset .. + size` (saturating, as above).
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::firecracker::GuestRegionUffdMapping;
    ///
    /// let r = GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0x8000, 4096);
    /// assert_eq!(r.snapshot_range(), 0x8000..0xc000);
    /// ```
    pub fn snapshot_range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(self.size)
    }

    /// Whether `host_addr` lies in the region.
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::firecracker::GuestRegionUffdMapping;
    ///
    /// let r = GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0, 4096);
    /// assert!(r.contains(0x10_3fff));
    /// assert!(!r.contains(0x10_4000) && !r.contains(0xf_ffff));
    /// ```
    pub fn contains(&self, host_addr: u64) -> bool {
        host_addr >= self.base_host_virt_addr && host_addr - self.base_host_virt_addr < self.size
    }

    /// The snapshot file offset holding the byte at `host_addr`, or `None`
    /// when the address is outside the region.
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::firecracker::GuestRegionUffdMapping;
    ///
    /// let r = GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0x8000, 4096);
    /// assert_eq!(r.snapshot_offset(0x10_1010), Some(0x9010));
    /// assert_eq!(r.snapshot_offset(0x10_4000), None);
    /// ```
    pub fn snapshot_offset(&self, host_addr: u64) -> Option<u64> {
        if !self.contains(host_addr) {
            return None;
        }
        self.offset
            .checked_add(host_addr - self.base_host_virt_addr)
    }

    /// Whether the region uses the secret-hiding guest_memfd.
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::firecracker::GuestRegionUffdMapping;
    ///
    /// let mut r = GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0, 4096);
    /// assert!(!r.is_guest_memfd()); // absent: main branch
    /// r.is_guest_memfd = Some(true);
    /// assert!(r.is_guest_memfd());
    /// ```
    pub fn is_guest_memfd(&self) -> bool {
        self.is_guest_memfd == Some(true)
    }
}

/// The VMM's credentials (`SO_PEERCRED`), e.g. to kill Firecracker when the
/// handler fails, as Firecracker's documentation recommends.
///
/// # Examples
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use uffd_gmem::firecracker::PeerCred;
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let (_vmm, handler) = UnixStream::pair().unwrap();
/// let vmm = PeerCred::of(&handler)?; // here, this very process
/// assert_eq!(vmm.pid as u32, std::process::id());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerCred {
    /// Process id at `connect` time.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

impl PeerCred {
    /// `getsockopt(SO_PEERCRED)` on a connected Unix socket.
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`] naming `getsockopt(SO_PEERCRED)`.
    pub fn of(stream: &UnixStream) -> Result<PeerCred> {
        let cred = sys::peer_cred(stream.as_fd())
            .map_err(|e| Error::kernel("getsockopt(SO_PEERCRED)", e))?;
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }
}

/// A received and validated handshake.
///
/// # Examples
///
/// Both sides in one process (a VMM would be the other end of the socket):
/// the VMM sends its registered userfaultfd and regions, the handler
/// receives them and serves the regions from the snapshot.
///
/// ```
/// use std::os::fd::AsFd;
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
/// use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake};
/// use uffd_gmem::serve::{Region, Server};
/// use uffd_gmem::{HostMapping, RegisterMode, Uffd};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let Ok(vmm_uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let page = uffd_gmem::page_size();
/// let guest = HostMapping::anonymous(4 * page as usize)?;
/// vmm_uffd.register_mapping(&guest, RegisterMode::MISSING)?;
/// let (vmm, handler) = UnixStream::pair()?;
/// let regions = [GuestRegionUffdMapping::new(guest.addr(), 4 * page, 0, page)];
/// firecracker::send(&vmm, &regions, &[vmm_uffd.as_fd()])?;
///
/// // The handler's side.
/// let snapshot = vec![0xabu8; 4 * page as usize];
/// let hs = Handshake::recv_timeout(&handler, Duration::from_secs(10))?;
/// hs.validate_against_snapshot(snapshot.len() as u64)?;
/// let mut builder = Server::builder(hs.uffd);
/// for r in &hs.regions {
///     builder = builder.region(Region::new(r.base_host_virt_addr, r.size).source_offset(r.offset));
/// }
/// let server = builder.source(snapshot).spawn()?;
///
/// let mut b = [0u8; 1];
/// guest.read_at(3 * page, &mut b)?; // served by the handler's server
/// assert_eq!(b[0], 0xab);
/// server.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Handshake {
    /// The regions, in the order Firecracker sent them.
    pub regions: Vec<GuestRegionUffdMapping>,
    /// The VMM's userfaultfd, adopted with [`Uffd::from_initialized`].
    pub uffd: Uffd,
    /// Secret-hiding: the VM's guest_memfd (second fd).
    pub guest_memfd: Option<OwnedFd>,
    /// Secret-hiding: the KVM userfault bitmap memfd (third fd).
    pub userfault_bitmap: Option<OwnedFd>,
    /// The VMM's credentials, when `SO_PEERCRED` answered.
    pub peer: Option<PeerCred>,
}

impl Handshake {
    /// Receives the handshake, waiting as long as it takes.
    ///
    /// Works on blocking and non-blocking sockets. Reads no further than the
    /// handshake: the message ends at its JSON array (it is read in one
    /// `recvmsg` unless it is larger than one socket buffer, in which case
    /// the rest of the array is read after it).
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] (op [`OP`]) naming the problem: the peer closed
    /// the socket first; the message is larger than [`MAX_PAYLOAD`] or
    /// carried more than [`MAX_FDS`] fds; the fd count is not 1 (main) or 3
    /// (secret-hiding); the first fd is not a userfaultfd; and every rule of
    /// [`parse`]. [`Error::Kernel`] if `recvmsg` or `poll` fails.
    pub fn recv(stream: &UnixStream) -> Result<Handshake> {
        Handshake::recv_inner(stream, None)
    }

    /// [`Handshake::recv`] with a deadline for the whole handshake.
    ///
    /// # Errors
    ///
    /// As [`Handshake::recv`], and [`Error::Protocol`] "timed out ..." when
    /// the handshake is not complete within `timeout`.
    pub fn recv_timeout(stream: &UnixStream, timeout: Duration) -> Result<Handshake> {
        Handshake::recv_inner(stream, Some((Instant::now() + timeout, timeout)))
    }

    fn recv_inner(stream: &UnixStream, deadline: Option<(Instant, Duration)>) -> Result<Handshake> {
        let (payload, fds) = recv_message(stream.as_fd(), deadline)?;
        let regions = parse(&payload, fds.len())?;
        let mut fds = fds.into_iter();
        let uffd_fd = fds.next().ok_or_else(|| protocol("no fd received"))?;
        check_is_userfaultfd(uffd_fd.as_fd())?;
        let guest_memfd = fds.next();
        let userfault_bitmap = fds.next();
        Ok(Handshake {
            regions,
            uffd: Uffd::from_initialized(uffd_fd),
            guest_memfd,
            userfault_bitmap,
            peer: PeerCred::of(stream).ok(),
        })
    }

    /// Whether this is a secret-hiding handshake (guest_memfd and bitmap
    /// present).
    pub fn is_secret_hiding(&self) -> bool {
        self.guest_memfd.is_some()
    }

    /// The common page size of the regions.
    pub fn page_size(&self) -> u64 {
        self.regions.first().map_or(MIN_PAGE_SIZE, |r| r.page_size)
    }

    /// The region holding `host_addr`.
    pub fn region_for(&self, host_addr: u64) -> Option<&GuestRegionUffdMapping> {
        self.regions.iter().find(|r| r.contains(host_addr))
    }

    /// The sum of the region sizes (validated not to overflow).
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Checks the regions against the snapshot memory file's length: every
    /// region lies inside it, and the sizes add up to exactly its length (as
    /// Firecracker's example handler asserts).
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] naming the region or the two totals.
    pub fn validate_against_snapshot(&self, snapshot_len: u64) -> Result<()> {
        validate_against_snapshot(&self.regions, snapshot_len)
    }
}

/// [`Handshake::validate_against_snapshot`] on a region list.
///
/// # Errors
///
/// As there.
///
/// # Examples
///
/// ```
/// use uffd_gmem::firecracker::{GuestRegionUffdMapping as R, validate_against_snapshot};
///
/// let regions = [R::new(0x10_0000, 0x2000, 0, 4096), R::new(0x20_0000, 0x1000, 0x2000, 4096)];
/// assert!(validate_against_snapshot(&regions, 0x3000).is_ok());
/// assert!(validate_against_snapshot(&regions, 0x4000).is_err()); // a tail nobody maps
/// assert!(validate_against_snapshot(&regions, 0x2000).is_err()); // region 1 past the end
/// ```
pub fn validate_against_snapshot(
    regions: &[GuestRegionUffdMapping],
    snapshot_len: u64,
) -> Result<()> {
    let mut total: u64 = 0;
    for (i, r) in regions.iter().enumerate() {
        match r.offset.checked_add(r.size) {
            Some(end) if end <= snapshot_len => {}
            _ => {
                return Err(protocol(format!(
                    "region {i} reads snapshot bytes {:#x}..{:#x}, past the end of the \
                     {snapshot_len:#x}-byte memory file",
                    r.offset,
                    r.offset as u128 + r.size as u128
                )));
            }
        }
        total = total
            .checked_add(r.size)
            .ok_or_else(|| protocol("the region sizes add up to more than 2^64 bytes"))?;
    }
    if total != snapshot_len {
        return Err(protocol(format!(
            "the region sizes add up to {total:#x} bytes but the memory file is \
             {snapshot_len:#x} bytes"
        )));
    }
    Ok(())
}

fn protocol(what: impl Into<String>) -> Error {
    Error::Protocol {
        op: OP,
        what: what.into(),
    }
}

/// A short, escaped preview of a payload for error messages.
fn preview(payload: &[u8]) -> String {
    const N: usize = 48;
    let head = String::from_utf8_lossy(&payload[..payload.len().min(N)]);
    let more = if payload.len() > N { "..." } else { "" };
    format!("\"{}\"{more}", head.escape_debug())
}

/// Parses and validates a handshake payload that arrived with `fd_count`
/// fds. Pure: no system calls, for property tests and custom transports.
///
/// Rules, each failing with [`Error::Protocol`] (op [`OP`]) that names it:
/// - the payload is a JSON array of [`GuestRegionUffdMapping`] (unknown
///   fields ignored), with at least one region;
/// - `fd_count` is 3 when any region has `is_guest_memfd: true`
///   (`[uffd, guest_memfd, userfault_bitmap]`), otherwise 1 (`[uffd]`);
/// - every `page_size` is a power of two >= 4096, the same for all regions,
///   and equal to `page_size_kib` (bytes, despite the name);
/// - `size` > 0; `size`, `base_host_virt_addr` and `offset` are multiples of
///   the page size; `base + size` and `offset + size` do not overflow;
/// - no two regions overlap in the host address space or in the snapshot
///   file.
///
/// # Errors
///
/// As above.
///
/// # Examples
///
/// ```
/// use uffd_gmem::firecracker::parse;
///
/// // Firecracker 2.0 drops `page_size_kib`: it then reads as `page_size`.
/// let payload = br#"[{"base_host_virt_addr":1048576,"size":8192,"offset":0,"page_size":4096}]"#;
/// let regions = parse(payload, 1)?;
/// assert_eq!((regions[0].size, regions[0].page_size_kib), (8192, 4096));
/// assert!(parse(payload, 3).is_err()); // 3 fds only with a guest_memfd region
/// assert!(parse(b"[]", 1).is_err());
/// # Ok::<(), uffd_gmem::Error>(())
/// ```
pub fn parse(payload: &[u8], fd_count: usize) -> Result<Vec<GuestRegionUffdMapping>> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(protocol(
            "the payload is empty (expected a JSON array of regions)",
        ));
    }
    let regions: Vec<GuestRegionUffdMapping> = serde_json::from_slice(payload).map_err(|e| {
        protocol(format!(
            "the payload is not a JSON array of GuestRegionUffdMapping: {e} (payload {})",
            preview(payload)
        ))
    })?;
    if regions.is_empty() {
        return Err(protocol("the region array is empty"));
    }
    let secret_hiding = regions.iter().any(GuestRegionUffdMapping::is_guest_memfd);
    let want = if secret_hiding { 3 } else { 1 };
    if fd_count != want {
        let what = if secret_hiding {
            "3 fds [uffd, guest_memfd, userfault_bitmap] (a region has is_guest_memfd: true)"
        } else {
            "1 fd (the userfaultfd)"
        };
        return Err(protocol(format!(
            "expected {what}, received {fd_count} fd{}",
            if fd_count == 1 { "" } else { "s" }
        )));
    }
    let page = regions[0].page_size;
    for (i, r) in regions.iter().enumerate() {
        let at = || {
            format!(
                "region {i} (base_host_virt_addr {:#x}, size {:#x}, offset {:#x})",
                r.base_host_virt_addr, r.size, r.offset
            )
        };
        if !r.page_size.is_power_of_two() || r.page_size < MIN_PAGE_SIZE {
            return Err(protocol(format!(
                "{}: page_size {:#x} must be a power of two >= {MIN_PAGE_SIZE:#x}",
                at(),
                r.page_size
            )));
        }
        if r.page_size != page {
            return Err(protocol(format!(
                "{}: page_size {:#x} differs from region 0's page_size {page:#x}; all regions \
                 must share one page size",
                at(),
                r.page_size
            )));
        }
        if r.page_size_kib != r.page_size {
            return Err(protocol(format!(
                "{}: page_size_kib {:#x} differs from page_size {:#x} (both are bytes)",
                at(),
                r.page_size_kib,
                r.page_size
            )));
        }
        if r.size == 0 {
            return Err(protocol(format!("{}: size is 0", at())));
        }
        for (name, v) in [
            ("size", r.size),
            ("base_host_virt_addr", r.base_host_virt_addr),
            ("offset", r.offset),
        ] {
            if !v.is_multiple_of(page) {
                return Err(protocol(format!(
                    "{}: {name} {v:#x} is not a multiple of page_size {page:#x}",
                    at()
                )));
            }
        }
        if r.base_host_virt_addr.checked_add(r.size).is_none() {
            return Err(protocol(format!(
                "{}: base_host_virt_addr + size overflows u64",
                at()
            )));
        }
        if r.offset.checked_add(r.size).is_none() {
            return Err(protocol(format!("{}: offset + size overflows u64", at())));
        }
    }
    check_disjoint(&regions, "the host address space", |r| r.host_range())?;
    check_disjoint(&regions, "the snapshot file", |r| r.snapshot_range())?;
    Ok(regions)
}

fn check_disjoint(
    regions: &[GuestRegionUffdMapping],
    space: &str,
    range: impl Fn(&GuestRegionUffdMapping) -> Range<u64>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| range(&regions[i]).start);
    for w in order.windows(2) {
        let (a, b) = (range(&regions[w[0]]), range(&regions[w[1]]));
        if a.end > b.start {
            let (i, j) = (w[0].min(w[1]), w[0].max(w[1]));
            return Err(protocol(format!(
                "regions {i} and {j} overlap in {space} ({:#x}..{:#x} and {:#x}..{:#x})",
                a.start, a.end, b.start, b.end
            )));
        }
    }
    Ok(())
}

/// `ANON_INODE_FS_MAGIC` (`linux/magic.h`): the filesystem of every
/// anonymous inode, userfaultfds included.
const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;

/// Fails unless `fd` is a userfaultfd: checked through `/proc/self/fd`;
/// where `/proc` is not mounted, only that it is an anonymous inode
/// (`fstatfs`), which refuses files, memfds, pipes, sockets and devices.
fn check_is_userfaultfd(fd: BorrowedFd<'_>) -> Result<()> {
    match proc_fd_link(fd) {
        Some(target) if target.as_os_str() == USERFAULTFD_LINK => Ok(()),
        Some(target) => Err(protocol(format!(
            "the first fd is not a userfaultfd (it is {})",
            target.display()
        ))),
        None => {
            let f_type = sys::fstatfs_type(fd)
                .map_err(|e| Error::kernel("fstatfs(firecracker handshake)", e))?;
            if f_type == ANON_INODE_FS_MAGIC {
                Ok(())
            } else {
                Err(protocol(format!(
                    "the first fd is not a userfaultfd (its filesystem type is {f_type:#x}, not \
                     the anonymous inodes' {ANON_INODE_FS_MAGIC:#x}; /proc is not mounted to tell \
                     more)"
                )))
            }
        }
    }
}

/// Waits until `fd` has something to report (data, hang-up or error), up to
/// the deadline.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Option<(Instant, Duration)>) -> Result<()> {
    loop {
        let ms = match deadline {
            None => -1,
            Some((at, total)) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(protocol(format!(
                        "timed out after {total:?} waiting for the handshake"
                    )));
                }
                // Round up so a sub-millisecond remainder still waits.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            }
        };
        match sys::poll(&mut [sys::pollfd(fd, libc::POLLIN)], ms) {
            Ok(0) | Err(Errno(libc::EINTR)) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(Error::kernel("poll(firecracker handshake)", e)),
        }
    }
}

/// One `recvmsg` into `buf`: the bytes read, whether the control data was
/// truncated, and every fd received (owned at once, so that each is closed
/// on every path).
fn recvmsg_once(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(usize, bool)> {
    let (n, flags) = loop {
        // Exactly room for MAX_FDS: the kernel closes any beyond it and sets
        // MSG_CTRUNC.
        match sys::recvmsg_fds(fd, buf, MAX_FDS, fds) {
            Err(Errno(libc::EINTR)) => continue,
            r => break r.map_err(|e| Error::kernel("recvmsg(firecracker handshake)", e))?,
        }
    };
    if flags & libc::MSG_TRUNC != 0 {
        return Err(protocol(format!(
            "the handshake is larger than {MAX_PAYLOAD} bytes (MSG_TRUNC)"
        )));
    }
    Ok((n, flags & libc::MSG_CTRUNC != 0))
}

/// Reads one handshake message: the payload and its fds.
fn recv_message(
    fd: BorrowedFd<'_>,
    deadline: Option<(Instant, Duration)>,
) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    // One byte more than accepted, so a message of exactly MAX_PAYLOAD is
    // told apart from a larger one.
    let mut buf = vec![0u8; MAX_PAYLOAD + 1];
    let mut len = 0;
    let mut fds = Vec::new();
    loop {
        wait_readable(fd, deadline)?;
        let (n, ctrunc) = match recvmsg_once(fd, &mut buf[len..], &mut fds) {
            Err(e) if e.errno() == Some(Errno(libc::EAGAIN)) => continue,
            r => r?,
        };
        if ctrunc {
            return Err(protocol(format!(
                "the handshake carried more than {MAX_FDS} fds (MSG_CTRUNC); Firecracker sends 1 or 3"
            )));
        }
        if n == 0 {
            return Err(if len == 0 {
                protocol("the peer closed the socket before the handshake")
            } else {
                protocol(format!(
                    "the peer closed the socket in the middle of the handshake, after {len} bytes \
                     (payload {})",
                    preview(&buf[..len])
                ))
            });
        }
        len += n;
        if len > MAX_PAYLOAD {
            return Err(protocol(format!(
                "the handshake is larger than {MAX_PAYLOAD} bytes"
            )));
        }
        // A message larger than one socket buffer arrives in pieces (the fds
        // with the first). Read on only while the JSON is incomplete: then the
        // next bytes can only be its continuation, never a later message.
        match serde_json::from_slice::<serde::de::IgnoredAny>(&buf[..len]) {
            Err(e) if e.is_eof() => continue,
            _ => break,
        }
    }
    buf.truncate(len);
    Ok((buf, fds))
}

/// The VMM's side: sends `regions` as Firecracker does (one JSON array, the
/// fds as `SCM_RIGHTS`). Does not validate: the receiver does.
///
/// # Errors
///
/// As [`send_payload`].
///
/// # Examples
///
/// ```
/// use std::os::fd::AsFd;
/// use std::os::unix::net::UnixStream;
/// use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake};
/// use uffd_gmem::{Origin, Uffd};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let (vmm, handler) = UnixStream::pair().unwrap();
/// let regions = [GuestRegionUffdMapping::new(0x10_0000, 0x4000, 0, 4096)];
/// firecracker::send(&vmm, &regions, &[uffd.as_fd()])?;
/// let hs = Handshake::recv(&handler)?;
/// assert_eq!((hs.regions.as_slice(), hs.total_size()), (&regions[..], 0x4000));
/// assert_eq!(hs.uffd.origin(), Origin::Adopted);
/// assert!(hs.region_for(0x10_2000).is_some() && !hs.is_secret_hiding());
/// # Ok(())
/// # }
/// ```
pub fn send(
    stream: &UnixStream,
    regions: &[GuestRegionUffdMapping],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    let payload = serde_json::to_vec(regions).map_err(|e| protocol(format!("serialize: {e}")))?;
    send_payload(stream, &payload, fds)
}

/// Sends `payload` as-is with `fds` attached to its first byte (one
/// `sendmsg`, then plain writes if the kernel took only part of it). For
/// tests of hostile input and for custom encodings.
///
/// # Errors
///
/// [`Error::Invalid`] for more than 253 fds (`SCM_MAX_FD`) or fds with an
/// empty payload; [`Error::Kernel`] naming `sendmsg` or `poll`.
///
/// # Examples
///
/// Hostile input, for a handler's tests:
///
/// ```
/// use std::os::fd::AsFd;
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
/// use uffd_gmem::Error;
/// use uffd_gmem::firecracker::{self, Handshake};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let (vmm, handler) = UnixStream::pair().unwrap();
/// // Fds need a payload byte to ride on.
/// let e = firecracker::send_payload(&vmm, b"", &[handler.as_fd()]).unwrap_err();
/// assert!(matches!(e, Error::Invalid { .. }), "{e}");
/// firecracker::send_payload(&vmm, br#"[{"size":4096}]"#, &[])?;
/// drop(vmm);
/// let e = Handshake::recv_timeout(&handler, Duration::from_secs(10)).unwrap_err();
/// assert!(matches!(e, Error::Protocol { op: firecracker::OP, .. }), "{e}");
/// # Ok(())
/// # }
/// ```
pub fn send_payload(stream: &UnixStream, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let op = "sendmsg(firecracker handshake)";
    if fds.len() > 253 {
        return Err(Error::invalid(
            op,
            "at most 253 fds (SCM_MAX_FD) per message",
        ));
    }
    if payload.is_empty() {
        if fds.is_empty() {
            return Ok(());
        }
        return Err(Error::invalid(
            op,
            "fds need at least one payload byte to ride on",
        ));
    }
    let mut sent = 0;
    while sent < payload.len() {
        // The fds ride on the first byte.
        let with = if sent == 0 { fds } else { &[] };
        match sys::sendmsg_fds(stream.as_fd(), &payload[sent..], with) {
            Ok(n) => sent += n,
            Err(Errno(libc::EINTR)) => {}
            Err(Errno(libc::EAGAIN)) => {
                match sys::poll(&mut [sys::pollfd(stream.as_fd(), libc::POLLOUT)], -1) {
                    Ok(_) | Err(Errno(libc::EINTR)) => {}
                    Err(e) => return Err(Error::kernel("poll(firecracker handshake)", e)),
                }
            }
            Err(e) => return Err(Error::kernel(op, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, size: u64, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping::new(base, size, offset, 4096)
    }

    #[test]
    fn serializes_in_firecrackers_field_order() {
        let json = serde_json::to_string(&[region(0x7f00_0000_0000, 0x1000, 0)]).unwrap();
        assert_eq!(
            json,
            r#"[{"base_host_virt_addr":139637976727552,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
        );
        let mut sh = region(0x1000, 0x1000, 0);
        sh.gpa_start = Some(0);
        sh.is_guest_memfd = Some(true);
        let json = serde_json::to_string(&sh).unwrap();
        assert!(
            json.ends_with(r#""page_size_kib":4096,"gpa_start":0,"is_guest_memfd":true}"#),
            "{json}"
        );
    }

    #[test]
    fn page_size_kib_may_be_absent() {
        let r = parse(
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#,
            1,
        )
        .unwrap();
        assert_eq!(r[0].page_size_kib, 4096);
    }

    #[test]
    fn lookups() {
        let r = region(0x10000, 0x2000, 0x3000);
        assert_eq!(r.snapshot_offset(0x10000), Some(0x3000));
        assert_eq!(r.snapshot_offset(0x11fff), Some(0x4fff));
        assert_eq!(r.snapshot_offset(0x12000), None);
        assert_eq!(r.snapshot_offset(0xffff), None);
    }
}
