/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem RFC addition: GUEST_MEMFD_FLAG_NO_DIRECT_MAP.
 *
 * Series:  "KVM: guest_memfd: Add flag to remove from direct map"
 *          (Patrick Roy, later posted by Nikita Kalyazin)
 *          v9 07/13 <20260114134510.1835-8-kalyazin@amazon.com>, 14 Jan 2026
 *          (earlier: v6 05/11 <20250912091708.17502-6-roypat@amazon.co.uk> used
 *          bit 1 and a capability 245; RFC v2 <20240910163038.1298452-2-roypat@amazon.co.uk>
 *          used bit 0 under another name)
 * Number:  bit 2 in v9 and in Firecracker's 6.18 stack (patch 0032). No own
 *          capability: offered through KVM_CAP_GUEST_MEMFD_FLAGS.
 *
 * Folios of such a guest_memfd leave the kernel's direct map when first
 * mapped to the guest or to userspace and return to it when freed.
 */
#ifndef KVM_GMEM_RFC_NO_DIRECT_MAP_H
#define KVM_GMEM_RFC_NO_DIRECT_MAP_H

#define GUEST_MEMFD_FLAG_NO_DIRECT_MAP (1ULL << 2)

#endif
