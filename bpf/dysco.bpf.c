// SPDX-License-Identifier: GPL-2.0
/* The Dysco datapath as tc (clsact) programs: per-session translations are data in one hash map.
 *
 *   dysco_ingress  (tc ingress, before netfilter PREROUTING and conntrack): subsession tuple -> session tuple
 *   dysco_egress   (tc egress, after POSTROUTING, the firewall and conntrack confirmation): session tuple ->
 *                  subsession tuple; where the destination changes, the next hop is chosen here (FIB lookup,
 *                  then bpf_redirect or bpf_redirect_neigh), since the kernel routed on the session's destination.
 *
 * Per packet: parse Ethernet/IPv4/TCP or Ethernet/IPv6/TCP (TCP the first next header), look the tuple up in
 * dysco_sessions or dysco_sessions6 (key: tuple + protocol + hook), and
 * unless the translation is held, rewrite the changed fields with incremental checksum updates, record the TCP
 * facts and counters, and report FIN, RST and establishment through the dysco_events ring buffer.
 * Layouts: Sources/CLibbpf/dysco_bpf.h (shared with user space). Built by `make bpf` (clang -O2 -g -target bpf).
 * docs/BPF.md describes hooks, maps and events. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "../Sources/CLibbpf/dysco_bpf.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

char LICENSE[] SEC("license") = "GPL";

/* The translations, one map per family (IPv6's key holds 16-byte addresses; IPv4's keeps its 16-byte key and its
 * layout across releases). Pinned by name: a restarted agent (or a second load) reuses the pinned maps. */
#define DYSCO_HASH_MAP(name, key_type, value_type)              \
    struct {                                                    \
        __uint(type, BPF_MAP_TYPE_HASH);                        \
        __uint(max_entries, DYSCO_MAX_ENTRIES_DEFAULT);         \
        __type(key, key_type);                                  \
        __type(value, value_type);                              \
        __uint(map_flags, BPF_F_NO_PREALLOC);                   \
        __uint(pinning, LIBBPF_PIN_BY_NAME);                    \
    } name SEC(".maps")

DYSCO_HASH_MAP(dysco_sessions, struct dysco_key, struct dysco_value);
DYSCO_HASH_MAP(dysco_sessions6, struct dysco_key6, struct dysco_value6);

/* Hand-over counts (docs/BPF.md "Hand-over without reordering"), keyed like the sessions, only for held
 * translations. dysco_passed: packets the program passed to the queue while the translation was HELD (the
 * program's atomic adds; the agent zeroes it when it sets HELD). dysco_seen: packets of the translation the agent
 * verdicted since (the agent's; written after the verdicts went out). Two maps, so that neither side's whole-value
 * update clobbers the other's count. */
DYSCO_HASH_MAP(dysco_passed, struct dysco_key, __u64);
DYSCO_HASH_MAP(dysco_seen, struct dysco_key, __u64);
DYSCO_HASH_MAP(dysco_passed6, struct dysco_key6, __u64);
DYSCO_HASH_MAP(dysco_seen6, struct dysco_key6, __u64);

/* Owned keys (fail closed while no agent runs; docs/BPF.md "Owned keys"): the keys of the sessions the agent
 * alone translates, written by the agent only. Sized like the sessions (at most four keys a session). */
DYSCO_HASH_MAP(dysco_owned, struct dysco_key, __u8);
DYSCO_HASH_MAP(dysco_owned6, struct dysco_key6, __u8);

/* Events to the agent (FIN, RST, established). */
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, DYSCO_RINGBUF_BYTES_DEFAULT);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} dysco_events SEC(".maps");

/* Global counters (DYSCO_STAT_*). */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, DYSCO_STAT_COUNT);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} dysco_stats SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct dysco_config);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} dysco_config SEC(".maps");

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP6_SADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* Every function below that depends on the family takes `v6`, a constant at each call site: the programs branch on
 * the family once, after parsing, and each branch is compiled (and verified) with the family known. */

static __always_inline void stat_inc(__u32 index)
{
    __u64 *counter = bpf_map_lookup_elem(&dysco_stats, &index);
    if (counter)
        *counter += 1; /* per-CPU: no atomics needed */
}

/* A packet's key in both layouts; only the family's is filled. key6 first and 8-aligned: compared 4 bytes at a time. */
struct keys {
    struct dysco_key6 key6 __attribute__((aligned(8)));
    struct dysco_key key;
};

/* What the programs read from one packet before touching it (helpers that write invalidate packet pointers). */
struct parsed {
    struct keys k;
    __u32 l4_off;
    __u32 seq;
    __u32 ack;
    __u32 tot_len;  /* IPv4 total length; IPv6: 40 + payload length */
    __be32 flowinfo; /* IPv6: traffic class and flow label (the FIB lookup's) */
    __u16 window;
    __u16 payload;
    __u8 tcp_flags;
    __u8 tos;
    __u8 options; /* bytes of TCP options (doff * 4 - 20) */
};

static __always_inline int addr6_equal(const void *a, const void *b)
{
    const __u32 *x = a, *y = b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* Ethernet + IPv4 (first fragment or unfragmented) + TCP: 4; Ethernet + IPv6 whose first next header is TCP: 6
 * (an extension header, a fragment or a jumbogram's hop-by-hop option: not ours, the agent's rule applies);
 * 0 if the packet is not one we translate. */
static __always_inline int parse(struct __sk_buff *skb, __u8 hook, struct parsed *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return 0;
    struct tcphdr *tcp;
    __u32 l3;
    int family;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
            return 0;
        if (ip->frag_off & bpf_htons(0x1fff)) /* a later fragment: no TCP header */
            return 0;
        l3 = ip->ihl * 4;
        tcp = (void *)ip + l3;
        if ((void *)(tcp + 1) > data_end)
            return 0;
        p->k.key.saddr = ip->saddr;
        p->k.key.daddr = ip->daddr;
        p->k.key.sport = tcp->source;
        p->k.key.dport = tcp->dest;
        p->k.key.proto = IPPROTO_TCP;
        p->k.key.hook = hook;
        p->tot_len = bpf_ntohs(ip->tot_len);
        p->tos = ip->tos;
        family = 4;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP || ip6->payload_len == 0)
            return 0;
        l3 = sizeof(*ip6);
        tcp = (void *)(ip6 + 1);
        if ((void *)(tcp + 1) > data_end)
            return 0;
        __builtin_memcpy(p->k.key6.saddr, &ip6->saddr, 16);
        __builtin_memcpy(p->k.key6.daddr, &ip6->daddr, 16);
        p->k.key6.sport = tcp->source;
        p->k.key6.dport = tcp->dest;
        p->k.key6.proto = IPPROTO_TCP;
        p->k.key6.hook = hook;
        p->tot_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
        p->flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
        family = 6;
    } else {
        return 0;
    }
    p->l4_off = ETH_HLEN + l3;
    p->seq = bpf_ntohl(tcp->seq);
    p->ack = bpf_ntohl(tcp->ack_seq);
    p->window = bpf_ntohs(tcp->window);
    __u32 headers = l3 + tcp->doff * 4;
    p->payload = p->tot_len > headers ? p->tot_len - headers : 0;
    p->tcp_flags = ((__u8 *)tcp)[13];
    p->options = tcp->doff > 5 ? (tcp->doff - 5) * 4 : 0;
    return family;
}

/* The family's maps. */
static __always_inline struct dysco_value *lookup_session(const struct keys *k, const int v6)
{
    if (v6) {
        struct dysco_value6 *v = bpf_map_lookup_elem(&dysco_sessions6, &k->key6);
        return v ? &v->v : 0;
    }
    return bpf_map_lookup_elem(&dysco_sessions, &k->key);
}

static __always_inline __u64 *lookup_passed(const struct keys *k, const int v6)
{
    return v6 ? bpf_map_lookup_elem(&dysco_passed6, &k->key6) : bpf_map_lookup_elem(&dysco_passed, &k->key);
}

static __always_inline __u64 *lookup_seen(const struct keys *k, const int v6)
{
    return v6 ? bpf_map_lookup_elem(&dysco_seen6, &k->key6) : bpf_map_lookup_elem(&dysco_seen, &k->key);
}

static __always_inline void insert_passed(const struct keys *k, const int v6)
{
    __u64 one = 1;
    if (v6)
        bpf_map_update_elem(&dysco_passed6, &k->key6, &one, BPF_NOEXIST);
    else
        bpf_map_update_elem(&dysco_passed, &k->key, &one, BPF_NOEXIST);
}

static __always_inline int owned(const struct keys *k, const int v6)
{
    return (v6 ? bpf_map_lookup_elem(&dysco_owned6, &k->key6) : bpf_map_lookup_elem(&dysco_owned, &k->key)) != 0;
}

/* Reserves an event of the packet's family and fills what both layouts share; NULL if the ring is full. */
static __always_inline struct dysco_event *reserve_event(const struct parsed *p, __u32 type, const int v6)
{
    struct dysco_event *e;
    if (v6) {
        struct dysco_event6 *e6 = bpf_ringbuf_reserve(&dysco_events, sizeof(*e6), 0);
        if (!e6) {
            stat_inc(DYSCO_STAT_EVENT_LOST);
            return 0;
        }
        __builtin_memset(e6, 0, sizeof(*e6));
        e6->key = p->k.key6;
        e = &e6->e;
        type |= DYSCO_EV_IPV6;
    } else {
        e = bpf_ringbuf_reserve(&dysco_events, sizeof(*e), 0);
        if (!e) {
            stat_inc(DYSCO_STAT_EVENT_LOST);
            return 0;
        }
        __builtin_memset(e, 0, sizeof(*e));
        e->key = p->k.key;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->type = type;
    e->seq = p->seq;
    e->ack = p->ack;
    e->tcp_flags = p->tcp_flags;
    return e;
}

static __always_inline void emit(struct dysco_value *v, const struct parsed *p, __u32 type, const int v6)
{
    struct dysco_event *e = reserve_event(p, type, v6);
    if (!e)
        return;
    e->session_id = v->session_id;
    e->packets = v->packets;
    e->bytes = v->bytes;
    bpf_ringbuf_submit(e, 0);
}

/* A tagged SYN after the box's NAT (DYSCO_NAT_SYN_MARK): its translated tuple goes to the agent, which sends it on. */
static __always_inline void emit_nat_syn(const struct parsed *p, const int v6)
{
    struct dysco_event *e = reserve_event(p, DYSCO_EV_NAT_SYN, v6);
    if (!e)
        return;
    e->ack = 0;
    bpf_ringbuf_submit(e, 0);
}

/* Facts, counters and events of one packet that passes a translation (before its rewrite). */
static __always_inline void account(struct dysco_value *v, const struct parsed *p, const int v6)
{
    __u32 seq_end = p->seq + p->payload;
    if (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN))
        seq_end += 1;
    v->tcp.seq_end = seq_end;
    if (p->tcp_flags & TCP_FLAG_ACK)
        v->tcp.ack = p->ack;
    v->tcp.window = p->window;
    v->tcp.tcp_flags = p->tcp_flags;
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, p->tot_len);
    v->last_seen_ns = bpf_ktime_get_ns();

    if ((v->flags & DYSCO_F_OPENING) && (p->tcp_flags & (TCP_FLAG_ACK | TCP_FLAG_SYN)) == TCP_FLAG_ACK) {
        __u32 old = __sync_fetch_and_and(&v->flags, ~DYSCO_F_OPENING);
        if (old & DYSCO_F_OPENING)
            emit(v, p, DYSCO_EV_ESTABLISHED, v6);
    }
    if (p->tcp_flags & TCP_FLAG_FIN) {
        __u32 old = __sync_fetch_and_or(&v->flags, DYSCO_F_FIN_SEEN);
        if (!(old & DYSCO_F_FIN_SEEN))
            emit(v, p, DYSCO_EV_FIN, v6);
    }
    if (p->tcp_flags & TCP_FLAG_RST) {
        __u32 old = __sync_fetch_and_or(&v->flags, DYSCO_F_RST_SEEN);
        if (!(old & DYSCO_F_RST_SEEN))
            emit(v, p, DYSCO_EV_RST, v6);
    }
}

/* An IPv6 address replaced: no IP checksum; the TCP checksum (pseudo-header) by the difference of the 16 bytes. */
static __always_inline int replace_addr6(struct __sk_buff *skb, __u32 tcp_csum_off, __u32 offset, const __u8 *from,
                                         const __u8 *to)
{
    __s64 diff = bpf_csum_diff((__be32 *)from, 16, (__be32 *)to, 16, 0);
    if (diff < 0)
        return (int)diff;
    int err = bpf_l4_csum_replace(skb, tcp_csum_off, 0, (__u32)diff, BPF_F_PSEUDO_HDR);
    if (err)
        return err;
    return bpf_skb_store_bytes(skb, offset, to, 16, 0);
}

/* Rewrites the fields that differ; IPv4 addresses change the IP checksum and (pseudo-header) the TCP checksum,
 * IPv6 addresses the TCP checksum only, ports only the TCP checksum. Returns 0, or a negative error of a helper. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct parsed *p, const struct dysco_value *v,
                                   const int v6)
{
    __u32 tcp_csum_off = p->l4_off + offsetof(struct tcphdr, check);
    int err;
    if (v6) {
        const struct dysco_value6 *v6v = (const struct dysco_value6 *)v;
        if (!addr6_equal(v6v->new_saddr, p->k.key6.saddr) &&
            (err = replace_addr6(skb, tcp_csum_off, IP6_SADDR_OFF, p->k.key6.saddr, v6v->new_saddr)))
            return err;
        if (!addr6_equal(v6v->new_daddr, p->k.key6.daddr) &&
            (err = replace_addr6(skb, tcp_csum_off, IP6_DADDR_OFF, p->k.key6.daddr, v6v->new_daddr)))
            return err;
    } else {
        if (v->new_saddr != p->k.key.saddr) {
            __be32 to = v->new_saddr;
            if ((err = bpf_l4_csum_replace(skb, tcp_csum_off, p->k.key.saddr, to, BPF_F_PSEUDO_HDR | sizeof(to))))
                return err;
            if ((err = bpf_l3_csum_replace(skb, IP_CSUM_OFF, p->k.key.saddr, to, sizeof(to))))
                return err;
            if ((err = bpf_skb_store_bytes(skb, IP_SADDR_OFF, &to, sizeof(to), 0)))
                return err;
        }
        if (v->new_daddr != p->k.key.daddr) {
            __be32 to = v->new_daddr;
            if ((err = bpf_l4_csum_replace(skb, tcp_csum_off, p->k.key.daddr, to, BPF_F_PSEUDO_HDR | sizeof(to))))
                return err;
            if ((err = bpf_l3_csum_replace(skb, IP_CSUM_OFF, p->k.key.daddr, to, sizeof(to))))
                return err;
            if ((err = bpf_skb_store_bytes(skb, IP_DADDR_OFF, &to, sizeof(to), 0)))
                return err;
        }
    }
    __be16 sport = v6 ? p->k.key6.sport : p->k.key.sport, dport = v6 ? p->k.key6.dport : p->k.key.dport;
    if (v->new_sport != sport) {
        __be16 to = v->new_sport;
        if ((err = bpf_l4_csum_replace(skb, tcp_csum_off, sport, to, sizeof(to))))
            return err;
        if ((err = bpf_skb_store_bytes(skb, p->l4_off + offsetof(struct tcphdr, source), &to, sizeof(to), 0)))
            return err;
    }
    if (v->new_dport != dport) {
        __be16 to = v->new_dport;
        if ((err = bpf_l4_csum_replace(skb, tcp_csum_off, dport, to, sizeof(to))))
            return err;
        if ((err = bpf_skb_store_bytes(skb, p->l4_off + offsetof(struct tcphdr, dest), &to, sizeof(to), 0)))
            return err;
    }
    return 0;
}

#define TCP_SEQ_OFF 4
#define TCP_ACK_OFF 8
#define TCP_OPTIONS_MAX 40
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_SACK 5

/* §3.4: an ingress translation with a delta moves the sequence number into the local endpoint's numbering (SYNs keep
 * their own). The field is 4-aligned in the header: an RFC 1624 replace. */
static __always_inline int shift_seq(struct __sk_buff *skb, const struct parsed *p, __s32 delta)
{
    if (p->tcp_flags & TCP_FLAG_SYN)
        return 0;
    __be32 from = bpf_htonl(p->seq), to = bpf_htonl(p->seq + (__u32)delta);
    int err = bpf_l4_csum_replace(skb, p->l4_off + offsetof(struct tcphdr, check), from, to, sizeof(to));
    if (err)
        return err;
    return bpf_skb_store_bytes(skb, p->l4_off + TCP_SEQ_OFF, &to, sizeof(to), 0);
}

static __always_inline __u32 ack_shape(const struct parsed *p)
{
    return (p->l4_off & 0xffff) | ((__u32)p->options << 16) | ((__u32)p->tcp_flags << 24);
}

/* §3.4: an egress translation with a delta moves the acknowledgment number and both edges of every SACK block
 * (RFC 2018) back into the far side's numbering. The options are copied out, shifted, and the checksum is fixed by
 * the difference over the whole options area (4-aligned in the header, whatever the blocks' own alignment).
 * A global function (BPF-to-BPF call, verified once on its own with any arguments): the options walk is the
 * program's costliest to verify, and each family's egress calls it. At most five arguments: `shape` packs the TCP
 * header's offset (bits 0-15), its options' length (16-23) and its flags (24-31); see ack_shape. */
__attribute__((noinline)) int shift_ack(struct __sk_buff *skb, __u32 shape, __u32 ack, __s32 delta)
{
    __u32 l4_off = shape & 0xffff, options = (shape >> 16) & 0xff, tcp_flags = shape >> 24;
    if (!skb || (tcp_flags & (TCP_FLAG_ACK | TCP_FLAG_SYN)) != TCP_FLAG_ACK)
        return 0;
    __u32 csum_off = l4_off + offsetof(struct tcphdr, check);
    __be32 from = bpf_htonl(ack), to = bpf_htonl(ack - (__u32)delta);
    int err = bpf_l4_csum_replace(skb, csum_off, from, to, sizeof(to));
    if (err)
        return err;
    if ((err = bpf_skb_store_bytes(skb, l4_off + TCP_ACK_OFF, &to, sizeof(to), 0)))
        return err;
    __u32 length = options;
    if (length == 0 || length > TCP_OPTIONS_MAX)
        return 0;
    __u8 old[TCP_OPTIONS_MAX] = {}, opt[TCP_OPTIONS_MAX] = {};
    if (bpf_skb_load_bytes(skb, l4_off + sizeof(struct tcphdr), opt, length & 0x3f))
        return 0;
    __builtin_memcpy(old, opt, TCP_OPTIONS_MAX);
    int changed = 0;
    __u32 i = 0;
    for (int guard = 0; guard < TCP_OPTIONS_MAX && i + 1 < length && i + 1 < TCP_OPTIONS_MAX; guard++) {
        __u8 kind = opt[i & 0x3f];
        if (kind == TCPOPT_EOL)
            break;
        if (kind == TCPOPT_NOP) {
            i++;
            continue;
        }
        __u8 len = opt[(i + 1) & 0x3f];
        if (len < 2 || i + len > length)
            break;
        if (kind == TCPOPT_SACK) {
            for (__u32 e = i + 2; e + 4 <= i + len && e + 4 <= TCP_OPTIONS_MAX; e += 4) {
                __u32 j = e & 0x3f;
                if (j + 3 >= TCP_OPTIONS_MAX)
                    break;
                __u32 edge = ((__u32)opt[j] << 24) | ((__u32)opt[j + 1] << 16) | ((__u32)opt[j + 2] << 8) | opt[j + 3];
                edge -= (__u32)delta;
                opt[j] = edge >> 24;
                opt[j + 1] = edge >> 16;
                opt[j + 2] = edge >> 8;
                opt[j + 3] = edge;
                changed = 1;
            }
            break;
        }
        i += len;
    }
    if (!changed)
        return 0;
    /* bpf_csum_diff wants a multiple of 4 (the options area is one) and a constant-bounded size. */
    __u32 size = length & 0x3c;
    asm volatile("" : "+r"(size)); /* keep the bound check below: the verifier needs it, clang proved it redundant */
    if (size == 0 || size > TCP_OPTIONS_MAX)
        return 0;
    __s64 diff = bpf_csum_diff((__be32 *)old, size, (__be32 *)opt, size, 0);
    if (diff < 0)
        return (int)diff;
    if ((err = bpf_skb_store_bytes(skb, l4_off + sizeof(struct tcphdr), opt, size, 0)))
        return err;
    return bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, 0);
}

/* A held translation's packet (the hand-over rule): 1 if the translation is (now) the kernel's, 0 if the packet
 * goes to the queue. Releasing and every packet passed while held verdicted by the agent (passed == seen): the
 * program takes the translation over (clears HELD|RELEASING) and carries this packet. Otherwise the packet is
 * counted in dysco_passed and passed to the stack (the queue rules), behind the earlier ones. Called where the
 * packet's queueing is decided: dysco_ingress (before raw PREROUTING) and dysco_egress_carried (the egress queue
 * rules' filter, before tc egress). */
static __always_inline int held_take_over(struct dysco_value *v, const struct keys *k, const int v6)
{
    if (v->flags & DYSCO_F_RELEASING) {
        __u64 *seen = lookup_seen(k, v6);
        __u64 *passed = lookup_passed(k, v6);
        __u64 s = seen ? *seen : 0, n = passed ? *passed : 0;
        if (s == n) {
            __u32 old = __sync_fetch_and_and(&v->flags, ~(DYSCO_F_HELD | DYSCO_F_RELEASING));
            if (old & DYSCO_F_HELD)
                stat_inc(DYSCO_STAT_RELEASED_IN_ORDER);
            return 1;
        }
    }
    __u64 *passed = lookup_passed(k, v6);
    if (passed)
        __sync_fetch_and_add(passed, 1);
    else
        insert_passed(k, v6);
    stat_inc(DYSCO_STAT_HELD_PASSED);
    return 0;
}

/* The translation of a packet at a hook, if it should be rewritten now; NULL to pass it untouched. `decides`:
 * this hook decides whether a held translation's packet is queued (ingress; at egress the socket filter did).
 * `*counted`: set to 1 when the packet was counted in dysco_passed (queued behind the translation's earlier ones). */
static __always_inline struct dysco_value *translation(struct parsed *p, int decides, int *counted, const int v6)
{
    struct dysco_value *v = lookup_session(&p->k, v6);
    if (!v)
        return 0;
    if (v->flags & DYSCO_F_HELD) {
        if (!decides) {
            stat_inc(DYSCO_STAT_HELD);
            return 0;
        }
        if (!held_take_over(v, &p->k, v6)) {
            *counted = 1;
            stat_inc(DYSCO_STAT_HELD);
            return 0;
        }
    }
    if ((p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN && !(v->flags & DYSCO_F_REWRITE_SYN)) {
        stat_inc(DYSCO_STAT_SYN_PASSED);
        return 0;
    }
    return v;
}

/* An ingress SYN-ACK or RST on an OPENING translation (installed with the SYN, issue 16 item 2): the agent no
 * longer sees it, so the program judges it as the agent's handshake tracking would, against the opposite
 * direction's entry: the egress translation keyed by the reverse of this one's new tuple (at an end host and at a
 * middlebox alike, the translation this connection's own SYN, or SYN-ACK, left by). The agent seeds that entry
 * with its SYN's facts at the install (the SYN itself leaves by the agent: tc egress never sees it with the
 * session's tuple). RFC 793 "SYN-SENT": a segment is acceptable when it has ACK and acknowledges exactly what
 * this side sent (ack == opposite seq_end: the SYN's seq + 1 while nothing else was sent); an RST without such an
 * ACK is acceptable only at the sequence number the other side expects (seq == opposite ack, the SYN-RECEIVED
 * side's RFC 5961 exact match; needs a recorded ACK). No opposite entry, or no facts in it: refused. */
static __always_inline int opening_acceptable(const struct dysco_value *v, const struct parsed *p, const int v6)
{
    struct keys opposite = {};
    if (v6) {
        const struct dysco_value6 *v6v = (const struct dysco_value6 *)v;
        __builtin_memcpy(opposite.key6.saddr, v6v->new_daddr, 16);
        __builtin_memcpy(opposite.key6.daddr, v6v->new_saddr, 16);
        opposite.key6.sport = v->new_dport;
        opposite.key6.dport = v->new_sport;
        opposite.key6.proto = IPPROTO_TCP;
        opposite.key6.hook = DYSCO_HOOK_EGRESS;
    } else {
        opposite.key.saddr = v->new_daddr;
        opposite.key.daddr = v->new_saddr;
        opposite.key.sport = v->new_dport;
        opposite.key.dport = v->new_sport;
        opposite.key.proto = IPPROTO_TCP;
        opposite.key.hook = DYSCO_HOOK_EGRESS;
    }
    struct dysco_value *o = lookup_session(&opposite, v6);
    if (!o)
        return 0;
    __u8 seen = o->tcp.tcp_flags;
    if (seen && (p->tcp_flags & TCP_FLAG_ACK) && p->ack == o->tcp.seq_end)
        return 1;
    if ((p->tcp_flags & TCP_FLAG_RST) && (seen & TCP_FLAG_ACK) && p->seq == o->tcp.ack)
        return 1;
    return 0;
}

/* A packet dysco_ingress passes untouched: if its key is owned, the owned mark goes on it, so that the raw
 * PREROUTING queue rule without --queue-bypass queues it (no agent: dropped, TCP retransmits it). */
static __always_inline int pass_untouched(struct __sk_buff *skb, const struct parsed *p, const int v6)
{
    if (!owned(&p->k, v6))
        return TC_ACT_OK;
    __u32 zero = 0;
    struct dysco_config *config = bpf_map_lookup_elem(&dysco_config, &zero);
    if (config && config->owned_mark)
        skb->mark |= config->owned_mark;
    return TC_ACT_OK;
}

static __always_inline int ingress(struct __sk_buff *skb, struct parsed *p, const int v6)
{
    int counted = 0;
    struct dysco_value *v = translation(p, 1, &counted, v6);
    if (!v) {
        /* A held translation's packet, counted: the agent counts its verdict only with this mark (a packet of the
           same key queued before the entry existed has none), so both counts cover the same packets. */
        if (counted)
            skb->mark |= DYSCO_COUNTED_MARK;
        return pass_untouched(skb, p, v6);
    }
    if ((v->flags & DYSCO_F_OPENING) && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST)) &&
        !opening_acceptable(v, p, v6)) {
        /* Forged (or stale): neither recorded nor rewritten nor reported; the real handshake carries on. */
        stat_inc(DYSCO_STAT_OPENING_REFUSED);
        return TC_ACT_SHOT;
    }
    account(v, p, v6);
    __s32 delta = v->seq_delta;
    if (rewrite(skb, p, v, v6) < 0)
        return TC_ACT_SHOT;
    if (delta && shift_seq(skb, p, delta) < 0)
        return TC_ACT_SHOT;
    stat_inc(DYSCO_STAT_REWRITTEN);
    __u32 zero = 0;
    struct dysco_config *config = bpf_map_lookup_elem(&dysco_config, &zero);
    if (config) {
        __u32 mark = config->ingress_mark;
        if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
            mark |= config->observe_mark;
        if (mark)
            skb->mark |= mark;
    }
    return TC_ACT_OK;
}

SEC("tc")
int dysco_ingress(struct __sk_buff *skb)
{
    struct parsed p = {};
    int family = parse(skb, DYSCO_HOOK_INGRESS, &p);
    if (family == 4)
        return ingress(skb, &p, 0);
    if (family == 6)
        return ingress(skb, &p, 1);
    return TC_ACT_OK;
}

/* The kernel chose device and next hop for the session's destination: choose them for the new one. */
static __always_inline int redirect(struct __sk_buff *skb, const struct parsed *p, const struct dysco_value *v,
                                    const int v6)
{
    struct bpf_fib_lookup fib = {};
    fib.l4_protocol = IPPROTO_TCP;
    fib.sport = v->new_sport;
    fib.dport = v->new_dport;
    /* tot_len stays 0: with it set, the lookup checks it against the MTU and refuses a GRO/GSO packet (up to
       64 KiB) as FRAG_NEEDED; without it the kernel asks is_skb_forwardable, which knows GSO. */
    fib.ifindex = skb->ifindex;
    if (v6) {
        const struct dysco_value6 *v6v = (const struct dysco_value6 *)v;
        fib.family = AF_INET6;
        fib.flowinfo = p->flowinfo;
        __builtin_memcpy(fib.ipv6_src, v6v->new_saddr, 16);
        __builtin_memcpy(fib.ipv6_dst, v6v->new_daddr, 16);
    } else {
        fib.family = AF_INET;
        fib.tos = p->tos;
        fib.ipv4_src = v->new_saddr;
        fib.ipv4_dst = v->new_daddr;
    }
    long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
        void *data = (void *)(long)skb->data;
        void *data_end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) > data_end)
            return TC_ACT_SHOT;
        __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
        __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
        stat_inc(DYSCO_STAT_FIB_REDIRECT);
        return bpf_redirect(fib.ifindex, 0);
    }
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
        /* Route known, neighbour not yet: let the neighbour subsystem resolve it (the lookup left the gateway, or
           the destination itself, in ipv4_dst / ipv6_dst). */
        struct bpf_redir_neigh nh = {};
        if (v6) {
            nh.nh_family = AF_INET6;
            __builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
        } else {
            nh.nh_family = AF_INET;
            nh.ipv4_nh = fib.ipv4_dst;
        }
        stat_inc(DYSCO_STAT_FIB_NEIGH);
        return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
    }
    if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
        /* An end host (forwarding off, which bpf_fib_lookup requires): let the kernel route the new destination
           out of this same device (a route lookup bound to it; dropped if the route leaves by another one). */
        stat_inc(DYSCO_STAT_FIB_NEIGH);
        return bpf_redirect_neigh(skb->ifindex, 0, 0, 0);
    }
    /* No route: drop, TCP retransmits. */
    stat_inc(DYSCO_STAT_FIB_FAILED);
    return TC_ACT_SHOT;
}

static __always_inline int egress(struct __sk_buff *skb, struct parsed *p, const int v6)
{
    if ((skb->mark & DYSCO_NAT_SYN_MARK) && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
        /* The SYN the agent tagged at ingress, now in the tuple the box's NAT gave it: the agent sends it on. */
        emit_nat_syn(p, v6);
        stat_inc(DYSCO_STAT_NAT_SYN);
        return TC_ACT_SHOT;
    }
    int counted = 0;
    struct dysco_value *v = translation(p, 0, &counted, v6);
    if (!v)
        return TC_ACT_OK;
    account(v, p, v6);
    int destination_changed = v6 ? !addr6_equal(((const struct dysco_value6 *)v)->new_daddr, p->k.key6.daddr)
                                 : v->new_daddr != p->k.key.daddr;
    __s32 delta = v->seq_delta;
    if (rewrite(skb, p, v, v6) < 0)
        return TC_ACT_SHOT;
    if (delta && shift_ack(skb, ack_shape(p), p->ack, delta) < 0)
        return TC_ACT_SHOT;
    stat_inc(DYSCO_STAT_REWRITTEN);
    if (!destination_changed)
        return TC_ACT_OK;
    return redirect(skb, p, v, v6);
}

SEC("tc")
int dysco_egress(struct __sk_buff *skb)
{
    struct parsed p = {};
    int family = parse(skb, DYSCO_HOOK_EGRESS, &p);
    if (family == 4)
        return egress(skb, &p, 0);
    if (family == 6)
        return egress(skb, &p, 1);
    return TC_ACT_OK;
}

/* The egress key and TCP flags of a packet as a socket filter sees it at the mangle OUTPUT/POSTROUTING queue rules
 * (skb->data is the IP header there): 4 or 6 (the family, with its key filled; IPv6 with TCP the first next
 * header), 0 for anything else (an IPv4 fragment other than the first too). */
static __always_inline int socket_egress_key(struct __sk_buff *skb, struct keys *k, __u8 *tcp_flags)
{
    __u8 first;
    if (bpf_skb_load_bytes(skb, 0, &first, 1) < 0)
        return 0;
    __u8 tcp[14];
    if ((first >> 4) == 4) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
            return 0;
        if (ip.protocol != IPPROTO_TCP || ip.ihl < 5 || (ip.frag_off & bpf_htons(0x1fff)))
            return 0;
        if (bpf_skb_load_bytes(skb, ip.ihl * 4, tcp, sizeof(tcp)) < 0)
            return 0;
        k->key.saddr = ip.saddr;
        k->key.daddr = ip.daddr;
        __builtin_memcpy(&k->key.sport, &tcp[0], 2);
        __builtin_memcpy(&k->key.dport, &tcp[2], 2);
        k->key.proto = IPPROTO_TCP;
        k->key.hook = DYSCO_HOOK_EGRESS;
        *tcp_flags = tcp[13];
        return 4;
    }
    if ((first >> 4) == 6) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
            return 0;
        if (ip6.nexthdr != IPPROTO_TCP || ip6.payload_len == 0)
            return 0;
        if (bpf_skb_load_bytes(skb, sizeof(ip6), tcp, sizeof(tcp)) < 0)
            return 0;
        __builtin_memcpy(k->key6.saddr, &ip6.saddr, 16);
        __builtin_memcpy(k->key6.daddr, &ip6.daddr, 16);
        __builtin_memcpy(&k->key6.sport, &tcp[0], 2);
        __builtin_memcpy(&k->key6.dport, &tcp[2], 2);
        k->key6.proto = IPPROTO_TCP;
        k->key6.hook = DYSCO_HOOK_EGRESS;
        *tcp_flags = tcp[13];
        return 6;
    }
    return 0;
}

static __always_inline int egress_carried(struct keys *k, __u8 flags, const int v6)
{
    struct dysco_value *v = lookup_session(k, v6);
    if (!v)
        return 0;
    /* Held: queued (and counted), unless the hand-over completes with this packet (then dysco_egress, which runs
       after these rules, finds the translation no longer held). */
    if ((v->flags & DYSCO_F_HELD) && !held_take_over(v, k, v6))
        return 0;
    if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN && !(v->flags & DYSCO_F_REWRITE_SYN))
        return 0;
    return 1;
}

/* For the agent's egress NFQUEUE rules (iptables and ip6tables `-m bpf --object-pinned`, a socket filter: skb->data
 * is the IP header there). tc egress runs after the mangle OUTPUT/POSTROUTING queue rules, so those rules ask this
 * program beforehand whether dysco_egress will rewrite the packet: 1 (the rule skips the queue) for a translation
 * that is not held, unless the packet is a SYN without ACK (dysco_egress passes it, without DYSCO_F_REWRITE_SYN);
 * 0 otherwise (queued). FIN and RST are rewritten too: dysco_egress reports them through dysco_events, which the
 * agent reads for its teardown bookkeeping. A held translation's hand-over is decided here (held_take_over): the
 * egress queue rules run before tc egress. */
SEC("socket")
int dysco_egress_carried(struct __sk_buff *skb)
{
    struct keys k = {};
    __u8 flags = 0;
    int family = socket_egress_key(skb, &k, &flags);
    if (family == 4)
        return egress_carried(&k, flags, 0);
    if (family == 6)
        return egress_carried(&k, flags, 1);
    return 0;
}

/* For the agent's fail-closed egress queue rule (iptables and ip6tables `-m bpf --object-pinned`, a socket filter
 * like dysco_egress_carried, after its RETURN rule): 1 when the packet's egress key is owned (in dysco_owned or
 * dysco_owned6), so the rule queues it WITHOUT --queue-bypass (no agent: dropped, TCP retransmits it); 0 otherwise. */
SEC("socket")
int dysco_egress_owned(struct __sk_buff *skb)
{
    struct keys k = {};
    __u8 flags = 0;
    int family = socket_egress_key(skb, &k, &flags);
    if (family == 4)
        return owned(&k, 0);
    if (family == 6)
        return owned(&k, 1);
    return 0;
}
