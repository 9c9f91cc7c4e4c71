//! Population of guest_memfd ranges: one entry point, several strategies,
//! the one that ran reported back.
//!
//! [`Populate::run`] copies a [`Source`] (a buffer, or a file such as a
//! snapshot) into a range of a guest_memfd. The strategies, in the order
//! [`Strategy::Auto`] tries them:
//!
//! 1. [`Strategy::PopulateIoctl`]: the VM ioctl `KVM_GUEST_MEMFD_POPULATE`
//!    ("\[RFC PATCH 0/4\] KVM: ioctl for populating guest_memfd", Nikita
//!    Kalyazin, 24 Oct 2024; not merged). Needs feature `rfc-populate`, a VM
//!    ([`Populate::new`]), [`Populate::gpa_base`], and the size-0 probe to
//!    succeed: the request number `0x4020AED6` is also Firecracker's
//!    `KVM_ASYNC_PF`, so it is never issued before that probe.
//! 2. [`Strategy::Write`]: `pwrite()` on the guest_memfd (the guest_memfd
//!    `write()` series, v7 14 Nov 2025, flag `GUEST_MEMFD_FLAG_WRITE`; bit 3
//!    in Firecracker's 6.18 stack). Needs feature `rfc-gmem-write` and a
//!    guest_memfd created with that flag. No user page tables, no per-page
//!    fault: about twice as fast as copying through a mapping.
//! 3. [`Strategy::MmapCopy`]: map the guest_memfd (upstream Linux 6.18,
//!    `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`) and copy. The
//!    per-page fault is the cost, so each thread prepares its next batch
//!    (4 MiB) in bulk, `fallocate` to allocate it and `MADV_POPULATE_READ`
//!    (Linux 5.14) to map it in the kernel, and then copies it (from a buffer
//!    with volatile stores, from a file with `pread` straight into the
//!    mapping); ranges of 64 MiB or more are split over two threads.
//! 4. [`Strategy::UffdCopy`]: `UFFDIO_COPY` into a registered guest_memfd
//!    mapping (the userfaultfd-on-guest_memfd series). Not implemented yet.
//!
//! Every strategy but the ioctl works from a process other than the VMM's
//! ([`Populate::detached`]; the guest_memfd travels with
//! [`crate::share`]).
//!
//! ```no_run
//! use kvm_gmem::populate::{Populate, Source, Strategy};
//! use kvm_gmem::{GuestMemfd, KvmDevice, VmType};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = KvmDevice::open()?;
//! let vm = kvm.create_vm(VmType::DEFAULT)?;
//! let gmem = GuestMemfd::builder(512 << 20).mmap(true).init_shared(true).create(&vm)?;
//! let snapshot = std::fs::File::open("snapshot.mem")?;
//! let report = Populate::new(&vm, &gmem)
//!     .strategy(Strategy::Auto)
//!     .gpa_base(0)
//!     .run(0..(512 << 20), Source::file(&snapshot, 0))?;
//! println!("{} bytes via {:?} in {:?}", report.bytes, report.strategy, report.elapsed);
//! for (skipped, why) in &report.tried {
//!     println!("  skipped {skipped:?}: {why}");
//! }
//! # Ok(())
//! # }
//! ```
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::gmem::{GuestMemfd, GuestMemfdFlags};
use crate::mapping::Mapping;
use crate::sys::page_size;
use crate::vm::VmOps;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

const OP: &str = "Populate::run";

/// Bytes each thread prepares and then copies in one step (MmapCopy), and
/// the size of each `pwrite`/ioctl call (Write, PopulateIoctl).
const BATCH: u64 = 4 << 20;

/// Ranges at least this large get two threads by default.
const PARALLEL_MIN: u64 = 64 << 20;
/// The most threads one population starts, whatever [`Populate::threads`] asks.
const MAX_THREADS: usize = 64;

/// Where the bytes come from. More kinds of source may come (the enum is
/// `#[non_exhaustive]`); [`Source::bytes`] and [`Source::file`] build these.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Source<'a> {
    /// A buffer: byte `i` of the range gets `bytes[i]`.
    Bytes(&'a [u8]),
    /// A file: byte `i` of the range gets the file's byte `offset + i`. The
    /// file must be open for reading; its position is not used or changed.
    File {
        /// The file.
        file: &'a File,
        /// Where in the file the range's first byte is.
        offset: u64,
    },
}

impl<'a> Source<'a> {
    /// A buffer.
    pub fn bytes(bytes: &'a [u8]) -> Source<'a> {
        Source::Bytes(bytes)
    }

    /// `file`, from byte `offset`.
    pub fn file(file: &'a File, offset: u64) -> Source<'a> {
        Source::File { file, offset }
    }
}

/// How to populate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// The fastest available, in the order of the variants below; the
    /// [`Report`] says which ran and why the others were skipped.
    #[default]
    Auto,
    /// The RFC VM ioctl `KVM_GUEST_MEMFD_POPULATE` (feature `rfc-populate`;
    /// needs [`Populate::new`] and [`Populate::gpa_base`]; the source must be
    /// in this process, which must be the VM's creator). The series:
    /// <https://lore.kernel.org/kvm/20241024095429.54052-1-kalyazin@amazon.com/>.
    PopulateIoctl,
    /// `pwrite()` on a guest_memfd created with the RFC
    /// `GUEST_MEMFD_FLAG_WRITE` (feature `rfc-gmem-write`). The series:
    /// <https://lore.kernel.org/kvm/20251114151828.98165-2-kalyazin@amazon.com/>.
    Write,
    /// Map the guest_memfd (`MMAP | INIT_SHARED`, Linux 6.18) and copy,
    /// after allocating and mapping each batch in bulk (`fallocate`,
    /// `MADV_POPULATE_READ`).
    MmapCopy,
    /// `UFFDIO_COPY` into a registered guest_memfd mapping: not implemented
    /// yet (needs uffd-gmem); always [`Error::Unsupported`].
    UffdCopy,
}

/// What [`Populate::run`] did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Report {
    /// Bytes populated: the whole range.
    pub bytes: u64,
    /// The strategy that ran (never [`Strategy::Auto`]).
    pub strategy: Strategy,
    /// Threads that copied.
    pub threads: usize,
    /// Wall time of the whole call, probes included.
    pub elapsed: Duration,
    /// Strategies skipped before the one that ran, each with the reason.
    pub tried: Vec<(Strategy, String)>,
}

/// Populates a guest_memfd; see the [module docs](self).
#[derive(Clone, Debug)]
#[must_use = "Populate does nothing until run() is called"]
pub struct Populate<'a> {
    vm: Option<BorrowedFd<'a>>,
    gmem: &'a GuestMemfd,
    strategy: Strategy,
    threads: Option<usize>,
    gpa_base: Option<u64>,
}

/// Why a strategy cannot run, before anything was written.
enum Unavailable {
    /// The request does not allow it (no VM, no gpa_base, no mapping flags).
    Invalid(Error),
    /// The kernel or build lacks it.
    Unsupported {
        capability: &'static str,
        evidence: String,
    },
}

impl Unavailable {
    fn reason(&self) -> String {
        match self {
            Unavailable::Invalid(Error::Invalid { rule, .. }) => rule.clone(),
            Unavailable::Invalid(e) => e.to_string(),
            Unavailable::Unsupported {
                capability,
                evidence,
            } => format!("{capability} unavailable: {evidence}"),
        }
    }

    fn into_error(self) -> Error {
        match self {
            Unavailable::Invalid(e) => e,
            Unavailable::Unsupported {
                capability,
                evidence,
            } => Error::Unsupported {
                op: OP,
                capability,
                evidence,
            },
        }
    }
}

/// How a strategy ended.
enum Outcome {
    Done,
    /// Refused before writing anything (Write on a kernel without the series).
    Unavailable(Unavailable),
}

impl<'a> Populate<'a> {
    /// Population by the VMM process, which owns `vm`: every strategy is
    /// possible (the ioctl also needs [`Populate::gpa_base`]).
    pub fn new(vm: &'a impl VmOps, gmem: &'a GuestMemfd) -> Populate<'a> {
        Populate {
            vm: Some(vm.vm_fd()),
            gmem,
            strategy: Strategy::Auto,
            threads: None,
            gpa_base: None,
        }
    }

    /// Population without a VM, e.g. in a separate process that received
    /// the guest_memfd with [`crate::share::recv`]: every strategy but
    /// [`Strategy::PopulateIoctl`].
    pub fn detached(gmem: &'a GuestMemfd) -> Populate<'a> {
        Populate {
            vm: None,
            gmem,
            strategy: Strategy::Auto,
            threads: None,
            gpa_base: None,
        }
    }

    /// The strategy ([`Strategy::Auto`] by default). An explicit strategy
    /// that cannot run is an error, never a silent fallback.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Threads that copy (at least 1; at most 64, and at most one per
    /// page). By default 1, or `min(available_parallelism, 2)` for ranges of
    /// 64 MiB or more.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// The guest physical address at which offset 0 of the guest_memfd is
    /// mapped (its memslot's `guest_phys_addr - guest_memfd_offset`).
    /// Required by [`Strategy::PopulateIoctl`], which addresses guest
    /// physical memory.
    pub fn gpa_base(mut self, gpa: u64) -> Self {
        self.gpa_base = Some(gpa);
        self
    }

    /// Copies `source` into `range` (offsets in the guest_memfd).
    ///
    /// Checked before anything is written: `range` is non-empty, page
    /// aligned at both ends and inside the guest_memfd; the source holds at
    /// least `range.end - range.start` bytes (for a file: its size minus
    /// `offset`); threads is at least 1.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the broken rule; [`Error::Unsupported`]
    /// naming the capability when an explicit strategy cannot run on this
    /// kernel, build or guest_memfd (or when [`Strategy::Auto`] finds none,
    /// with every reason); [`Error::Kernel`] when a system call fails
    /// midway (the range is then partly populated). The ioctl's `EEXIST`
    /// means a page was already populated: punch it first.
    ///
    /// # Examples
    ///
    /// Filling a guest_memfd from a buffer; on a stock kernel
    /// [`Strategy::Auto`] ends at [`Strategy::MmapCopy`] and the report
    /// says why the faster strategies were skipped:
    ///
    /// ```
    /// use kvm_gmem::populate::{Populate, Source};
    /// use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let vm = KvmDevice::open()?.create_vm(VmType::DEFAULT)?;
    /// let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    /// if !vm.guest_memfd_flags()?.contains(shared) {
    ///     return Ok(()); // no strategy without a mappable guest_memfd (Linux 6.18)
    /// }
    /// let gmem = GuestMemfd::builder(4 << 20).flags(shared).create(&vm)?;
    /// let image = vec![0x5a; 4 << 20];
    /// let report = Populate::new(&vm, &gmem).run(0..4 << 20, Source::bytes(&image))?;
    /// println!("{} bytes via {:?} in {:?}", report.bytes, report.strategy, report.elapsed);
    /// for (skipped, why) in &report.tried {
    ///     println!("  skipped {skipped:?}: {why}");
    /// }
    /// let mut byte = [0u8];
    /// gmem.map()?.read_at(0x1234, &mut byte)?;
    /// assert_eq!(byte, [0x5a]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - RFC `KVM_GUEST_MEMFD_POPULATE`:
    ///   <https://lore.kernel.org/kvm/20241024095429.54052-1-kalyazin@amazon.com/>
    /// - RFC guest_memfd `write()`:
    ///   <https://lore.kernel.org/kvm/20251114151828.98165-2-kalyazin@amazon.com/>
    /// - <https://man7.org/linux/man-pages/man2/fallocate.2.html>,
    ///   <https://man7.org/linux/man-pages/man2/madvise.2.html>
    ///   (`MmapCopy`'s batches)
    pub fn run(&self, range: Range<u64>, source: Source<'_>) -> Result<Report> {
        let start = Instant::now();
        let len = self.check(&range, &source)?;
        let threads = self.thread_count(len);
        let mut tried = Vec::new();
        let candidates: &[Strategy] = match self.strategy {
            Strategy::Auto => &[
                Strategy::PopulateIoctl,
                Strategy::Write,
                Strategy::MmapCopy,
                Strategy::UffdCopy,
            ],
            Strategy::PopulateIoctl => &[Strategy::PopulateIoctl],
            Strategy::Write => &[Strategy::Write],
            Strategy::MmapCopy => &[Strategy::MmapCopy],
            Strategy::UffdCopy => &[Strategy::UffdCopy],
        };
        for &strategy in candidates {
            let outcome = match strategy {
                Strategy::PopulateIoctl => self.populate_ioctl(&range, &source, threads)?,
                Strategy::Write => self.write(&range, &source, threads)?,
                Strategy::MmapCopy => self.mmap_copy(&range, &source, threads)?,
                _ => Outcome::Unavailable(Unavailable::Unsupported {
                    capability: "UFFDIO_COPY into a guest_memfd mapping",
                    evidence: "not yet implemented: needs uffd-gmem".into(),
                }),
            };
            match outcome {
                Outcome::Done => {
                    return Ok(Report {
                        bytes: len,
                        strategy,
                        threads,
                        elapsed: start.elapsed(),
                        tried,
                    });
                }
                Outcome::Unavailable(why) if self.strategy != Strategy::Auto => {
                    return Err(why.into_error());
                }
                Outcome::Unavailable(why) => tried.push((strategy, why.reason())),
            }
        }
        let evidence = tried
            .iter()
            .map(|(s, why)| format!("{s:?}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Error::Unsupported {
            op: OP,
            capability: "a population strategy (KVM_GUEST_MEMFD_POPULATE, \
                         GUEST_MEMFD_FLAG_WRITE or GUEST_MEMFD_FLAG_MMAP|INIT_SHARED)",
            evidence,
        })
    }

    /// The up-front rules; returns the range's length.
    fn check(&self, range: &Range<u64>, source: &Source<'_>) -> Result<u64> {
        let page = page_size();
        if self.threads == Some(0) {
            return Err(Error::invalid(OP, "threads must be at least 1"));
        }
        if range.start >= range.end {
            return Err(Error::invalid(
                OP,
                format!("empty range {:#x}..{:#x}", range.start, range.end),
            ));
        }
        if !range.start.is_multiple_of(page) || !range.end.is_multiple_of(page) {
            return Err(Error::invalid(
                OP,
                format!(
                    "range {:#x}..{:#x} is not page aligned at both ends (page size {page:#x})",
                    range.start, range.end
                ),
            ));
        }
        if range.end > self.gmem.size() {
            return Err(Error::invalid(
                OP,
                format!(
                    "range {:#x}..{:#x} ends past the guest_memfd's size {:#x}",
                    range.start,
                    range.end,
                    self.gmem.size()
                ),
            ));
        }
        let len = range.end - range.start;
        if usize::try_from(len).is_err() {
            return Err(Error::invalid(
                OP,
                "the range is larger than the address space",
            ));
        }
        let available = match *source {
            Source::Bytes(b) => b.len() as u64,
            Source::File { file, offset } => {
                let size = file
                    .metadata()
                    .map_err(|e| Error::kernel("fstat(source file)", io_errno(&e)))?
                    .len();
                size.saturating_sub(offset)
            }
        };
        if available < len {
            let what = match source {
                Source::Bytes(_) => "the source buffer holds".to_string(),
                Source::File { offset, .. } => {
                    format!("the source file holds, from offset {offset:#x},")
                }
            };
            return Err(Error::invalid(
                OP,
                format!(
                    "{what} {available:#x} bytes, fewer than the range's {len:#x}: \
                     the source must cover the whole range"
                ),
            ));
        }
        Ok(len)
    }

    fn thread_count(&self, len: u64) -> usize {
        let want = self.threads.unwrap_or_else(|| {
            if len >= PARALLEL_MIN {
                std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
            } else {
                1
            }
        });
        let pages = usize::try_from(len / page_size()).unwrap_or(usize::MAX);
        // Each thread gets at least one page, and no more threads than
        // MAX_THREADS are started whatever was asked.
        want.clamp(1, pages.clamp(1, MAX_THREADS))
    }

    // ---- Strategy::PopulateIoctl ------------------------------------------

    /// Whether the ioctl may be issued; the VM and the guest physical address
    /// of the range's start when it may.
    fn ioctl_available(&self, range: &Range<u64>) -> Result<(BorrowedFd<'a>, u64), Unavailable> {
        let vm = self.vm.ok_or_else(|| {
            Unavailable::Invalid(Error::invalid(
                OP,
                "KVM_GUEST_MEMFD_POPULATE is a VM ioctl issued by the VM's own process; \
                 Populate::detached has no VM (use Populate::new)",
            ))
        })?;
        let base = self.gpa_base.ok_or_else(|| {
            Unavailable::Invalid(Error::invalid(
                OP,
                "KVM_GUEST_MEMFD_POPULATE addresses guest physical memory: \
                 set Populate::gpa_base to where offset 0 of the guest_memfd is mapped",
            ))
        })?;
        let gpa = base
            .checked_add(range.start)
            .filter(|g| g.checked_add(range.end - range.start).is_some())
            .ok_or_else(|| {
                Unavailable::Invalid(Error::invalid(
                    OP,
                    format!(
                        "gpa_base {base:#x} + range {:#x}..{:#x} overflows",
                        range.start, range.end
                    ),
                ))
            })?;
        if !gpa.is_multiple_of(page_size()) {
            return Err(Unavailable::Invalid(Error::invalid(
                OP,
                format!("gpa_base {base:#x} is not page aligned"),
            )));
        }
        Self::probe_ioctl(vm)?;
        Ok((vm, gpa))
    }

    #[cfg(feature = "rfc-populate")]
    fn probe_ioctl(vm: BorrowedFd<'_>) -> Result<(), Unavailable> {
        crate::caps::populate_ioctl(vm).map_err(|e| Unavailable::Unsupported {
            capability: "KVM_GUEST_MEMFD_POPULATE",
            evidence: match e {
                Errno(libc::EINVAL) => "the size-0 probe of ioctl 0x4020aed6 answered EINVAL: \
                     the number is Firecracker's KVM_ASYNC_PF on this kernel"
                    .into(),
                Errno(libc::ENOTTY) => "the size-0 probe of ioctl 0x4020aed6 answered ENOTTY: \
                     the kernel does not have the RFC ioctl"
                    .into(),
                e => format!("the size-0 probe of ioctl 0x4020aed6 answered {e}"),
            },
        })
    }

    #[cfg(not(feature = "rfc-populate"))]
    fn probe_ioctl(_vm: BorrowedFd<'_>) -> Result<(), Unavailable> {
        Err(Unavailable::Unsupported {
            capability: "KVM_GUEST_MEMFD_POPULATE",
            evidence: "the crate was built without feature rfc-populate \
                       (the ioctl was not probed)"
                .into(),
        })
    }

    fn populate_ioctl(
        &self,
        range: &Range<u64>,
        source: &Source<'_>,
        threads: usize,
    ) -> Result<Outcome> {
        let (vm, gpa) = match self.ioctl_available(range) {
            Ok(ok) => ok,
            Err(why) => return Ok(Outcome::Unavailable(why)),
        };
        #[cfg(feature = "rfc-populate")]
        {
            let len = range.end - range.start;
            let src = SourcePtr::new(source, len)?;
            // The first page runs alone: EINVAL there, with nothing written,
            // means no guest_memfd memslot maps gpa_base + range (the ioctl
            // addresses guest physical memory); Strategy::Auto then goes on
            // to the strategies that address the file.
            let first = len.min(page_size());
            match populate_ioctl_chunk(vm, gpa, src.at(0), first) {
                Ok(()) => {}
                Err(Error::Kernel {
                    errno: Errno(libc::EINVAL),
                    ..
                }) => {
                    return Ok(Outcome::Unavailable(Unavailable::Invalid(Error::invalid(
                        OP,
                        format!(
                            "KVM_GUEST_MEMFD_POPULATE refused gpa {gpa:#x} with EINVAL: no \
                             memslot of this VM maps the guest_memfd there (gpa_base {:#x})",
                            gpa - range.start
                        ),
                    ))));
                }
                Err(e) => return Err(e),
            }
            let rest = len - first;
            if rest > 0 {
                parallel(rest, threads, |sub| {
                    populate_ioctl_chunk(
                        vm,
                        gpa + first + sub.start,
                        src.at(first + sub.start),
                        sub.end - sub.start,
                    )
                })?;
            }
            Ok(Outcome::Done)
        }
        #[cfg(not(feature = "rfc-populate"))]
        {
            // probe_ioctl refuses without the feature; nothing gets here.
            let _ = (vm, gpa, source, threads);
            Ok(Outcome::Unavailable(Unavailable::Unsupported {
                capability: "KVM_GUEST_MEMFD_POPULATE",
                evidence: "the crate was built without feature rfc-populate".into(),
            }))
        }
    }

    // ---- Strategy::Write --------------------------------------------------

    fn write_available(&self) -> Result<(), Unavailable> {
        #[cfg(feature = "rfc-gmem-write")]
        {
            if self.gmem.flags().contains(GuestMemfdFlags::WRITE) {
                return Ok(());
            }
            Err(Unavailable::Unsupported {
                capability: "GUEST_MEMFD_FLAG_WRITE",
                evidence: format!(
                    "the guest_memfd was created without it (flags {})",
                    self.gmem.flags()
                ),
            })
        }
        #[cfg(not(feature = "rfc-gmem-write"))]
        {
            Err(Unavailable::Unsupported {
                capability: "GUEST_MEMFD_FLAG_WRITE",
                evidence: "the crate was built without feature rfc-gmem-write".into(),
            })
        }
    }

    fn write(&self, range: &Range<u64>, source: &Source<'_>, threads: usize) -> Result<Outcome> {
        if let Err(why) = self.write_available() {
            return Ok(Outcome::Unavailable(why));
        }
        let len = range.end - range.start;
        let src = SourcePtr::new(source, len)?;
        pwrite_range(self.gmem.as_fd(), range.start, &src, len, threads)
    }

    // ---- Strategy::MmapCopy -----------------------------------------------

    fn mmap_copy(
        &self,
        range: &Range<u64>,
        source: &Source<'_>,
        threads: usize,
    ) -> Result<Outcome> {
        let flags = self.gmem.flags();
        if !flags.contains(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED) {
            // The mapping's own refusal explains the SIGBUS rule.
            return match self.gmem.map() {
                Err(e) => Ok(Outcome::Unavailable(Unavailable::Invalid(e))),
                Ok(_) => Ok(Outcome::Unavailable(Unavailable::Invalid(Error::invalid(
                    OP,
                    "the guest_memfd lacks GUEST_MEMFD_FLAG_MMAP|INIT_SHARED",
                )))),
            };
        }
        let map = self.gmem.map()?;
        let len = range.end - range.start;
        let base = range.start;
        let fallocate = std::sync::atomic::AtomicBool::new(true);
        let prefault =
            |b: &Range<u64>| prefault(self.gmem, &map, &fallocate, base + b.start, base + b.end);
        match *source {
            Source::Bytes(bytes) => parallel(len, threads, |sub| {
                batches(&sub, |b| {
                    prefault(&b)?;
                    map.copy_from(base + b.start, &bytes[b.start as usize..b.end as usize])
                })
            })?,
            Source::File { file, offset } => parallel(len, threads, |sub| {
                batches(&sub, |b| {
                    prefault(&b)?;
                    pread_into(
                        &map,
                        base + b.start,
                        file,
                        offset + b.start,
                        b.end - b.start,
                    )
                })
            })?,
        }
        Ok(Outcome::Done)
    }
}

/// Makes `start..end` of the guest_memfd present in `map` before it is
/// copied into, so the copy takes no page faults: `fallocate(KEEP_SIZE)`
/// allocates the pages in bulk, then `MADV_POPULATE_READ` (Linux 5.14)
/// maps them, in the kernel, without one trip through the fault path per
/// page in userspace. Measured on the test machine, this pair is faster than
/// `MADV_POPULATE_WRITE` alone (which allocates page by page and takes the
/// write-fault path); the resulting shared PTEs are writable, so the copy
/// after it takes no faults either. A page the host may not access (made
/// private) fails here with EFAULT instead of raising SIGBUS in the copy.
fn prefault(
    gmem: &GuestMemfd,
    map: &Mapping,
    fallocate: &std::sync::atomic::AtomicBool,
    start: u64,
    end: u64,
) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    if fallocate.load(Relaxed) {
        match gmem.allocate(start..end) {
            Ok(()) => {}
            // Only an optimisation: a kernel that cannot do it faults the
            // pages in below instead.
            Err(Error::Kernel {
                errno: Errno(libc::EOPNOTSUPP | libc::ENOSYS),
                ..
            }) => fallocate.store(false, Relaxed),
            Err(e) => return Err(e),
        }
    }
    let op = "madvise(MADV_POPULATE_READ)";
    let (Ok(off), Ok(len)) = (usize::try_from(start), usize::try_from(end - start)) else {
        return Err(Error::invalid(op, "range larger than the address space"));
    };
    if off.checked_add(len).is_none_or(|e| e > map.len()) {
        return Err(Error::invalid(op, "range outside the mapping"));
    }
    loop {
        // SAFETY: `off..off + len` lies inside `map` (checked above), which
        // stays mapped for the borrow; MADV_POPULATE_READ only faults pages
        // in and changes no contents.
        let r =
            unsafe { libc::madvise(map.as_ptr().add(off).cast(), len, libc::MADV_POPULATE_READ) };
        if r == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno(libc::EINTR) => continue,
            e => return Err(Error::kernel(op, e)),
        }
    }
}

/// Splits `0..len` into `threads` contiguous, page-aligned parts and runs
/// `work` on each, one on the calling thread; the first error wins.
fn parallel<F>(len: u64, threads: usize, work: F) -> Result<()>
where
    F: Fn(Range<u64>) -> Result<()> + Sync,
{
    let page = page_size();
    let pages = len / page;
    let n = threads.max(1) as u64;
    let part = |i: u64| -> Range<u64> {
        let bound = |k: u64| ((pages as u128 * k as u128 / n as u128) as u64 * page).min(len);
        bound(i)..if i + 1 == n { len } else { bound(i + 1) }
    };
    if n == 1 {
        return work(0..len);
    }
    std::thread::scope(|s| {
        let work = &work;
        let mut handles = Vec::new();
        let mut inline = Vec::new();
        for i in 1..n {
            let r = part(i);
            if r.is_empty() {
                continue;
            }
            match std::thread::Builder::new()
                .name("gmem-populate".into())
                .spawn_scoped(s, move || work(r))
            {
                Ok(h) => handles.push(h),
                // No thread to be had: do that part here.
                Err(_) => inline.push(part(i)),
            }
        }
        // Part 0 is empty when there are fewer pages than threads: no call
        // with an empty range (the parts above are skipped the same way).
        let first = part(0);
        let mut result = if first.is_empty() {
            Ok(())
        } else {
            work(first)
        };
        for r in inline {
            if result.is_ok() {
                result = work(r);
            }
        }
        for h in handles {
            let r = match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Runs `step` over `range` in [`BATCH`]-sized pieces.
fn batches(range: &Range<u64>, mut step: impl FnMut(Range<u64>) -> Result<()>) -> Result<()> {
    let mut at = range.start;
    while at < range.end {
        let end = range.end.min(at + BATCH);
        step(at..end)?;
        at = end;
    }
    Ok(())
}

/// `pread(file, mapping + at, len, file_offset)` until done: the kernel
/// copies straight from the page cache into the guest_memfd mapping, so the
/// source file is never mapped (a file truncated meanwhile makes `pread`
/// return early instead of raising SIGBUS).
fn pread_into(map: &Mapping, at: u64, file: &File, file_offset: u64, len: u64) -> Result<()> {
    let op = "pread(source file)";
    let (Ok(at), Ok(len)) = (usize::try_from(at), usize::try_from(len)) else {
        return Err(Error::invalid(op, "range larger than the address space"));
    };
    if at.checked_add(len).is_none_or(|end| end > map.len()) {
        return Err(Error::invalid(op, "range outside the mapping"));
    }
    let mut done = 0usize;
    while done < len {
        let Ok(off) = i64::try_from(file_offset + done as u64) else {
            return Err(Error::invalid(op, "file offset past the largest file size"));
        };
        // SAFETY: `at + len` lies inside `map` (checked above), which stays
        // mapped for the borrow; the kernel writes at most `len - done` bytes
        // there with copy_to_user, which tolerates concurrent writers and
        // turns an inaccessible page into EFAULT rather than a signal. No
        // Rust reference to the mapping is formed.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                map.as_ptr().add(at + done).cast(),
                len - done,
                off,
            )
        };
        match r {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "the source file ended at offset {off:#x}: it shrank during population \
                         (the source must cover the whole range)"
                    ),
                ));
            }
            _ => match Errno::last() {
                Errno(libc::EINTR) => continue,
                e => return Err(Error::kernel(op, e)),
            },
        }
    }
    Ok(())
}

/// The source as memory the *kernel* reads (pwrite, the populate ioctl):
/// the buffer itself, or a read-only shared mapping of the file range.
/// Userspace never dereferences it, so a file truncated meanwhile gives the
/// system call EFAULT, not this process SIGBUS.
struct SourcePtr<'a> {
    ptr: NonNull<u8>,
    /// The file mapping to unmap on drop, if one was made.
    map: Option<(NonNull<libc::c_void>, usize)>,
    _borrow: std::marker::PhantomData<&'a [u8]>,
}

// SAFETY: the pointer refers either to a buffer borrowed for 'a (shared,
// read-only) or to a read-only mapping owned by this value; it is only handed
// to system calls that read it, from any thread.
unsafe impl Send for SourcePtr<'_> {}
// SAFETY: as for Send: shared access is read-only and done by the kernel.
unsafe impl Sync for SourcePtr<'_> {}

impl<'a> SourcePtr<'a> {
    fn new(source: &Source<'a>, len: u64) -> Result<SourcePtr<'a>> {
        match *source {
            Source::Bytes(b) => Ok(SourcePtr {
                ptr: NonNull::from(b).cast(),
                map: None,
                _borrow: std::marker::PhantomData,
            }),
            Source::File { file, offset } => {
                let op = "mmap(source file)";
                let page = page_size();
                let skip = offset % page;
                let (Ok(map_len), Ok(file_off)) = (
                    usize::try_from(len + skip),
                    libc::off_t::try_from(offset - skip),
                ) else {
                    return Err(Error::invalid(op, "range or offset too large to map"));
                };
                // SAFETY: a fresh read-only shared mapping chosen by the
                // kernel (addr NULL); it replaces nothing and is unmapped in
                // Drop.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        map_len,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        file.as_raw_fd(),
                        file_off,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(Error::kernel(op, Errno::last()));
                }
                let Some(base) = NonNull::new(p) else {
                    return Err(Error::invalid(op, "mmap returned NULL"));
                };
                // SAFETY: advice on the mapping just made; it changes no data.
                unsafe { libc::madvise(p, map_len, libc::MADV_SEQUENTIAL) };
                // SAFETY: `skip < page <= map_len`, inside the mapping.
                let ptr = unsafe { base.cast::<u8>().add(skip as usize) };
                Ok(SourcePtr {
                    ptr,
                    map: Some((base, map_len)),
                    _borrow: std::marker::PhantomData,
                })
            }
        }
    }

    /// The source address of the range's byte `i`, for the kernel.
    fn at(&self, i: u64) -> *const u8 {
        self.ptr.as_ptr().wrapping_add(i as usize)
    }
}

impl Drop for SourcePtr<'_> {
    fn drop(&mut self) {
        if let Some((base, len)) = self.map {
            // SAFETY: the mapping made in `new`, unmapped once; only the
            // kernel read through it and no call using it is in flight.
            unsafe { libc::munmap(base.as_ptr(), len) };
        }
    }
}

/// The Write strategy: `pwrite` of `len` bytes from `src` to the guest_memfd
/// at `start`, [`BATCH`] bytes per call. The first call runs alone: if it is
/// refused with ESPIPE/ENODEV/EINVAL (no write() series, or no WRITE flag)
/// nothing was written and the strategy is reported unavailable.
fn pwrite_range(
    fd: BorrowedFd<'_>,
    start: u64,
    src: &SourcePtr<'_>,
    len: u64,
    threads: usize,
) -> Result<Outcome> {
    let first = len.min(BATCH);
    match pwrite_all(fd, start, src.at(0), first) {
        Ok(()) => {}
        Err(Error::Kernel {
            errno: e @ Errno(libc::ESPIPE | libc::ENODEV | libc::EINVAL),
            ..
        }) => {
            return Ok(Outcome::Unavailable(Unavailable::Unsupported {
                capability: "GUEST_MEMFD_FLAG_WRITE",
                evidence: format!(
                    "pwrite on the guest_memfd answered {e}: the kernel lacks the guest_memfd \
                     write() series or the flag"
                ),
            }));
        }
        Err(e) => return Err(e),
    }
    let rest = len - first;
    if rest > 0 {
        parallel(rest, threads, |sub| {
            batches(&sub, |b| {
                pwrite_all(
                    fd,
                    start + first + b.start,
                    src.at(first + b.start),
                    b.end - b.start,
                )
            })
        })?;
    }
    Ok(Outcome::Done)
}

/// `pwrite(fd, src, len, offset)` until every byte is written.
fn pwrite_all(fd: BorrowedFd<'_>, offset: u64, src: *const u8, len: u64) -> Result<()> {
    let op = "pwrite(guest_memfd)";
    let Ok(len) = usize::try_from(len) else {
        return Err(Error::invalid(op, "length larger than the address space"));
    };
    let mut done = 0usize;
    while done < len {
        let Ok(off) = i64::try_from(offset + done as u64) else {
            return Err(Error::invalid(op, "offset past the largest file size"));
        };
        // SAFETY: `src` points at `len` readable bytes of the source (a
        // borrowed buffer or a live read-only mapping of the source file,
        // see SourcePtr); the kernel only reads them, with copy_from_user,
        // which reports an unreadable page as EFAULT.
        let r = unsafe { libc::pwrite(fd.as_raw_fd(), src.add(done).cast(), len - done, off) };
        match r {
            n if n > 0 => done += n as usize,
            0 => return Err(Error::kernel(op, Errno(libc::EIO))),
            _ => match Errno::last() {
                Errno(libc::EINTR) => continue,
                e => return Err(Error::kernel(op, e)),
            },
        }
    }
    Ok(())
}

/// `KVM_GUEST_MEMFD_POPULATE` over `[gpa, gpa + len)` from `src`, one
/// [`BATCH`] per call; `EINTR`/`EAGAIN` retried (bounded).
#[cfg(feature = "rfc-populate")]
fn populate_ioctl_chunk(vm: BorrowedFd<'_>, gpa: u64, src: *const u8, len: u64) -> Result<()> {
    use kvm_gmem_sys::rfc::populate as rfc;
    let page = page_size();
    let mut done = 0u64;
    let mut retries = 0u32;
    while done < len {
        let size = (len - done).min(BATCH);
        let mut arg = rfc::kvm_guest_memfd_populate {
            gpa: gpa + done,
            size,
            from: src.wrapping_add(done as usize).cast_mut().cast(),
            flags: 0,
        };
        // SAFETY: the request encodes `kvm_guest_memfd_populate` (32 bytes),
        // issued only after the size-0 probe confirmed this kernel's 0xd6 is
        // POPULATE. `from` points at `size` readable bytes of the source (a
        // borrowed buffer or a live read-only mapping of the source file) in
        // this process; the kernel copies from it with copy_from_user and
        // keeps no reference after returning.
        let r =
            unsafe { crate::sys::ioctl_arg::<{ rfc::KVM_GUEST_MEMFD_POPULATE }, _>(vm, &mut arg) };
        match r {
            // 0: all pages; a positive count: that many pages (partial progress).
            Ok(n) if n > 0 && (n as u64) < size / page => done += n as u64 * page,
            Ok(_) => done += size,
            Err(Errno(libc::EINTR | libc::EAGAIN)) if retries < 1000 => retries += 1,
            Err(e @ Errno(libc::EEXIST)) => {
                return Err(Error::kernel(
                    "KVM_GUEST_MEMFD_POPULATE (EEXIST: a page in the range is already \
                     populated; punch it with GuestMemfd::punch_hole first)",
                    e,
                ));
            }
            Err(e) => return Err(Error::kernel("KVM_GUEST_MEMFD_POPULATE", e)),
        }
    }
    Ok(())
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

#[cfg(test)]
mod tests {
    //! The Write strategy's logic, run where the kernel has an equivalent:
    //! `pwrite` on a shmem memfd (DESIGN.md: RFC paths are tested through
    //! the nearest upstream equivalent).
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: a NUL-terminated name; memfd_create returns a new fd.
        let raw = unsafe { libc::memfd_create(c"populate-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", Errno::last());
        // SAFETY: `raw` was just returned and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on the fd just created.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        fd
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64).wrapping_mul(0x9e37_79b9) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    fn read_back(fd: &OwnedFd, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` is writable for `len` bytes.
        let r = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, offset as i64) };
        assert_eq!(r, len as isize);
        buf
    }

    #[test]
    fn pwrite_range_on_shmem_bytes_and_threads() {
        let page = page_size();
        let size = 24 << 20;
        let data = pattern(size as usize - page as usize);
        for threads in [1, 2, 3] {
            let fd = memfd(size);
            let src = SourcePtr::new(&Source::bytes(&data), data.len() as u64).unwrap();
            let out = pwrite_range(fd.as_fd(), page, &src, data.len() as u64, threads).unwrap();
            assert!(matches!(out, Outcome::Done));
            assert!(
                read_back(&fd, page, data.len()) == data,
                "threads {threads}"
            );
            assert!(read_back(&fd, 0, page as usize).iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn pwrite_range_from_a_mapped_file_at_an_unaligned_offset() {
        let data = pattern(9 << 20);
        let path =
            std::env::temp_dir().join(format!("kvm-gmem-populate-unit-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let off = 1234u64;
        let len = 8 << 20;
        let fd = memfd(len);
        let src = SourcePtr::new(&Source::file(&file, off), len).unwrap();
        assert!(matches!(
            pwrite_range(fd.as_fd(), 0, &src, len, 2).unwrap(),
            Outcome::Done
        ));
        assert!(read_back(&fd, 0, len as usize) == data[off as usize..off as usize + len as usize]);
    }

    #[test]
    fn pwrite_refusal_on_first_chunk_is_reported_unavailable() {
        // A pipe answers pwrite with ESPIPE, as a guest_memfd without the
        // write() series does.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just returned by pipe2.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let data = pattern(page_size() as usize);
        let src = SourcePtr::new(&Source::bytes(&data), data.len() as u64).unwrap();
        match pwrite_range(w.as_fd(), 0, &src, data.len() as u64, 1).unwrap() {
            Outcome::Unavailable(why) => {
                let e = why.into_error();
                assert!(e.is_unsupported(), "{e}");
                assert!(e.to_string().contains("ESPIPE"), "{e}");
            }
            Outcome::Done => panic!("pwrite on a pipe succeeded"),
        }
        drop(r);
    }

    #[test]
    fn parallel_covers_the_range_exactly_once() {
        let page = page_size();
        for (pages, threads) in [(1u64, 1usize), (1, 4), (7, 3), (1024, 2), (5, 5)] {
            let seen = std::sync::Mutex::new(Vec::new());
            parallel(pages * page, threads, |r| {
                seen.lock().unwrap().push(r);
                Ok(())
            })
            .unwrap();
            let mut v = seen.into_inner().unwrap();
            v.sort_by_key(|r| r.start);
            let mut at = 0;
            for r in v {
                assert_eq!(r.start, at);
                assert!(r.start.is_multiple_of(page));
                at = r.end;
            }
            assert_eq!(at, pages * page);
        }
    }
}
