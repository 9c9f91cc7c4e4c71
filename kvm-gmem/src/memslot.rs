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
/// Bits are set and cleared atomically; clearing uses release ordering, so
/// the page's contents written before [`UserfaultBitmap::clear`] are visible
/// to the vCPU that sees the bit clear.
///
/// # References
///
/// "KVM: Introduce KVM Userfault", v3:
/// <https://lore.kernel.org/kvm/20250618042424.330664-1-jthoughton@google.com/>
#[cfg(feature = "rfc-kvm-userfault")]
#[cfg_attr(docsrs, doc(cfg(feature = "rfc-kvm-userfault")))]
#[derive(Debug)]
pub struct UserfaultBitmap {
    words: Box<[std::sync::atomic::AtomicU64]>,
    pages: u64,
}

#[cfg(feature = "rfc-kvm-userfault")]
impl UserfaultBitmap {
    /// A bitmap for `pages` pages, every bit set (every page faults) when
    /// `all_set`.
    pub fn new(pages: u64, all_set: bool) -> UserfaultBitmap {
        let n = pages.div_ceil(64) as usize;
        let init = if all_set { u64::MAX } else { 0 };
        UserfaultBitmap {
            words: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(init))
                .collect(),
            pages,
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The address the memslot carries.
    pub fn addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }

    /// Marks page `i` as trapping.
    pub fn set(&self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize]
                .fetch_or(1 << (i % 64), std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Marks page `i` as resolved, with release ordering.
    pub fn clear(&self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize]
                .fetch_and(!(1 << (i % 64)), std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether page `i` traps.
    pub fn is_set(&self, i: u64) -> bool {
        i < self.pages
            && self.words[(i / 64) as usize].load(std::sync::atomic::Ordering::Acquire)
                & (1 << (i % 64))
                != 0
    }
}
