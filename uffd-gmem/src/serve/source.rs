//! Where page contents come from: the [`PageSource`] trait, the mapped
//! snapshot file [`MappedFile`], and `Vec<u8>`.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::sys;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

#[cfg(doc)]
use super::Region;

/// Where page contents come from.
///
/// # Examples
///
/// `Vec<u8>` is one; a source of your own needs `len` and `read_at`:
///
/// ```
/// use uffd_gmem::serve::PageSource;
///
/// let snapshot: Vec<u8> = (0..=255).collect();
/// let mut buf = [0u8; 4];
/// snapshot.read_at(16, &mut buf)?;
/// assert_eq!((PageSource::len(&snapshot), buf), (256, [16, 17, 18, 19]));
/// assert!(snapshot.read_at(254, &mut buf).is_err()); // past the end
///
/// struct Pattern(u8); // every byte the same, 1 MiB of it
/// impl PageSource for Pattern {
///     fn len(&self) -> u64 { 1 << 20 }
///     fn read_at(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
///         buf.fill(self.0);
///         Ok(())
///     }
/// }
/// Pattern(9).read_at(4096, &mut buf)?;
/// assert_eq!(buf, [9; 4]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub trait PageSource: Send + Sync {
    /// The source's length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    ///
    /// # Errors
    ///
    /// Any I/O error, or `UnexpectedEof` for a short read; the server reports
    /// it and leaves the fault unresolved.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// A pointer to `len` bytes at `offset`, when the source is memory that
    /// stays mapped while the server runs (zero-copy `UFFDIO_COPY`).
    ///
    /// The pointer must be valid for reads of `len` bytes for as long as the
    /// server runs. The server hands it to `UFFDIO_COPY` and `pwrite` (the
    /// kernel checks it: a bad pointer is an `EFAULT`), and, for regions
    /// resolved through an alias mapping, copies from it in userspace: that
    /// use is covered by the `unsafe` contract of
    /// [`Region::continue_via_alias`].
    fn as_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let _ = (offset, len);
        None
    }
}

/// A snapshot file mapped read-only (`MAP_PRIVATE`): the usual page source.
///
/// As with any mapped file, the file must not shrink while it is mapped:
/// reading a page past a new end raises SIGBUS in the copy that reads it.
/// Snapshot files are written once, before restore; do not truncate one
/// that a server is reading.
///
/// # Examples
///
/// ```
/// use uffd_gmem::serve::{MappedFile, PageSource};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let path = std::env::temp_dir().join(format!("uffd-gmem-doc-{}.snap", std::process::id()));
/// std::fs::write(&path, vec![0xa5u8; 8192])?;
/// let snapshot = MappedFile::open(&path)?;
/// std::fs::remove_file(&path)?; // the mapping keeps the contents
/// let mut buf = [0u8; 2];
/// snapshot.read_at(4095, &mut buf)?;
/// assert_eq!((snapshot.len(), buf), (8192, [0xa5; 2]));
/// assert!(snapshot.as_ptr(0, 8192).is_some()); // zero-copy UFFDIO_COPY
/// assert!(snapshot.as_ptr(4096, 8192).is_none()); // past the end
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MappedFile {
    ptr: *const u8,
    len: u64,
    _file: File,
}

// SAFETY: the mapping is read-only (PROT_READ) and owned by this handle,
// which unmaps it only on drop; the crate never writes through it and forms
// no reference into it, only reads it (the kernel in UFFDIO_COPY, or copies
// into caller buffers), so moving the handle across threads is sound.
unsafe impl Send for MappedFile {}
// SAFETY: as for Send: shared access is concurrent reads of read-only memory.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Opens and maps `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming `open`; [`Error::Kernel`] naming `mmap`.
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(|e| io_err("open(snapshot)", e))?;
        MappedFile::from_file(file)
    }

    /// Maps an open file.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming `fstat`; [`Error::Kernel`] naming `mmap`;
    /// [`Error::Invalid`] for an empty file.
    pub fn from_file(file: File) -> Result<MappedFile> {
        let len = file
            .metadata()
            .map_err(|e| io_err("fstat(snapshot)", e))?
            .len();
        if len == 0 {
            return Err(Error::invalid(
                "mmap(snapshot)",
                "the snapshot file is empty",
            ));
        }
        let ptr = sys::mmap_read_only(file.as_fd(), len as usize)
            .map_err(|e| Error::kernel("mmap(snapshot)", e))?;
        Ok(MappedFile {
            ptr,
            len,
            _file: file,
        })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `from_file`; no pointer into it outlives
        // the server, which holds this source in an Arc.
        unsafe { sys::munmap(self.ptr, self.len as usize) };
    }
}

impl PageSource for MappedFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let ptr = self
            .as_ptr(offset, buf.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        // SAFETY: `as_ptr` checked `offset + buf.len()` lies inside the
        // mapping, which is readable while `self` lives (file not shrunk: see
        // the type's docs); `buf` is a distinct, writable Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn as_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        // SAFETY: `offset <= end <= self.len`, so the result stays inside
        // (or one past) the mapping made in `from_file`.
        (end <= self.len).then(|| unsafe { self.ptr.add(offset as usize) })
    }
}

impl PageSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let ptr = PageSource::as_ptr(self, offset, buf.len() as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        // SAFETY: `as_ptr` checked `offset + buf.len()` is inside the vector,
        // which `&self` keeps alive and unchanged; `buf` is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn as_ptr(&self, offset: u64, len: u64) -> Option<*const u8> {
        let end = offset.checked_add(len)?;
        (end <= self.as_slice().len() as u64).then(|| self[offset as usize..].as_ptr())
    }
}

pub(super) fn io_err(op: &'static str, source: std::io::Error) -> Error {
    Error::Io { op, source }
}
