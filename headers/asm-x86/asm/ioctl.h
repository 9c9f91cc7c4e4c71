/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* kvm-gmem hermetic stub for <asm/ioctl.h> on x86: the generic encoding. */
#ifndef KVM_GMEM_STUB_ASM_IOCTL_H
#define KVM_GMEM_STUB_ASM_IOCTL_H

#include <asm-generic/ioctl.h>

#endif
