#ifndef DYSCO_CLINUX_SHIM_H
#define DYSCO_CLINUX_SHIM_H
#include <sched.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <malloc.h>
#include <sys/mount.h>
#include <sys/vfs.h>
#include <sys/syscall.h>

/* setns(2) is declared only under _GNU_SOURCE, which must not leak into this module (it changes struct
   layouts that other C modules import without it): declare it here. CLONE_NEWNET is 0x40000000. */
extern int setns(int fd, int nstype);
static inline int dysco_setns(int fd, int nstype) { return setns(fd, nstype); }
static inline int dysco_clone_newnet(void) { return 0x40000000; }

/* errno is a macro (thread-local lvalue); read it through a function. */
static inline int dysco_errno(void) { return errno; }
static inline void dysco_set_errno(int value) { errno = value; }

/* Coarse monotonic clock in nanoseconds (vDSO, no syscall): the per-packet clock. */
static inline unsigned long long dysco_monotonic_coarse_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}
static inline unsigned long long dysco_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}
/* Wall-clock time in microseconds since 1970 (CLOCK_REALTIME: one clock for every namespace of a machine): the
   control messages' freshness stamp (issue 20). */
static inline unsigned long long dysco_realtime_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull;
}
/* An RCU grace period (membarrier MEMBARRIER_CMD_GLOBAL = 1: synchronize_rcu() on a multi-CPU machine): when it
   returns, every BPF program run and every netfilter hook traversal that began before the call has ended, so a
   packet whose tc ingress lookup missed a map entry written before the call has reached NFQUEUE (the tc hook and
   the queue's enqueue run in one RCU read-side section; the egress queue rule's socket filter and its enqueue too).
   docs/BPF.md "New keys". 0 or -1 with errno (EINVAL with nohz_full: no such barrier there). */
static inline int dysco_rcu_barrier(void) { return (int)syscall(__NR_membarrier, 1 /* MEMBARRIER_CMD_GLOBAL */, 0, 0); }
/* The packet thread's wake-up: an eventfd (non-blocking, close-on-exec). */
static inline int dysco_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

/* A raw IPv4 socket that sends whole packets we built (IP_HDRINCL implied by IPPROTO_RAW). */
static inline int dysco_raw_ipv4_socket(void) { return socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW); }
static inline int dysco_so_mark(void) { return SO_MARK; }
/* Fixed malloc thresholds (glibc): without them, freeing one large block (a big dictionary's storage, mmapped)
   raises the mmap threshold to its size and the trim threshold to twice that, after which the tops of the
   threads' arenas are never given back (malloc_trim does not trim a non-main arena's top). */
static inline void dysco_malloc_fixed_thresholds(void) {
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    mallopt(M_TRIM_THRESHOLD, 1024 * 1024);
}
/* Gives freed heap memory back to the OS (every arena; glibc). Returns 1 if some was released. */
static inline int dysco_malloc_trim(void) { return malloc_trim(0); }
/* Whether `path` is on a bpffs: 1, 0, or -1 with errno (statfs). */
static inline int dysco_is_bpffs(const char *path) {
    struct statfs fs;
    if (statfs(path, &fs) != 0) return -1;
    return fs.f_type == 0xcafe4a11 ? 1 : 0; /* BPF_FS_MAGIC */
}

/* Mounts a bpffs at `path`; unmounts (lazily) what is mounted there. */
static inline int dysco_mount_bpffs(const char *path) { return mount("bpf", path, "bpf", 0, 0); }
static inline int dysco_umount_lazy(const char *path) { return umount2(path, MNT_DETACH); }

#endif
