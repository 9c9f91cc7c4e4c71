/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem RFC addition: KVM Userfault (memslot userfault bitmap).
 *
 * Series:  "KVM: Introduce KVM Userfault" (James Houghton)
 *          v2 <20250109204929.1106563-1-jthoughton@google.com>, 9 Jan 2025
 *          v3 <20250618042424.330664-1-jthoughton@google.com>, 18 Jun 2025
 *             (04/15 <20250618042424.330664-5-jthoughton@google.com>: the
 *             memslot flag, the bitmap field and the exit flag below)
 * Number:  the capability follows Firecracker's 6.18 stack (patch 0051): 245.
 *          The series itself used 236 (RFC), 239 (v1, v2) and 243 (v3), all
 *          since taken upstream; on upstream >= 6.19, 245 is
 *          KVM_CAP_ARM_SEA_TO_USER. Confirm support by behaviour: a memslot
 *          with KVM_MEM_USERFAULT is accepted.
 *
 * This translation unit stands alone: it defines the series' version of
 * struct kvm_userspace_memory_region2, which takes pad2[0] for
 * `userfault_bitmap`. The size stays 160 bytes, so the request number of
 * KVM_SET_USER_MEMORY_REGION2 is unchanged; on kernels without the series the
 * field is padding and must be 0.
 *
 * `userfault_bitmap` points to an array of unsigned long; bit i stands for
 * gfn guest_phys_addr / PAGE_SIZE + i. A vCPU fault on a set bit exits with
 * KVM_EXIT_MEMORY_FAULT and KVM_MEMORY_EXIT_FLAG_USERFAULT. Clear bits with
 * release ordering.
 */
#ifndef KVM_GMEM_RFC_KVM_USERFAULT_H
#define KVM_GMEM_RFC_KVM_USERFAULT_H

#include <linux/types.h>

#define KVM_CAP_USERFAULT 245

struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 userfault_bitmap;      /* user pointer; used with KVM_MEM_USERFAULT */
	__u64 pad2[13];
};

#define KVM_MEM_USERFAULT              (1UL << 3)
#define KVM_MEMORY_EXIT_FLAG_USERFAULT (1ULL << 4)

#endif
