/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem hermetic stub for <asm-generic/ioctl.h>: the ioctl request
 * encoding shared by x86 and arm64 (and most other architectures).
 *
 * A request number packs four fields, from bit 0 upwards:
 *   nr (8 bits) | type (8 bits) | size of the argument (14 bits) | direction (2 bits)
 * Direction is seen from userspace: WRITE = userspace writes to the kernel,
 * READ = the kernel writes back.
 */
#ifndef KVM_GMEM_STUB_ASM_GENERIC_IOCTL_H
#define KVM_GMEM_STUB_ASM_GENERIC_IOCTL_H

#define _IOC_NRBITS    8
#define _IOC_TYPEBITS  8
#define _IOC_SIZEBITS  14
#define _IOC_DIRBITS   2

#define _IOC_NRMASK    ((1 << _IOC_NRBITS) - 1)
#define _IOC_TYPEMASK  ((1 << _IOC_TYPEBITS) - 1)
#define _IOC_SIZEMASK  ((1 << _IOC_SIZEBITS) - 1)
#define _IOC_DIRMASK   ((1 << _IOC_DIRBITS) - 1)

#define _IOC_NRSHIFT   0
#define _IOC_TYPESHIFT (_IOC_NRSHIFT + _IOC_NRBITS)
#define _IOC_SIZESHIFT (_IOC_TYPESHIFT + _IOC_TYPEBITS)
#define _IOC_DIRSHIFT  (_IOC_SIZESHIFT + _IOC_SIZEBITS)

#define _IOC_NONE  0U
#define _IOC_WRITE 1U
#define _IOC_READ  2U

#define _IOC(dir, type, nr, size)          \
	(((dir) << _IOC_DIRSHIFT) |        \
	 ((type) << _IOC_TYPESHIFT) |      \
	 ((nr) << _IOC_NRSHIFT) |          \
	 ((size) << _IOC_SIZESHIFT))

#define _IOC_TYPECHECK(t) (sizeof(t))

#define _IO(type, nr)         _IOC(_IOC_NONE, (type), (nr), 0)
#define _IOR(type, nr, arg)   _IOC(_IOC_READ, (type), (nr), (_IOC_TYPECHECK(arg)))
#define _IOW(type, nr, arg)   _IOC(_IOC_WRITE, (type), (nr), (_IOC_TYPECHECK(arg)))
#define _IOWR(type, nr, arg)  _IOC(_IOC_READ | _IOC_WRITE, (type), (nr), (_IOC_TYPECHECK(arg)))

#endif
