/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem hermetic stub for <linux/types.h>.
 *
 * Only the fixed-width kernel integer types that kvm.h and userfaultfd.h use.
 * Both supported targets (x86_64, aarch64) are LP64 with the int-ll64 model:
 * 64-bit quantities are `long long`, exactly as asm-generic/int-ll64.h has it.
 */
#ifndef KVM_GMEM_STUB_LINUX_TYPES_H
#define KVM_GMEM_STUB_LINUX_TYPES_H

typedef signed char        __s8;
typedef unsigned char      __u8;
typedef signed short       __s16;
typedef unsigned short     __u16;
typedef signed int         __s32;
typedef unsigned int       __u32;
typedef signed long long   __s64;
typedef unsigned long long __u64;

#endif
