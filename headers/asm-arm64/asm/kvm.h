/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem: the part of arm64's <asm/kvm.h> (Linux 7.3 uAPI) that guest_memfd
 * users need. arm64 has no named VM types in <asm/kvm.h>: the KVM_CREATE_VM
 * argument carries the IPA size (KVM_VM_TYPE_ARM_IPA_SIZE_MASK in linux/kvm.h),
 * so nothing from this file is part of our subset. It exists so that
 * linux/kvm.h includes <asm/kvm.h> on every architecture, as upstream does.
 */
#ifndef KVM_GMEM_ASM_ARM64_KVM_H
#define KVM_GMEM_ASM_ARM64_KVM_H
#endif
