/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/* kvm-gmem hermetic stub for <linux/ioctl.h>: defer to the arch's encoding. */
#ifndef KVM_GMEM_STUB_LINUX_IOCTL_H
#define KVM_GMEM_STUB_LINUX_IOCTL_H

#include <asm/ioctl.h>

#endif
