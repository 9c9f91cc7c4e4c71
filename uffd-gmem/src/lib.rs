// Module dependencies, bottom up: a module uses only those listed for it.
//
// - `sys`: none. Every raw system call of the crate; ioctls through
//   kvm-gmem-sys's checked `ioctl_arg`/`ioctl_int`.
// - `flags`: none.
// - `error`: `flags`.
// - `event`: `error`. Pure decoding: no descriptor, no system call.
// - `uffd`: `sys`, `flags`, `error`, `event`. The fd: creation, ioctls,
//   reading events, and adopting a fork record's descriptor only from a
//   confirmed userfaultfd (the trust decision and its enforcement).
// - `serve`: `sys`, `flags`, `error`, `event`, `uffd`.
// - `firecracker`: `sys`, `error`, `uffd`.
// - `seccomp`: none (kvm-gmem's seccomp types).

//! Typed **userfaultfd** for VMMs: every Linux 7.3 feature, MINOR
//! registration on guest_memfd mappings, and (next) a fault-serving building
//! block that speaks Firecracker's handler protocol.
//!
//! - [`Uffd::builder`]: `/dev/userfaultfd` first, the system call when the
//!   device is missing or denied; the `UFFDIO_API` handshake with typed
//!   [`Features`] and [`UffdBuilder::require_features`] naming what is
//!   missing; [`Uffd::from_initialized`] adopts a VMM's fd.
//! - Ranges: [`Uffd::register`] (`unsafe`: the kernel starts changing that
//!   memory), [`Uffd::register_guest_memfd`] (typed
//!   [`Error::Unsupported`] where the kernel refuses).
//! - Resolving: [`Uffd::copy`], [`Uffd::zeropage`], `Uffd::r#continue`,
//!   [`Uffd::wake`], [`Uffd::writeprotect`], [`Uffd::poison`],
//!   `Uffd::r#move`, [`Uffd::rwprotect`], [`Uffd::set_mode`]. `EEXIST` and
//!   `EAGAIN` are their own errors, with the progress made; the kernel's
//!   negative result fields are never mistaken for byte counts.
//! - Events: one `Send`, `#[non_exhaustive]` [`Event`] type: read in
//!   batches into a reusable [`EventBuffer`] (`Event<Uffd>`, a fork's
//!   userfaultfd owned), or decoded from bytes by the pure [`Event::decode`]
//!   (`Event`, a fork's descriptor only a number).
//! - [`serve`]: a multi-threaded fault server; [`firecracker`]: Firecracker's
//!   UFFD handler handshake.
//! - [`seccomp`]: the system calls and ioctl requests each feature needs,
//!   for handlers and VMMs that run under a seccomp filter.
//!
//! ```no_run
//! use uffd_gmem::{Features, Uffd};
//!
//! # fn main() -> Result<(), uffd_gmem::Error> {
//! let uffd = Uffd::builder()
//!     .non_blocking(true)
//!     .require_features(Features::MINOR_SHMEM | Features::EVENT_REMOVE)
//!     .create()?;
//! println!("offered: {:?}", uffd.supported_features());
//! # Ok(())
//! # }
//! ```
//!
//! Where the API draws the `unsafe` line, and why, is in the repository's
//! `SAFETY.md`; moving from userfaultfd-rs is in `MIGRATING.md`.
//!
//! # Examples
//!
//! In `uffd-gmem/examples/`:
//!
//! - `firecracker_handler`: a drop-in for Firecracker's example on-demand
//!   UFFD handler (`firecracker_handler <socket path> <memory file>`), built
//!   on [`firecracker`] and [`serve`]: validated handshake, worker threads,
//!   fault-around, one server per connection.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod error;
mod event;
pub mod firecracker;
mod flags;
pub mod seccomp;
pub mod serve;
mod sys;
mod uffd;

pub use error::{Errno, Error, Result};
pub use event::{Access, Event, FaultKind, MSG_SIZE};
pub use flags::{Features, Ioctls, Mode, RegisterMode};
pub use uffd::{EventBuffer, Origin, Uffd, UffdBuilder};

/// The raw bindings this crate is built on.
pub use kvm_gmem_sys as sys_bindings;
