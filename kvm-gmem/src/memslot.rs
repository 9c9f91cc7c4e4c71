//! `KVM_SET_USER_MEMORY_REGION2`: memory slots backed by guest_memfd.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::gmem::{GuestMemfd, GuestMemfdFlags};
use crate::mapping::Mapping;
use crate::sys::{ioctl_arg, page_size};
use kvm_gmem_sys as sys;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};

bitflags::bitflags! {
    /// `KVM_MEM_*` flags of a memory slot.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct RegionFlags: u32 {
        /// `KVM_MEM_LOG_DIRTY_PAGES`: track dirty pages.
        const LOG_DIRTY_PAGES = sys::KVM_MEM_LOG_DIRTY_PAGES;
        /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
        const READONLY = sys::KVM_MEM_READONLY;
        /// `KVM_MEM_GUEST_MEMFD` (Linux 6.8): backed by a guest_memfd. Set by
        /// [`MemoryRegion2Builder::guest_memfd`].
        const GUEST_MEMFD = sys::KVM_MEM_GUEST_MEMFD;
        /// `KVM_MEM_USERFAULT` (RFC KVM Userfault): vCPU faults on pages whose
        /// bit is set in the slot's [`UserfaultBitmap`] exit to userspace
        /// (<https://lore.kernel.org/kvm/20250618042424.330664-1-jthoughton@google.com/>).
        #[cfg(feature = "rfc-kvm-userfault")]
        const USERFAULT = sys::rfc::kvm_userfault::KVM_MEM_USERFAULT;
    }
}

/// A memory slot description for `KVM_SET_USER_MEMORY_REGION2`, validated.
///
/// It borrows the [`GuestMemfd`] whose descriptor it names (`'a`), so the fd
/// cannot be closed, and its number reused, before the slot is set; once set,
/// KVM holds its own reference to the file.
///
/// # Examples
///
/// ```
/// use kvm_gmem::{MemoryRegion2, RegionFlags};
///
/// # fn main() -> Result<(), kvm_gmem::Error> {
/// let region = MemoryRegion2::builder(0, 0x10_0000, 2 << 20)
///     .userspace_addr(0x7f00_0000_0000)
///     .flags(RegionFlags::LOG_DIRTY_PAGES)
///     .build()?;
/// assert_eq!((region.slot(), region.gpa(), region.size()), (0, 0x10_0000, 2 << 20));
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegion2<'a> {
    raw: Raw,
    _gmem: PhantomData<&'a GuestMemfd>,
    /// The flags of the guest_memfd the slot names (empty without one), to
    /// explain a refusal.
    gmem_flags: GuestMemfdFlags,
}

/// The 160-byte argument: upstream's layout, or the KVM Userfault RFC's
/// (identical size and request number; the RFC names `pad2[0]`).
#[cfg(not(feature = "rfc-kvm-userfault"))]
type Raw = sys::kvm_userspace_memory_region2;
#[cfg(feature = "rfc-kvm-userfault")]
type Raw = sys::rfc::kvm_userfault::kvm_userspace_memory_region2;

static_assertions::assert_eq_size!(Raw, sys::kvm_userspace_memory_region2);

impl MemoryRegion2<'_> {
    /// A builder for slot `slot` mapping `size` bytes at guest physical
    /// address `gpa`.
    ///
    /// Bits 16..31 of `slot` select the address space where the VM has
    /// several (`KVM_CAP_MULTI_ADDRESS_SPACE`).
    ///
    /// # Examples
    ///
    /// The rules the kernel enforces are checked by
    /// [`MemoryRegion2Builder::build`], before any ioctl:
    ///
    /// ```
    /// use kvm_gmem::{Error, GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryRegion2, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// let e = MemoryRegion2::builder(0, 0x1000, 0x1234).build().unwrap_err();
    /// assert!(matches!(e, Error::Invalid { .. })); // size not a page multiple
    ///
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// if !vm.guest_memfd_flags()?.contains(shared) {
    ///     return Ok(()); // a guest_memfd the host maps needs Linux 6.18
    /// }
    /// let gmem = GuestMemfd::builder(4 << 20).flags(shared).create(&vm)?;
    /// let map = gmem.map()?;
    /// // Slot 1: guest physical 1 GiB.. backed by the second half of the file;
    /// // its shared view is the mapping (which must cover the whole slot).
    /// let region = MemoryRegion2::builder(1, 1 << 30, 2 << 20)
    ///     .guest_memfd(&gmem, 2 << 20)
    ///     .userspace_addr(map.addr() + (2 << 20))
    ///     .build()?;
    /// assert_eq!(region.as_raw().guest_memfd_offset, 2 << 20);
    /// // The guest_memfd range must lie inside the file.
    /// assert!(MemoryRegion2::builder(2, 0, 4 << 20).guest_memfd(&gmem, 2 << 20).build().is_err());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
    pub fn builder(slot: u32, gpa: u64, size: u64) -> MemoryRegion2Builder<'static> {
        MemoryRegion2Builder {
            _gmem: PhantomData,
            slot,
            gpa,
            size,
            flags: RegionFlags::empty(),
            userspace_addr: 0,
            userspace_len: None,
            gmem: None,
            gmem_flags: GuestMemfdFlags::empty(),
            #[cfg(feature = "rfc-kvm-userfault")]
            bitmap: None,
        }
    }

    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.raw.slot
    }

    /// The guest physical address.
    pub fn gpa(&self) -> u64 {
        self.raw.guest_phys_addr
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.raw.memory_size
    }

    /// The flags.
    pub fn flags(&self) -> RegionFlags {
        RegionFlags::from_bits_retain(self.raw.flags)
    }

    /// `ioctl(vm, KVM_SET_USER_MEMORY_REGION2, &region)`; see
    /// [`VmOps::set_memory_region`](crate::VmOps::set_memory_region).
    ///
    /// # Safety
    ///
    /// As for [`VmOps::set_memory_region`](crate::VmOps::set_memory_region).
    ///
    /// # Errors
    ///
    /// As for [`VmOps::set_memory_region`](crate::VmOps::set_memory_region):
    /// the kernel's errno (`EEXIST` for an overlapping guest range, and from
    /// Linux 7.2 for a guest_memfd range already bound to another slot,
    /// which 7.1 and older answer `EINVAL`), typed where the cause is known.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
    pub(crate) unsafe fn set(&self, vm: BorrowedFd<'_>) -> Result<()> {
        let mut raw = self.raw;
        // SAFETY: the request encodes the 160-byte struct `Raw` has (checked
        // at compile time); the caller guarantees the user pointers inside it.
        unsafe { ioctl_arg::<{ sys::KVM_SET_USER_MEMORY_REGION2 }, _>(vm, &mut raw) }
            .map_err(|e| self.explain_refusal(e))?;
        Ok(())
    }

    /// The kernel's refusal, typed where the cause is known: arm64 KVM binds
    /// only guest_memfds the host can map (`GUEST_MEMFD_FLAG_MMAP`), and
    /// answers EINVAL for any other.
    fn explain_refusal(&self, e: crate::error::Errno) -> Error {
        let op = "KVM_SET_USER_MEMORY_REGION2";
        if cfg!(target_arch = "aarch64")
            && e.0 == libc::EINVAL
            && self.flags().contains(RegionFlags::GUEST_MEMFD)
            && !self.gmem_flags.contains(GuestMemfdFlags::MMAP)
        {
            return Error::Unsupported {
                op,
                capability: "GUEST_MEMFD_FLAG_MMAP",
                evidence: format!(
                    "arm64 KVM binds only a guest_memfd created with GUEST_MEMFD_FLAG_MMAP; \
                     this one has flags {}; the ioctl answered {e}",
                    self.gmem_flags
                ),
            };
        }
        Error::kernel(op, e)
    }

    /// The raw argument, for callers that issue the ioctl themselves (with
    /// feature `kvm-ioctls`, kvm-bindings' struct converts `From` a region).
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
    pub fn as_raw(&self) -> &sys::kvm_userspace_memory_region2 {
        // Always upstream's type: with the KVM Userfault RFC on, `Raw` is the
        // RFC's layout and `raw_upstream` reinterprets it (see there).
        self.raw_upstream()
    }

    #[cfg(not(feature = "rfc-kvm-userfault"))]
    fn raw_upstream(&self) -> &sys::kvm_userspace_memory_region2 {
        &self.raw
    }

    #[cfg(feature = "rfc-kvm-userfault")]
    #[allow(unsafe_code)]
    fn raw_upstream(&self) -> &sys::kvm_userspace_memory_region2 {
        // SAFETY: both types are `repr(C)`, 160 bytes, 8-aligned, made of
        // integers only, and agree on every field but `pad2[0]`, which the
        // RFC names `userfault_bitmap` (an integer too).
        unsafe { &*(&self.raw as *const Raw).cast() }
    }
}

/// `ioctl(vm, KVM_SET_USER_MEMORY_REGION2, {slot, memory_size: 0})`; see
/// [`VmOps::delete_memory_region`](crate::VmOps::delete_memory_region).
///
/// # References
///
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
pub(crate) fn delete(vm: BorrowedFd<'_>, slot: u32) -> Result<()> {
    let mut raw = sys::kvm_userspace_memory_region2 {
        slot,
        ..Default::default()
    };
    // SAFETY: a zero-sized slot holds no user pointer; the request encodes
    // this struct (checked at compile time).
    unsafe { ioctl_arg::<{ sys::KVM_SET_USER_MEMORY_REGION2 }, _>(vm, &mut raw) }
        .map_err(|e| Error::kernel("KVM_SET_USER_MEMORY_REGION2", e))?;
    Ok(())
}

/// Builds a [`MemoryRegion2`].
#[derive(Clone, Copy, Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct MemoryRegion2Builder<'a> {
    _gmem: PhantomData<&'a GuestMemfd>,
    slot: u32,
    gpa: u64,
    size: u64,
    flags: RegionFlags,
    userspace_addr: u64,
    userspace_len: Option<u64>,
    gmem: Option<(i32, u64, u64)>,
    gmem_flags: GuestMemfdFlags,
    #[cfg(feature = "rfc-kvm-userfault")]
    bitmap: Option<(u64, u64)>,
}

impl<'a> MemoryRegion2Builder<'a> {
    /// Backs the slot with `gmem` from `offset` (sets `KVM_MEM_GUEST_MEMFD`).
    /// The region borrows `gmem` until it is set.
    pub fn guest_memfd<'b>(self, gmem: &'b GuestMemfd, offset: u64) -> MemoryRegion2Builder<'b>
    where
        'a: 'b,
    {
        MemoryRegion2Builder {
            _gmem: PhantomData,
            gmem: Some((gmem.as_raw_fd(), offset, gmem.size())),
            gmem_flags: gmem.flags(),
            flags: self.flags | RegionFlags::GUEST_MEMFD,
            ..self
        }
    }

    /// The shared view: the slot's `userspace_addr` is `map`'s start.
    pub fn userspace(mut self, map: &Mapping) -> Self {
        self.userspace_addr = map.addr();
        self.userspace_len = Some(map.len() as u64);
        self
    }

    /// The shared view at a raw address (any mapping the caller manages).
    pub fn userspace_addr(mut self, addr: u64) -> Self {
        self.userspace_addr = addr;
        self.userspace_len = None;
        self
    }

    /// Adds flags (`LOG_DIRTY_PAGES`, `READONLY`, RFC `USERFAULT`).
    pub fn flags(mut self, flags: RegionFlags) -> Self {
        self.flags |= flags;
        self
    }

    /// The KVM Userfault bitmap (RFC); also sets `KVM_MEM_USERFAULT`.
    #[cfg(feature = "rfc-kvm-userfault")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rfc-kvm-userfault")))]
    pub fn userfault_bitmap(mut self, bitmap: &UserfaultBitmap) -> Self {
        self.bitmap = Some((bitmap.addr(), bitmap.pages()));
        self.flags |= RegionFlags::USERFAULT;
        self
    }

    /// Checks the slot against the rules KVM enforces and returns it.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the rule: size non-zero and page aligned;
    /// guest address page aligned; no flag bit outside [`RegionFlags`];
    /// `GUEST_MEMFD` only with [`Self::guest_memfd`]; guest_memfd offset page
    /// aligned and the range inside the file; a mapping given with
    /// [`Self::userspace`] at least `size` long; a userfault bitmap covering
    /// every page.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2> (the rules)
    pub fn build(self) -> Result<MemoryRegion2<'a>> {
        let op = "KVM_SET_USER_MEMORY_REGION2";
        let page = page_size();
        let bad = |rule: String| Err(Error::invalid(op, rule));
        if self.size == 0 {
            return bad("size must be non-zero (use delete_memory_region to delete a slot)".into());
        }
        if !self.size.is_multiple_of(page) {
            return bad(format!(
                "size {:#x} is not a multiple of the page size",
                self.size
            ));
        }
        if !self.gpa.is_multiple_of(page) {
            return bad(format!("guest address {:#x} is not page aligned", self.gpa));
        }
        if self.gpa.checked_add(self.size).is_none() {
            return bad("guest address + size overflows".into());
        }
        if !self.userspace_addr.is_multiple_of(page) {
            return bad(format!(
                "userspace address {:#x} is not page aligned",
                self.userspace_addr
            ));
        }
        if let Some(len) = self.userspace_len
            && len < self.size
        {
            return bad(format!(
                "the mapping ({len:#x} bytes) is smaller than the slot ({:#x})",
                self.size
            ));
        }
        let unknown = self.flags.bits() & !RegionFlags::all().bits();
        if unknown != 0 {
            return bad(format!(
                "flags {:#x} hold bits {unknown:#x} that no KVM_MEM_* flag of this build names \
                 (RFC flags need their cargo feature)",
                self.flags.bits()
            ));
        }
        if self.gmem.is_none() && self.flags.contains(RegionFlags::GUEST_MEMFD) {
            return bad(
                "KVM_MEM_GUEST_MEMFD is set but no guest_memfd was given (set it with \
                 MemoryRegion2Builder::guest_memfd, which also sets the flag)"
                    .into(),
            );
        }
        let (fd, offset) = match self.gmem {
            Some((fd, offset, file_size)) => {
                if !offset.is_multiple_of(page) {
                    return bad(format!(
                        "guest_memfd offset {offset:#x} is not page aligned"
                    ));
                }
                match offset.checked_add(self.size) {
                    Some(end) if end <= file_size => {}
                    _ => {
                        return bad(format!(
                            "guest_memfd range {offset:#x}+{:#x} ends past the file size {file_size:#x}",
                            self.size
                        ));
                    }
                }
                (fd as u32, offset)
            }
            None => (0, 0),
        };
        #[allow(unused_mut)]
        let mut raw = Raw {
            slot: self.slot,
            flags: self.flags.bits(),
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.userspace_addr,
            guest_memfd_offset: offset,
            guest_memfd: fd,
            ..Default::default()
        };
        #[cfg(feature = "rfc-kvm-userfault")]
        if let Some((addr, pages)) = self.bitmap {
            if pages < self.size / page {
                return bad(format!(
                    "the userfault bitmap covers {pages} pages, the slot has {}",
                    self.size / page
                ));
            }
            raw.userfault_bitmap = addr;
        }
        Ok(MemoryRegion2 {
            raw,
            _gmem: PhantomData,
            gmem_flags: self.gmem_flags,
        })
    }
}

/// The KVM Userfault bitmap (RFC): bit *i* set = a vCPU fault on page *i* of
/// the slot exits to userspace with `KVM_MEMORY_EXIT_FLAG_USERFAULT`.
///
/// One bit per host page, bit *i* in 64-bit word *i* / 64 at bit *i* % 64
/// (little-endian bit order, as the kernel's `test_bit` reads it). The words
/// live on the heap ([`UserfaultBitmap::new`]) or in a memfd mapped
/// `MAP_SHARED` ([`UserfaultBitmap::memfd`], [`UserfaultBitmap::from_fd`]),
/// which is how Firecracker's secret-hiding branch shares the bitmap between
/// the VMM and its page-fault handler: the VMM hands the memfd over, and a
/// bit the handler clears is clear for KVM in the VMM at once.
///
/// Bits are set and cleared atomically; clearing uses release ordering, so
/// the page's contents written before [`UserfaultBitmap::clear`] are visible
/// to the vCPU that sees the bit clear.
///
/// # Examples
///
/// ```
/// use kvm_gmem::UserfaultBitmap;
///
/// # fn main() -> kvm_gmem::Result<()> {
/// // The VMM's bitmap, every page trapping, in a memfd to hand over.
/// let vmm = UserfaultBitmap::memfd(256, true)?;
/// // The handler maps the same memfd (received over a Unix socket).
/// let fd = vmm.fd().expect("a memfd bitmap").try_clone_to_owned().unwrap();
/// let handler = UserfaultBitmap::from_fd(fd, 256)?;
/// handler.clear_range(0..64); // pages 0..64 populated
/// assert!(!vmm.is_set(63) && vmm.is_set(64));
/// assert_eq!(vmm.first_set(0), Some(64));
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// "KVM: Introduce KVM Userfault", v3:
/// <https://lore.kernel.org/kvm/20250618042424.330664-1-jthoughton@google.com/>
#[cfg(feature = "rfc-kvm-userfault")]
#[cfg_attr(docsrs, doc(cfg(feature = "rfc-kvm-userfault")))]
#[derive(Debug)]
pub struct UserfaultBitmap {
    /// The first word: the heap allocation's or the mapping's start.
    words: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    /// Number of words (`pages.div_ceil(64)`).
    len: usize,
    pages: u64,
    backing: Backing,
}

/// What holds a [`UserfaultBitmap`]'s words.
#[cfg(feature = "rfc-kvm-userfault")]
#[derive(Debug)]
enum Backing {
    /// Owned by this box (never read through it: through `words`).
    Heap(#[allow(dead_code)] Box<[std::sync::atomic::AtomicU64]>),
    /// A `MAP_SHARED` mapping of `map_len` bytes of `fd`, unmapped on drop.
    Memfd {
        fd: std::os::fd::OwnedFd,
        map_len: usize,
    },
}

// SAFETY: the words are only ever accessed through `&AtomicU64` (atomic
// operations), whichever thread holds the bitmap; the heap box or the shared
// mapping lives as long as the bitmap and is freed once, on drop.
#[cfg(feature = "rfc-kvm-userfault")]
unsafe impl Send for UserfaultBitmap {}
// SAFETY: see the `Send` impl: shared access is atomic access.
#[cfg(feature = "rfc-kvm-userfault")]
unsafe impl Sync for UserfaultBitmap {}

#[cfg(feature = "rfc-kvm-userfault")]
impl UserfaultBitmap {
    /// A heap bitmap for `pages` pages, every bit set (every page faults)
    /// when `all_set`.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::UserfaultBitmap;
    ///
    /// let bitmap = UserfaultBitmap::new(100, true);
    /// bitmap.clear(7);
    /// assert!(!bitmap.is_set(7) && bitmap.is_set(8) && !bitmap.is_set(100));
    /// assert!(bitmap.fd().is_none()); // not shareable
    /// ```
    pub fn new(pages: u64, all_set: bool) -> UserfaultBitmap {
        let n = pages.div_ceil(64) as usize;
        let init = if all_set { u64::MAX } else { 0 };
        let mut boxed: Box<[std::sync::atomic::AtomicU64]> = (0..n)
            .map(|_| std::sync::atomic::AtomicU64::new(init))
            .collect();
        let words = std::ptr::NonNull::new(boxed.as_mut_ptr())
            .expect("a boxed slice's pointer is never null");
        UserfaultBitmap {
            words,
            len: n,
            pages,
            backing: Backing::Heap(boxed),
        }
    }

    /// `memfd_create("kvm-userfault-bitmap", MFD_CLOEXEC |
    /// MFD_ALLOW_SEALING)` of `pages.div_ceil(64) * 8` bytes, its size sealed
    /// (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and mapped `MAP_SHARED`:
    /// a bitmap for `pages` pages that [`UserfaultBitmap::fd`] can hand to
    /// another process (every bit set when `all_set`).
    ///
    /// The sealed size means the receiver can map it without the risk of the
    /// file shrinking under its mapping (SIGBUS).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for `pages == 0` or a bitmap larger than the
    /// address space; [`Error::Kernel`] naming `memfd_create`, `ftruncate`,
    /// `fcntl(F_ADD_SEALS)` or `mmap`.
    ///
    /// # References
    ///
    /// - <https://man7.org/linux/man-pages/man2/memfd_create.2.html>
    /// - <https://man7.org/linux/man-pages/man2/fcntl.2.html> (file seals)
    #[doc(alias = "memfd_create")]
    pub fn memfd(pages: u64, all_set: bool) -> Result<UserfaultBitmap> {
        let op = "memfd_create(userfault bitmap)";
        let (len, bytes, map_len) = Self::geometry(op, pages)?;
        let fd = crate::sys::sealed_memfd(op, c"kvm-userfault-bitmap", bytes)?;
        let bitmap = Self::map(fd, len, map_len, pages)?;
        if all_set {
            for w in bitmap.words() {
                w.store(u64::MAX, std::sync::atomic::Ordering::Release);
            }
        }
        Ok(bitmap)
    }

    /// Maps a bitmap memfd received from another process (Firecracker's
    /// third handshake fd) for `pages` pages, `MAP_SHARED`, read-write: bits
    /// cleared here are clear for the sender's KVM at once. Takes ownership
    /// of `fd` (closed on every error path).
    ///
    /// The file's size is checked with `fstat` before it is mapped: it must
    /// be a regular file (a memfd) holding at least the `pages.div_ceil(8)`
    /// bytes that carry the bits, so that no word this bitmap touches lies
    /// on a page past the end of the file (which would raise SIGBUS).
    /// The sender must not shrink the file afterwards (a memfd from
    /// [`UserfaultBitmap::memfd`] cannot: its size is sealed).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for `pages == 0`, a file that is not a regular file,
    /// or one too small for `pages`; [`Error::Kernel`] naming `fstat` or
    /// `mmap` (`EACCES` for an fd opened read-only).
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{Error, UserfaultBitmap};
    ///
    /// # fn main() -> kvm_gmem::Result<()> {
    /// let small = UserfaultBitmap::memfd(64, false)?; // 8 bytes
    /// let fd = small.fd().unwrap().try_clone_to_owned().unwrap();
    /// let e = UserfaultBitmap::from_fd(fd, 4096).unwrap_err(); // needs 512 bytes
    /// assert!(matches!(e, Error::Invalid { .. }), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - <https://man7.org/linux/man-pages/man2/fstat.2.html>
    /// - <https://man7.org/linux/man-pages/man2/mmap.2.html> (SIGBUS past the end of the file)
    pub fn from_fd(fd: std::os::fd::OwnedFd, pages: u64) -> Result<UserfaultBitmap> {
        let op = "UserfaultBitmap::from_fd";
        let (len, _, map_len) = Self::geometry(op, pages)?;
        let st = crate::sys::fstat(std::os::fd::AsFd::as_fd(&fd))
            .map_err(|e| Error::kernel("fstat(userfault bitmap)", e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Error::invalid(
                op,
                format!(
                    "the fd is not a regular file (a memfd): st_mode {:#o}",
                    st.st_mode
                ),
            ));
        }
        // Every word read lies on a page whose first byte is inside the file
        // when the file holds every bit: the last word starts at or before
        // the byte of the last bit, and a word never crosses a page.
        let need = pages.div_ceil(8);
        let size = u64::try_from(st.st_size).unwrap_or(0);
        if size < need {
            return Err(Error::invalid(
                op,
                format!(
                    "the bitmap file is {size} bytes; {pages} pages need at least {need} \
                     (one bit per page); mapping it would raise SIGBUS"
                ),
            ));
        }
        Self::map(fd, len, map_len, pages)
    }

    /// Words, bytes of bits, and mapping length for `pages`.
    fn geometry(op: &'static str, pages: u64) -> Result<(usize, u64, usize)> {
        if pages == 0 {
            return Err(Error::invalid(op, "a bitmap covers at least one page"));
        }
        let words = pages.div_ceil(64);
        let bytes = words * 8;
        let map_len = bytes
            .checked_next_multiple_of(page_size())
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| Error::invalid(op, "the bitmap is larger than the address space"))?;
        Ok((words as usize, bytes, map_len))
    }

    /// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)` of the
    /// words, rounded up to the page size.
    fn map(
        fd: std::os::fd::OwnedFd,
        len: usize,
        map_len: usize,
        pages: u64,
    ) -> Result<UserfaultBitmap> {
        let op = "mmap(userfault bitmap)";
        // SAFETY: a fresh shared mapping placed by the kernel (addr NULL) of
        // a file we hold open; it replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::kernel(op, crate::error::Errno::last()));
        }
        // mmap never returns NULL for a NULL hint without MAP_FIXED; should
        // it, the mapping is released rather than leaked.
        let Some(words) = std::ptr::NonNull::new(p.cast::<std::sync::atomic::AtomicU64>()) else {
            return Err(Error::invalid(op, "mmap returned NULL"));
        };
        Ok(UserfaultBitmap {
            words,
            len,
            pages,
            backing: Backing::Memfd { fd, map_len },
        })
    }

    fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: `words` points at `len` initialised, 8-aligned words (a
        // boxed slice, or a page-aligned mapping at least `len * 8` bytes
        // long) that live as long as `self`. `AtomicU64` is interior
        // mutable, so other threads, processes and KVM changing the words
        // does not invalidate the shared reference.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr(), self.len) }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The address the memslot carries (`userfault_bitmap`): the first
    /// word, on the heap or in the mapping.
    pub fn addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    /// The memfd holding the bitmap, to send to another process; `None` for
    /// a heap bitmap ([`UserfaultBitmap::new`]).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.backing {
            Backing::Heap(_) => None,
            Backing::Memfd { fd, .. } => Some(std::os::fd::AsFd::as_fd(fd)),
        }
    }

    /// Marks page `i` as trapping (no effect past [`Self::pages`]).
    pub fn set(&self, i: u64) {
        if i < self.pages {
            self.words()[(i / 64) as usize]
                .fetch_or(1 << (i % 64), std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Marks page `i` as resolved, with release ordering (no effect past
    /// [`Self::pages`]).
    pub fn clear(&self, i: u64) {
        if i < self.pages {
            self.words()[(i / 64) as usize]
                .fetch_and(!(1 << (i % 64)), std::sync::atomic::Ordering::Release);
        }
    }

    /// Marks every page of `pages` (clamped to [`Self::pages`]) as resolved:
    /// one atomic `fetch_and` per word, with release ordering.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::UserfaultBitmap;
    ///
    /// let bitmap = UserfaultBitmap::new(200, true);
    /// bitmap.clear_range(60..130);
    /// assert!(bitmap.is_set(59) && !bitmap.is_set(60) && !bitmap.is_set(129));
    /// assert_eq!(bitmap.first_set(60), Some(130));
    /// ```
    pub fn clear_range(&self, pages: std::ops::Range<u64>) {
        let (start, end) = (pages.start, pages.end.min(self.pages));
        let mut i = start;
        while i < end {
            let word = i / 64;
            let hi = end.min((word + 1) * 64);
            let bits = hi - i; // 1..=64
            let mask = if bits == 64 {
                u64::MAX
            } else {
                ((1u64 << bits) - 1) << (i % 64)
            };
            self.words()[word as usize].fetch_and(!mask, std::sync::atomic::Ordering::Release);
            i = hi;
        }
    }

    /// Whether page `i` traps (`false` past [`Self::pages`]).
    pub fn is_set(&self, i: u64) -> bool {
        i < self.pages
            && self.words()[(i / 64) as usize].load(std::sync::atomic::Ordering::Acquire)
                & (1 << (i % 64))
                != 0
    }

    /// The first trapping page at or after `from`, if any (bits past
    /// [`Self::pages`] are never reported).
    pub fn first_set(&self, from: u64) -> Option<u64> {
        let mut word = from / 64;
        let mut mask = u64::MAX.checked_shl((from % 64) as u32).unwrap_or(0);
        while word < self.len as u64 {
            let bits =
                self.words()[word as usize].load(std::sync::atomic::Ordering::Acquire) & mask;
            if bits != 0 {
                let i = word * 64 + u64::from(bits.trailing_zeros());
                return (i < self.pages).then_some(i);
            }
            word += 1;
            mask = u64::MAX;
        }
        None
    }
}

#[cfg(feature = "rfc-kvm-userfault")]
impl Drop for UserfaultBitmap {
    fn drop(&mut self) {
        if let Backing::Memfd { map_len, .. } = self.backing {
            // SAFETY: `words` is the start of the `map_len`-byte mapping this
            // bitmap made and owns; no reference into it outlives `self`.
            // The fd closes after, when `backing` drops.
            unsafe { libc::munmap(self.words.as_ptr().cast(), map_len) };
        }
    }
}

#[cfg(all(test, feature = "rfc-kvm-userfault"))]
mod tests {
    use super::UserfaultBitmap;
    use crate::error::Error;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    /// (device, inode) of an open fd.
    fn identity(fd: BorrowedFd<'_>) -> (u64, u64) {
        // SAFETY: plain data, all-zero valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is writable; `fd` is open for the borrow.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        (st.st_dev, st.st_ino)
    }

    /// Whether fd number `raw` still names the file `id` (another thread may
    /// have reused the number for another file: that is not a leak).
    fn still_open(raw: i32, id: (u64, u64)) -> bool {
        // SAFETY: plain data, all-zero valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is writable; fstat on any number is harmless (EBADF).
        (unsafe { libc::fstat(raw, &mut st) }) == 0 && (st.st_dev, st.st_ino) == id
    }

    /// Whether `addr` starts a mapping of the file with inode `ino` (the
    /// other tests of this process map bitmaps too, possibly at an address
    /// just freed, so the name alone does not tell).
    fn mapped(addr: u64, ino: u64) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            l.starts_with(&format!("{addr:x}-")) && f.get(4) == Some(&ino.to_string().as_str())
        })
    }

    fn memfd_of(bytes: i64) -> OwnedFd {
        // SAFETY: a NUL-terminated name; memfd_create returns a new fd.
        let raw = unsafe { libc::memfd_create(c"small".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: integers only.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), bytes) }, 0);
        fd
    }

    #[test]
    fn two_mappings_of_one_memfd_share_bits() {
        let a = UserfaultBitmap::memfd(130, false).unwrap();
        let fd = a.fd().unwrap().try_clone_to_owned().unwrap();
        let b = UserfaultBitmap::from_fd(fd, 130).unwrap();
        assert_ne!(a.addr(), b.addr(), "two distinct mappings");
        assert_eq!(a.first_set(0), None);
        a.set(129);
        a.set(3);
        assert!(b.is_set(129) && b.is_set(3) && !b.is_set(4));
        b.clear(3);
        assert!(!a.is_set(3));
        b.clear_range(0..200);
        assert_eq!(a.first_set(0), None);
        // The memfd holds exactly the words, in little-endian bit order.
        a.set(0);
        a.set(65);
        let mut raw = [0u8; 24];
        // SAFETY: `raw` is writable for 24 bytes.
        let n = unsafe { libc::pread(a.fd().unwrap().as_raw_fd(), raw.as_mut_ptr().cast(), 24, 0) };
        assert_eq!(n, 24, "ceil(130 / 64) * 8 bytes");
        assert_eq!(u64::from_le_bytes(raw[0..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(raw[8..16].try_into().unwrap()), 2);
    }

    #[test]
    fn memfd_all_set_and_sealed() {
        let a = UserfaultBitmap::memfd(100, true).unwrap();
        assert!((0..100).all(|i| a.is_set(i)) && !a.is_set(100));
        assert_eq!(a.first_set(99), Some(99));
        assert_eq!(a.first_set(100), None, "bits past pages are never reported");
        // SAFETY: F_GET_SEALS reads the seals.
        let seals = unsafe { libc::fcntl(a.fd().unwrap().as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        // SAFETY: integers only; refused by the seal.
        assert!(unsafe { libc::ftruncate(a.fd().unwrap().as_raw_fd(), 0) } < 0);
    }

    #[test]
    fn from_fd_refuses_a_too_small_file() {
        // 8 bytes hold 64 bits: 65 pages need 9.
        let e = UserfaultBitmap::from_fd(memfd_of(8), 65).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { rule, .. } if rule.contains("SIGBUS")),
            "{e}"
        );
        // Exactly enough bytes for the bits maps (the last word's tail is on
        // the same page).
        let b = UserfaultBitmap::from_fd(memfd_of(9), 65).unwrap();
        b.clear_range(0..65);
        assert_eq!(b.first_set(0), None);
        assert!(matches!(
            UserfaultBitmap::from_fd(memfd_of(4096), 0),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            UserfaultBitmap::memfd(0, true),
            Err(Error::Invalid { .. })
        ));
        // Not a regular file.
        let (s, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = UserfaultBitmap::from_fd(OwnedFd::from(s), 1).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { rule, .. } if rule.contains("regular")),
            "{e}"
        );
    }

    #[test]
    fn no_fd_or_mapping_leaks() {
        let a = UserfaultBitmap::memfd(4096, true).unwrap();
        let raw = a.fd().unwrap().as_raw_fd();
        let id = identity(a.fd().unwrap());
        let addr = a.addr();
        assert!(mapped(addr, id.1));
        drop(a);
        assert!(!still_open(raw, id), "the memfd is closed on drop");
        assert!(!mapped(addr, id.1), "the mapping is gone on drop");

        // Error paths close the fd they were given.
        let small = memfd_of(8);
        let (raw, id) = (small.as_raw_fd(), identity(small.as_fd()));
        assert!(UserfaultBitmap::from_fd(small, 1000).is_err());
        assert!(!still_open(raw, id));
        let ok = memfd_of(4096);
        let (raw, id) = (ok.as_raw_fd(), identity(ok.as_fd()));
        let b = UserfaultBitmap::from_fd(ok, 1000).unwrap();
        assert!(still_open(raw, id));
        drop(b);
        assert!(!still_open(raw, id));
    }

    #[test]
    fn heap_bitmap_unchanged() {
        let h = UserfaultBitmap::new(130, false);
        assert!(h.fd().is_none());
        h.set(64);
        assert!(h.is_set(64));
        assert_eq!(h.first_set(0), Some(64));
        h.clear_range(64..65);
        assert_eq!(h.first_set(0), None);
        let empty = UserfaultBitmap::new(0, true);
        assert_eq!((empty.first_set(0), empty.is_set(0)), (None, false));
        empty.clear_range(0..10);
        empty.set(0);
    }

    #[test]
    fn clear_range_matches_single_clears() {
        for (start, end) in [
            (0, 1),
            (0, 64),
            (1, 63),
            (5, 200),
            (64, 128),
            (127, 129),
            (190, 500),
        ] {
            let a = UserfaultBitmap::new(200, true);
            let b = UserfaultBitmap::new(200, true);
            a.clear_range(start..end);
            for i in start..end {
                b.clear(i);
            }
            for i in 0..200 {
                assert_eq!(a.is_set(i), b.is_set(i), "{start}..{end} at {i}");
            }
        }
    }
}
