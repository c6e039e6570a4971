#ifndef DYSCO_CNETFILTERQUEUE_SHIM_H
#define DYSCO_CNETFILTERQUEUE_SHIM_H
/* <netinet/in.h> must come before <linux/netfilter.h> (DESIGN.md §5). */
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/netfilter.h>
#include <libmnl/libmnl.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

/* Macros and inline helpers Swift cannot import directly. */
static inline int dysco_mnl_socket_buffer_size(void) { return MNL_SOCKET_BUFFER_SIZE; }
static inline void *dysco_nlmsg_data(struct nlmsghdr *nlh) { return mnl_nlmsg_get_payload(nlh); }
#endif
