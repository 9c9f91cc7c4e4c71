/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem RFC addition: KVM_GUEST_MEMFD_POPULATE.
 *
 * Series:  "[RFC PATCH 0/4] KVM: ioctl for populating guest_memfd"
 *          (Nikita Kalyazin), 24 Oct 2024
 * Cover:   <20241024095429.54052-1-kalyazin@amazon.com>
 * uAPI:    2/4 <20241024095429.54052-3-kalyazin@amazon.com>
 * Status:  not merged; continued as the guest_memfd write() series.
 *
 * A VM ioctl that copies `size` bytes from the caller's buffer `from` into
 * the guest_memfd pages backing [gpa, gpa + size); from == NULL clears them.
 * A page can be populated once; a repeat gives EEXIST until it is punched.
 *
 * DANGER: the request number 0x4020AED6 is also Firecracker's KVM_ASYNC_PF
 * (same nr 0xd6, same direction, same 32-byte size). Never issue it without
 * the size-0 probe: POPULATE kernels succeed, ASYNC_PF kernels answer EINVAL,
 * kernels with neither answer ENOTTY.
 */
#ifndef KVM_GMEM_RFC_POPULATE_H
#define KVM_GMEM_RFC_POPULATE_H

#include <linux/kvm.h>

struct kvm_guest_memfd_populate {
	__u64 gpa;                   /* page aligned; the low bits are dropped */
	__u64 size;                  /* page multiple; the low bits are dropped */
	void *from;                  /* user pointer to the source, or NULL */
	__u64 flags;                 /* none defined: 0 */
};

#define KVM_GUEST_MEMFD_POPULATE _IOW(KVMIO, 0xd6, struct kvm_guest_memfd_populate)

#endif
