//! `const fn` ioctl request encoders, the Rust form of C's `_IOC`, `_IO`,
//! `_IOR`, `_IOW` and `_IOWR`.
//!
//! The field layout (bit widths and shifts, direction values) is not
//! hard-coded here: it comes from the target's generated bindings
//! (`_IOC_NRSHIFT`, `_IOC_READ`, ...), which bindgen took from the
//! architecture's `<asm/ioctl.h>`. The argument size is `size_of::<T>()` of
//! the generated struct, as C's `sizeof` is. The ABI tests compare every
//! number built here with the C macros.
#![allow(non_snake_case)]

use super::uapi::{
    _IOC_DIRMASK, _IOC_DIRSHIFT, _IOC_NONE, _IOC_NRMASK, _IOC_NRSHIFT, _IOC_READ, _IOC_SIZEMASK,
    _IOC_SIZESHIFT, _IOC_TYPEMASK, _IOC_TYPESHIFT, _IOC_WRITE,
};

/// Packs an ioctl request number from its four fields, as C's `_IOC`.
///
/// Fails to compile (or panics when called at run time) if a field does not
/// fit its width.
pub const fn _IOC(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    assert!(ty <= _IOC_TYPEMASK, "ioctl type does not fit _IOC_TYPEBITS");
    assert!(nr <= _IOC_NRMASK, "ioctl nr does not fit _IOC_NRBITS");
    assert!(
        size <= _IOC_SIZEMASK as usize,
        "ioctl argument does not fit _IOC_SIZEBITS"
    );
    (dir << _IOC_DIRSHIFT)
        | (ty << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | ((size as u32) << _IOC_SIZESHIFT)
}

/// A request without an argument struct, as C's `_IO(type, nr)`.
pub const fn _IO(ty: u32, nr: u32) -> u32 {
    _IOC(_IOC_NONE, ty, nr, 0)
}

/// A request whose argument the kernel writes, as C's `_IOR(type, nr, T)`.
pub const fn _IOR<T>(ty: u32, nr: u32) -> u32 {
    _IOC(_IOC_READ, ty, nr, size_of::<T>())
}

/// A request whose argument the kernel reads, as C's `_IOW(type, nr, T)`.
pub const fn _IOW<T>(ty: u32, nr: u32) -> u32 {
    _IOC(_IOC_WRITE, ty, nr, size_of::<T>())
}

/// A request whose argument goes both ways, as C's `_IOWR(type, nr, T)`.
pub const fn _IOWR<T>(ty: u32, nr: u32) -> u32 {
    _IOC(_IOC_READ | _IOC_WRITE, ty, nr, size_of::<T>())
}

/// The direction field of a request, as C's `_IOC_DIR`.
pub const fn _IOC_DIR(request: u32) -> u32 {
    (request >> _IOC_DIRSHIFT) & _IOC_DIRMASK
}

/// The argument size a request encodes, as C's `_IOC_SIZE`.
pub const fn _IOC_SIZE(request: u32) -> usize {
    ((request >> _IOC_SIZESHIFT) & _IOC_SIZEMASK) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_generic_c_macros() {
        // dir << 30 | size << 16 | type << 8 | nr
        assert_eq!(_IO(0xAE, 0x01), 0x0000_AE01);
        assert_eq!(_IOW::<[u8; 160]>(0xAE, 0x49), 0x40A0_AE49);
        assert_eq!(_IOR::<[u8; 16]>(0xAA, 0x01), 0x8010_AA01);
        assert_eq!(_IOWR::<[u8; 64]>(0xAE, 0xd4), 0xC040_AED4);
    }

    #[test]
    fn decodes_direction_and_size() {
        let r = _IOWR::<[u8; 64]>(0xAE, 0xd4);
        assert_eq!((_IOC_DIR(r), _IOC_SIZE(r)), (_IOC_READ | _IOC_WRITE, 64));
        assert_eq!(
            (_IOC_DIR(_IO(0xAE, 1)), _IOC_SIZE(_IO(0xAE, 1))),
            (_IOC_NONE, 0)
        );
    }
}
