//! The userfaultfd handle: creation, the API handshake, ranges, resolving,
//! and reading events (where the descriptor a fork record names is adopted,
//! only from a userfaultfd created here or confirmed).
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::event::{Event, MSG_SIZE};
use crate::flags::{Features, Ioctls, Mode, RegisterMode};
use crate::mapping::HostMapping;
use crate::sys::ioctl;
use kvm_gmem_sys as sys;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How a userfaultfd was obtained.
///
/// # Examples
///
/// ```
/// use std::os::fd::OwnedFd;
/// use uffd_gmem::{Origin, Uffd};
///
/// // No device node there: the builder falls back to the system call.
/// let built = Uffd::builder().device_path("/nonexistent/userfaultfd").create();
/// let Ok(uffd) = built else {
///     return; // no userfaultfd here
/// };
/// assert_eq!(uffd.origin(), Origin::Syscall);
/// // A VMM's fd handed over is adopted, its features unknown.
/// let adopted = Uffd::from_initialized(OwnedFd::from(uffd));
/// assert_eq!(adopted.origin(), Origin::Adopted);
/// assert_eq!(adopted.features(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW` (Linux 6.1).
    Device,
    /// The `userfaultfd(2)` system call.
    Syscall,
    /// Adopted from another owner (e.g. received from a VMM), already
    /// initialised with `UFFDIO_API`.
    Adopted,
}

/// Builds a [`Uffd`]; see [`Uffd::builder`].
///
/// # Examples
///
/// Requiring features, and learning which are missing:
///
/// ```
/// use uffd_gmem::{Error, Features, Uffd};
///
/// let wanted = Features::EVENT_REMOVE | Features::MINOR_SHMEM;
/// match Uffd::builder().non_blocking(true).require_features(wanted).create() {
///     Ok(uffd) => assert!(uffd.features().unwrap().contains(wanted)),
///     Err(Error::MissingFeatures { missing, supported }) => {
///         assert!(!missing.is_empty() && !supported.contains(missing));
///     }
///     Err(e) => println!("no userfaultfd here: {e}"),
/// }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until create() is called"]
pub struct UffdBuilder {
    user_mode_only: bool,
    non_blocking: bool,
    features: Features,
    device: PathBuf,
}

impl UffdBuilder {
    /// `UFFD_USER_MODE_ONLY`: report only faults raised in user mode. Off by
    /// default, because a VMM needs the faults KVM and system calls raise on
    /// guest memory too.
    pub fn user_mode_only(mut self, on: bool) -> Self {
        self.user_mode_only = on;
        self
    }

    /// `O_NONBLOCK`: reads return no event instead of blocking (needed for
    /// `poll`: a blocking userfaultfd makes `poll` report `POLLERR`).
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }

    /// Features to enable in the handshake; creation fails with
    /// [`Error::MissingFeatures`] naming any the kernel does not offer.
    pub fn require_features(mut self, features: Features) -> Self {
        self.features |= features;
        self
    }

    /// The device node to try first (default `/dev/userfaultfd`).
    pub fn device_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.device = path.into();
        self
    }

    fn flags(&self) -> i32 {
        let mut f = libc::O_CLOEXEC;
        if self.non_blocking {
            f |= libc::O_NONBLOCK;
        }
        if self.user_mode_only {
            f |= sys::UFFD_USER_MODE_ONLY;
        }
        f
    }

    /// A fresh, uninitialised userfaultfd: `/dev/userfaultfd` +
    /// `USERFAULTFD_IOC_NEW` first, the system call when the device is
    /// missing or denied.
    fn open_raw(&self) -> Result<(OwnedFd, Origin)> {
        let flags = self.flags();
        let device = match open_device(&self.device)
            .and_then(|dev| crate::sys::userfaultfd_ioc_new(dev.as_fd(), flags))
        {
            Ok(fd) => return Ok((fd, Origin::Device)),
            Err(e) => e,
        };
        if !matches!(
            device.0,
            libc::ENOENT | libc::EACCES | libc::EPERM | libc::ENODEV | libc::ENXIO
        ) {
            return Err(Error::kernel("USERFAULTFD_IOC_NEW", device));
        }
        crate::sys::userfaultfd(flags)
            .map(|fd| (fd, Origin::Syscall))
            .map_err(|e| Error::Unsupported {
                op: "userfaultfd(2)",
                what: "userfaultfd",
                evidence: format!(
                    "{} gave {device}; the system call gave {e}{}",
                    self.device.display(),
                    if e.0 == libc::EPERM && !self.user_mode_only {
                        " (without privilege, the system call allows only user_mode_only(true))"
                    } else {
                        ""
                    }
                ),
            })
    }

    /// Creates the userfaultfd and performs the `UFFDIO_API` handshake.
    ///
    /// # Errors
    ///
    /// [`Error::MissingFeatures`] naming what the kernel lacks;
    /// [`Error::Unsupported`] when neither the device nor the system call
    /// can create one; [`Error::Kernel`] otherwise.
    ///
    /// # Examples
    ///
    /// Asking for features and telling "this kernel lacks them" from "no
    /// userfaultfd at all":
    ///
    /// ```
    /// use uffd_gmem::{Error, Features, Uffd};
    ///
    /// match Uffd::builder()
    ///     .require_features(Features::MINOR_SHMEM | Features::EVENT_REMOVE)
    ///     .create()
    /// {
    ///     Ok(uffd) => println!("enabled: {:?}", uffd.features()),
    ///     Err(Error::MissingFeatures { missing, .. }) => println!("this kernel lacks {missing:?}"),
    ///     Err(e) => println!("no userfaultfd: {e}"),
    /// }
    /// ```
    ///
    /// # References
    ///
    /// - [`UFFDIO_API` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [API](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#api) in the kernel's userfaultfd guide
    /// - [userfaultfd(2)](https://man7.org/linux/man-pages/man2/userfaultfd.2.html)
    ///   (the system call, and `/dev/userfaultfd`'s `USERFAULTFD_IOC_NEW`)
    #[doc(alias = "UFFDIO_API")]
    #[doc(alias = "USERFAULTFD_IOC_NEW")]
    pub fn create(self) -> Result<Uffd> {
        let (fd, origin) = self.open_raw()?;
        let mut api = sys::uffdio_api {
            api: sys::UFFD_API,
            features: self.features.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `uffdio_api`, which holds no pointers.
        match unsafe { ioctl::<{ sys::UFFDIO_API }, _>(fd.as_fd(), &mut api) } {
            Ok(_) => Ok(Uffd {
                fd,
                origin,
                forks_trusted: true,
                enabled: Some(self.features),
                supported: Some(Features::from_bits_retain(api.features)),
                ioctls: Some(Ioctls::from_bits_retain(api.ioctls)),
            }),
            Err(e) if e.0 == libc::EINVAL && !self.features.is_empty() => {
                // Which features were missing? Ask a second, throwaway fd.
                let supported = UffdBuilder {
                    features: Features::empty(),
                    ..self
                }
                .create()?
                .supported_features()
                .unwrap_or_default();
                let missing = self.features.difference(supported);
                if missing.is_empty() {
                    Err(Error::kernel("UFFDIO_API", e))
                } else {
                    Err(Error::MissingFeatures { missing, supported })
                }
            }
            Err(e) => Err(Error::kernel("UFFDIO_API", e)),
        }
    }
}

/// Opens the device read-write (and close-on-exec, as std always does).
fn open_device(path: &Path) -> Result<OwnedFd, Errno> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        // Only a path with a NUL byte fails without an errno.
        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EINVAL)))
}

/// What `/proc/self/fd/N` names `fd`; `None` where it cannot be read
/// (`/proc` not mounted).
pub(crate) fn proc_fd_link(fd: BorrowedFd<'_>) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}

/// What `/proc/self/fd/N` reads for a userfaultfd.
pub(crate) const USERFAULTFD_LINK: &str = "anon_inode:[userfaultfd]";

/// An owned userfaultfd.
///
/// # Examples
///
/// Resolving ahead of any fault: a registered page zero-filled before it is
/// touched, so the touch does not fault.
///
/// ```
/// use uffd_gmem::{HostMapping, Mode, RegisterMode, Uffd};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let Ok(uffd) = Uffd::builder().create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// let mem = HostMapping::anonymous(uffd_gmem::page_size() as usize)?;
/// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
/// assert_eq!(uffd.zeropage(mem.range(), Mode::empty())?, mem.len() as u64);
/// let mut b = [1u8];
/// mem.read_at(0, &mut b)?; // present: no fault
/// assert_eq!(b, [0]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    origin: Origin,
    /// Whether `UFFD_EVENT_FORK` records read from `fd` may be trusted to
    /// name a descriptor the kernel just installed: the fd was created here,
    /// or `/proc/self/fd` confirmed it is a userfaultfd.
    forks_trusted: bool,
    enabled: Option<Features>,
    supported: Option<Features>,
    ioctls: Option<Ioctls>,
}

#[inline]
fn check_range(op: &'static str, range: &Range<u64>) -> Result<u64> {
    let page = kvm_gmem_sys::support::page_size();
    // The page size is a power of two: alignment is a mask test.
    if range.start >= range.end || (range.start | range.end) & (page - 1) != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "range {:#x}..{:#x} must be non-empty and page aligned (page size {page:#x})",
                range.start, range.end
            ),
        ));
    }
    Ok(range.end - range.start)
}

/// Maps an ioctl outcome and its kernel-written result field to bytes done
/// or a typed error. The kernel writes either the bytes handled or a
/// negative errno into the field; a negative value is never a byte count.
#[inline]
fn outcome(op: &'static str, r: Result<i32, Errno>, field: i64, start: u64) -> Result<u64> {
    let done = if field > 0 { field as u64 } else { 0 };
    match r {
        Ok(_) => Ok(done),
        Err(Errno(libc::EEXIST)) => Err(Error::Exists {
            op,
            addr: start + done,
            done,
        }),
        Err(Errno(libc::EAGAIN)) => Err(Error::Again { op, done }),
        Err(errno) if done > 0 => Err(Error::Partial { op, done, errno }),
        Err(errno) => Err(Error::kernel(op, errno)),
    }
}

impl Uffd {
    /// A builder; see [`UffdBuilder`].
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::{Features, Uffd};
    ///
    /// # fn main() -> uffd_gmem::Result<()> {
    /// let uffd = match Uffd::builder()
    ///     .non_blocking(true) // for poll, and for serve::Server
    ///     .require_features(Features::EVENT_REMOVE)
    ///     .create()
    /// {
    ///     Ok(uffd) => uffd,
    ///     // No userfaultfd here, or a kernel without the feature.
    ///     Err(e) if e.is_unsupported() => return Ok(()),
    ///     Err(e) => return Err(e),
    /// };
    /// assert!(uffd.features().unwrap().contains(Features::EVENT_REMOVE));
    /// println!("{:?}; offered: {:?}", uffd.origin(), uffd.supported_features());
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> UffdBuilder {
        UffdBuilder {
            user_mode_only: false,
            non_blocking: false,
            features: Features::empty(),
            device: PathBuf::from("/dev/userfaultfd"),
        }
    }

    /// Adopts a userfaultfd that its creator already initialised with
    /// `UFFDIO_API` (a VMM's, received over a socket). A second handshake
    /// would fail, so its features are unknown: operations that depend on a
    /// feature are attempted and the kernel's answer reported.
    ///
    /// Nothing is checked here, but a `UFFD_EVENT_FORK` record names a
    /// descriptor to take ownership of, so fork events are honoured only when
    /// `/proc/self/fd` confirms that `fd` is a userfaultfd (whose records
    /// only the kernel writes): read from any other fd, or where `/proc` is
    /// not mounted, a fork record is reported as [`Event::Unknown`] and the
    /// descriptor it names is left alone.
    pub fn from_initialized(fd: OwnedFd) -> Uffd {
        let forks_trusted =
            proc_fd_link(fd.as_fd()).is_some_and(|l| l.as_os_str() == USERFAULTFD_LINK);
        Uffd {
            fd,
            origin: Origin::Adopted,
            forks_trusted,
            enabled: None,
            supported: None,
            ioctls: None,
        }
    }

    /// How this userfaultfd was obtained.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The features enabled in the handshake (unknown for adopted fds).
    pub fn features(&self) -> Option<Features> {
        self.enabled
    }

    /// Every feature the kernel offers (unknown for adopted fds).
    pub fn supported_features(&self) -> Option<Features> {
        self.supported
    }

    /// The ioctls valid on the fd itself (unknown for adopted fds).
    pub fn api_ioctls(&self) -> Option<Ioctls> {
        self.ioctls
    }

    /// Fails with [`Error::Unsupported`] / [`Error::Invalid`] when a feature
    /// the operation needs is known to be absent or not enabled.
    fn need(
        &self,
        op: &'static str,
        feature: Features,
        name: &'static str,
        must_enable: bool,
    ) -> Result<()> {
        if let Some(supported) = self.supported
            && !supported.contains(feature)
        {
            return Err(Error::Unsupported {
                op,
                what: name,
                evidence: format!("UFFDIO_API offered {:#x}", supported.bits()),
            });
        }
        if must_enable
            && let Some(enabled) = self.enabled
            && !enabled.contains(feature)
        {
            return Err(Error::invalid(
                op,
                format!("{name} must be enabled with UffdBuilder::require_features"),
            ));
        }
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_REGISTER, &{range, mode})`: reports faults in
    /// `range` to this userfaultfd; returns the ioctls valid on the range.
    ///
    /// # Safety
    ///
    /// From here on the kernel stops threads that touch `range` until this
    /// fd resolves the fault, and the resolving ioctls (`COPY`, `ZEROPAGE`,
    /// `POISON`, ...) change the memory behind the program's back. `range`
    /// must therefore be memory that no Rust reference points into (a guest
    /// memory mapping, a region handed to a VMM), and it must stay mapped
    /// while registered.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for an empty or unaligned range; [`Error::Kernel`]
    /// (`EINVAL` for a mode the memory does not support, e.g. MINOR on
    /// anonymous memory).
    ///
    /// # Examples
    ///
    /// Registering memory this program mapped itself; for a [`HostMapping`],
    /// [`Uffd::register_mapping`] says the same without `unsafe`.
    ///
    /// ```
    /// use uffd_gmem::{HostMapping, Ioctls, RegisterMode, Uffd};
    ///
    /// # fn main() -> uffd_gmem::Result<()> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let mem = HostMapping::anonymous(4 * uffd_gmem::page_size() as usize)?;
    /// // SAFETY: no Rust reference points into `mem`, which stays mapped
    /// // until after the range is unregistered.
    /// let ioctls = unsafe { uffd.register(mem.range(), RegisterMode::MISSING) }?;
    /// assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));
    /// uffd.unregister(mem.range())?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - [`UFFDIO_REGISTER` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [API](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#api) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_REGISTER")]
    pub unsafe fn register(&self, range: Range<u64>, mode: RegisterMode) -> Result<Ioctls> {
        let op = "UFFDIO_REGISTER";
        let len = check_range(op, &range)?;
        if mode.is_empty() {
            return Err(Error::invalid(
                op,
                "the mode must name at least one of MISSING, WP, MINOR, RWP",
            ));
        }
        if mode.contains(RegisterMode::RWP) {
            self.need(op, Features::RWP, "UFFD_FEATURE_RWP (Linux 7.3)", false)?;
        }
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: range.start,
                len,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: the request encodes `uffdio_register`; the caller vouches
        // for the range (see # Safety).
        unsafe { ioctl::<{ sys::UFFDIO_REGISTER }, _>(self.fd.as_fd(), &mut arg) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Registers a [`HostMapping`] (`MISSING`, `WP`, `MINOR` and/or `RWP`
    /// as the memory allows): [`Uffd::register`] without `unsafe`.
    ///
    /// Safe for the reason `Uffd::register_guest_memfd` is: the crate
    /// never hands out a Rust reference into a `HostMapping` (its contents
    /// are reached only through the volatile copies
    /// [`HostMapping::read_at`] / [`HostMapping::write_at`] and raw
    /// addresses), so the kernel filling or unmapping its pages behind the
    /// program's back breaks no reference; and it stays mapped while `map`
    /// lives. The rule that remains the caller's: keep `map` alive while the
    /// range is registered and served, and do not hand its address to code
    /// that forms references into it. Dropping `map` unmaps the range, which
    /// also unregisters it (the kernel drops a range's registration with its
    /// mapping; with [`Features::EVENT_UNMAP`] the fd is told).
    ///
    /// # Errors
    ///
    /// As [`Uffd::register`]: [`Error::Invalid`] for an empty mode;
    /// [`Error::Kernel`] (`EINVAL` for a mode the memory does not support,
    /// e.g. MINOR on a [`HostMapping::anonymous`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::{HostMapping, Ioctls, RegisterMode, Uffd};
    ///
    /// # fn main() -> uffd_gmem::Result<()> {
    /// let Ok(uffd) = Uffd::builder().non_blocking(true).create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let mem = HostMapping::anonymous(4 * uffd_gmem::page_size() as usize)?;
    /// let ioctls = uffd.register_mapping(&mem, RegisterMode::MISSING)?;
    /// assert!(ioctls.contains(Ioctls::COPY));
    /// uffd.unregister(mem.range())?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - [`UFFDIO_REGISTER` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [API](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#api) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_REGISTER")]
    pub fn register_mapping(&self, map: &HostMapping, mode: RegisterMode) -> Result<Ioctls> {
        // SAFETY: a `HostMapping` is memory no Rust reference points into
        // (the type forms none and hands none out), mapped while `map`
        // lives; the caller keeps it alive while registered (see above:
        // unmapping it also drops the registration).
        unsafe { self.register(map.range(), mode) }
    }

    /// Registers a guest_memfd mapping (`MINOR` and/or `MISSING`).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when the kernel refuses userfaultfd on
    /// guest_memfd (`EINVAL`: every release up to Linux 7.3; the guest_memfd
    /// userfaultfd series adds it); otherwise as [`Uffd::register`].
    ///
    /// # References
    ///
    /// - [`UFFDIO_REGISTER` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [API](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#api) in the kernel's userfaultfd guide
    #[cfg(feature = "guest-memfd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "guest-memfd")))]
    #[doc(alias = "UFFDIO_REGISTER")]
    pub fn register_guest_memfd(
        &self,
        map: &kvm_gmem::Mapping,
        mode: RegisterMode,
    ) -> Result<Ioctls> {
        let range = map.addr()..map.addr() + map.len() as u64;
        // SAFETY: a guest_memfd mapping is guest memory: the crate never hands
        // out references into it, it stays mapped while `map` lives, and the
        // caller keeps `map` alive while registered (unregistering on drop of
        // the mapping is done by the kernel).
        match unsafe { self.register(range, mode) } {
            Err(Error::Kernel {
                errno: Errno(libc::EINVAL),
                ..
            }) => Err(Error::Unsupported {
                op: "UFFDIO_REGISTER",
                what: "userfaultfd on guest_memfd",
                evidence: format!(
                    "UFFDIO_REGISTER ({mode:?}) on a guest_memfd mapping answered EINVAL: \
                     this kernel lacks the guest_memfd userfaultfd series"
                ),
            }),
            other => other,
        }
    }

    /// `ioctl(uffd, UFFDIO_UNREGISTER, &range)`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for an empty or unaligned range; [`Error::Kernel`].
    ///
    /// # References
    ///
    /// - [`UFFDIO_UNREGISTER` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [API](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#api) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_UNREGISTER")]
    pub fn unregister(&self, range: Range<u64>) -> Result<()> {
        let op = "UFFDIO_UNREGISTER";
        let len = check_range(op, &range)?;
        let mut arg = sys::uffdio_range {
            start: range.start,
            len,
        };
        // SAFETY: the request encodes `uffdio_range`; no memory changes.
        unsafe { ioctl::<{ sys::UFFDIO_UNREGISTER }, _>(self.fd.as_fd(), &mut arg) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_WAKE, &range)`: wakes threads waiting on faults in
    /// `range` (needed after [`Error::Exists`] and `DONTWAKE`).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for an empty or unaligned range; [`Error::Kernel`].
    ///
    /// # References
    ///
    /// - [`UFFDIO_WAKE` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Resolving userfaults](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#resolving-userfaults) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_WAKE")]
    #[inline]
    pub fn wake(&self, range: Range<u64>) -> Result<()> {
        let op = "UFFDIO_WAKE";
        let len = check_range(op, &range)?;
        let mut arg = sys::uffdio_range {
            start: range.start,
            len,
        };
        // SAFETY: the request encodes `uffdio_range`; waking changes no memory.
        unsafe { ioctl::<{ sys::UFFDIO_WAKE }, _>(self.fd.as_fd(), &mut arg) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_COPY, &{dst, src, len, mode})`: fills missing
    /// pages at `dst` from `src`; returns the bytes copied.
    ///
    /// # Safety
    ///
    /// `src` must be valid for reads of `len` bytes for the duration of the
    /// call. `dst` must lie in a range registered on this fd (the kernel
    /// checks that).
    ///
    /// # Errors
    ///
    /// [`Error::Exists`] (typed `EEXIST`; wake the faulter), [`Error::Again`]
    /// (typed `EAGAIN` with the bytes done, never the kernel's negative
    /// result as a count), [`Error::Partial`], [`Error::Invalid`] for
    /// unaligned arguments or modes other than `DONTWAKE` and `WP`.
    ///
    /// # Examples
    ///
    /// Serving a fault by hand (what [`serve::Server`](crate::serve::Server)
    /// does with worker threads): a thread touches a registered page and
    /// waits; the fault is read and the page copied in, which wakes it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use uffd_gmem::{Event, EventBuffer, HostMapping, Mode, RegisterMode, Uffd};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder().non_blocking(true).create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let mem = HostMapping::anonymous(page as usize)?;
    /// uffd.register_mapping(&mem, RegisterMode::MISSING)?;
    /// let contents = vec![0x42u8; page as usize];
    /// std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
    ///     let toucher = s.spawn(|| {
    ///         let mut b = [0u8; 1];
    ///         mem.read_at(7, &mut b).map(|()| b[0]) // blocks until filled
    ///     });
    ///     let mut events = EventBuffer::with_capacity(16);
    ///     while !toucher.is_finished() {
    ///         if !uffd.poll_readable(Duration::from_millis(100))? {
    ///             continue;
    ///         }
    ///         for event in uffd.read_events(&mut events)? {
    ///             if let Event::Pagefault { address, .. } = event {
    ///                 let start = address & !(page - 1);
    ///                 // SAFETY: `contents` is readable for one page.
    ///                 unsafe { uffd.copy(start, contents.as_ptr(), page, Mode::empty()) }?;
    ///             }
    ///         }
    ///     }
    ///     assert_eq!(toucher.join().unwrap()?, 0x42);
    ///     Ok(())
    /// })
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - [`UFFDIO_COPY` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Resolving userfaults](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#resolving-userfaults) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_COPY")]
    #[inline]
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64, mode: Mode) -> Result<u64> {
        let op = "UFFDIO_COPY";
        check_range(op, &(dst..dst.wrapping_add(len)))?;
        if !(Mode::DONTWAKE | Mode::WP).contains(mode) {
            return Err(Error::invalid(
                op,
                "only DONTWAKE and WP apply to UFFDIO_COPY",
            ));
        }
        let mut bits = 0;
        if mode.contains(Mode::DONTWAKE) {
            bits |= sys::UFFDIO_COPY_MODE_DONTWAKE;
        }
        if mode.contains(Mode::WP) {
            bits |= sys::UFFDIO_COPY_MODE_WP;
        }
        let mut arg = sys::uffdio_copy {
            dst,
            src: src as u64,
            len,
            mode: bits,
            copy: 0,
        };
        // SAFETY: the request encodes `uffdio_copy`; the caller guarantees
        // `src` is readable for `len` bytes.
        let r = unsafe { ioctl::<{ sys::UFFDIO_COPY }, _>(self.fd.as_fd(), &mut arg) };
        outcome(op, r, arg.copy, dst)
    }

    /// `ioctl(uffd, UFFDIO_ZEROPAGE, &{range, mode})`: fills missing pages
    /// with zeroes; returns the bytes handled.
    ///
    /// # Errors
    ///
    /// As [`Uffd::copy`]; only `DONTWAKE` applies.
    ///
    /// # References
    ///
    /// - [`UFFDIO_ZEROPAGE` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Resolving userfaults](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#resolving-userfaults) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_ZEROPAGE")]
    #[inline]
    pub fn zeropage(&self, range: Range<u64>, mode: Mode) -> Result<u64> {
        let op = "UFFDIO_ZEROPAGE";
        let len = check_range(op, &range)?;
        if !Mode::DONTWAKE.contains(mode) {
            return Err(Error::invalid(
                op,
                "only DONTWAKE applies to UFFDIO_ZEROPAGE",
            ));
        }
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range {
                start: range.start,
                len,
            },
            mode: if mode.contains(Mode::DONTWAKE) {
                sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: the request encodes `uffdio_zeropage`; it writes zero pages
        // only into ranges registered on this fd, whose owner accepted that
        // when registering (an `unsafe` contract).
        let r = unsafe { ioctl::<{ sys::UFFDIO_ZEROPAGE }, _>(self.fd.as_fd(), &mut arg) };
        outcome(op, r, arg.zeropage, range.start)
    }

    /// `ioctl(uffd, UFFDIO_CONTINUE, &{range, mode})`: maps pages that are
    /// already in the page cache (minor faults); returns the bytes mapped.
    ///
    /// # Errors
    ///
    /// As [`Uffd::copy`]; `DONTWAKE` and `WP` apply.
    ///
    /// # Examples
    ///
    /// A MINOR fault on shared memory: the page is already in the memfd's
    /// page cache (written through a second mapping), only the registered
    /// mapping lacks it; `UFFDIO_CONTINUE` maps it there.
    ///
    /// ```
    /// use std::time::Duration;
    /// use uffd_gmem::{Event, FaultKind, Features, HostMapping, Mode, RegisterMode, Uffd};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let Ok(uffd) = Uffd::builder()
    ///     .non_blocking(true)
    ///     .require_features(Features::MINOR_SHMEM)
    ///     .create()
    /// else {
    ///     return Ok(()); // no userfaultfd, or no MINOR faults on shmem here
    /// };
    /// let page = uffd_gmem::page_size();
    /// let guest = HostMapping::memfd("guest", page as usize)?;
    /// // A second view of the same page cache, not registered.
    /// let view = HostMapping::file(guest.memfd_fd().unwrap(), 0, page as usize, true)?;
    /// view.write_at(0, b"from the page cache")?;
    /// uffd.register_mapping(&guest, RegisterMode::MINOR)?;
    /// std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
    ///     let toucher = s.spawn(|| {
    ///         let mut b = [0u8; 19];
    ///         guest.read_at(0, &mut b).map(|()| b) // a MINOR fault
    ///     });
    ///     while !toucher.is_finished() {
    ///         if !uffd.poll_readable(Duration::from_millis(100))? {
    ///             continue;
    ///         }
    ///         while let Some(event) = uffd.read_event()? {
    ///             if let Event::Pagefault { kind: FaultKind::Minor, address, .. } = event {
    ///                 let start = address & !(page - 1);
    ///                 uffd.r#continue(start..start + page, Mode::empty())?;
    ///             }
    ///         }
    ///     }
    ///     assert_eq!(&toucher.join().unwrap()?, b"from the page cache");
    ///     Ok(())
    /// })
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - [`UFFDIO_CONTINUE` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Resolving userfaults](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#resolving-userfaults) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_CONTINUE")]
    #[inline]
    pub fn r#continue(&self, range: Range<u64>, mode: Mode) -> Result<u64> {
        let op = "UFFDIO_CONTINUE";
        let len = check_range(op, &range)?;
        if !(Mode::DONTWAKE | Mode::WP).contains(mode) {
            return Err(Error::invalid(
                op,
                "only DONTWAKE and WP apply to UFFDIO_CONTINUE",
            ));
        }
        let mut bits = 0;
        if mode.contains(Mode::DONTWAKE) {
            bits |= sys::UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        if mode.contains(Mode::WP) {
            bits |= sys::UFFDIO_CONTINUE_MODE_WP;
        }
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range {
                start: range.start,
                len,
            },
            mode: bits,
            mapped: 0,
        };
        // SAFETY: the request encodes `uffdio_continue`, which holds no
        // pointer; it maps existing page-cache pages only into ranges
        // registered on this fd, whose owner accepted the kernel changing
        // them when registering (the `register` contract).
        let r = unsafe { ioctl::<{ sys::UFFDIO_CONTINUE }, _>(self.fd.as_fd(), &mut arg) };
        outcome(op, r, arg.mapped, range.start)
    }

    /// `ioctl(uffd, UFFDIO_WRITEPROTECT, &{range, mode})`: sets (`protect`)
    /// or clears write protection.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`]; [`Error::Kernel`]; only `DONTWAKE` applies.
    ///
    /// # References
    ///
    /// - [`UFFDIO_WRITEPROTECT` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Write protect notifications](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#write-protect-notifications) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_WRITEPROTECT")]
    pub fn writeprotect(&self, range: Range<u64>, protect: bool, mode: Mode) -> Result<()> {
        let op = "UFFDIO_WRITEPROTECT";
        let len = check_range(op, &range)?;
        if !Mode::DONTWAKE.contains(mode) {
            return Err(Error::invalid(
                op,
                "only DONTWAKE applies to UFFDIO_WRITEPROTECT",
            ));
        }
        let mut bits = if protect {
            sys::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        if mode.contains(Mode::DONTWAKE) {
            bits |= sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: range.start,
                len,
            },
            mode: bits,
        };
        // SAFETY: the request encodes `uffdio_writeprotect`; protection
        // changes no contents.
        unsafe { ioctl::<{ sys::UFFDIO_WRITEPROTECT }, _>(self.fd.as_fd(), &mut arg) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_POISON, &{range, mode})`: marks missing pages so
    /// that any access raises SIGBUS (Linux 6.6); returns the bytes handled.
    ///
    /// The crate requires [`Features::POISON`] to have been negotiated (Linux
    /// itself only advertises it), so code that works here works on every
    /// kernel that offers the ioctl.
    ///
    /// # Errors
    ///
    /// As [`Uffd::copy`]; [`Error::Unsupported`] / [`Error::Invalid`] when
    /// the feature is absent or was not enabled.
    ///
    /// # References
    ///
    /// - [`UFFDIO_POISON` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Resolving userfaults](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#resolving-userfaults) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_POISON")]
    pub fn poison(&self, range: Range<u64>, mode: Mode) -> Result<u64> {
        let op = "UFFDIO_POISON";
        let len = check_range(op, &range)?;
        self.need(
            op,
            Features::POISON,
            "UFFD_FEATURE_POISON (Linux 6.6)",
            true,
        )?;
        if !Mode::DONTWAKE.contains(mode) {
            return Err(Error::invalid(op, "only DONTWAKE applies to UFFDIO_POISON"));
        }
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range {
                start: range.start,
                len,
            },
            mode: if mode.contains(Mode::DONTWAKE) {
                sys::UFFDIO_POISON_MODE_DONTWAKE
            } else {
                0
            },
            updated: 0,
        };
        // SAFETY: the request encodes `uffdio_poison`, which holds no
        // pointer; it affects only missing pages of ranges registered on
        // this fd (the `register` contract). A later access there raises
        // SIGBUS, a crash rather than a memory-safety violation.
        let r = unsafe { ioctl::<{ sys::UFFDIO_POISON }, _>(self.fd.as_fd(), &mut arg) };
        outcome(op, r, arg.updated, range.start)
    }

    /// `ioctl(uffd, UFFDIO_MOVE, &{dst, src, len, mode})`: moves anonymous
    /// pages from `src` to `dst` without copying (Linux 6.8); returns the
    /// bytes moved. As with [`Uffd::poison`], the crate requires
    /// [`Features::MOVE`] to have been negotiated.
    ///
    /// # Safety
    ///
    /// The pages leave `src`: afterwards `src..src + len` reads as missing
    /// (or faults), so it must be memory no Rust reference points into.
    ///
    /// # Errors
    ///
    /// As [`Uffd::copy`]; `DONTWAKE` and `ALLOW_SRC_HOLES` apply.
    ///
    /// # References
    ///
    /// - [`UFFDIO_MOVE` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Resolving userfaults](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#resolving-userfaults) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_MOVE")]
    pub unsafe fn r#move(&self, dst: u64, src: u64, len: u64, mode: Mode) -> Result<u64> {
        let op = "UFFDIO_MOVE";
        check_range(op, &(dst..dst.wrapping_add(len)))?;
        check_range(op, &(src..src.wrapping_add(len)))?;
        self.need(op, Features::MOVE, "UFFD_FEATURE_MOVE (Linux 6.8)", true)?;
        if !(Mode::DONTWAKE | Mode::ALLOW_SRC_HOLES).contains(mode) {
            return Err(Error::invalid(
                op,
                "only DONTWAKE and ALLOW_SRC_HOLES apply to UFFDIO_MOVE",
            ));
        }
        let mut bits = 0;
        if mode.contains(Mode::DONTWAKE) {
            bits |= sys::UFFDIO_MOVE_MODE_DONTWAKE;
        }
        if mode.contains(Mode::ALLOW_SRC_HOLES) {
            bits |= sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
        }
        let mut arg = sys::uffdio_move {
            dst,
            src,
            len,
            mode: bits,
            move_: 0,
        };
        // SAFETY: the request encodes `uffdio_move`; the caller guarantees
        // the source pages may be taken away.
        let r = unsafe { ioctl::<{ sys::UFFDIO_MOVE }, _>(self.fd.as_fd(), &mut arg) };
        outcome(op, r, arg.move_, dst)
    }

    /// `ioctl(uffd, UFFDIO_RWPROTECT, &{range, mode})`: makes pages
    /// inaccessible (`protect`), so the next touch faults, or undoes it
    /// (Linux 7.3; needs [`Features::RWP`]).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] naming `UFFD_FEATURE_RWP` on older kernels;
    /// [`Error::Invalid`]; [`Error::Kernel`].
    ///
    /// # References
    ///
    /// - [`UFFDIO_RWPROTECT` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [Write protect notifications](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#write-protect-notifications) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_RWPROTECT")]
    pub fn rwprotect(&self, range: Range<u64>, protect: bool, mode: Mode) -> Result<()> {
        let op = "UFFDIO_RWPROTECT";
        let len = check_range(op, &range)?;
        self.need(op, Features::RWP, "UFFD_FEATURE_RWP (Linux 7.3)", true)?;
        if !Mode::DONTWAKE.contains(mode) {
            return Err(Error::invalid(
                op,
                "only DONTWAKE applies to UFFDIO_RWPROTECT",
            ));
        }
        let mut bits = if protect {
            sys::UFFDIO_RWPROTECT_MODE_RWP
        } else {
            0
        };
        if mode.contains(Mode::DONTWAKE) {
            bits |= sys::UFFDIO_RWPROTECT_MODE_DONTWAKE;
        }
        let mut arg = sys::uffdio_rwprotect {
            range: sys::uffdio_range {
                start: range.start,
                len,
            },
            mode: bits,
        };
        // SAFETY: the request encodes `uffdio_rwprotect`; protection changes
        // no contents.
        unsafe { ioctl::<{ sys::UFFDIO_RWPROTECT }, _>(self.fd.as_fd(), &mut arg) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(())
    }

    /// `ioctl(uffd, UFFDIO_SET_MODE, &{enable, disable})`: turns asynchronous
    /// modes on or off at run time (Linux 7.3; only
    /// [`Features::RWP_ASYNC`]).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] naming `UFFD_FEATURE_RWP_ASYNC` on older
    /// kernels; [`Error::Invalid`] for a feature in both sets or any other
    /// feature; [`Error::Kernel`].
    ///
    /// # References
    ///
    /// - [`UFFDIO_SET_MODE` in ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html#DESCRIPTION)
    /// - [API](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#api) in the kernel's userfaultfd guide
    #[doc(alias = "UFFDIO_SET_MODE")]
    pub fn set_mode(&self, enable: Features, disable: Features) -> Result<()> {
        let op = "UFFDIO_SET_MODE";
        if enable.intersects(disable) {
            return Err(Error::invalid(
                op,
                "a feature cannot be both enabled and disabled",
            ));
        }
        if !Features::RWP_ASYNC.contains(enable | disable) {
            return Err(Error::invalid(
                op,
                "only RWP_ASYNC can be switched at run time",
            ));
        }
        self.need(
            op,
            Features::RWP_ASYNC,
            "UFFD_FEATURE_RWP_ASYNC (Linux 7.3)",
            false,
        )?;
        let mut arg = sys::uffdio_set_mode {
            enable: enable.bits(),
            disable: disable.bits(),
        };
        // SAFETY: the request encodes `uffdio_set_mode`, which holds no pointers.
        unsafe { ioctl::<{ sys::UFFDIO_SET_MODE }, _>(self.fd.as_fd(), &mut arg) }
            .map_err(|e| Error::kernel(op, e))?;
        Ok(())
    }

    /// Reads pending events into `buf` and returns them. On a non-blocking
    /// fd with nothing pending it returns none; on a blocking fd it waits for
    /// at least one.
    ///
    /// Every record becomes one event: one the crate cannot decode, and a
    /// fork record whose descriptor is not adopted (see
    /// [`Uffd::from_initialized`]), as [`Event::Unknown`].
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`] for read errors; [`Error::Protocol`] when the read
    /// returns a partial record.
    ///
    /// # Examples
    ///
    /// A handler's event loop (see [`Uffd::copy`] for resolving a fault):
    ///
    /// ```
    /// use std::time::Duration;
    /// use uffd_gmem::{Event, EventBuffer, Features, Uffd};
    ///
    /// # fn main() -> uffd_gmem::Result<()> {
    /// let Ok(uffd) = Uffd::builder()
    ///     .non_blocking(true)
    ///     .require_features(Features::EVENT_REMOVE)
    ///     .create()
    /// else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// let mut events = EventBuffer::with_capacity(64); // reused by every read
    /// for _ in 0..3 {
    ///     if !uffd.poll_readable(Duration::from_millis(10))? {
    ///         continue; // nothing registered here, so nothing arrives
    ///     }
    ///     for event in uffd.read_events(&mut events)? {
    ///         match event {
    ///             Event::Pagefault { address, .. } => println!("fault at {address:#x}"),
    ///             Event::Remove { start, end } => println!("dropped {start:#x}..{end:#x}"),
    ///             other => println!("{other:?}"),
    ///         }
    ///     }
    /// }
    /// // Non-blocking with nothing pending: no events, no error.
    /// assert_eq!(uffd.read_events(&mut events)?.count(), 0);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - [Reading events in userfaultfd(2)](https://man7.org/linux/man-pages/man2/userfaultfd.2.html#DESCRIPTION)
    /// - [Non-cooperative userfaultfd](https://docs.kernel.org/admin-guide/mm/userfaultfd.html#non-cooperative-userfaultfd)
    ///   (the events besides faults) in the kernel's userfaultfd guide
    pub fn read_events<'b>(
        &self,
        buf: &'b mut EventBuffer,
    ) -> Result<std::vec::Drain<'b, Event<Uffd>>> {
        let op = "read(userfaultfd)";
        buf.events.clear();
        let n = loop {
            match crate::sys::read(self.fd.as_fd(), &mut buf.raw) {
                Ok(n) => break n,
                Err(Errno(libc::EINTR)) => continue,
                Err(Errno(libc::EAGAIN)) => break 0,
                Err(e) => return Err(Error::kernel(op, e)),
            }
        };
        let (records, rest) = buf.raw[..n].as_chunks::<MSG_SIZE>();
        if !rest.is_empty() {
            return Err(Error::Protocol {
                op,
                what: format!("read returned {n} bytes, not a multiple of {MSG_SIZE}"),
            });
        }
        let thread_id = self
            .enabled
            .is_some_and(|f| f.contains(Features::THREAD_ID));
        for rec in records {
            // A record the crate cannot decode still reaches the caller, raw,
            // so that no event is lost.
            let ev = Event::decode_with(rec, thread_id, |ufd| self.adopt_fork(ufd)).unwrap_or(
                Event::Unknown {
                    event: rec[0],
                    raw: *rec,
                },
            );
            buf.events.push(ev);
        }
        Ok(buf.events.drain(..))
    }

    /// Takes ownership of the descriptor a fork record read from this fd
    /// names, when it can be trusted to be one the kernel just installed:
    /// this fd is a userfaultfd (created here or confirmed through `/proc`,
    /// so only the kernel writes its records) and the number is a possible
    /// descriptor. Anything else could name, and so close, any fd of this
    /// process: `None`, and the number is left alone.
    fn adopt_fork(&self, ufd: u32) -> Option<Uffd> {
        if !self.forks_trusted {
            return None;
        }
        let raw = i32::try_from(ufd).ok()?;
        // SAFETY: the record comes from a userfaultfd, so the kernel wrote it
        // and installed descriptor `raw` in our table for this event; nothing
        // else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The kernel gives the child's userfaultfd the parent's features.
        Some(Uffd {
            fd,
            origin: Origin::Adopted,
            forks_trusted: true,
            enabled: self.enabled,
            supported: self.supported,
            ioctls: self.ioctls,
        })
    }

    /// Reads one event, if any (see [`Uffd::read_events`]).
    ///
    /// # Errors
    ///
    /// As [`Uffd::read_events`].
    pub fn read_event(&self) -> Result<Option<Event<Uffd>>> {
        let mut buf = EventBuffer::with_capacity(1);
        Ok(self.read_events(&mut buf)?.next())
    }

    /// Waits up to `timeout` for an event to be readable (`poll`). Returns
    /// whether one is. Use on a non-blocking fd.
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`] if `poll` fails (other than `EINTR`, which reports
    /// "not readable"); [`Error::Poll`] naming `POLLERR` (the userfaultfd
    /// is blocking: create it with
    /// [`UffdBuilder::non_blocking`]), `POLLHUP` or `POLLNVAL` when `poll`
    /// reports one of them instead of readiness.
    pub fn poll_readable(&self, timeout: std::time::Duration) -> Result<bool> {
        let op = "poll(userfaultfd)";
        let mut p = [crate::sys::pollfd(self.fd.as_fd(), libc::POLLIN)];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match crate::sys::poll(&mut p, ms) {
            Ok(0) | Err(Errno(libc::EINTR)) => Ok(false),
            Ok(_) if p[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
                Err(Error::Poll {
                    op,
                    revents: p[0].revents,
                })
            }
            Ok(_) => Ok(p[0].revents & libc::POLLIN != 0),
            Err(e) => Err(Error::kernel(op, e)),
        }
    }
}

/// A reusable buffer for batched reads ([`Uffd::read_events`]).
///
/// # Examples
///
/// ```
/// use uffd_gmem::{EventBuffer, Uffd};
///
/// # fn main() -> uffd_gmem::Result<()> {
/// let Ok(uffd) = Uffd::builder().non_blocking(true).create() else {
///     return Ok(()); // no userfaultfd here
/// };
/// // Room for 64 records per read(2), allocated once.
/// let mut events = EventBuffer::with_capacity(64);
/// for _ in 0..2 {
///     // Nothing registered, nothing pending: an empty batch, no error.
///     assert_eq!(uffd.read_events(&mut events)?.count(), 0);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EventBuffer {
    raw: Vec<u8>,
    events: Vec<Event<Uffd>>,
}

impl EventBuffer {
    /// Room for `n` records per read (at least 1).
    pub fn with_capacity(n: usize) -> EventBuffer {
        let n = n.max(1);
        EventBuffer {
            raw: vec![0; n * MSG_SIZE],
            events: Vec::with_capacity(n),
        }
    }
}

static_assertions::assert_impl_all!(Event<Uffd>: Send);

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_result_fields_are_never_byte_counts() {
        let eagain = outcome(
            "UFFDIO_COPY",
            Err(Errno(libc::EAGAIN)),
            -(libc::EAGAIN as i64),
            0x1000,
        );
        assert!(
            matches!(eagain, Err(Error::Again { done: 0, .. })),
            "{eagain:?}"
        );
        let partial = outcome("UFFDIO_COPY", Err(Errno(libc::EAGAIN)), 8192, 0x1000);
        assert!(matches!(partial, Err(Error::Again { done: 8192, .. })));
        let exists = outcome(
            "UFFDIO_CONTINUE",
            Err(Errno(libc::EEXIST)),
            -(libc::EEXIST as i64),
            0x2000,
        );
        assert!(matches!(
            exists,
            Err(Error::Exists {
                addr: 0x2000,
                done: 0,
                ..
            })
        ));
        let fault = outcome("UFFDIO_COPY", Err(Errno(libc::EFAULT)), 4096, 0);
        assert!(matches!(fault, Err(Error::Partial { done: 4096, .. })));
        let ok = outcome("UFFDIO_COPY", Ok(0), 4096, 0);
        assert_eq!(ok.unwrap(), 4096);
    }
}
