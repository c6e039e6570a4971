/* The Dysco BPF datapath's map layout, shared by the tc programs (bpf/dysco.bpf.c, built with clang -target bpf)
 * and user space (the CLibbpf shim, imported by Swift as DyscoBPF): one definition, so both sides see the same
 * bytes. Fixed-width types only, explicit padding, sizes pinned by _Static_assert; addresses and ports in network
 * byte order (as they are in the packet), everything else in host order. docs/BPF.md describes the maps. */
#ifndef DYSCO_BPF_H
#define DYSCO_BPF_H

#include <linux/types.h>

/* Which tc hook a translation belongs to (part of the key: one map serves both hooks). */
#define DYSCO_HOOK_INGRESS 0
#define DYSCO_HOOK_EGRESS 1

/* dysco_value.flags (host order). */
/* Held or slow: the program passes the packet to the stack untouched (the NFQUEUE rule sees it; the agent
   handles it). A migration's hold is one map update that sets this bit. */
#define DYSCO_F_HELD (1u << 0)
/* Opening: the translation was installed with the SYN; the first packet with ACK and without SYN clears it and
   reports DYSCO_EV_ESTABLISHED. While it is set, the ingress program judges a SYN-ACK or an RST against the opposite
   direction's entry (see opening_acceptable in bpf/dysco.bpf.c) and drops what it refutes. */
#define DYSCO_F_OPENING (1u << 1)
/* Set by the program: a FIN / RST passed this translation (reported once each as an event). */
#define DYSCO_F_FIN_SEEN (1u << 2)
#define DYSCO_F_RST_SEEN (1u << 3)
/* Rewrite SYNs too (without it a SYN without ACK passes untouched, to the agent: trailer, handshake). */
#define DYSCO_F_REWRITE_SYN (1u << 4)
/* Releasing (with HELD): the agent gave the translation back to the kernel, which takes it over only once every
   packet it passed to the queue while held has been verdicted by the agent: dysco_passed[key] (the program's
   count) equals dysco_seen[key] (the agent's). Then the program clears HELD|RELEASING (atomically) and carries
   the packet; until then it keeps passing (and counting) the translation's packets to the queue, in order.
   docs/BPF.md "Hand-over without reordering". */
#define DYSCO_F_RELEASING (1u << 5)
/* OR-ed into skb->mark by dysco_ingress for a HELD translation's packet it counted in dysco_passed and passed to
   the queue: the agent counts (dysco_seen) only the ingress packets that carry it, so the two counts cover the same
   packets even for a key new at a release, whose earlier packets reached the queue before its entry existed
   (docs/BPF.md "Hand-over without reordering", "New keys"). A bit no queue rule matches on. */
#define DYSCO_COUNTED_MARK 0x00800000u
/* The paper's SYN tag (§2.1, "Middleboxes that modify the five-tuple"), set by the agent of a box that translates
   tuples (`agent --nat`) in its verdict on a Dysco SYN it took in: dysco_egress, after the box's NAT, drops the
   tagged SYN and reports its translated tuple (DYSCO_EV_NAT_SYN); the agent sends the SYN on itself, on the
   subsession it opens for that tuple. A bit no queue rule matches on. docs/ARCHITECTURE.md "Boxes that translate". */
#define DYSCO_NAT_SYN_MARK 0x00400000u
/* The flags the program itself sets; user space owns the others. */
#define DYSCO_F_PROGRAM_OWNED (DYSCO_F_FIN_SEEN | DYSCO_F_RST_SEEN)

/* Key of dysco_sessions: the packet's tuple as it arrives at the hook (network order), protocol, hook. */
struct dysco_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto; /* IPPROTO_TCP */
    __u8 hook;  /* DYSCO_HOOK_* */
    __u8 pad[2]; /* zero: hashed with the rest */
};

/* Key of dysco_sessions6 (and of dysco_passed6, dysco_seen6, dysco_owned6): an IPv6 packet's tuple at the hook.
   IPv6 lives in maps of its own, as in Cilium's datapath: IPv4's key and value keep their layout (16 and 64
   bytes; a restart across releases reuses the pinned IPv4 maps) and IPv4's hash covers 16 bytes, not 40. */
struct dysco_key6 {
    __u8 saddr[16];
    __u8 daddr[16];
    __be16 sport;
    __be16 dport;
    __u8 proto; /* IPPROTO_TCP */
    __u8 hook;  /* DYSCO_HOOK_* */
    __u8 pad[2]; /* zero */
};

/* The TCP facts of the packets that passed one translation (one direction of a session), host order, from the
   packet before the rewrite (sequence numbers are not translated). For RFC 5961 checks against the other
   direction's entry. */
struct dysco_tcp_facts {
    __u32 seq_end;  /* seq + payload length (+1 for SYN and FIN) of the last packet */
    __u32 ack;      /* ack of the last packet with ACK */
    __u16 window;   /* raw window field of the last packet (unscaled) */
    __u8 tcp_flags; /* flags byte of the last packet (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10) */
    __u8 pad;
};

/* Value of dysco_sessions: the rewrite, flags, TCP facts, counters (64 bytes). */
struct dysco_value {
    /* The tuple the packet leaves with (network order). */
    __be32 new_saddr;
    __be32 new_daddr;
    __be16 new_sport;
    __be16 new_dport;
    __u32 flags;        /* DYSCO_F_* */
    __u64 session_id;   /* the agent's session id, echoed in events */
    struct dysco_tcp_facts tcp;
    /* Sequence delta (paper §3.4, docs/ARCHITECTURE.md "Sequence deltas"), host order: an ingress translation adds it
       to the sequence number, an egress one subtracts it from the acknowledgment number and both edges of each SACK
       block. 0 for almost every session. */
    __s32 seq_delta;
    __u64 packets;      /* rewritten packets (atomic adds) */
    __u64 bytes;        /* their IP lengths */
    __u64 last_seen_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last rewritten packet */
};

/* Value of dysco_sessions6: an IPv4 value whose new_saddr/new_daddr are zero, followed by the IPv6 addresses the
   packet leaves with. The programs share every rule (flags, facts, counters, hand-over) through the leading
   struct dysco_value. */
struct dysco_value6 {
    struct dysco_value v;
    __u8 new_saddr[16];
    __u8 new_daddr[16];
};

/* Value of dysco_owned (key: struct dysco_key, the packet's tuple at the hook, as in dysco_sessions): the keys of
   sessions the agent alone translates (established, not kernel-carried). While no agent runs their packets are
   dropped by the queue rules (fail closed) instead of leaking untranslated. Presence is all that counts. */
#define DYSCO_OWNED 1

/* Ring-buffer events (dysco_events). */
#define DYSCO_EV_FIN 1
#define DYSCO_EV_RST 2
#define DYSCO_EV_ESTABLISHED 3
/* A tagged SYN (DYSCO_NAT_SYN_MARK) reached tc egress and was dropped: key = its tuple after the box's NAT (hook
   egress), seq = its sequence number, session_id 0 (no translation exists yet). */
#define DYSCO_EV_NAT_SYN 4

struct dysco_event {
    __u64 ts_ns;      /* bpf_ktime_get_ns() */
    __u64 session_id;
    struct dysco_key key; /* the translation's key (the tuple before the rewrite) */
    __u32 type;       /* DYSCO_EV_* */
    __u32 seq;        /* the packet's sequence number (host order) */
    __u32 ack;        /* its ack number (host order) */
    __u8 tcp_flags;
    __u8 pad[3];
    __u64 packets;    /* the translation's counters after this packet */
    __u64 bytes;
};

/* An IPv6 packet's event: the same 64 bytes as struct dysco_event (its key zero), then the IPv6 key. Its type has
   DYSCO_EV_IPV6 set, which a build that knows only struct dysco_event reads as an unknown type and ignores. */
#define DYSCO_EV_IPV6 0x100u

struct dysco_event6 {
    struct dysco_event e;
    struct dysco_key6 key;
};

/* Indices of dysco_stats (per-CPU array of __u64). */
#define DYSCO_STAT_REWRITTEN 0   /* packets rewritten */
#define DYSCO_STAT_HELD 1        /* packets of held translations passed untouched */
#define DYSCO_STAT_SYN_PASSED 2  /* SYNs passed untouched (no DYSCO_F_REWRITE_SYN) */
#define DYSCO_STAT_FIB_REDIRECT 3 /* egress packets redirected after a FIB lookup */
#define DYSCO_STAT_FIB_NEIGH 4   /* egress packets redirected by bpf_redirect_neigh (no neighbour entry yet) */
#define DYSCO_STAT_FIB_FAILED 5  /* egress FIB lookups that failed (packet dropped) */
#define DYSCO_STAT_EVENT_LOST 6  /* events the ring buffer had no room for */
#define DYSCO_STAT_OPENING_REFUSED 7 /* ingress SYN-ACKs and RSTs on an OPENING translation that the opposite
                                        direction's facts refute (RFC 793 SYN-SENT acceptability): dropped */
#define DYSCO_STAT_RELEASED_IN_ORDER 8 /* HELD|RELEASING translations the program took over (passed == seen) */
#define DYSCO_STAT_HELD_PASSED 9 /* packets of held translations passed to the queue and counted in dysco_passed */
#define DYSCO_STAT_NAT_SYN 10    /* tagged SYNs dropped at egress and reported (DYSCO_EV_NAT_SYN) */
#define DYSCO_STAT_COUNT 16

/* Configuration (array map dysco_config, one element, index 0). */
struct dysco_config {
    __u32 ingress_mark; /* OR-ed into skb->mark of a packet rewritten at ingress (0: none) */
    __u32 observe_mark; /* also OR-ed in when that packet is a FIN or an RST (the agent's teardown bookkeeping
                           queue rule; 0: none) */
    __u32 owned_mark;   /* OR-ed into skb->mark of a packet NOT rewritten at ingress whose key is in dysco_owned
                           (the fail-closed queue rule matches it; 0: none) */
};

/* Default sizes (user space may resize dysco_sessions before load: --max-sessions). */
#define DYSCO_MAX_ENTRIES_DEFAULT 262144
#define DYSCO_RINGBUF_BYTES_DEFAULT (1u << 20)

_Static_assert(sizeof(struct dysco_key) == 16, "dysco_key is 16 bytes");
_Static_assert(sizeof(struct dysco_tcp_facts) == 12, "dysco_tcp_facts is 12 bytes");
_Static_assert(sizeof(struct dysco_value) == 64, "dysco_value is 64 bytes");
_Static_assert(sizeof(struct dysco_event) == 64, "dysco_event is 64 bytes");
_Static_assert(sizeof(struct dysco_key6) == 40, "dysco_key6 is 40 bytes");
_Static_assert(sizeof(struct dysco_value6) == 96, "dysco_value6 is 96 bytes");
_Static_assert(sizeof(struct dysco_event6) == 104, "dysco_event6 is 104 bytes");
_Static_assert(sizeof(struct dysco_config) == 12, "dysco_config is 12 bytes");

#endif
