/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem: the part of x86's <asm/kvm.h> (Linux 7.3 uAPI) that guest_memfd
 * users need: the VM types accepted by KVM_CREATE_VM. KVM_CAP_VM_TYPES
 * reports the supported ones as a bitmask indexed by these numbers.
 */
#ifndef KVM_GMEM_ASM_X86_KVM_H
#define KVM_GMEM_ASM_X86_KVM_H

#define KVM_X86_DEFAULT_VM      0   /* plain VM, shared memory only */
#define KVM_X86_SW_PROTECTED_VM 1   /* private memory without hardware protection */
#define KVM_X86_SEV_VM          2
#define KVM_X86_SEV_ES_VM       3
#define KVM_X86_SNP_VM          4
#define KVM_X86_TDX_VM          5

#endif
