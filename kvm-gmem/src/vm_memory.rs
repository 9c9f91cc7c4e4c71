//! guest_memfd memory for [vm-memory](https://docs.rs/vm-memory/0.18)
//! (feature `vm-memory`): [`GuestMemfdRegion`], a
//! [`GuestMemoryRegion`] backed by a guest_memfd, and [`GuestMemfdMemory`],
//! vm-memory's [`GuestRegionCollection`] of them.
//!
//! Firecracker and Cloud Hypervisor keep guest RAM in a
//! `GuestRegionCollection<R>`; with this region type, their device
//! emulation, loaders and snapshot code (everything written against
//! vm-memory's [`Bytes`](::vm_memory::Bytes),
//! [`GuestMemoryBackend`](::vm_memory::GuestMemoryBackend) and
//! [`VolatileSlice`]) work unchanged on guest_memfd memory, while the memory
//! slot is `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`
//! ([`GuestMemfdRegion::memory_region`]). vm-memory's maintainers suggested
//! exactly this shape (a separate region type) in
//! [vm-memory#315](https://github.com/rust-vmm/vm-memory/issues/315).
//!
//! A region is a range of one guest_memfd (`gmem_offset .. gmem_offset +
//! len`) placed at a guest physical address. It holds the guest_memfd and
//! a shared [`Mapping`] of the whole file; several regions of one
//! guest_memfd ([`GuestMemfdRegion::sibling`]) share both. Accesses go through
//! [`VolatileSlice`]s of that mapping, bounds-checked against the region.
//!
//! # SIGBUS
//!
//! An access to a guest_memfd page the host may not touch raises SIGBUS, not
//! an error. A region exists only where no access vm-memory makes through it
//! can: the rule is [`Mapping`]'s, plus the region's own bounds.
//!
//! - The guest_memfd was created with `GUEST_MEMFD_FLAG_MMAP` **and**
//!   `GUEST_MEMFD_FLAG_INIT_SHARED`; the constructors refuse any other
//!   ([`Error::Invalid`]). The kernel's fault handler for a guest_memfd
//!   mapping (`kvm_gmem_fault_user_mapping`) raises SIGBUS for a page past
//!   the end of the file, or for a page that is not shared; up to Linux 7.3
//!   (the newest kernel this crate is tested on) "shared" is decided for the
//!   whole file, once, by `INIT_SHARED`.
//! - The region lies inside the file (checked at construction), the mapping
//!   covers exactly the file, and a guest_memfd's size never changes
//!   (`ftruncate` on one fails). Every slice the region hands out
//!   ([`GuestMemoryRegion::get_slice`]) is checked against the region's
//!   length, and vm-memory checks every access against the slice; an access
//!   outside every region is an error of the collection
//!   ([`GuestMemoryError::InvalidGuestAddress`], or `PartialBuffer` for one
//!   that starts inside and runs out).
//! - Punching a hole ([`GuestMemfdRegion::punch_hole`]) frees the pages; the
//!   next access faults in a fresh, zeroed, shared page: reads after a punch
//!   return zeros, never a signal.
//! - `KVM_SET_MEMORY_ATTRIBUTES` on the VM fd steers where the *guest*'s
//!   faults are served from; it does not change what the host mapping may
//!   touch. (On x86 a VM that offers `INIT_SHARED` is one without private
//!   memory, and its `KVM_CAP_MEMORY_ATTRIBUTES` is 0; arm64 has no private
//!   memory.)
//!
//! Not covered, as for every [`Mapping`] (see
//! [`guide::safety`](crate::guide::safety#sigbus)):
//! a conversion of pages of the file to private done outside this crate (the
//! proposed in-place conversion of guest_memfd, which this crate does not
//! issue) makes later host accesses to them raise SIGBUS; so does a page
//! poisoned with userfaultfd (`UFFDIO_POISON`) or a userfaultfd registered
//! with `UFFD_FEATURE_SIGBUS` on the region's mapping, and a hardware memory
//! error. A raw pointer from [`GuestMemoryRegion::get_host_address`] is
//! checked for its first byte only; what the caller does with it is the
//! caller's to keep in bounds.
//!
//! # Examples
//!
//! Two regions of one guest_memfd, on either side of a hole in the guest
//! physical address space, used through vm-memory's traits only:
//!
//! ```
//! use kvm_gmem::vm_memory::{self as gmem_memory, GuestMemfdRegion};
//! use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let Ok(kvm) = KvmDevice::open() else {
//!     return Ok(()); // no /dev/kvm here
//! };
//! let vm = kvm.create_vm(VmType::DEFAULT)?;
//! let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
//! if !vm.guest_memfd_flags()?.contains(shared) {
//!     return Ok(()); // guest_memfd cannot be mapped here (Linux 6.18 or later)
//! }
//! let gmem = GuestMemfd::builder(4 << 20)
//!     .mmap(true)
//!     .init_shared(true)
//!     .create(&vm)?;
//! // File bytes 0..2 MiB at GPA 0, 2..4 MiB at GPA 4 GiB.
//! let low = GuestMemfdRegion::from_range(gmem, 0, 2 << 20, GuestAddress(0))?;
//! let high = low.sibling(2 << 20, 2 << 20, GuestAddress(1 << 32))?;
//! let slots = [low.memory_region(0)?.size(), high.memory_region(1)?.size()];
//! assert_eq!(slots, [2 << 20, 2 << 20]);
//!
//! let mem = gmem_memory::from_regions([low, high])?;
//! mem.write_obj(0x1234_5678u32, GuestAddress((1 << 32) + 0x10))?;
//! assert_eq!(mem.read_obj::<u32>(GuestAddress((1 << 32) + 0x10))?, 0x1234_5678);
//! assert!(mem.read_obj::<u32>(GuestAddress(3 << 30)).is_err()); // the hole
//!
//! let high = mem.find_region(GuestAddress(1 << 32)).unwrap();
//! assert_eq!(high.gmem_offset(), 2 << 20);
//! let page = kvm_gmem::page_size();
//! high.punch_hole(GuestAddress(1 << 32)..GuestAddress((1 << 32) + page))?;
//! assert_eq!(mem.read_obj::<u32>(GuestAddress((1 << 32) + 0x10))?, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # References
//!
//! - `KVM_CREATE_GUEST_MEMFD`:
//!   <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd>
//! - vm-memory 0.18: <https://docs.rs/vm-memory/0.18/vm_memory/>

use crate::error::{Errno, Error, Result};
use crate::gmem::{GuestMemfd, GuestMemfdFlags};
use crate::mapping::Mapping;
#[cfg(feature = "rfc-kvm-userfault")]
use crate::memslot::UserfaultBitmap;
use crate::memslot::{MemoryRegion2, MemoryRegion2Builder};
use crate::sys::page_size;
use ::vm_memory::bitmap::BS;
use ::vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestRegionCollectionError, GuestUsize, MemoryRegionAddress,
    VolatileSlice,
};
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

/// Guest memory made of guest_memfd regions: vm-memory's collection, so
/// [`Bytes<GuestAddress>`](::vm_memory::Bytes) and
/// [`GuestMemoryBackend`](::vm_memory::GuestMemoryBackend) work on it as on
/// `GuestMemoryMmap`. Build one with [`from_regions`].
pub type GuestMemfdMemory = GuestRegionCollection<GuestMemfdRegion>;

/// What regions of one guest_memfd share: the file, its mapping, and a
/// duplicate of its descriptor for [`FileOffset`].
#[derive(Debug)]
struct Backing {
    // Dropped in this order: the mapping first, then the descriptors.
    map: Mapping,
    file: Arc<File>,
    gmem: Arc<GuestMemfd>,
}

/// A range of a guest_memfd as a vm-memory [`GuestMemoryRegion`].
///
/// The range `gmem_offset .. gmem_offset + len` of the guest_memfd appears
/// at guest physical addresses `start .. start + len`. All three are page
/// aligned, the length is non-zero and the range lies inside the file;
/// the guest_memfd has `MMAP` and `INIT_SHARED`, so no access through the
/// region can raise SIGBUS (see the [module docs](self#sigbus)).
///
/// The region keeps the guest_memfd and its mapping alive; a memory slot
/// set from [`GuestMemfdRegion::memory_region`] must be deleted (or the VM
/// closed) before the region is dropped.
#[derive(Debug)]
pub struct GuestMemfdRegion {
    backing: Arc<Backing>,
    start: GuestAddress,
    gmem_offset: u64,
    len: u64,
    file_offset: FileOffset,
    #[cfg(feature = "rfc-kvm-userfault")]
    userfault: Option<Arc<UserfaultBitmap>>,
}

impl GuestMemfdRegion {
    /// The whole guest_memfd at guest physical address `start`; maps it.
    ///
    /// # Errors
    ///
    /// As for [`GuestMemfdRegion::from_range`].
    pub fn new(gmem: impl Into<Arc<GuestMemfd>>, start: GuestAddress) -> Result<GuestMemfdRegion> {
        let gmem = gmem.into();
        let size = gmem.size();
        Self::create("GuestMemfdRegion::new", gmem, 0, size, start)
    }

    /// Bytes `gmem_offset .. gmem_offset + len` of the guest_memfd at guest
    /// physical address `start`; maps the guest_memfd (all of it: the
    /// mapping is shared with [`GuestMemfdRegion::sibling`]s) and duplicates
    /// its descriptor for [`GuestMemoryRegion::file_offset`].
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`], before any system call, naming the rule: the
    /// guest_memfd has `GUEST_MEMFD_FLAG_MMAP` and
    /// `GUEST_MEMFD_FLAG_INIT_SHARED`; `len` is non-zero; `gmem_offset`,
    /// `len` and `start` are page aligned; the range ends inside the file;
    /// `start + len` does not overflow. [`Error::Kernel`] if `mmap` or the
    /// descriptor's duplication fails.
    pub fn from_range(
        gmem: impl Into<Arc<GuestMemfd>>,
        gmem_offset: u64,
        len: u64,
        start: GuestAddress,
    ) -> Result<GuestMemfdRegion> {
        Self::create(
            "GuestMemfdRegion::from_range",
            gmem.into(),
            gmem_offset,
            len,
            start,
        )
    }

    fn create(
        op: &'static str,
        gmem: Arc<GuestMemfd>,
        gmem_offset: u64,
        len: u64,
        start: GuestAddress,
    ) -> Result<GuestMemfdRegion> {
        check(op, &gmem, gmem_offset, len, start)?;
        let map = gmem.map()?;
        let dup = gmem.as_fd().try_clone_to_owned().map_err(|e| {
            Error::kernel(
                "fcntl(F_DUPFD_CLOEXEC, guest_memfd)",
                Errno(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        })?;
        let backing = Arc::new(Backing {
            map,
            file: Arc::new(File::from(dup)),
            gmem,
        });
        Ok(Self::with_backing(backing, gmem_offset, len, start))
    }

    fn with_backing(
        backing: Arc<Backing>,
        gmem_offset: u64,
        len: u64,
        start: GuestAddress,
    ) -> GuestMemfdRegion {
        GuestMemfdRegion {
            file_offset: FileOffset::from_arc(Arc::clone(&backing.file), gmem_offset),
            backing,
            start,
            gmem_offset,
            len,
            #[cfg(feature = "rfc-kvm-userfault")]
            userfault: None,
        }
    }

    /// Another region of the same guest_memfd (bytes `gmem_offset ..
    /// gmem_offset + len` at `start`), sharing this one's mapping and
    /// descriptors: no system call. The ranges of two regions may overlap in
    /// the file, but KVM binds each byte of a guest_memfd to one memory slot
    /// only, and [`from_regions`] refuses such a pair.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for the rules of [`GuestMemfdRegion::from_range`].
    pub fn sibling(
        &self,
        gmem_offset: u64,
        len: u64,
        start: GuestAddress,
    ) -> Result<GuestMemfdRegion> {
        check(
            "GuestMemfdRegion::sibling",
            &self.backing.gmem,
            gmem_offset,
            len,
            start,
        )?;
        Ok(Self::with_backing(
            Arc::clone(&self.backing),
            gmem_offset,
            len,
            start,
        ))
    }

    /// The guest_memfd (for [`GuestMemfd::allocate`], a hand-over with
    /// [`crate::share::send`], ...).
    pub fn guest_memfd(&self) -> &GuestMemfd {
        &self.backing.gmem
    }

    /// Where the region starts in the guest_memfd.
    pub fn gmem_offset(&self) -> u64 {
        self.gmem_offset
    }

    /// The host mapping of the **whole** guest_memfd; the region is bytes
    /// [`gmem_offset()`](Self::gmem_offset) `..` `+ len()` of it.
    pub fn mapping(&self) -> &Mapping {
        &self.backing.map
    }

    /// The guest physical addresses the region covers.
    pub fn guest_range(&self) -> Range<GuestAddress> {
        // Cannot overflow: `start + len` was checked at construction.
        self.start..GuestAddress(self.start.raw_value() + self.len)
    }

    /// The host address of the region's first byte: the memory slot's
    /// `userspace_addr`, or the start of a userfaultfd registration. Not
    /// dereferenceable from safe code.
    pub fn userspace_addr(&self) -> u64 {
        self.backing.map.addr() + self.gmem_offset
    }

    /// Attaches a KVM Userfault bitmap (RFC) for the memory slot: the slot of
    /// [`GuestMemfdRegion::memory_region`] then carries it, with
    /// `KVM_MEM_USERFAULT`. The `Arc` lets the VMM's fault handler clear bits
    /// while the region is in a collection.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] unless the bitmap covers every page of the region.
    #[cfg(feature = "rfc-kvm-userfault")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rfc-kvm-userfault")))]
    pub fn with_userfault_bitmap(
        mut self,
        bitmap: Arc<UserfaultBitmap>,
    ) -> Result<GuestMemfdRegion> {
        let pages = self.len / page_size();
        if bitmap.pages() < pages {
            return Err(Error::invalid(
                "GuestMemfdRegion::with_userfault_bitmap",
                format!(
                    "the userfault bitmap covers {} pages, the region has {pages}",
                    bitmap.pages()
                ),
            ));
        }
        self.userfault = Some(bitmap);
        Ok(self)
    }

    /// The KVM Userfault bitmap (RFC), if one was attached.
    #[cfg(feature = "rfc-kvm-userfault")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rfc-kvm-userfault")))]
    pub fn userfault_bitmap(&self) -> Option<&Arc<UserfaultBitmap>> {
        self.userfault.as_ref()
    }

    /// The memory slot for this region, to add flags (`LOG_DIRTY_PAGES`)
    /// before [`MemoryRegion2Builder::build`]: slot `slot` at the region's
    /// guest address and length, backed by the guest_memfd from
    /// [`gmem_offset()`](Self::gmem_offset), with the mapping's address of the
    /// region as `userspace_addr` (and the userfault bitmap, when attached).
    pub fn memory_region_builder(&self, slot: u32) -> MemoryRegion2Builder<'_> {
        let builder = MemoryRegion2::builder(slot, self.start.raw_value(), self.len)
            .guest_memfd(&self.backing.gmem, self.gmem_offset)
            .userspace_addr(self.userspace_addr());
        #[cfg(feature = "rfc-kvm-userfault")]
        let builder = match &self.userfault {
            Some(bitmap) => builder.userfault_bitmap(bitmap),
            None => builder,
        };
        builder
    }

    /// The `KVM_SET_USER_MEMORY_REGION2` description of this region as slot
    /// `slot`; see [`GuestMemfdRegion::memory_region_builder`]. Set it with
    /// [`VmOps::set_memory_region`](crate::VmOps::set_memory_region), whose
    /// safety promise the region helps keep: it owns the mapping (and the
    /// bitmap), so keeping the region (or its collection) alive until the
    /// slot is deleted or the VM closed is enough.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] from [`MemoryRegion2Builder::build`] (not expected:
    /// the region's own rules imply the slot's).
    pub fn memory_region(&self, slot: u32) -> Result<MemoryRegion2<'_>> {
        self.memory_region_builder(slot).build()
    }

    /// Frees the pages of the guest physical `range`, which must lie inside
    /// this region: `fallocate(PUNCH_HOLE)` on the matching range of the
    /// guest_memfd. The pages read as zero when touched again, through the
    /// region or by the guest.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] unless `range` is non-empty, page aligned and inside
    /// [`guest_range()`](Self::guest_range) (checked before the call);
    /// [`Error::Kernel`] if `fallocate` fails.
    #[doc(alias = "FALLOC_FL_PUNCH_HOLE")]
    pub fn punch_hole(&self, range: Range<GuestAddress>) -> Result<()> {
        let op = "GuestMemfdRegion::punch_hole";
        let page = page_size();
        let (start, end) = (range.start.raw_value(), range.end.raw_value());
        if start >= end {
            return Err(Error::invalid(
                op,
                format!("empty guest range {start:#x}..{end:#x}"),
            ));
        }
        if !start.is_multiple_of(page) || !end.is_multiple_of(page) {
            return Err(Error::invalid(
                op,
                format!(
                    "guest range {start:#x}..{end:#x} is not page aligned (page size {page:#x})"
                ),
            ));
        }
        let ours = self.guest_range();
        if start < ours.start.raw_value() || end > ours.end.raw_value() {
            return Err(Error::invalid(
                op,
                format!(
                    "guest range {start:#x}..{end:#x} is not inside the region {:#x}..{:#x}",
                    ours.start.raw_value(),
                    ours.end.raw_value()
                ),
            ));
        }
        // Inside the region, so inside the file: no overflow.
        let to_file = |gpa: u64| self.gmem_offset + (gpa - ours.start.raw_value());
        self.backing.gmem.punch_hole(to_file(start)..to_file(end))
    }

    /// The region's first byte in the host mapping.
    #[allow(unsafe_code)]
    fn host_ptr(&self) -> *mut u8 {
        // SAFETY: `as_ptr` is valid for the mapping's length while the
        // mapping lives (the `Arc` in `self` keeps it); `gmem_offset + len`
        // is at most the file size, which is the mapping's length (checked
        // at construction), so the offset stays inside the mapping. No
        // reference into the mapping is formed.
        unsafe { self.backing.map.as_ptr().add(self.gmem_offset as usize) }
    }

    /// Whether the file ranges of `self` and `other` overlap in one
    /// guest_memfd.
    fn shares_file_range(&self, other: &GuestMemfdRegion) -> bool {
        Arc::ptr_eq(&self.backing.gmem, &other.backing.gmem)
            && self.gmem_offset < other.gmem_offset + other.len
            && other.gmem_offset < self.gmem_offset + self.len
    }
}

/// The rules of a region of `gmem`; see [`GuestMemfdRegion::from_range`].
fn check(
    op: &'static str,
    gmem: &GuestMemfd,
    gmem_offset: u64,
    len: u64,
    start: GuestAddress,
) -> Result<()> {
    let page = page_size();
    let flags = gmem.flags();
    let bad = |rule: String| Err(Error::invalid(op, rule));
    if !flags.contains(GuestMemfdFlags::MMAP) {
        return bad(format!(
            "the guest_memfd was created without GUEST_MEMFD_FLAG_MMAP (flags {flags}): vm-memory \
             reaches guest memory through a host mapping, which this guest_memfd cannot have"
        ));
    }
    if !flags.contains(GuestMemfdFlags::INIT_SHARED) {
        return bad(format!(
            "the guest_memfd was created without GUEST_MEMFD_FLAG_INIT_SHARED (flags {flags}): its \
             memory is private to the guest and every access through the region would raise SIGBUS"
        ));
    }
    if len == 0 {
        return bad("the length must be non-zero".into());
    }
    if !len.is_multiple_of(page) {
        return bad(format!(
            "length {len:#x} is not a multiple of the page size ({page:#x})"
        ));
    }
    if !gmem_offset.is_multiple_of(page) {
        return bad(format!(
            "guest_memfd offset {gmem_offset:#x} is not page aligned (page size {page:#x})"
        ));
    }
    if !start.raw_value().is_multiple_of(page) {
        return bad(format!(
            "guest address {:#x} is not page aligned (page size {page:#x})",
            start.raw_value()
        ));
    }
    match gmem_offset.checked_add(len) {
        Some(end) if end <= gmem.size() => {}
        _ => {
            return bad(format!(
                "guest_memfd range {gmem_offset:#x}+{len:#x} ends past the file size {:#x}",
                gmem.size()
            ));
        }
    }
    if start.raw_value().checked_add(len).is_none() {
        return bad(format!(
            "guest range {:#x}+{len:#x} overflows the guest physical address space",
            start.raw_value()
        ));
    }
    Ok(())
}

impl GuestMemoryRegion for GuestMemfdRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len
    }

    fn start_addr(&self) -> GuestAddress {
        self.start
    }

    fn bitmap(&self) -> BS<'_, ()> {}

    /// The host address of `addr` in the region's mapping, or
    /// [`GuestMemoryError::InvalidBackendAddress`] outside the region.
    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> ::vm_memory::GuestMemoryResult<*mut u8> {
        let addr = self
            .check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        Ok(self.host_ptr().wrapping_add(addr.raw_value() as usize))
    }

    /// A duplicate of the guest_memfd's descriptor (shared by
    /// [`sibling`](GuestMemfdRegion::sibling)s), at
    /// [`gmem_offset()`](GuestMemfdRegion::gmem_offset): a process it is
    /// passed to can `mmap` it (`MAP_SHARED`; guest_memfd refuses
    /// `MAP_PRIVATE`), but `read`/`write` on a guest_memfd fail.
    fn file_offset(&self) -> Option<&FileOffset> {
        Some(&self.file_offset)
    }

    /// `count` bytes from `offset`, or
    /// [`GuestMemoryError::InvalidBackendAddress`] if they leave the region.
    #[allow(unsafe_code)]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> ::vm_memory::GuestMemoryResult<VolatileSlice<'_, BS<'_, ()>>> {
        let off = offset.raw_value();
        match off.checked_add(count as u64) {
            Some(end) if end <= self.len => {}
            _ => return Err(GuestMemoryError::InvalidBackendAddress),
        }
        // SAFETY: `off + count <= len` (checked above), and the region's
        // bytes lie inside the mapping (checked at construction), which
        // stays mapped while `self` lives: the slice's lifetime is `self`'s
        // borrow. Every other user of the memory in this process goes
        // through volatile accesses (vm-memory's slices, this crate's
        // `Mapping` copies); the guest and other processes are not Rust. The
        // guest_memfd has MMAP and INIT_SHARED and the range is inside the
        // file, so no access through the slice raises SIGBUS.
        Ok(unsafe { VolatileSlice::new(self.host_ptr().add(off as usize), count) })
    }
}

/// vm-memory's [`Bytes<MemoryRegionAddress>`](::vm_memory::Bytes) for the
/// region, through [`GuestMemoryRegion::get_slice`]: guest_memfd memory
/// shared with the host is plain RAM to the accessor.
impl GuestMemoryRegionBytes for GuestMemfdRegion {}

/// A [`GuestMemfdMemory`] of `regions`, in any order (they are sorted by
/// guest address), with vm-memory's `GuestRegionCollection::from_regions`.
///
/// # Errors
///
/// [`Error::Invalid`] naming the rule: at least one region; no two regions
/// overlap in guest physical addresses; no two regions of one guest_memfd
/// overlap in the file (KVM binds each byte of a guest_memfd to one memory
/// slot only).
pub fn from_regions(
    regions: impl IntoIterator<Item = GuestMemfdRegion>,
) -> Result<GuestMemfdMemory> {
    let op = "kvm_gmem::vm_memory::from_regions";
    let mut regions: Vec<GuestMemfdRegion> = regions.into_iter().collect();
    regions.sort_by_key(|r| r.start);
    let show = |r: &GuestMemfdRegion| {
        let g = r.guest_range();
        format!("{:#x}..{:#x}", g.start.raw_value(), g.end.raw_value())
    };
    for pair in regions.windows(2) {
        if pair[0].guest_range().end > pair[1].start {
            return Err(Error::invalid(
                op,
                format!(
                    "the regions at guest addresses {} and {} overlap",
                    show(&pair[0]),
                    show(&pair[1])
                ),
            ));
        }
    }
    for (i, a) in regions.iter().enumerate() {
        if let Some(b) = regions[i + 1..].iter().find(|b| a.shares_file_range(b)) {
            return Err(Error::invalid(
                op,
                format!(
                    "the regions at guest addresses {} and {} overlap in the guest_memfd \
                     (offsets {:#x}+{:#x} and {:#x}+{:#x}): KVM binds each byte of a guest_memfd \
                     to one memory slot only",
                    show(a),
                    show(b),
                    a.gmem_offset,
                    a.len,
                    b.gmem_offset,
                    b.len
                ),
            ));
        }
    }
    GuestRegionCollection::from_regions(regions).map_err(|e| {
        Error::invalid(
            op,
            match e {
                GuestRegionCollectionError::NoMemoryRegion => {
                    "guest memory needs at least one region".to_string()
                }
                other => format!("vm-memory refused the regions: {other}"),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    //! The region's rules and vm-memory's view of it, run where the kernel
    //! has an equivalent: a shmem memfd stands in for the guest_memfd (it
    //! maps, reads, writes and punches holes the same way), wrapped as one
    //! with the flags a guest_memfd would have. The same paths on a real
    //! guest_memfd are `kvm-gmem/tests/vm_memory.rs`.
    #![allow(unsafe_code)]

    use super::*;
    use ::vm_memory::{Bytes, GuestMemoryBackend};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn page() -> u64 {
        page_size()
    }

    /// A memfd of `pages` pages posing as a guest_memfd with `flags`.
    fn stand_in(pages: u64, flags: GuestMemfdFlags) -> GuestMemfd {
        // SAFETY: a NUL-terminated name; memfd_create returns a new fd.
        let raw = unsafe { libc::memfd_create(c"vm-memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", Errno::last());
        // SAFETY: `raw` was just returned and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = pages * page();
        // SAFETY: ftruncate on the fd just created.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        GuestMemfd::from_parts(fd, size, flags)
    }

    fn shared(pages: u64) -> GuestMemfd {
        stand_in(pages, GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED)
    }

    /// The rule of an `Invalid` error, after checking its op.
    fn invalid<T: std::fmt::Debug>(r: Result<T>, op: &str) -> String {
        match r {
            Err(Error::Invalid { op: got, rule }) => {
                assert_eq!(got, op, "{rule}");
                rule
            }
            other => panic!("{op}: expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn constructors_refuse_what_breaks_a_rule() {
        let p = page();
        let op = "GuestMemfdRegion::from_range";
        let no_mmap = stand_in(4, GuestMemfdFlags::empty());
        let rule = invalid(
            GuestMemfdRegion::new(no_mmap, GuestAddress(0)),
            "GuestMemfdRegion::new",
        );
        assert!(rule.contains("GUEST_MEMFD_FLAG_MMAP"), "{rule}");
        let private = stand_in(4, GuestMemfdFlags::MMAP);
        let rule = invalid(
            GuestMemfdRegion::from_range(private, 0, p, GuestAddress(0)),
            op,
        );
        assert!(
            rule.contains("INIT_SHARED") && rule.contains("SIGBUS"),
            "{rule}"
        );

        let gmem = Arc::new(shared(4));
        let cases: [(u64, u64, u64, &str); 7] = [
            (0, 0, 0, "non-zero"),
            (0, p + 1, 0, "multiple of the page size"),
            (1, p, 0, "offset 0x1 is not page aligned"),
            (0, p, 0x800, "guest address 0x800 is not page aligned"),
            (0, 5 * p, 0, "ends past the file size"),
            (4 * p, p, 0, "ends past the file size"),
            (0, p, u64::MAX - p + 1, "overflows"),
        ];
        for (off, len, gpa, want) in cases {
            let rule = invalid(
                GuestMemfdRegion::from_range(Arc::clone(&gmem), off, len, GuestAddress(gpa)),
                op,
            );
            assert!(rule.contains(want), "{off:#x}+{len:#x}@{gpa:#x}: {rule}");
        }
        let region = GuestMemfdRegion::new(Arc::clone(&gmem), GuestAddress(0)).unwrap();
        let rule = invalid(
            region.sibling(3 * p, 2 * p, GuestAddress(0)),
            "GuestMemfdRegion::sibling",
        );
        assert!(rule.contains("ends past the file size"), "{rule}");
        // The last page of the file, exactly, is fine, and so is a region
        // ending one page below the top of the guest address space (a region
        // ending at 2^64 is refused: its end is not an address, and
        // KVM_SET_USER_MEMORY_REGION2 refuses it too).
        let below_top = GuestAddress(0u64.wrapping_sub(2 * p));
        let r = region.sibling(3 * p, p, below_top).unwrap();
        assert_eq!(r.last_addr(), GuestAddress(0u64.wrapping_sub(p + 1)));
    }

    #[test]
    fn accessors_and_memory_region() {
        let p = page();
        let gmem = shared(8);
        let fd = gmem.as_raw_fd();
        let region =
            GuestMemfdRegion::from_range(gmem, 2 * p, 4 * p, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(region.len(), 4 * p);
        assert_eq!(region.start_addr(), GuestAddress(0x10_0000));
        assert_eq!(region.last_addr(), GuestAddress(0x10_0000 + 4 * p - 1));
        assert_eq!(region.gmem_offset(), 2 * p);
        assert_eq!(region.guest_memfd().size(), 8 * p);
        assert_eq!(region.mapping().len() as u64, 8 * p);
        assert_eq!(
            region.guest_range(),
            GuestAddress(0x10_0000)..GuestAddress(0x10_0000 + 4 * p)
        );
        assert_eq!(region.userspace_addr(), region.mapping().addr() + 2 * p);
        assert_eq!(
            region.get_host_address(MemoryRegionAddress(0x10)).unwrap() as u64,
            region.userspace_addr() + 0x10
        );
        assert!(matches!(
            region.get_host_address(MemoryRegionAddress(4 * p)),
            Err(GuestMemoryError::InvalidBackendAddress)
        ));

        let slot = region.memory_region(3).unwrap();
        let raw = slot.as_raw();
        assert_eq!(raw.slot, 3);
        assert_eq!(raw.guest_phys_addr, 0x10_0000);
        assert_eq!(raw.memory_size, 4 * p);
        assert_eq!(raw.guest_memfd_offset, 2 * p);
        assert_eq!(raw.guest_memfd, fd as u32);
        assert_eq!(raw.userspace_addr, region.userspace_addr());
        assert!(
            slot.flags()
                .contains(crate::memslot::RegionFlags::GUEST_MEMFD)
        );
        let logged = region
            .memory_region_builder(3)
            .flags(crate::memslot::RegionFlags::LOG_DIRTY_PAGES)
            .build()
            .unwrap();
        assert!(
            logged
                .flags()
                .contains(crate::memslot::RegionFlags::LOG_DIRTY_PAGES)
        );

        // The FileOffset is a duplicate of the guest_memfd's descriptor.
        let fo = region.file_offset().expect("a FileOffset");
        assert_eq!(fo.start(), 2 * p);
        assert_ne!(fo.file().as_raw_fd(), fd);
        let ino = |fd: i32| {
            // SAFETY: an all-zero stat is valid; fstat fills it for an open fd.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `fd` is open for the call; `st` is writable.
            assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
            (st.st_dev, st.st_ino)
        };
        assert_eq!(ino(fo.file().as_raw_fd()), ino(fd));
        let sibling = region.sibling(0, p, GuestAddress(0)).unwrap();
        assert!(Arc::ptr_eq(sibling.file_offset().unwrap().arc(), fo.arc()));
        assert_eq!(sibling.mapping().addr(), region.mapping().addr());
    }

    #[test]
    fn bytes_across_two_regions_reach_the_right_file_bytes() {
        let p = page();
        // File pages 2..4 at GPA 0, pages 0..2 right after them: a write
        // across the boundary lands at the end of the file, then its start.
        let low = GuestMemfdRegion::from_range(shared(4), 2 * p, 2 * p, GuestAddress(0)).unwrap();
        let high = low.sibling(0, 2 * p, GuestAddress(2 * p)).unwrap();
        let mem = from_regions([high, low]).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(mem.last_addr(), GuestAddress(4 * p - 1));

        let data: Vec<u8> = (0..64u8).collect();
        let at = GuestAddress(2 * p - 32);
        mem.write_slice(&data, at).unwrap();
        let mut back = [0u8; 64];
        mem.read_slice(&mut back, at).unwrap();
        assert_eq!(&back[..], &data[..]);

        let map = mem.find_region(GuestAddress(0)).unwrap().mapping();
        let mut file = [0u8; 32];
        map.read_at(4 * p - 32, &mut file).unwrap();
        assert_eq!(
            &file[..],
            &data[..32],
            "the low half at the end of the file"
        );
        map.read_at(0, &mut file).unwrap();
        assert_eq!(
            &file[..],
            &data[32..],
            "the high half at the start of the file"
        );

        mem.write_obj(0xdead_beef_u32, GuestAddress(2 * p + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(2 * p + 8)).unwrap(),
            0xdead_beef
        );
        let mut word = [0u8; 4];
        map.read_at(8, &mut word).unwrap();
        assert_eq!(u32::from_ne_bytes(word), 0xdead_beef);

        let high = mem.find_region(GuestAddress(3 * p)).unwrap();
        assert_eq!(high.start_addr(), GuestAddress(2 * p));
        assert_eq!(high.gmem_offset(), 0);
        let slice = mem.get_slice(GuestAddress(3 * p), 16).unwrap();
        assert_eq!(slice.len(), 16);
        slice.write_slice(&[7u8; 16], 0).unwrap();
        map.read_at(p, &mut file[..16]).unwrap();
        assert_eq!(&file[..16], &[7u8; 16]);

        // Reading from and writing to files, through the volatile paths.
        let mut src: &[u8] = &[9u8; 100];
        mem.read_exact_volatile_from(GuestAddress(100), &mut src, 100)
            .unwrap();
        let mut out = Vec::new();
        mem.write_all_volatile_to(GuestAddress(100), &mut out, 100)
            .unwrap();
        assert_eq!(out, vec![9u8; 100]);
    }

    #[test]
    fn out_of_range_accesses_are_errors() {
        let p = page();
        let low = GuestMemfdRegion::from_range(shared(4), 0, 2 * p, GuestAddress(0)).unwrap();
        let high = low.sibling(2 * p, 2 * p, GuestAddress(0x10_0000)).unwrap();
        let mem = from_regions([low, high]).unwrap();

        // In the hole between the regions, and past the last one.
        for gpa in [2 * p, 0x10_0000 - 4, 0x10_0000 + 2 * p, u64::MAX - 3] {
            assert!(
                matches!(
                    mem.read_obj::<u32>(GuestAddress(gpa)),
                    Err(GuestMemoryError::InvalidGuestAddress(_))
                ),
                "read at {gpa:#x}"
            );
            assert!(mem.write_obj(1u32, GuestAddress(gpa)).is_err());
            assert!(mem.get_slice(GuestAddress(gpa), 1).is_err());
        }
        // Starting inside, running out: a partial access, an error.
        let r = mem.read_obj::<u64>(GuestAddress(2 * p - 4));
        assert!(
            matches!(
                r,
                Err(GuestMemoryError::PartialBuffer {
                    expected: 8,
                    completed: 4
                })
            ),
            "{r:?}"
        );
        assert!(
            mem.write_slice(&[1u8; 8], GuestAddress(0x10_0000 + 2 * p - 4))
                .is_err()
        );
        // A slice must fit the region.
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(matches!(
            region.get_slice(MemoryRegionAddress(2 * p - 4), 8),
            Err(GuestMemoryError::InvalidBackendAddress)
        ));
        assert!(region.get_slice(MemoryRegionAddress(u64::MAX), 2).is_err());
        assert_eq!(
            region
                .get_slice(MemoryRegionAddress(2 * p), 0)
                .unwrap()
                .len(),
            0
        );
        assert!(mem.get_slice(GuestAddress(2 * p - 4), 8).is_err());
    }

    #[test]
    fn punched_pages_read_zero() {
        let p = page();
        let base = GuestAddress(0x4000_0000);
        let region = GuestMemfdRegion::from_range(shared(6), p, 4 * p, base).unwrap();
        let mem = from_regions([region]).unwrap();
        mem.write_slice(&vec![0xaa; 4 * p as usize], base).unwrap();
        let region = mem.find_region(base).unwrap();
        region
            .punch_hole(GuestAddress(base.0 + p)..GuestAddress(base.0 + 3 * p))
            .unwrap();
        let mut all = vec![0u8; 4 * p as usize];
        mem.read_slice(&mut all, base).unwrap();
        let (p_us, at) = (p as usize, |i: usize| i * p as usize);
        assert!(all[..p_us].iter().all(|&b| b == 0xaa));
        assert!(
            all[at(1)..at(3)].iter().all(|&b| b == 0),
            "punched pages read zero"
        );
        assert!(all[at(3)..].iter().all(|&b| b == 0xaa));
        // In the file: pages 2 and 3 (the region starts at page 1).
        let mut page_buf = vec![0u8; p_us];
        region.mapping().read_at(2 * p, &mut page_buf).unwrap();
        assert!(page_buf.iter().all(|&b| b == 0));
        region.mapping().read_at(p, &mut page_buf).unwrap();
        assert!(page_buf.iter().all(|&b| b == 0xaa));
        // A punched page refaults writable.
        mem.write_obj(5u8, GuestAddress(base.0 + p)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(base.0 + p)).unwrap(), 5);

        let op = "GuestMemfdRegion::punch_hole";
        let r = |a: u64, b: u64| GuestAddress(base.0 + a)..GuestAddress(base.0 + b);
        assert!(invalid(region.punch_hole(r(p, p)), op).contains("empty"));
        assert!(invalid(region.punch_hole(r(1, p)), op).contains("page aligned"));
        assert!(invalid(region.punch_hole(r(3 * p, 5 * p)), op).contains("not inside"));
        assert!(
            invalid(region.punch_hole(GuestAddress(0)..GuestAddress(p)), op).contains("not inside")
        );
    }

    #[test]
    fn from_regions_refuses_overlaps() {
        let p = page();
        let op = "kvm_gmem::vm_memory::from_regions";
        let rule = invalid(from_regions(Vec::new()), op);
        assert!(rule.contains("at least one region"), "{rule}");

        let a = GuestMemfdRegion::from_range(shared(4), 0, 2 * p, GuestAddress(0)).unwrap();
        let b = a.sibling(2 * p, 2 * p, GuestAddress(p)).unwrap();
        let rule = invalid(from_regions([a, b]), op);
        assert!(
            rule.contains("overlap") && rule.contains("guest addresses"),
            "{rule}"
        );

        let a = GuestMemfdRegion::from_range(shared(4), 0, 2 * p, GuestAddress(0)).unwrap();
        let b = a.sibling(p, 2 * p, GuestAddress(0x10_0000)).unwrap();
        let rule = invalid(from_regions([b, a]), op);
        assert!(rule.contains("overlap in the guest_memfd"), "{rule}");

        // The same file range of two different guest_memfds is fine.
        let a = GuestMemfdRegion::from_range(shared(2), 0, 2 * p, GuestAddress(0)).unwrap();
        let b = GuestMemfdRegion::from_range(shared(2), 0, 2 * p, GuestAddress(2 * p)).unwrap();
        assert_eq!(from_regions([a, b]).unwrap().num_regions(), 2);
    }

    #[cfg(feature = "rfc-kvm-userfault")]
    #[test]
    fn userfault_bitmap_rides_on_the_slot() {
        let p = page();
        let region = GuestMemfdRegion::from_range(shared(4), 0, 4 * p, GuestAddress(0)).unwrap();
        let sibling = region.sibling(0, 4 * p, GuestAddress(0)).unwrap();
        let rule = invalid(
            region.with_userfault_bitmap(Arc::new(UserfaultBitmap::new(3, true))),
            "GuestMemfdRegion::with_userfault_bitmap",
        );
        assert!(rule.contains("3 pages"), "{rule}");
        let bitmap = Arc::new(UserfaultBitmap::new(4, true));
        let region = sibling.with_userfault_bitmap(Arc::clone(&bitmap)).unwrap();
        assert!(Arc::ptr_eq(region.userfault_bitmap().unwrap(), &bitmap));
        let slot = region.memory_region(0).unwrap();
        assert!(
            slot.flags()
                .contains(crate::memslot::RegionFlags::USERFAULT)
        );
    }
}
