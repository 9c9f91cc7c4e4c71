//! The target architecture's generated bindings (one file per module, under
//! `bindings/<arch>/`, written only by `gmem-gen`) and the ioctl numbers
//! computed over them. Every module is compiled on every build; the RFC ones
//! are exposed only through their cargo features, in [`crate::rfc`].
//!
//! The ABI tests instantiate this same set of files for each architecture.

/// Declares each generated module from its file for the target
/// architecture, with the lint allowances bindgen's output needs: written
/// once, here, and never in the generated files. `dead_code` is for the RFC
/// modules, compiled on every build but re-exported only with their features.
macro_rules! generated {
    ($($name:ident: $x86_64:literal, $aarch64:literal;)*) => {$(
        #[cfg_attr(target_arch = "x86_64", path = $x86_64)]
        #[cfg_attr(target_arch = "aarch64", path = $aarch64)]
        #[allow(
            non_camel_case_types,
            non_upper_case_globals,
            missing_debug_implementations,
            missing_docs,
            dead_code
        )]
        #[allow(clippy::all, clippy::undocumented_unsafe_blocks)]
        pub mod $name;
    )*};
}

generated! {
    uapi: "bindings/x86_64/uapi.rs", "bindings/aarch64/uapi.rs";
    rfc_populate: "bindings/x86_64/rfc_populate.rs", "bindings/aarch64/rfc_populate.rs";
    rfc_gmem_write: "bindings/x86_64/rfc_gmem_write.rs", "bindings/aarch64/rfc_gmem_write.rs";
    rfc_no_direct_map:
        "bindings/x86_64/rfc_no_direct_map.rs", "bindings/aarch64/rfc_no_direct_map.rs";
    rfc_kvm_userfault:
        "bindings/x86_64/rfc_kvm_userfault.rs", "bindings/aarch64/rfc_kvm_userfault.rs";
}

#[path = "ioctl.rs"]
pub mod ioctl;
#[path = "numbers.rs"]
pub mod numbers;
#[path = "rfc_numbers.rs"]
#[allow(dead_code)]
pub mod rfc_numbers;
