/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem: the guest_memfd / private-memory subset of <linux/kvm.h>, at the
 * level of the Linux 7.3 uAPI (identical to 6.18 for everything below).
 *
 * Written by the kvm-gmem project from the facts in uapi-facts.md; names,
 * numbers and layouts are the kernel's, the text is ours. The rest of KVM's
 * uAPI is deliberately absent: kvm-bindings covers it.
 *
 * Every definition and its origin is listed in headers/README.md.
 */
#ifndef KVM_GMEM_LINUX_KVM_H
#define KVM_GMEM_LINUX_KVM_H

#include <linux/types.h>
#include <linux/ioctl.h>
#include <asm/kvm.h>

/* ---- Base: version, the ioctl type, system ioctls ------------------------ */

#define KVM_API_VERSION 12

#define KVMIO 0xAE

/* System ioctls, issued on an open /dev/kvm. */
#define KVM_GET_API_VERSION  _IO(KVMIO, 0x00)
#define KVM_CREATE_VM        _IO(KVMIO, 0x01)   /* argument: the VM type */
/* Also valid on a VM fd, where the answer can be specific to that VM. */
#define KVM_CHECK_EXTENSION  _IO(KVMIO, 0x03)   /* argument: a KVM_CAP_* number */

/* arm64: the KVM_CREATE_VM argument carries the guest IPA size in its low byte. */
#define KVM_VM_TYPE_ARM_IPA_SIZE_MASK 0xffULL

/* ---- Capabilities (KVM_CHECK_EXTENSION) ---------------------------------- */

#define KVM_CAP_NR_MEMSLOTS                     10
#define KVM_CAP_MULTI_ADDRESS_SPACE             118
#define KVM_CAP_ARM_VM_IPA_SIZE                 165   /* arm64: largest IPA size (bits) a VM type may ask for */
/* The private-memory era, 6.5 onwards, contiguous. */
#define KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE      228
#define KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES       229
#define KVM_CAP_ARM_SUPPORTED_REG_MASK_RANGES   230
#define KVM_CAP_USER_MEMORY2                    231
#define KVM_CAP_MEMORY_FAULT_INFO               232
#define KVM_CAP_MEMORY_ATTRIBUTES               233   /* returns KVM_MEMORY_ATTRIBUTE_* mask */
#define KVM_CAP_GUEST_MEMFD                     234
#define KVM_CAP_VM_TYPES                        235   /* returns 1 << type for each VM type */
#define KVM_CAP_PRE_FAULT_MEMORY                236
#define KVM_CAP_X86_APIC_BUS_CYCLES_NS          237
#define KVM_CAP_X86_GUEST_MODE                  238
#define KVM_CAP_ARM_WRITABLE_IMP_ID_REGS        239
#define KVM_CAP_ARM_EL2                         240
#define KVM_CAP_ARM_EL2_E2H0                    241
#define KVM_CAP_RISCV_MP_STATE_RESET            242
#define KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED  243
#define KVM_CAP_GUEST_MEMFD_FLAGS               244   /* returns GUEST_MEMFD_FLAG_* mask; ask the VM fd */
#define KVM_CAP_ARM_SEA_TO_USER                 245
#define KVM_CAP_S390_USER_OPEREXEC              246
#define KVM_CAP_S390_KEYOP                      247
#define KVM_CAP_S390_VSIE_ESAMODE               248
#define KVM_CAP_S390_HPAGE_2G                   249
#define KVM_CAP_PPC_COMPAT_CAPS                 250
#define KVM_CAP_ARM_PMU_V3_STRICT               251

/* ---- Memory slots, version 2 (since 6.8) ---------------------------------- */

/*
 * Argument of KVM_SET_USER_MEMORY_REGION2: 160 bytes. A slot backed by
 * guest_memfd names the fd and the offset in it; userspace_addr may also be
 * given (for the shared view of the memory). Bits 16..31 of `slot` select the
 * address space when KVM_CAP_MULTI_ADDRESS_SPACE is above 1.
 */
struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;                 /* KVM_MEM_* */
	__u64 guest_phys_addr;
	__u64 memory_size;           /* 0 deletes the slot */
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 pad2[14];
};

/* Memory slot flags. Only bits 0..15 are for userspace; KVM keeps the rest. */
#define KVM_MEM_LOG_DIRTY_PAGES (1UL << 0)
#define KVM_MEM_READONLY        (1UL << 1)
#define KVM_MEM_GUEST_MEMFD     (1UL << 2)

#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)

/* ---- Memory attributes (since 6.8) ---------------------------------------- */

/* Argument of KVM_SET_MEMORY_ATTRIBUTES: set `attributes` on [address, address + size). */
struct kvm_memory_attributes {
	__u64 address;               /* guest physical, page aligned */
	__u64 size;                  /* page aligned, non-zero */
	__u64 attributes;            /* KVM_MEMORY_ATTRIBUTE_* */
	__u64 flags;                 /* none defined: must be 0 */
};

#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)

#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)

/* ---- guest_memfd (since 6.8; mmap flags since 6.18) ----------------------- */

/* Argument of KVM_CREATE_GUEST_MEMFD; the ioctl returns the new fd. */
struct kvm_create_guest_memfd {
	__u64 size;                  /* bytes, a multiple of the page size */
	__u64 flags;                 /* GUEST_MEMFD_FLAG_*, as offered by KVM_CAP_GUEST_MEMFD_FLAGS */
	__u64 reserved[6];
};

/* The fd may be mmap()ed. */
#define GUEST_MEMFD_FLAG_MMAP        (1ULL << 0)
/* Memory starts out shared, so host faults through the mapping are allowed;
 * without it any host access through the mapping gets SIGBUS. */
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)

#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)

/* ---- Pre-fault (since 6.11, vCPU ioctl) ----------------------------------- */

/* In/out: on partial progress the kernel advances gpa and shrinks size. */
struct kvm_pre_fault_memory {
	__u64 gpa;
	__u64 size;
	__u64 flags;                 /* none defined: must be 0 */
	__u64 padding[5];
};

#define KVM_PRE_FAULT_MEMORY _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)

/* ---- The shared vCPU run area: header and the memory-fault exit ----------- */

#define KVM_EXIT_MEMORY_FAULT 39

#define SYNC_REGS_SIZE_BYTES 2048

/*
 * The mmap()ed vCPU run structure. Our subset spells out the fixed header and,
 * of the 256-byte exit union, only the memory_fault member; the other exit
 * members and the architecture's kvm_sync_regs are left to kvm-bindings. The
 * padding members keep the size and every offset identical to the kernel's.
 */
struct kvm_run {
	/* written by userspace */
	__u8 request_interrupt_window;
	__u8 immediate_exit;
	__u8 padding1[6];

	/* written by KVM */
	__u32 exit_reason;
	__u8 ready_for_interrupt_injection;
	__u8 if_flag;
	__u16 flags;

	/* written by KVM, read on the next entry */
	__u64 cr8;
	__u64 apic_base;

	union {
		/* exit_reason == KVM_EXIT_MEMORY_FAULT */
		struct {
/* The access was to memory the guest holds as private. */
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
			__u64 flags;
			__u64 gpa;
			__u64 size;
		} memory_fault;
		/* fixes the size of the exit union */
		char padding[256];
	};

	__u64 kvm_valid_regs;
	__u64 kvm_dirty_regs;
	union {
		/* the architecture's struct kvm_sync_regs lives here upstream */
		char padding[SYNC_REGS_SIZE_BYTES];
	} s;
};

#endif
