#ifndef DYSCO_CCONNTRACK_SHIM_H
#define DYSCO_CCONNTRACK_SHIM_H
#include <netinet/in.h>
#include <libmnl/libmnl.h>
#include <libnetfilter_conntrack/libnetfilter_conntrack.h>
#endif
