#ifndef DYSCO_CNETFILTERQUEUE_SHIM_H
#define DYSCO_CNETFILTERQUEUE_SHIM_H
/* <netinet/in.h> must come before <linux/netfilter.h> (DESIGN.md §5). */
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/netlink.h>
#include <linux/netfilter.h>
#include <libmnl/libmnl.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

/* Wrappers for what Swift cannot import: macros (NFQA_MAX, MNL_*), and attribute tables sized by them. */

static inline int dysco_mnl_socket_buffer_size(void) { return MNL_SOCKET_BUFFER_SIZE; }
static inline int dysco_netlink_netfilter(void) { return NETLINK_NETFILTER; }
static inline unsigned int dysco_mnl_autopid(void) { return MNL_SOCKET_AUTOPID; }

/* One queued packet, as parsed from an NFQNL_MSG_PACKET message. */
struct dysco_nfq_packet {
    uint32_t id;
    uint8_t hook;
    uint32_t skb_info;      /* NFQA_SKB_* flags, 0 when absent */
    uint32_t mark;          /* NFQA_MARK, 0 when absent */
    unsigned char *payload; /* points into the receive buffer; NULL when absent */
    uint32_t payload_len;
};

static inline int dysco_nfq_parse(const struct nlmsghdr *nlh, struct dysco_nfq_packet *out) {
    struct nlattr *attr[NFQA_MAX + 1];
    memset(attr, 0, sizeof attr);
    if (nfq_nlmsg_parse(nlh, attr) < 0 || attr[NFQA_PACKET_HDR] == NULL) return -1;
    struct nfqnl_msg_packet_hdr *ph = mnl_attr_get_payload(attr[NFQA_PACKET_HDR]);
    out->id = ntohl(ph->packet_id);
    out->hook = ph->hook;
    out->skb_info = attr[NFQA_SKB_INFO] ? ntohl(mnl_attr_get_u32(attr[NFQA_SKB_INFO])) : 0;
    out->mark = attr[NFQA_MARK] ? ntohl(mnl_attr_get_u32(attr[NFQA_MARK])) : 0;
    if (attr[NFQA_PAYLOAD]) {
        out->payload = mnl_attr_get_payload(attr[NFQA_PAYLOAD]);
        out->payload_len = mnl_attr_get_payload_len(attr[NFQA_PAYLOAD]);
    } else {
        out->payload = NULL;
        out->payload_len = 0;
    }
    return 0;
}

/* Writes a verdict message's headers into buf (>= 64 bytes): nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR, NFQA_MARK when
   set_mark (the packet's new mark) and,
   when payload_len > 0, the NFQA_PAYLOAD attribute header. Returns the header bytes; the caller sends the
   payload and dysco_nfq_padding(payload_len) zero bytes after them (one sendmsg, no copy of the packet). */
static inline size_t dysco_nfq_verdict_header(char *buf, uint16_t queue, uint32_t id, uint32_t verdict,
                                              uint32_t payload_len, int set_mark, uint32_t mark) {
    struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_VERDICT, queue);
    nfq_nlmsg_verdict_put(nlh, id, verdict);
    if (set_mark) nfq_nlmsg_verdict_put_mark(nlh, mark);
    if (payload_len == 0) return nlh->nlmsg_len;
    struct nlattr *attr = (struct nlattr *)mnl_nlmsg_get_payload_tail(nlh);
    attr->nla_type = NFQA_PAYLOAD;
    attr->nla_len = MNL_ATTR_HDRLEN + payload_len;
    nlh->nlmsg_len += MNL_ALIGN(attr->nla_len);
    return (size_t)((char *)attr - buf) + MNL_ATTR_HDRLEN;
}
static inline uint32_t dysco_nfq_padding(uint32_t payload_len) { return MNL_ALIGN(payload_len) - payload_len; }

/* Queue configuration messages, each asking for an ACK so that a refusal (EBUSY, EPERM) reaches us. */
static inline struct nlmsghdr *dysco_nfq_config_bind(char *buf, uint16_t queue, uint8_t command) {
    struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, queue);
    nfq_nlmsg_cfg_put_cmd(nlh, AF_INET, command);
    nlh->nlmsg_flags |= NLM_F_ACK;
    return nlh;
}
static inline struct nlmsghdr *dysco_nfq_config_params(char *buf, uint16_t queue, uint32_t maxlen) {
    struct nlmsghdr *nlh = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, queue);
    nfq_nlmsg_cfg_put_params(nlh, NFQNL_COPY_PACKET, 0xffff);
    nfq_nlmsg_cfg_put_qmaxlen(nlh, maxlen);
    mnl_attr_put_u32(nlh, NFQA_CFG_FLAGS, htonl(NFQA_CFG_F_GSO));
    mnl_attr_put_u32(nlh, NFQA_CFG_MASK, htonl(NFQA_CFG_F_GSO));
    nlh->nlmsg_flags |= NLM_F_ACK;
    return nlh;
}
static inline uint8_t dysco_nfq_cmd_bind(void) { return NFQNL_CFG_CMD_BIND; }
static inline uint8_t dysco_nfq_cmd_unbind(void) { return NFQNL_CFG_CMD_UNBIND; }

/* Runs the ACK/error callbacks over a received buffer: < 0 with errno set on an NLMSG_ERROR. */
static inline int dysco_mnl_check_ack(const void *buf, size_t len, unsigned int seq, unsigned int portid) {
    return mnl_cb_run(buf, len, seq, portid, NULL, NULL);
}
#endif
