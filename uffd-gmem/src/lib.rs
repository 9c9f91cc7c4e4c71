// Module dependencies, bottom up: a module uses only those listed for it.
//
// - `sys`: none. Every raw system call of the crate; ioctls through
//   kvm-gmem-sys's checked `ioctl_arg`/`ioctl_int`.
// - `flags`: none.
// - `error`: `flags`.
// - `event`: `error`. Pure decoding: no descriptor, no system call.
// - `mapping`: `sys`, `error`. `HostMapping`: the memory users register.
// - `uffd`: `sys`, `flags`, `error`, `event`, `mapping`. The fd: creation, ioctls,
//   reading events, and adopting a fork record's descriptor only from a
//   confirmed userfaultfd (the trust decision and its enforcement).
// - `serve`: `sys`, `flags`, `error`, `event`, `uffd`.
// - `firecracker`: `sys`, `error`, `uffd`.
// - `seccomp`: none (kvm-gmem's seccomp types).

//! Typed **userfaultfd** for VMMs: every Linux 7.3 feature, MINOR
//! registration on guest_memfd mappings, and a fault-serving building block
//! that speaks Firecracker's handler protocol.
//!
//! - [`Uffd::builder`]: `/dev/userfaultfd` first, the system call when the
//!   device is missing or denied; the `UFFDIO_API` handshake with typed
//!   [`Features`] and [`UffdBuilder::require_features`] naming what is
//!   missing; [`Uffd::from_initialized`] adopts a VMM's fd.
//! - Memory: [`HostMapping`] maps and owns what a userfaultfd user
//!   registers (private anonymous, a memfd's page cache, a file), with
//!   bounds-checked volatile copies.
//! - Ranges: [`Uffd::register_mapping`] (safe: a [`HostMapping`] holds no
//!   Rust references), [`Uffd::register`] (`unsafe`: the kernel starts
//!   changing that memory), `Uffd::register_guest_memfd` (feature
//!   `guest-memfd`; typed [`Error::Unsupported`] where the kernel refuses).
//! - Resolving: [`Uffd::copy`], [`Uffd::zeropage`], `Uffd::r#continue`,
//!   [`Uffd::wake`], [`Uffd::writeprotect`], [`Uffd::poison`],
//!   `Uffd::r#move`, [`Uffd::rwprotect`], [`Uffd::set_mode`]. `EEXIST` and
//!   `EAGAIN` are their own errors, with the progress made; the kernel's
//!   negative result fields are never mistaken for byte counts.
//! - Events: one `Send`, `#[non_exhaustive]` [`Event`] type: read in
//!   batches into a reusable [`EventBuffer`] (`Event<Uffd>`, a fork's
//!   userfaultfd owned), or decoded from bytes by the pure [`Event::decode`]
//!   (`Event`, a fork's descriptor only a number).
//! - [`serve`]: a multi-threaded fault server; `firecracker` (feature
//!   `firecracker`): Firecracker's UFFD handler handshake, and the
//!   secret-hiding branch's fault channel.
//! - [`seccomp`]: the system calls and ioctl requests each feature needs,
//!   for handlers and VMMs that run under a seccomp filter.
//! - Errors: one [`Error`] type whose [`Error::errno`] is the kernel's (or
//!   `EINVAL` for a request refused before the call); with feature
//!   `guest-memfd` it converts to and from `kvm_gmem::Error`, so `?` works
//!   both ways.
//!
//! # Cargo features
//!
//! None is on by default: a userfaultfd-only user builds `kvm-gmem-sys`
//! (the bindings), `libc`, `bitflags`, `thiserror` and `static_assertions`,
//! nothing more.
//!
//! | Feature | What it adds | Dependencies |
//! | --- | --- | --- |
//! | `guest-memfd` | `Uffd::register_guest_memfd` and the `Error` conversions with `kvm_gmem::Error` | `kvm-gmem` |
//! | `firecracker` | the `firecracker` module (Firecracker's UFFD handler handshake; the secret-hiding branch's `FaultChannel`) and its [`seccomp`] features | `serde`, `serde_json`, `bitcode` 0.6 |
//! | `firecracker-secret-hiding` | `firecracker::UserfaultServer`: serving KVM userfault exits by `pwrite` into a `GUEST_MEMFD_FLAG_WRITE` guest_memfd and clearing the bitmap bit | `firecracker`, `guest-memfd`, kvm-gmem's `rfc-kvm-userfault` and `rfc-gmem-write` |
//!
//! # Example: serving missing faults from memory
//!
//! A VMM's snapshot restore in miniature: guest memory registered `MISSING`,
//! a [`serve::Server`] filling each page from an in-memory page source on
//! first touch, and the main thread reading it back. Without a userfaultfd
//! it says so and returns. (The README shows the same program.)
//!
//! ```
//! use uffd_gmem::serve::{Region, Server};
//! use uffd_gmem::{HostMapping, RegisterMode, Uffd};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // A userfaultfd: /dev/userfaultfd, or the system call.
//!     let uffd = match Uffd::builder().non_blocking(true).create() {
//!         Ok(uffd) => uffd,
//!         Err(e) => {
//!             println!("no userfaultfd here: {e}");
//!             return Ok(());
//!         }
//!     };
//!     // Guest memory, registered MISSING: the first touch of each page
//!     // faults to `uffd` and waits until the fault is resolved.
//!     let page = uffd_gmem::page_size() as usize;
//!     let len = 16 * page;
//!     let mem = HostMapping::anonymous(len)?;
//!     uffd.register_mapping(&mem, RegisterMode::MISSING)?;
//!     // What the memory should hold: a buffer here, a snapshot file
//!     // (`serve::MappedFile`) in a VMM.
//!     let snapshot: Vec<u8> = (0..len).map(|i| (i / page) as u8 ^ 0x5a).collect();
//!     // Two worker threads resolve the faults with UFFDIO_COPY.
//!     let server = Server::builder(uffd)
//!         .region(Region::new(mem.addr(), len as u64))
//!         .source(snapshot.clone())
//!         .workers(2)
//!         .spawn()?;
//!     // Touch the memory: every page faults and is filled on demand.
//!     let mut seen = vec![0u8; len];
//!     mem.read_at(0, &mut seen)?;
//!     assert_eq!(seen, snapshot);
//!     let stats = server.shutdown()?;
//!     assert!(stats.errors.is_empty(), "{:?}", stats.errors);
//!     println!("{} faults, {} pages copied", stats.faults, stats.pages_copied);
//!     Ok(())
//! }
//! ```
//!
//! Where the API draws the `unsafe` line, and why, is in
//! [`guide::safety`]; moving from userfaultfd-rs is in [`guide::migrating`].
//!
//! # Examples
//!
//! In `uffd-gmem/examples/`:
//!
//! - `firecracker_handler` (feature `firecracker`): a drop-in for
//!   Firecracker's example on-demand UFFD handler (`firecracker_handler
//!   <socket path> <memory file>`), built on `firecracker` and [`serve`]:
//!   validated handshake, worker threads, fault-around, one server per
//!   connection.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod error;
mod event;
#[cfg(feature = "firecracker")]
#[cfg_attr(docsrs, doc(cfg(feature = "firecracker")))]
pub mod firecracker;
mod flags;
pub mod guide;
mod mapping;
pub mod seccomp;
pub mod serve;
mod sys;
mod uffd;

pub use error::{Errno, Error, Result};
pub use event::{Access, Event, FaultKind, MSG_SIZE};
pub use flags::{Features, Ioctls, Mode, RegisterMode};
pub use mapping::HostMapping;
pub use uffd::{EventBuffer, Origin, Uffd, UffdBuilder};

/// The system's page size (`sysconf(_SC_PAGESIZE)`, read once): the unit of
/// every range this crate registers and resolves.
pub use kvm_gmem_sys::support::page_size;

/// The raw bindings this crate is built on.
pub use kvm_gmem_sys as sys_bindings;
