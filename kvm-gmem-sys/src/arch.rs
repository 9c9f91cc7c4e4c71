//! The target architecture's generated bindings (one file per module, under
//! `bindings/<arch>/`, written only by `gmem-gen`) and the ioctl numbers
//! computed over them. Every module is compiled on every build; the RFC ones
//! are exposed only through their cargo features, in [`crate::rfc`].
//!
//! The ABI tests instantiate this same set of files for each architecture.

#[cfg_attr(target_arch = "x86_64", path = "bindings/x86_64/uapi.rs")]
#[cfg_attr(target_arch = "aarch64", path = "bindings/aarch64/uapi.rs")]
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    missing_debug_implementations,
    missing_docs
)]
#[allow(clippy::all, clippy::undocumented_unsafe_blocks)]
pub mod uapi;

#[cfg_attr(target_arch = "x86_64", path = "bindings/x86_64/rfc_populate.rs")]
#[cfg_attr(target_arch = "aarch64", path = "bindings/aarch64/rfc_populate.rs")]
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    missing_debug_implementations,
    missing_docs
)]
#[allow(clippy::all, clippy::undocumented_unsafe_blocks, dead_code)]
pub mod rfc_populate;

#[cfg_attr(target_arch = "x86_64", path = "bindings/x86_64/rfc_gmem_write.rs")]
#[cfg_attr(target_arch = "aarch64", path = "bindings/aarch64/rfc_gmem_write.rs")]
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    missing_debug_implementations,
    missing_docs
)]
#[allow(clippy::all, clippy::undocumented_unsafe_blocks, dead_code)]
pub mod rfc_gmem_write;

#[cfg_attr(target_arch = "x86_64", path = "bindings/x86_64/rfc_no_direct_map.rs")]
#[cfg_attr(
    target_arch = "aarch64",
    path = "bindings/aarch64/rfc_no_direct_map.rs"
)]
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    missing_debug_implementations,
    missing_docs
)]
#[allow(clippy::all, clippy::undocumented_unsafe_blocks, dead_code)]
pub mod rfc_no_direct_map;

#[cfg_attr(target_arch = "x86_64", path = "bindings/x86_64/rfc_kvm_userfault.rs")]
#[cfg_attr(
    target_arch = "aarch64",
    path = "bindings/aarch64/rfc_kvm_userfault.rs"
)]
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    missing_debug_implementations,
    missing_docs
)]
#[allow(clippy::all, clippy::undocumented_unsafe_blocks, dead_code)]
pub mod rfc_kvm_userfault;

#[path = "ioctl.rs"]
pub mod ioctl;
#[path = "numbers.rs"]
pub mod numbers;
#[path = "rfc_numbers.rs"]
#[allow(dead_code)]
pub mod rfc_numbers;
