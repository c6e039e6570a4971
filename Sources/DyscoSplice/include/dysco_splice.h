/* libdysco-splice: tells the local Dysco agent which two TCP sockets a proxy splices together (paper §4,
 * "Triggering a reconfiguration using splice").
 *
 * Two ways to use it:
 *  - Unmodified proxy: LD_PRELOAD=/path/to/libdysco-splice.so. The library interposes pipe, pipe2, splice and
 *    close, follows socket -> pipe -> socket and reports each pair of TCP/IPv4 sockets once (forgotten when
 *    either is closed).
 *  - Modified proxy: link it and call dysco_splice() once the two sessions are joined.
 *
 * The report is one JSON line to the agent's control socket (env DYSCO_CONTROL_SOCKET, default
 * /run/dysco-migrate/agent-host.sock), sent from a worker thread of the library:
 *   {"command":"splice","splice":{"from":{"src":"A","sport":P,"dst":"B","dport":Q},
 *                                 "to":{"src":"C","sport":R,"dst":"D","dport":S},"delta":N}}
 * each socket as local address/port (src) -> peer address/port (dst). If env DYSCO_SPLICE_LOG names a file, the
 * worker appends one line per report (with the agent's answer) and per failure.
 */
#ifndef DYSCO_SPLICE_H
#define DYSCO_SPLICE_H

#ifdef __cplusplus
extern "C" {
#endif

/* Reports that the proxy forwards the byte stream it reads from socket fd_in to socket fd_out, having added
 * `delta` bytes to it (negative: removed). Both must be connected TCP/IPv4 sockets. The report is queued for the
 * library's worker thread; the call does not wait for the agent.
 * Returns 0, or -1 with errno: EBADF/ENOTSOCK (not a socket), EAFNOSUPPORT (not TCP over IPv4), ENOTCONN (no
 * peer), EAGAIN (report queue full). */
int dysco_splice(int fd_in, int fd_out, int delta);

#ifdef __cplusplus
}
#endif

#endif /* DYSCO_SPLICE_H */
