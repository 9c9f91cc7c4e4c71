/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem RFC addition: write() on guest_memfd, GUEST_MEMFD_FLAG_WRITE.
 *
 * Series:  "KVM: guest_memfd: add generic population via write" (Nikita Kalyazin)
 *          v3 <20250303130838.28812-2-kalyazin@amazon.com> (no uAPI)
 *          v6 <20251020161352.69257-2-kalyazin@amazon.com> (no uAPI)
 *          v7 <20251114151828.98165-2-kalyazin@amazon.com>, 14 Nov 2025:
 *             adds the flag as bit 2
 * Number:  bit 3, as in Firecracker's 6.18 secret-hiding patch stack (patch
 *          0060), where bit 2 is NO_DIRECT_MAP. The project follows that stack
 *          (DESIGN.md, "Where the RFCs disagree"); v7 alone numbers it bit 2.
 *          Probe KVM_CAP_GUEST_MEMFD_FLAGS and confirm by behaviour.
 *
 * With the flag, write()/pwrite() fill the guest_memfd's page cache: offset
 * and length page aligned, within the file size (else EINVAL); without the
 * flag write() fails with ENODEV (and on kernels without the series, pwrite
 * fails with ESPIPE).
 */
#ifndef KVM_GMEM_RFC_GMEM_WRITE_H
#define KVM_GMEM_RFC_GMEM_WRITE_H

#define GUEST_MEMFD_FLAG_WRITE (1ULL << 3)

#endif
