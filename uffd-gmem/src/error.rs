//! The crate's error type: the operation, and the rule, the missing kernel
//! feature, or the errno, with the partial progress the kernel reported.

pub use kvm_gmem_sys::support::Errno;

use crate::flags::Features;

/// What went wrong, and where.
///
/// # Examples
///
/// ```
/// use uffd_gmem::{Error, Features, Uffd};
///
/// match Uffd::builder().require_features(Features::MOVE).create() {
///     Ok(uffd) => println!("UFFDIO_MOVE available: {:?}", uffd.features()),
///     // No userfaultfd, or a kernel before 6.8: skip, do not fail.
///     Err(e) if e.is_unsupported() => println!("skipping: {e}"),
///     Err(Error::Kernel { op, errno }) => println!("{op} failed: {errno}"),
///     Err(e) => println!("{e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused the operation.
    #[error("{op}: {errno}")]
    Kernel {
        /// The ioctl or system call.
        op: &'static str,
        /// What the kernel returned.
        errno: Errno,
    },
    /// The request breaks a rule the kernel enforces, or one this crate
    /// enforces for portability (e.g. negotiating a feature before using its
    /// ioctl); no call was made.
    ///
    /// The kernel answers such a request `EINVAL`, so [`Error::errno`]
    /// reports `Some(Errno(EINVAL))` for it and the [`std::io::Error`] it
    /// converts to has kind
    /// [`InvalidInput`](std::io::ErrorKind::InvalidInput).
    #[error("{op}: {rule}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// The rule, and how it was broken.
        rule: String,
    },
    /// The kernel (or this userfaultfd) lacks what the operation needs.
    #[error("{op}: not supported: {what} ({evidence})")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The missing feature or capability.
        what: &'static str,
        /// How the crate knows.
        evidence: String,
    },
    /// `UFFDIO_API`: features the kernel does not offer.
    #[error(
        "UFFDIO_API: features {missing:?} are not offered by this kernel (it offers {supported:?})"
    )]
    MissingFeatures {
        /// Requested but not offered.
        missing: Features,
        /// What the kernel offers.
        supported: Features,
    },
    /// `EEXIST`: the page is already present. The faulting thread is *not*
    /// woken: issue [`crate::Uffd::wake`] for the range.
    #[error(
        "{op}: page already present at {addr:#x} (EEXIST) after {done} bytes; the faulter still needs UFFDIO_WAKE"
    )]
    Exists {
        /// The operation.
        op: &'static str,
        /// The first page that was already present.
        addr: u64,
        /// Bytes handled before it.
        done: u64,
    },
    /// `EAGAIN`: the address space is changing (a `REMOVE`, `REMAP` or
    /// `UNMAP` event is queued); read events, then retry the rest.
    #[error(
        "{op}: the address space is changing (EAGAIN) after {done} bytes; read events and retry"
    )]
    Again {
        /// The operation.
        op: &'static str,
        /// Bytes handled before the kernel stopped (never the negative errno
        /// the kernel stores in the result field).
        done: u64,
    },
    /// The operation stopped part way with another errno.
    #[error("{op}: {errno} after {done} bytes")]
    Partial {
        /// The operation.
        op: &'static str,
        /// Bytes handled.
        done: u64,
        /// Why it stopped.
        errno: Errno,
    },
    /// A record from the kernel or a message from another process was
    /// malformed.
    #[error("{op}: {what}")]
    Protocol {
        /// What was being decoded.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
    /// `poll` succeeded but reported a condition on the descriptor instead
    /// of readiness: `POLLERR` (on a userfaultfd: it is blocking, see
    /// [`UffdBuilder::non_blocking`](crate::UffdBuilder::non_blocking)),
    /// `POLLHUP` or `POLLNVAL` (not an open descriptor). No errno: the
    /// kernel returned none.
    #[error("{op}: poll reported {} on the descriptor", poll_names(*.revents))]
    Poll {
        /// The descriptor polled.
        op: &'static str,
        /// The `revents` the kernel wrote.
        revents: i16,
    },
    /// An I/O error from outside the kernel interface this crate wraps (a
    /// [`PageSource`](crate::serve::PageSource), a file), kept as it is.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error, with its errno when it has one.
        #[source]
        source: std::io::Error,
    },
    /// An error from kvm-gmem (feature `guest-memfd`), kept as it is:
    /// [`Error::errno`] and [`Error::is_unsupported`] answer what its own
    /// methods answer.
    #[cfg(feature = "guest-memfd")]
    #[cfg_attr(docsrs, doc(cfg(feature = "guest-memfd")))]
    #[error(transparent)]
    GuestMemfd(#[from] kvm_gmem::Error),
}

/// `POLLERR | POLLHUP`, by name.
fn poll_names(revents: i16) -> String {
    let names: Vec<&str> = [
        (libc::POLLERR, "POLLERR"),
        (libc::POLLHUP, "POLLHUP"),
        (libc::POLLNVAL, "POLLNVAL"),
        (libc::POLLIN, "POLLIN"),
        (libc::POLLOUT, "POLLOUT"),
    ]
    .into_iter()
    .filter(|(bit, _)| revents & bit != 0)
    .map(|(_, name)| name)
    .collect();
    if names.is_empty() {
        format!("revents {revents:#x}")
    } else {
        names.join(" | ")
    }
}

impl Error {
    pub(crate) fn kernel(op: &'static str, errno: Errno) -> Error {
        Error::Kernel { op, errno }
    }

    pub(crate) fn invalid(op: &'static str, rule: impl Into<String>) -> Error {
        Error::Invalid {
            op,
            rule: rule.into(),
        }
    }

    /// Whether the kernel lacks the feature.
    pub fn is_unsupported(&self) -> bool {
        match self {
            Error::Unsupported { .. } | Error::MissingFeatures { .. } => true,
            #[cfg(feature = "guest-memfd")]
            Error::GuestMemfd(e) => e.is_unsupported(),
            _ => false,
        }
    }

    /// The errno the failure means: the kernel's, when it returned one
    /// ([`Error::Exists`] is `EEXIST`, [`Error::Again`] `EAGAIN`);
    /// `EINVAL` for [`Error::Invalid`], a request refused before the system
    /// call, because that is what the kernel answers such a request with;
    /// an [`Error::Io`]'s own errno. `None` otherwise: no errno is made up
    /// for [`Error::Unsupported`], [`Error::Protocol`] or [`Error::Poll`].
    ///
    /// ```
    /// # #[allow(unsafe_code)]
    /// # fn main() {
    /// use uffd_gmem::{Errno, RegisterMode, Uffd};
    ///
    /// let Ok(uffd) = Uffd::builder().create() else { return };
    /// // Unaligned: refused before the ioctl, with the kernel's errno.
    /// // SAFETY: nothing is registered (the range is refused).
    /// let e = unsafe { uffd.register(1..4097, RegisterMode::MISSING) }.unwrap_err();
    /// assert_eq!(e.errno(), Some(Errno(libc::EINVAL)));
    /// let io = std::io::Error::from(e);
    /// assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
    /// # }
    /// ```
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Kernel { errno, .. } | Error::Partial { errno, .. } => Some(*errno),
            Error::Exists { .. } => Some(Errno(libc::EEXIST)),
            Error::Again { .. } => Some(Errno(libc::EAGAIN)),
            Error::Invalid { .. } => Some(Errno(libc::EINVAL)),
            Error::Io { source, .. } => source.raw_os_error().map(Errno),
            #[cfg(feature = "guest-memfd")]
            Error::GuestMemfd(e) => e.errno(),
            _ => None,
        }
    }
}

/// An `io::Error` of the kind [`Error::errno`] names (`InvalidInput` for
/// [`Error::Invalid`], whose errno is `EINVAL`), or the [`Error::Io`]'s
/// own kind; `Other` where there is no errno. The `Error` is its inner
/// error.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match (&e, e.errno()) {
            (Error::Io { source, .. }, _) => source.kind(),
            (_, Some(errno)) => std::io::Error::from(errno).kind(),
            (_, None) => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// kvm-gmem's error for a userfaultfd failure, so that `?` works in a
/// function returning [`kvm_gmem::Result`]: `Kernel`, `Invalid` and
/// `Protocol` map to the same variants; `Unsupported` and
/// [`Error::MissingFeatures`] to `Unsupported`; [`Error::Exists`],
/// [`Error::Again`] and [`Error::Partial`] to `Kernel` with their errno
/// (the progress made is in the message no more); [`Error::Poll`] to
/// `Protocol`; [`Error::Io`] to `Kernel` when it has an errno, else
/// `Protocol`; [`Error::GuestMemfd`] to the error it holds.
///
/// ```
/// fn with_both() -> kvm_gmem::Result<()> {
///     let uffd = uffd_gmem::Uffd::builder().create()?; // uffd_gmem::Error
///     drop(uffd);
///     Ok(())
/// }
/// # let _ = with_both();
/// ```
#[cfg(feature = "guest-memfd")]
#[cfg_attr(docsrs, doc(cfg(feature = "guest-memfd")))]
impl From<Error> for kvm_gmem::Error {
    fn from(e: Error) -> Self {
        use kvm_gmem::Error as K;
        match e {
            Error::Kernel { op, errno } | Error::Partial { op, errno, .. } => {
                K::Kernel { op, errno }
            }
            Error::Exists { op, .. } => K::Kernel {
                op,
                errno: Errno(libc::EEXIST),
            },
            Error::Again { op, .. } => K::Kernel {
                op,
                errno: Errno(libc::EAGAIN),
            },
            Error::Invalid { op, rule } => K::Invalid { op, rule },
            Error::Unsupported { op, what, evidence } => K::Unsupported {
                op,
                capability: what,
                evidence,
            },
            e @ Error::MissingFeatures { .. } => K::Unsupported {
                op: "UFFDIO_API",
                capability: "userfaultfd features",
                evidence: e.to_string(),
            },
            Error::Protocol { op, what } => K::Protocol { op, what },
            e @ Error::Poll { op, .. } => K::Protocol {
                op,
                what: e.to_string(),
            },
            Error::Io { op, source } => match source.raw_os_error() {
                Some(errno) => K::Kernel {
                    op,
                    errno: Errno(errno),
                },
                None => K::Protocol {
                    op,
                    what: source.to_string(),
                },
            },
            Error::GuestMemfd(e) => e,
        }
    }
}

/// The crate's result type.
///
/// # Examples
///
/// ```
/// use uffd_gmem::{Features, Uffd};
///
/// fn negotiated() -> uffd_gmem::Result<Features> {
///     let uffd = Uffd::builder().require_features(Features::EVENT_UNMAP).create()?;
///     Ok(uffd.features().unwrap_or_default())
/// }
///
/// match negotiated() {
///     Ok(features) => assert!(features.contains(Features::EVENT_UNMAP)),
///     Err(e) => println!("no userfaultfd here: {}", e.errno().map_or(0, |e| e.0)),
/// }
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;
