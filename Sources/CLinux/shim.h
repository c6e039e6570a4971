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
#include <string.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/inet_diag.h>

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
static inline int dysco_raw_ipv6_socket(void) { return socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW); }
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

/* ---- One local TCP socket by its 4-tuple (NETLINK_SOCK_DIAG, inet_diag), in the calling thread's namespace ---- */

/* What dysco_tcp_diag reports. has_tcp_info is 0 when the kernel sent no INET_DIAG_INFO (a TIME_WAIT or SYN_RECV
   socket: only state and the queues are meaningful then; the tcp_info fields stay 0). */
struct dysco_tcp_diag_info {
    uint8_t state;            /* idiag_state: TCP_ESTABLISHED = 1 ... TCP_CLOSING = 11 */
    uint8_t has_tcp_info;
    uint8_t snd_wscale;       /* tcpi_snd_wscale */
    uint8_t rcv_wscale;       /* tcpi_rcv_wscale */
    uint8_t options;          /* tcpi_options: TCPI_OPT_TIMESTAMPS 1, SACK 2, WSCALE 4, ECN 8, ... */
    uint32_t rqueue;          /* idiag_rqueue: received, not read by the application (rcv_nxt - copied_seq) */
    uint32_t wqueue;          /* idiag_wqueue: written, not acknowledged by the peer (write_seq - snd_una) */
    uint32_t unacked;         /* tcpi_unacked (segments) */
    uint32_t notsent_bytes;   /* tcpi_notsent_bytes */
    uint64_t bytes_acked;     /* tcpi_bytes_acked */
    uint64_t bytes_received;  /* tcpi_bytes_received */
};

/* The head of the kernel's struct tcp_info (linux/tcp.h, append-only UAPI) up to tcpi_notsent_bytes. linux/tcp.h
   itself cannot be included here: glibc's <netinet/tcp.h> (in the Glibc module this one imports) defines another
   struct tcp_info without these fields. */
struct dysco_kernel_tcp_info_head {
    uint8_t tcpi_state, tcpi_ca_state, tcpi_retransmits, tcpi_probes, tcpi_backoff, tcpi_options;
    uint8_t tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;
    uint8_t tcpi_delivery_rate_app_limited : 1, tcpi_fastopen_client_fail : 2;
    uint32_t tcpi_rto, tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss;
    uint32_t tcpi_unacked, tcpi_sacked, tcpi_lost, tcpi_retrans, tcpi_fackets;
    uint32_t tcpi_last_data_sent, tcpi_last_ack_sent, tcpi_last_data_recv, tcpi_last_ack_recv;
    uint32_t tcpi_pmtu, tcpi_rcv_ssthresh, tcpi_rtt, tcpi_rttvar, tcpi_snd_ssthresh, tcpi_snd_cwnd, tcpi_advmss,
             tcpi_reordering;
    uint32_t tcpi_rcv_rtt, tcpi_rcv_space;
    uint32_t tcpi_total_retrans;
    uint64_t tcpi_pacing_rate, tcpi_max_pacing_rate;
    uint64_t tcpi_bytes_acked, tcpi_bytes_received;
    uint32_t tcpi_segs_out, tcpi_segs_in;
    uint32_t tcpi_notsent_bytes;
};
_Static_assert(__builtin_offsetof(struct dysco_kernel_tcp_info_head, tcpi_bytes_acked) == 120, "tcp_info layout");
_Static_assert(__builtin_offsetof(struct dysco_kernel_tcp_info_head, tcpi_notsent_bytes) == 144, "tcp_info layout");

/* Asks the kernel about the TCP socket of `family` (AF_INET or AF_INET6) whose local end is src:sport and whose
   peer is dst:dport (network byte order; an IPv4 address in word 0, the rest ignored): one SOCK_DIAG_BY_FAMILY
   request without NLM_F_DUMP (the exact lookup), with INET_DIAG_INFO. 0 with *out filled; -1 with errno: ENOENT
   when there is no such socket (also when the kernel's lookup falls back to a listener on sport, or answers for
   another tuple: the reply's tuple must be the one asked for; an IPv4 connection of a dual-stack IPv6 socket
   answers as AF_INET6 with IPv4-mapped addresses, which match), EPROTO for a malformed answer, else the socket
   call's errno. */
static inline int dysco_tcp_diag_matches(int family, const uint32_t *asked, const uint32_t *answered, int answered_family) {
    if (family == AF_INET6) return answered_family == AF_INET6 && memcmp(asked, answered, 16) == 0;
    if (answered_family == AF_INET) return answered[0] == asked[0];
    return answered_family == AF_INET6 && answered[0] == 0 && answered[1] == 0 && answered[2] == htonl(0xffff)
        && answered[3] == asked[0];
}

static inline int dysco_tcp_diag(int family, const uint32_t *src_be, uint16_t sport_be, const uint32_t *dst_be,
                                 uint16_t dport_be, struct dysco_tcp_diag_info *out) {
    struct {
        struct nlmsghdr nlh;
        struct inet_diag_req_v2 req;
    } request;
    memset(&request, 0, sizeof request);
    request.nlh.nlmsg_len = sizeof request;
    request.nlh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    request.nlh.nlmsg_flags = NLM_F_REQUEST;
    request.nlh.nlmsg_seq = 1;
    request.req.sdiag_family = (uint8_t)family;
    request.req.sdiag_protocol = IPPROTO_TCP;
    request.req.idiag_ext = 1 << (INET_DIAG_INFO - 1);
    request.req.idiag_states = ~0u;
    memcpy(request.req.id.idiag_src, src_be, family == AF_INET6 ? 16 : 4);
    request.req.id.idiag_sport = sport_be;
    memcpy(request.req.id.idiag_dst, dst_be, family == AF_INET6 ? 16 : 4);
    request.req.id.idiag_dport = dport_be;
    request.req.id.idiag_cookie[0] = INET_DIAG_NOCOOKIE;
    request.req.id.idiag_cookie[1] = INET_DIAG_NOCOOKIE;

    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) return -1;
    struct sockaddr_nl kernel;
    memset(&kernel, 0, sizeof kernel);
    kernel.nl_family = AF_NETLINK;
    ssize_t sent;
    do {
        sent = sendto(fd, &request, sizeof request, 0, (struct sockaddr *)&kernel, sizeof kernel);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) { int e = errno; close(fd); errno = e; return -1; }

    /* The kernel answers inside sendto: the reply (or the NLMSG_ERROR) is queued already. */
    long buffer[2048]; /* 16 KiB, aligned for nlmsghdr */
    ssize_t got;
    do {
        got = recv(fd, buffer, sizeof buffer, MSG_DONTWAIT);
    } while (got < 0 && errno == EINTR);
    int saved = errno;
    close(fd);
    if (got < 0) { errno = saved; return -1; }

    memset(out, 0, sizeof *out);
    int len = (int)got;
    for (struct nlmsghdr *h = (struct nlmsghdr *)buffer; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
        if (h->nlmsg_seq != request.nlh.nlmsg_seq) continue;
        if (h->nlmsg_type == NLMSG_ERROR) {
            if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct nlmsgerr))) { errno = EPROTO; return -1; }
            const struct nlmsgerr *e = (const struct nlmsgerr *)NLMSG_DATA(h);
            if (e->error == 0) continue; /* an ACK */
            errno = -e->error;
            return -1;
        }
        if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) continue;
        if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct inet_diag_msg))) { errno = EPROTO; return -1; }
        const struct inet_diag_msg *m = (const struct inet_diag_msg *)NLMSG_DATA(h);
        if (!dysco_tcp_diag_matches(family, src_be, m->id.idiag_src, m->idiag_family)
            || !dysco_tcp_diag_matches(family, dst_be, m->id.idiag_dst, m->idiag_family)
            || m->id.idiag_sport != sport_be || m->id.idiag_dport != dport_be) {
            errno = ENOENT; /* a listener on sport (inet_lookup's fallback), not the connection asked for */
            return -1;
        }
        out->state = m->idiag_state;
        out->rqueue = m->idiag_rqueue;
        out->wqueue = m->idiag_wqueue;
        int attributes = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *m));
        const struct nlattr *a = (const struct nlattr *)((const char *)m + NLMSG_ALIGN(sizeof *m));
        while (attributes >= (int)sizeof *a && a->nla_len >= sizeof *a && (int)a->nla_len <= attributes) {
            if ((a->nla_type & NLA_TYPE_MASK) == INET_DIAG_INFO) {
                struct dysco_kernel_tcp_info_head info;
                size_t n = a->nla_len - NLA_HDRLEN;
                memset(&info, 0, sizeof info);
                memcpy(&info, (const char *)a + NLA_HDRLEN, n < sizeof info ? n : sizeof info);
                out->has_tcp_info = 1;
                out->snd_wscale = info.tcpi_snd_wscale;
                out->rcv_wscale = info.tcpi_rcv_wscale;
                out->options = info.tcpi_options;
                out->unacked = info.tcpi_unacked;
                out->notsent_bytes = info.tcpi_notsent_bytes;
                out->bytes_acked = info.tcpi_bytes_acked;
                out->bytes_received = info.tcpi_bytes_received;
            }
            int step = (int)NLA_ALIGN(a->nla_len);
            attributes -= step;
            a = (const struct nlattr *)((const char *)a + step);
        }
        return 0;
    }
    errno = EPROTO; /* no answer for our request */
    return -1;
}

#endif
