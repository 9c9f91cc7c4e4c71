//! The host's mapping of a guest_memfd.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::gmem::{GuestMemfd, GuestMemfdFlags};
use kvm_gmem_sys::support::volatile_copy;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A shared, read-write mapping of a whole guest_memfd.
///
/// It exists only where no access inside it can raise SIGBUS: the guest_memfd
/// has `MMAP` and `INIT_SHARED`, and the mapping covers exactly the file
/// (accesses past the end of the file fault). Guest memory is never handed
/// out as `&[u8]`: the guest, other threads and other processes write it
/// concurrently, so every access copies with volatile loads and stores,
/// bounded by the file size. Raw pointers are available only through
/// `unsafe`.
///
/// The mapping stays valid after the [`GuestMemfd`] handle is dropped (it
/// holds its own reference on the file) and is unmapped on drop.
///
/// # Examples
///
/// ```
/// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
///
/// # fn main() -> Result<(), kvm_gmem::Error> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
/// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
/// if !vm.guest_memfd_flags()?.contains(shared) {
///     return Ok(()); // a guest_memfd the host maps needs Linux 6.18
/// }
/// let map = GuestMemfd::builder(2 << 20).flags(shared).create(&vm)?.map()?;
/// map.fill(0, map.len(), 0)?;
/// map.write_at(0x1000, &0xdead_beef_u32.to_le_bytes())?;
/// let mut word = [0u8; 4];
/// map.read_at(0x1000, &mut word)?;
/// assert_eq!(u32::from_le_bytes(word), 0xdead_beef);
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd>
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is a region of shared memory that the crate accesses
// only through volatile copies of caller-owned buffers; no reference into it
// is ever created, so moving the handle to another thread (Send) or copying
// through it from several threads at once (Sync) cannot create aliasing
// `&mut`. Concurrent writers can interleave bytes, which is the documented
// behaviour of shared guest memory, not undefined behaviour of this type.
unsafe impl Send for Mapping {}
// SAFETY: see the `Send` impl above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(gmem: &GuestMemfd) -> Result<Mapping> {
        let op = "mmap(guest_memfd)";
        let flags = gmem.flags();
        if !flags.contains(GuestMemfdFlags::MMAP) {
            return Err(Error::invalid(
                op,
                "the guest_memfd was created without GUEST_MEMFD_FLAG_MMAP: it cannot be mapped (mmap gives ENODEV)",
            ));
        }
        if !flags.contains(GuestMemfdFlags::INIT_SHARED) {
            return Err(Error::invalid(
                op,
                "the guest_memfd was created without GUEST_MEMFD_FLAG_INIT_SHARED: its memory is private \
                 to the guest and every host access through a mapping would raise SIGBUS",
            ));
        }
        let len = usize::try_from(gmem.size())
            .map_err(|_| Error::invalid(op, "the file is larger than the address space"))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL), of
        // a file we hold open; it replaces nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                gmem.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::kernel(op, Errno::last()));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::invalid(op, "mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// The mapping's length: the guest_memfd's size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: a guest_memfd has a non-zero size).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address, for the kernel (a memslot's `userspace_addr`, a
    /// userfaultfd registration). Not dereferenceable from safe code.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The start of the mapping as a raw pointer.
    ///
    /// # Safety
    ///
    /// The pointer is valid for `len()` bytes while `self` lives. Any access
    /// must tolerate concurrent writers (the guest, other threads and
    /// processes): do not create `&`/`&mut` references into it that outlive
    /// a single volatile access.
    pub unsafe fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, op: &'static str, offset: u64, len: usize) -> Result<usize> {
        kvm_gmem_sys::support::span_in(offset, len, self.len)
            .map_err(|rule| Error::invalid(op, rule))
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// if !vm.guest_memfd_flags()?.contains(shared) {
    ///     return Ok(()); // a guest_memfd the host maps needs Linux 6.18
    /// }
    /// let map = GuestMemfd::builder(2 << 20).flags(shared).create(&vm)?.map()?;
    /// map.write_at(0x1000, b"guest code")?;
    /// let mut back = [0u8; 10];
    /// map.read_at(0x1000, &mut back)?;
    /// assert_eq!(&back, b"guest code");
    /// // Past the end: refused, nothing copied.
    /// assert!(map.write_at(map.len() as u64 - 4, b"too long").is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.check("Mapping::read_at", offset, buf.len())?;
        // SAFETY: `off + buf.len()` is inside the mapping (checked), which is
        // valid and accessible (MMAP + INIT_SHARED) for `self`'s lifetime;
        // `buf` is a distinct, exclusive Rust buffer.
        unsafe { volatile_copy(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// if !vm.guest_memfd_flags()?.contains(shared) {
    ///     return Ok(()); // a guest_memfd the host maps needs Linux 6.18
    /// }
    /// let map = GuestMemfd::builder(2 << 20).flags(shared).create(&vm)?.map()?;
    /// map.write_at(0x1000, b"guest code")?;
    /// let mut back = [0u8; 10];
    /// map.read_at(0x1000, &mut back)?;
    /// assert_eq!(&back, b"guest code");
    /// // Past the end: refused, nothing copied.
    /// assert!(map.write_at(map.len() as u64 - 4, b"too long").is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let off = self.check("Mapping::write_at", offset, data.len())?;
        // SAFETY: `off + data.len()` is inside the mapping (checked), which is
        // valid and writable (MMAP + INIT_SHARED) for `self`'s lifetime;
        // `data` is readable for its length.
        unsafe { volatile_copy(data.as_ptr(), self.ptr.as_ptr().add(off), data.len()) };
        Ok(())
    }

    /// Copies from `src` (any readable bytes: a snapshot file's mapping, a
    /// buffer) into the mapping at `offset`; an alias of
    /// [`Mapping::write_at`] named for population.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping.
    pub fn copy_from(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.write_at(offset, src)
    }

    /// Sets `len` bytes at `offset` to `byte`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<()> {
        let off = self.check("Mapping::fill", offset, len)?;
        // SAFETY: `off + len` is inside the mapping (checked), which is
        // mapped read-write and host-accessible (MMAP + INIT_SHARED) for
        // `self`'s lifetime; only volatile stores touch it.
        unsafe { volatile_fill(self.ptr.as_ptr().add(off), byte, len) };
        Ok(())
    }

    /// `madvise(MADV_POPULATE_WRITE)` over `range`: allocates and maps the
    /// pages in one call instead of one fault per page (Linux 5.14).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping or is not page
    /// aligned; [`Error::Kernel`] if the kernel refuses.
    ///
    /// # References
    ///
    /// <https://man7.org/linux/man-pages/man2/madvise.2.html>
    pub fn populate_write(&self, offset: u64, len: usize) -> Result<()> {
        let op = "madvise(MADV_POPULATE_WRITE)";
        let off = self.check(op, offset, len)?;
        let page = crate::sys::page_size() as usize;
        if !off.is_multiple_of(page) {
            return Err(Error::invalid(
                op,
                format!("offset {offset:#x} is not page aligned"),
            ));
        }
        // SAFETY: the range lies inside our mapping (checked); MADV_POPULATE_WRITE
        // only faults pages in, it changes no contents.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(off).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r < 0 {
            return Err(Error::kernel(op, Errno::last()));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `new`, which
        // nothing else unmaps; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Sets `len` bytes to `byte` with volatile stores.
///
/// # Safety
///
/// `dst` must be valid for writes of `len` bytes.
unsafe fn volatile_fill(dst: *mut u8, byte: u8, len: usize) {
    let word = u64::from_ne_bytes([byte; 8]);
    let mut i = 0;
    while i < len && !(dst as usize + i).is_multiple_of(8) {
        // SAFETY: `i < len`, inside the caller's writable range; a byte store.
        unsafe { dst.add(i).write_volatile(byte) };
        i += 1;
    }
    while i + 8 <= len {
        // SAFETY: `i + 8 <= len` keeps the word inside the caller's range,
        // and `dst + i` is 8-aligned after the loop above.
        unsafe { dst.add(i).cast::<u64>().write_volatile(word) };
        i += 8;
    }
    while i < len {
        // SAFETY: `i < len`, inside the caller's writable range; a byte store.
        unsafe { dst.add(i).write_volatile(byte) };
        i += 1;
    }
}
