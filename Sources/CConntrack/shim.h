#ifndef DYSCO_CCONNTRACK_SHIM_H
#define DYSCO_CCONNTRACK_SHIM_H
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <libmnl/libmnl.h>
#include <libnetfilter_conntrack/libnetfilter_conntrack.h>

/* CONNTRACK is a macro over NFNL_SUBSYS_CTNETLINK: give Swift a function. */
static inline struct nfct_handle *dysco_nfct_open_conntrack(void) { return nfct_open(CONNTRACK, 0); }

/* unshare(CLONE_NEWNET) for the calling thread only (a private, throw-away namespace for benchmarks).
   Called through syscall(2) so the declaration does not depend on _GNU_SOURCE at import time. */
static inline int dysco_ct_unshare_net(void) { return (int)syscall(SYS_unshare, 0x40000000 /* CLONE_NEWNET */); }

/* errno is a thread-local macro: read/write it through functions. */
static inline int dysco_ct_errno(void) { return errno; }
static inline void dysco_ct_set_errno(int value) { errno = value; }

/* The dump-callback signature libnetfilter_conntrack expects. */
typedef int (*dysco_nfct_callback)(enum nf_conntrack_msg_type type, struct nf_conntrack *ct, void *data);

/* Address parsing/formatting wrappers with plain buffers (no sockaddr juggling in Swift). */
static inline int dysco_ct_pton4(const char *text, unsigned char out[4]) { return inet_pton(AF_INET, text, out); }
static inline int dysco_ct_pton6(const char *text, unsigned char out[16]) { return inet_pton(AF_INET6, text, out); }
static inline const char *dysco_ct_ntop4(const unsigned char in[4], char *buf, unsigned int len) {
    return inet_ntop(AF_INET, in, buf, len);
}
static inline const char *dysco_ct_ntop6(const unsigned char in[16], char *buf, unsigned int len) {
    return inet_ntop(AF_INET6, in, buf, len);
}
#endif
