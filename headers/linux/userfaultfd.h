/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * kvm-gmem: <linux/userfaultfd.h>, complete, at the level of the Linux 7.3
 * uAPI (6.8 plus read-write protection, "RWP", new in 7.3).
 *
 * Written by the kvm-gmem project from the facts in uapi-facts.md; names,
 * numbers and layouts are the kernel's, the text is ours.
 *
 * Note on feature bit 17: several unmerged series used it for a guest_memfd
 * minor-fault feature. Since 7.3 it is UFFD_FEATURE_RWP. Userfaultfd support
 * on guest_memfd needs no feature bit: UFFDIO_REGISTER on a guest_memfd
 * mapping either succeeds or it does not.
 */
#ifndef KVM_GMEM_LINUX_USERFAULTFD_H
#define KVM_GMEM_LINUX_USERFAULTFD_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* ---- Creating a userfaultfd through /dev/userfaultfd ---------------------- */

#define USERFAULTFD_IOC     0xAA
/* ioctl on an open /dev/userfaultfd; argument: the userfaultfd(2) flags. */
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)

/* userfaultfd(2) flag: only faults raised in user mode are reported. */
#define UFFD_USER_MODE_ONLY 1

/* ---- The API handshake ---------------------------------------------------- */

/* The only API version: the value of uffdio_api.api. */
#define UFFD_API ((__u64)0xAA)

/* ioctl numbers (the `nr` field); uffdio_*.ioctls report them as 1 << nr. */
#define _UFFDIO_REGISTER     (0x00)
#define _UFFDIO_UNREGISTER   (0x01)
#define _UFFDIO_WAKE         (0x02)
#define _UFFDIO_COPY         (0x03)
#define _UFFDIO_ZEROPAGE     (0x04)
#define _UFFDIO_MOVE         (0x05)
#define _UFFDIO_WRITEPROTECT (0x06)
#define _UFFDIO_CONTINUE     (0x07)
#define _UFFDIO_POISON       (0x08)
#define _UFFDIO_RWPROTECT    (0x09)
#define _UFFDIO_SET_MODE     (0x0A)
#define _UFFDIO_API          (0x3F)

#define UFFDIO 0xAA

/* Events: uffd_msg.event. */
#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFD_EVENT_FORK      0x13
#define UFFD_EVENT_REMAP     0x14
#define UFFD_EVENT_REMOVE    0x15
#define UFFD_EVENT_UNMAP     0x16

/* uffd_msg.arg.pagefault.flags */
#define UFFD_PAGEFAULT_FLAG_WRITE (1 << 0)   /* the access was a write */
#define UFFD_PAGEFAULT_FLAG_WP    (1 << 1)   /* write-protect fault */
#define UFFD_PAGEFAULT_FLAG_MINOR (1 << 2)   /* page present in the page cache, PTE missing */
#define UFFD_PAGEFAULT_FLAG_RWP   (1 << 3)   /* read-write-protect fault (7.3) */

/*
 * One record as read(2) returns it: 32 bytes, packed, the event-specific
 * argument at offset 8.
 */
struct uffd_msg {
	__u8  event;                 /* UFFD_EVENT_* */
	__u8  reserved1;
	__u16 reserved2;
	__u32 reserved3;

	union {
		struct {
			__u64 flags;         /* UFFD_PAGEFAULT_FLAG_* */
			__u64 address;       /* page aligned unless UFFD_FEATURE_EXACT_ADDRESS */
			union {
				__u32 ptid;  /* with UFFD_FEATURE_THREAD_ID */
			} feat;
		} pagefault;

		struct {
			__u32 ufd;           /* the child's new userfaultfd */
		} fork;

		struct {
			__u64 from;
			__u64 to;
			__u64 len;
		} remap;

		struct {
			__u64 start;
			__u64 end;
		} remove;

		struct {
			/* room reserved for later events */
			__u64 reserved1;
			__u64 reserved2;
			__u64 reserved3;
		} reserved;
	} arg;
} __attribute__((packed));

/* Features, negotiated through uffdio_api.features. */
#define UFFD_FEATURE_PAGEFAULT_FLAG_WP   (1 << 0)
#define UFFD_FEATURE_EVENT_FORK          (1 << 1)
#define UFFD_FEATURE_EVENT_REMAP         (1 << 2)
#define UFFD_FEATURE_EVENT_REMOVE        (1 << 3)
#define UFFD_FEATURE_MISSING_HUGETLBFS   (1 << 4)
#define UFFD_FEATURE_MISSING_SHMEM       (1 << 5)
#define UFFD_FEATURE_EVENT_UNMAP         (1 << 6)
#define UFFD_FEATURE_SIGBUS              (1 << 7)
#define UFFD_FEATURE_THREAD_ID           (1 << 8)
#define UFFD_FEATURE_MINOR_HUGETLBFS     (1 << 9)
#define UFFD_FEATURE_MINOR_SHMEM         (1 << 10)
#define UFFD_FEATURE_EXACT_ADDRESS       (1 << 11)
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM  (1 << 12)
#define UFFD_FEATURE_WP_UNPOPULATED      (1 << 13)
#define UFFD_FEATURE_POISON              (1 << 14)
#define UFFD_FEATURE_WP_ASYNC            (1 << 15)
#define UFFD_FEATURE_MOVE                (1 << 16)
#define UFFD_FEATURE_RWP                 (1 << 17)   /* 7.3 */
#define UFFD_FEATURE_RWP_ASYNC           (1 << 18)   /* 7.3 */

/* Argument of UFFDIO_API: in api + features, out features + ioctls. */
struct uffdio_api {
	__u64 api;                   /* UFFD_API */
	__u64 features;              /* UFFD_FEATURE_* asked for, then granted */
	__u64 ioctls;                /* 1 << _UFFDIO_* usable on the fd itself */
};

/* A page-aligned range of the address space. */
struct uffdio_range {
	__u64 start;
	__u64 len;
};

/* ---- Registering ranges --------------------------------------------------- */

/* Argument of UFFDIO_REGISTER: in range + mode, out ioctls. */
struct uffdio_register {
	struct uffdio_range range;
	__u64 mode;                  /* UFFDIO_REGISTER_MODE_* */
	__u64 ioctls;                /* 1 << _UFFDIO_* usable on the range */
};

#define UFFDIO_REGISTER_MODE_MISSING ((__u64)1 << 0)
#define UFFDIO_REGISTER_MODE_WP      ((__u64)1 << 1)
#define UFFDIO_REGISTER_MODE_MINOR   ((__u64)1 << 2)
#define UFFDIO_REGISTER_MODE_RWP     ((__u64)1 << 3)   /* 7.3 */

/* ---- Resolving faults ----------------------------------------------------- */

/*
 * In each request below the last member is written by the kernel: the number
 * of bytes handled, or a negative errno. The kernel does not read it.
 */

/* Argument of UFFDIO_COPY: fill missing pages from a source buffer. */
struct uffdio_copy {
	__u64 dst;
	__u64 src;
	__u64 len;
	__u64 mode;                  /* UFFDIO_COPY_MODE_* */
	__s64 copy;
};

#define UFFDIO_COPY_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_COPY_MODE_WP       ((__u64)1 << 1)   /* map write-protected */

/* Argument of UFFDIO_ZEROPAGE: fill missing pages with zeroes. */
struct uffdio_zeropage {
	struct uffdio_range range;
	__u64 mode;                  /* UFFDIO_ZEROPAGE_MODE_* */
	__s64 zeropage;
};

#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ((__u64)1 << 0)

/* Argument of UFFDIO_WRITEPROTECT: set or clear write protection. */
struct uffdio_writeprotect {
	struct uffdio_range range;
	__u64 mode;                  /* WP set protects, WP clear unprotects */
};

#define UFFDIO_WRITEPROTECT_MODE_WP       ((__u64)1 << 0)
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ((__u64)1 << 1)

/* Argument of UFFDIO_CONTINUE: map pages already in the page cache (minor faults). */
struct uffdio_continue {
	struct uffdio_range range;
	__u64 mode;                  /* UFFDIO_CONTINUE_MODE_* */
	__s64 mapped;
};

#define UFFDIO_CONTINUE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_CONTINUE_MODE_WP       ((__u64)1 << 1)

/* Argument of UFFDIO_POISON: mark pages so that any access raises SIGBUS. */
struct uffdio_poison {
	struct uffdio_range range;
	__u64 mode;                  /* UFFDIO_POISON_MODE_* */
	__s64 updated;
};

#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)

/* Argument of UFFDIO_RWPROTECT (7.3): make pages inaccessible, or undo it. */
struct uffdio_rwprotect {
	struct uffdio_range range;
	__u64 mode;                  /* RWP set protects, RWP clear unprotects */
};

#define UFFDIO_RWPROTECT_MODE_RWP      ((__u64)1 << 0)
#define UFFDIO_RWPROTECT_MODE_DONTWAKE ((__u64)1 << 1)

/* Argument of UFFDIO_MOVE: move pages from src to dst without copying. */
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
	__u64 mode;                  /* UFFDIO_MOVE_MODE_* */
	__s64 move;
};

#define UFFDIO_MOVE_MODE_DONTWAKE        ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)

/* Argument of UFFDIO_SET_MODE (7.3): switch asynchronous modes at run time. */
struct uffdio_set_mode {
	__u64 enable;                /* features to turn on; only UFFD_FEATURE_RWP_ASYNC */
	__u64 disable;               /* features to turn off; a bit in both is invalid */
};

/* ---- Summary masks -------------------------------------------------------- */

#define UFFD_API_REGISTER_MODES (UFFDIO_REGISTER_MODE_MISSING |	\
				 UFFDIO_REGISTER_MODE_WP |	\
				 UFFDIO_REGISTER_MODE_MINOR |	\
				 UFFDIO_REGISTER_MODE_RWP)

#define UFFD_API_FEATURES (UFFD_FEATURE_PAGEFAULT_FLAG_WP |	\
			   UFFD_FEATURE_EVENT_FORK |		\
			   UFFD_FEATURE_EVENT_REMAP |		\
			   UFFD_FEATURE_EVENT_REMOVE |		\
			   UFFD_FEATURE_MISSING_HUGETLBFS |	\
			   UFFD_FEATURE_MISSING_SHMEM |		\
			   UFFD_FEATURE_EVENT_UNMAP |		\
			   UFFD_FEATURE_SIGBUS |		\
			   UFFD_FEATURE_THREAD_ID |		\
			   UFFD_FEATURE_MINOR_HUGETLBFS |	\
			   UFFD_FEATURE_MINOR_SHMEM |		\
			   UFFD_FEATURE_EXACT_ADDRESS |		\
			   UFFD_FEATURE_WP_HUGETLBFS_SHMEM |	\
			   UFFD_FEATURE_WP_UNPOPULATED |	\
			   UFFD_FEATURE_POISON |		\
			   UFFD_FEATURE_WP_ASYNC |		\
			   UFFD_FEATURE_MOVE |			\
			   UFFD_FEATURE_RWP |			\
			   UFFD_FEATURE_RWP_ASYNC)

/* ioctls valid on the userfaultfd itself. */
#define UFFD_API_IOCTLS (((__u64)1 << _UFFDIO_REGISTER) |	\
			 ((__u64)1 << _UFFDIO_UNREGISTER) |	\
			 ((__u64)1 << _UFFDIO_SET_MODE) |	\
			 ((__u64)1 << _UFFDIO_API))

/* ioctls valid on a registered range. */
#define UFFD_API_RANGE_IOCTLS (((__u64)1 << _UFFDIO_WAKE) |		\
			       ((__u64)1 << _UFFDIO_COPY) |		\
			       ((__u64)1 << _UFFDIO_ZEROPAGE) |		\
			       ((__u64)1 << _UFFDIO_MOVE) |		\
			       ((__u64)1 << _UFFDIO_WRITEPROTECT) |	\
			       ((__u64)1 << _UFFDIO_CONTINUE) |		\
			       ((__u64)1 << _UFFDIO_POISON) |		\
			       ((__u64)1 << _UFFDIO_RWPROTECT))

/* ioctls valid on a range whose memory cannot take zero pages or moves (hugetlbfs). */
#define UFFD_API_RANGE_IOCTLS_BASIC (((__u64)1 << _UFFDIO_WAKE) |		\
				     ((__u64)1 << _UFFDIO_COPY) |		\
				     ((__u64)1 << _UFFDIO_WRITEPROTECT) |	\
				     ((__u64)1 << _UFFDIO_CONTINUE) |		\
				     ((__u64)1 << _UFFDIO_POISON) |		\
				     ((__u64)1 << _UFFDIO_RWPROTECT))

/* ---- The ioctls ----------------------------------------------------------- */

#define UFFDIO_API          _IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)
#define UFFDIO_REGISTER     _IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)
/* UNREGISTER and WAKE are encoded as _IOR although the kernel only reads
 * the range: an old quirk that the numbers keep. */
#define UFFDIO_UNREGISTER   _IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)
#define UFFDIO_WAKE         _IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)
#define UFFDIO_COPY         _IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)
#define UFFDIO_ZEROPAGE     _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, struct uffdio_zeropage)
#define UFFDIO_MOVE         _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#define UFFDIO_WRITEPROTECT _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)
#define UFFDIO_CONTINUE     _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)
#define UFFDIO_POISON       _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#define UFFDIO_RWPROTECT    _IOWR(UFFDIO, _UFFDIO_RWPROTECT, struct uffdio_rwprotect)
#define UFFDIO_SET_MODE     _IOW(UFFDIO, _UFFDIO_SET_MODE, struct uffdio_set_mode)

#endif
