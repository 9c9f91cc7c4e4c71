//! Typed **userfaultfd** for VMMs: MINOR registration on guest_memfd
//! mappings and a fault-serving building block.
//!
//! This crate is at its start: its API (the `Uffd` builder and handshake,
//! range registration, resolving ioctls, events, `serve`, Firecracker's
//! handler protocol) lands next. Today it re-exports the raw layer it is built
//! on.
//!
//! ```
//! assert_eq!(uffd_gmem::sys::UFFD_API_FEATURES, 0x7FFFF);
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_code)]

/// The raw bindings this crate is built on.
pub use kvm_gmem_sys as sys;
