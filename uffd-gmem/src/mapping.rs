//! [`HostMapping`]: the memory a userfaultfd user registers, mapped and
//! owned safely (private anonymous, `MAP_SHARED` over a new memfd, or over a
//! file), reached only through volatile copies.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::sys;
use kvm_gmem_sys::support::volatile_copy;
use std::ffi::CString;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

/// What a [`HostMapping`] maps.
#[derive(Debug)]
enum Backing {
    /// Private anonymous memory.
    Anonymous,
    /// `MAP_SHARED` over a memfd this mapping created and owns.
    Memfd(OwnedFd),
    /// A caller's file, shared or private (the mapping holds the kernel's
    /// reference on the file, not the descriptor).
    File { shared: bool },
}

/// A read-write host mapping that a userfaultfd registers: private
/// anonymous memory ([`HostMapping::anonymous`], for `MISSING` faults
/// resolved with `UFFDIO_COPY`), shared memory over a new memfd
/// ([`HostMapping::memfd`], whose page cache `MINOR` faults and
/// `UFFDIO_CONTINUE` need), or a file ([`HostMapping::file`]).
///
/// Like guest memory, its contents are never handed out as `&[u8]`: once
/// registered the kernel fills and removes its pages behind the program's
/// back, and other threads (or, shared, other processes) write it
/// concurrently. Every access copies with volatile loads and stores,
/// bounded by the length ([`HostMapping::read_at`],
/// [`HostMapping::write_at`]); a read of a registered, missing page blocks
/// until the userfaultfd resolves it. Because no reference into it exists,
/// [`Uffd::register_mapping`](crate::Uffd::register_mapping) is safe.
///
/// Unmapped on drop (which also drops a userfaultfd registration of it).
///
/// # Examples
///
/// ```
/// use uffd_gmem::HostMapping;
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let page = uffd_gmem::page_size() as usize;
/// let mem = HostMapping::anonymous(2 * page)?;
/// mem.write_at(page as u64 - 2, b"hello")?; // across the page boundary
/// let mut buf = [0u8; 5];
/// mem.read_at(page as u64 - 2, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// assert!(mem.write_at(2 * page as u64 - 1, b"no").is_err()); // out of bounds
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct HostMapping {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: a `HostMapping` is a region of memory that the crate accesses only
// through volatile copies of caller-owned buffers; no reference into it is
// ever created, so moving the handle to another thread (Send) or copying
// through it from several threads at once (Sync) cannot create aliasing
// `&mut`. Concurrent writers can interleave bytes, the documented behaviour
// of memory shared with a kernel that fills it, not undefined behaviour of
// this type. The memfd it may own is an ordinary descriptor.
unsafe impl Send for HostMapping {}
// SAFETY: see the `Send` impl above.
unsafe impl Sync for HostMapping {}

/// `len` as a non-zero multiple of the page size, or [`Error::Invalid`].
fn check_len(op: &'static str, len: usize) -> Result<()> {
    let page = kvm_gmem_sys::support::page_size() as usize;
    if len == 0 || !len.is_multiple_of(page) {
        return Err(Error::invalid(
            op,
            format!("length {len:#x} must be a non-zero multiple of the page size {page:#x}"),
        ));
    }
    Ok(())
}

impl HostMapping {
    /// A private anonymous mapping of `len` bytes (`MAP_PRIVATE |
    /// MAP_ANONYMOUS`, read-write): registered `MISSING` (or `WP`), its
    /// faults are resolved with [`Uffd::copy`](crate::Uffd::copy) or
    /// [`Uffd::zeropage`](crate::Uffd::zeropage).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a `len` of 0 or not a multiple of the page
    /// size; [`Error::Kernel`] naming `mmap`.
    #[doc(alias = "mmap")]
    pub fn anonymous(len: usize) -> Result<HostMapping> {
        let op = "mmap(anonymous)";
        check_len(op, len)?;
        let p = sys::mmap_read_write(len, false, None, 0).map_err(|e| Error::kernel(op, e))?;
        HostMapping::adopt(op, p, len, Backing::Anonymous)
    }

    /// A new memfd named `name`, `len` bytes long, mapped `MAP_SHARED`
    /// read-write: the page cache that `MINOR` registration and
    /// `Uffd::r#continue` work on (fill it through [`HostMapping::memfd_fd`]
    /// with `pwrite`, or through a second mapping). The memfd is owned by
    /// the mapping.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a `len` of 0 or not a multiple of the page
    /// size, or a `name` with a NUL byte; [`Error::Kernel`] naming
    /// `memfd_create` (with `ftruncate`) or `mmap`.
    #[doc(alias = "memfd_create")]
    pub fn memfd(name: &str, len: usize) -> Result<HostMapping> {
        let op = "memfd_create";
        check_len(op, len)?;
        let cname = CString::new(name)
            .map_err(|_| Error::invalid(op, format!("the name {name:?} contains a NUL byte")))?;
        let size = libc::off_t::try_from(len)
            .map_err(|_| Error::invalid(op, format!("length {len:#x} overflows off_t")))?;
        let fd = sys::memfd(&cname, size).map_err(|e| Error::kernel(op, e))?;
        let op = "mmap(memfd)";
        let p = sys::mmap_read_write(len, true, Some(fd.as_fd()), 0)
            .map_err(|e| Error::kernel(op, e))?;
        HostMapping::adopt(op, p, len, Backing::Memfd(fd))
    }

    /// Maps `len` bytes of `fd` from `offset`, read-write: `shared`
    /// (`MAP_SHARED`, writes reach the file and its page cache) or private
    /// (`MAP_PRIVATE`, copy on write). `fd` must be open read-write for a
    /// shared mapping (read-only is enough for a private one). The mapping
    /// keeps the file alive; `fd` may be closed afterwards.
    ///
    /// Accesses past the file's end raise SIGBUS (a crash, not undefined
    /// behaviour): keep the file at least `offset + len` long while the
    /// mapping lives.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a `len` of 0 or not a multiple of the page
    /// size, an unaligned `offset`, or one past `off_t`; [`Error::Kernel`]
    /// naming `mmap` (`EACCES` for a shared mapping of a read-only fd).
    #[doc(alias = "mmap")]
    pub fn file(fd: BorrowedFd<'_>, offset: u64, len: usize, shared: bool) -> Result<HostMapping> {
        let op = "mmap(file)";
        check_len(op, len)?;
        let page = kvm_gmem_sys::support::page_size();
        if !offset.is_multiple_of(page) {
            return Err(Error::invalid(
                op,
                format!("offset {offset:#x} must be a multiple of the page size {page:#x}"),
            ));
        }
        let off = libc::off_t::try_from(offset)
            .ok()
            .filter(|o| o.checked_add(len as libc::off_t).is_some())
            .ok_or_else(|| Error::invalid(op, format!("offset {offset:#x} overflows off_t")))?;
        let p =
            sys::mmap_read_write(len, shared, Some(fd), off).map_err(|e| Error::kernel(op, e))?;
        HostMapping::adopt(op, p, len, Backing::File { shared })
    }

    fn adopt(op: &'static str, p: *mut u8, len: usize, backing: Backing) -> Result<HostMapping> {
        match NonNull::new(p) {
            Some(ptr) => Ok(HostMapping { ptr, len, backing }),
            None => Err(Error::Protocol {
                op,
                what: "mmap returned address 0".into(),
            }),
        }
    }

    /// The start address, for the kernel (a userfaultfd registration, a
    /// Firecracker handshake region, a memslot's `userspace_addr`). Not
    /// dereferenceable from safe code.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The length in bytes (a non-zero multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: the length is non-zero).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `addr()..addr() + len()`: the range to register, unregister, wake.
    pub fn range(&self) -> Range<u64> {
        self.addr()..self.addr() + self.len as u64
    }

    /// Whether the mapping is `MAP_SHARED` (a memfd, or a file mapped
    /// shared).
    pub fn is_shared(&self) -> bool {
        matches!(
            self.backing,
            Backing::Memfd(_) | Backing::File { shared: true }
        )
    }

    /// The memfd behind a [`HostMapping::memfd`] mapping (`None` for the
    /// others): `pwrite` to it fills the page cache before
    /// `Uffd::r#continue`; it can be handed to another process.
    pub fn memfd_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd(fd) => Some(fd.as_fd()),
            _ => None,
        }
    }

    /// The start of the mapping as a raw pointer.
    ///
    /// # Safety
    ///
    /// The pointer is valid for `len()` bytes while `self` lives. Any access
    /// must tolerate the kernel and concurrent writers changing the memory
    /// (and, when registered, may block until a fault is resolved): do not
    /// create `&`/`&mut` references into it that outlive a single volatile
    /// access.
    pub unsafe fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, op: &'static str, offset: u64, len: usize) -> Result<usize> {
        kvm_gmem_sys::support::span_in(offset, len, self.len)
            .map_err(|rule| Error::invalid(op, rule))
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` (volatile loads). A
    /// registered page that is missing blocks the read until the
    /// userfaultfd resolves the fault.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.check("HostMapping::read_at", offset, buf.len())?;
        // SAFETY: `off + buf.len()` is inside the mapping (checked), which is
        // mapped read-write for `self`'s lifetime; `buf` is a distinct,
        // exclusive Rust buffer.
        unsafe { volatile_copy(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset` (volatile stores).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] if the range leaves the mapping.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let off = self.check("HostMapping::write_at", offset, data.len())?;
        // SAFETY: `off + data.len()` is inside the mapping (checked), which
        // is mapped read-write for `self`'s lifetime; `data` is readable for
        // its length and not inside the mapping (no reference into it
        // exists).
        unsafe { volatile_copy(data.as_ptr(), self.ptr.as_ptr().add(off), data.len()) };
        Ok(())
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in the constructor,
        // which nothing else unmaps; no reference into it outlives `self`.
        unsafe { sys::munmap(self.ptr.as_ptr(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_offsets_are_checked_before_the_call() {
        let page = kvm_gmem_sys::support::page_size() as usize;
        for len in [0, 1, page + 1] {
            let e = HostMapping::anonymous(len).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{e}");
            let e = HostMapping::memfd("t", len).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{e}");
        }
        assert!(matches!(
            HostMapping::memfd("a\0b", page),
            Err(Error::Invalid { .. })
        ));
        let m = HostMapping::memfd("uffd-gmem-test", page).unwrap();
        let fd = m.memfd_fd().unwrap();
        assert!(matches!(
            HostMapping::file(fd, 1, page, true),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn copies_are_bounded_and_see_each_other() {
        let page = kvm_gmem_sys::support::page_size() as usize;
        let m = HostMapping::memfd("uffd-gmem-test", 2 * page).unwrap();
        assert!(m.is_shared());
        assert_eq!(m.range(), m.addr()..m.addr() + 2 * page as u64);
        // Unaligned, across the page boundary, odd lengths.
        let data: Vec<u8> = (0..37u8).collect();
        m.write_at(page as u64 - 11, &data).unwrap();
        // A second, shared mapping of the same memfd sees the bytes.
        let alias = HostMapping::file(m.memfd_fd().unwrap(), 0, 2 * page, true).unwrap();
        let mut back = vec![0u8; data.len()];
        alias.read_at(page as u64 - 11, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(m.read_at(2 * page as u64 - 3, &mut [0u8; 4]).is_err());
        assert!(m.write_at(u64::MAX, &[1]).is_err());
        assert!(m.read_at(2 * page as u64, &mut []).is_ok());
        let anon = HostMapping::anonymous(page).unwrap();
        assert!(!anon.is_shared() && anon.memfd_fd().is_none());
    }
}
