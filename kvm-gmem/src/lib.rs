//! Typed, safe KVM **guest_memfd** API for VMM authors.
//!
//! This crate is at its start: its API (capability probing, the
//! `KVM_CREATE_GUEST_MEMFD` builder, mapping, memslots v2, memory attributes,
//! population) lands next. Today it re-exports the raw layer it is built on.
//!
//! ```
//! assert_eq!(kvm_gmem::sys::KVM_CAP_GUEST_MEMFD_FLAGS, 244);
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_code)]

/// The raw bindings this crate is built on.
pub use kvm_gmem_sys as sys;
