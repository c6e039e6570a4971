/* libdysco-splice (paper §4, "Triggering a reconfiguration using splice"): an LD_PRELOAD interposer for proxies
 * that splice, and the paper's dysco_splice() call. See include/dysco_splice.h.
 *
 * How the interposer learns a pair: a splicing proxy moves bytes socket -> pipe -> socket. splice(socket, pipe
 * write end) records the socket as the pipe's current source; splice(pipe read end, socket) finds the pipe's write
 * end (from pipe/pipe2) and so its source: (source socket, destination socket). Proxies pool pipes and reuse them
 * for other connections, so the source is recorded on every call, never once per pipe. Each unordered pair is
 * reported once, and forgotten when either socket is closed. Only connected TCP/IPv4 sockets count.
 *
 * Threads: one mutex over fixed tables indexed by fd; the proxy's threads only update them and queue a report
 * (the socket addresses are read in the proxy's thread, while the fds are certainly the ones spliced). One detached
 * worker thread, started on the first report, talks to the agent and writes the log; a missing or slow agent only
 * costs that thread (5 s timeouts), never the proxy's.
 */
#ifdef __linux__

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "dysco_splice.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_CONTROL_SOCKET "/run/dysco-migrate/agent-host.sock"
/* fds at or above this are passed through untracked (tables are virtual memory, touched only where used). */
#define MAX_FD (1 << 18)
#define QUEUE_SIZE 128
#define AGENT_TIMEOUT_SECONDS 5

#define API __attribute__((visibility("default")))

enum pipe_role { PIPE_NONE = 0, PIPE_READ = 1, PIPE_WRITE = 2 };

struct fd_entry {
    uint32_t gen;          /* bumped on every close of this fd number */
    int32_t pipe_other;    /* the other end of the pipe (role != PIPE_NONE) */
    int32_t src_fd;        /* write end: the socket last spliced into the pipe (has_src) */
    uint32_t src_gen;      /* src_fd's gen then */
    int32_t reported_with; /* the socket this one was reported with (has_reported) */
    uint8_t role;
    uint8_t has_src;
    uint8_t has_reported;
    uint8_t not_tcp4;      /* known not to be a connected TCP/IPv4 socket (until closed) */
};

struct report {
    char json[448];
    char from[64];
    char to[64];
    int delta;
};

static struct fd_entry fds[MAX_FD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static struct report queue[QUEUE_SIZE];
static unsigned queue_head, queue_count, dropped;
static int worker_running;

static char control_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char log_path[4096];

static int (*real_pipe)(int[2]);
static int (*real_pipe2)(int[2], int);
static ssize_t (*real_splice)(int, loff_t *, int, loff_t *, size_t, unsigned int);
static int (*real_close)(int);
static pthread_once_t resolved = PTHREAD_ONCE_INIT;

/* Fallbacks should dlsym find nothing (a static libc): the system calls themselves. */
static int sys_pipe(int p[2]) { return (int)syscall(SYS_pipe2, p, 0); }
static int sys_pipe2(int p[2], int flags) { return (int)syscall(SYS_pipe2, p, flags); }
static ssize_t sys_splice(int a, loff_t *b, int c, loff_t *d, size_t e, unsigned int f) {
    return syscall(SYS_splice, a, b, c, d, e, f);
}
static int sys_close(int fd) { return (int)syscall(SYS_close, fd); }

static void resolve_once(void) {
    real_pipe = (int (*)(int[2]))dlsym(RTLD_NEXT, "pipe");
    real_pipe2 = (int (*)(int[2], int))dlsym(RTLD_NEXT, "pipe2");
    real_splice = (ssize_t(*)(int, loff_t *, int, loff_t *, size_t, unsigned int))dlsym(RTLD_NEXT, "splice");
    real_close = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (!real_pipe) real_pipe = sys_pipe;
    if (!real_pipe2) real_pipe2 = sys_pipe2;
    if (!real_splice) real_splice = sys_splice;
    if (!real_close) real_close = sys_close;
}

static inline void resolve(void) { pthread_once(&resolved, resolve_once); }

/* ---- logging (worker thread only) ---- */

static void log_line(const char *fmt, ...) {
    if (!log_path[0]) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t w = write(fd, line, (size_t)n);
    (void)w;
    real_close(fd);
}

/* ---- the agent (worker thread only) ---- */

/* Sends one request line and reads one answer line into `answer`; 0, or -1 with `error` set. */
static int ask_agent(const char *request, char *answer, size_t answer_size, char *error, size_t error_size) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, control_path, sizeof addr.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        snprintf(error, error_size, "socket: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = AGENT_TIMEOUT_SECONDS};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
        snprintf(error, error_size, "connect %s: %s", control_path, strerror(errno));
        real_close(s);
        return -1;
    }
    size_t len = strlen(request), sent = 0;
    while (sent < len) {
        ssize_t n = send(s, request + sent, len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            snprintf(error, error_size, "send to %s: %s", control_path, n < 0 ? strerror(errno) : "closed");
            real_close(s);
            return -1;
        }
        sent += (size_t)n;
    }
    size_t got = 0;
    while (got < answer_size - 1) {
        ssize_t n = recv(s, answer + got, answer_size - 1 - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                snprintf(error, error_size, "no answer from %s within %d s", control_path, AGENT_TIMEOUT_SECONDS);
            else
                snprintf(error, error_size, "no answer from %s: %s", control_path, strerror(errno));
            real_close(s);
            return -1;
        }
        if (n == 0) break;
        got += (size_t)n;
        if (memchr(answer + got - (size_t)n, '\n', (size_t)n)) break;
    }
    real_close(s);
    answer[got] = 0;
    char *nl = strchr(answer, '\n');
    if (nl) *nl = 0;
    if (got == 0) {
        snprintf(error, error_size, "no answer from %s: closed", control_path);
        return -1;
    }
    return 0;
}

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        struct report r;
        unsigned lost;
        pthread_mutex_lock(&lock);
        while (queue_count == 0 && dropped == 0) pthread_cond_wait(&wake, &lock);
        lost = dropped;
        dropped = 0;
        int have = queue_count > 0;
        if (have) {
            r = queue[queue_head];
            queue_head = (queue_head + 1) % QUEUE_SIZE;
            queue_count--;
        }
        pthread_mutex_unlock(&lock);
        if (lost) log_line("dropped %u reports: queue full", lost);
        if (!have) continue;
        char answer[1024], error[256];
        if (ask_agent(r.json, answer, sizeof answer, error, sizeof error) == 0)
            log_line("reported %s -> %s: %s", r.from, r.to, answer);
        else
            log_line("failed to report %s -> %s: %s", r.from, r.to, error);
    }
    return NULL;
}

/* Under `lock`. Starts the worker if this process has none (first report, or a forked child). */
static void start_worker_locked(void) {
    if (worker_running) return;
    pthread_t t;
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    /* The worker takes none of the proxy's signals. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (pthread_create(&t, &attr, worker, NULL) == 0) worker_running = 1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

/* ---- socket tuples ---- */

struct tuple {
    struct sockaddr_in local, peer;
};

/* 0 for a connected TCP/IPv4 socket (its addresses in *t), else -1 with errno. */
static int tcp4_tuple(int fd, struct tuple *t) {
    int type = 0, proto = 0;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) return -1;
    len = sizeof proto;
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0) return -1;
    if (type != SOCK_STREAM || proto != IPPROTO_TCP) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    struct sockaddr_storage ss;
    len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0) return -1;
    if (ss.ss_family != AF_INET) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    memcpy(&t->local, &ss, sizeof t->local);
    len = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &len) < 0) return -1;
    if (ss.ss_family != AF_INET) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    memcpy(&t->peer, &ss, sizeof t->peer);
    return 0;
}

static void describe(const struct tuple *t, char *out, size_t size) {
    char a[INET_ADDRSTRLEN], b[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &t->local.sin_addr, a, sizeof a);
    inet_ntop(AF_INET, &t->peer.sin_addr, b, sizeof b);
    snprintf(out, size, "%s:%u->%s:%u", a, ntohs(t->local.sin_port), b, ntohs(t->peer.sin_port));
}

static void tuple_json(const struct tuple *t, char *out, size_t size) {
    char a[INET_ADDRSTRLEN], b[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &t->local.sin_addr, a, sizeof a);
    inet_ntop(AF_INET, &t->peer.sin_addr, b, sizeof b);
    snprintf(out, size, "{\"src\":\"%s\",\"sport\":%u,\"dst\":\"%s\",\"dport\":%u}", a, ntohs(t->local.sin_port), b,
             ntohs(t->peer.sin_port));
}

/* Under `lock`: queues the report of from -> to; -1 when the queue is full. */
static int enqueue_locked(const struct tuple *from, const struct tuple *to, int delta) {
    if (queue_count == QUEUE_SIZE) {
        dropped++;
        start_worker_locked();
        pthread_cond_signal(&wake);
        return -1;
    }
    struct report *r = &queue[(queue_head + queue_count) % QUEUE_SIZE];
    char f[160], t[160];
    tuple_json(from, f, sizeof f);
    tuple_json(to, t, sizeof t);
    snprintf(r->json, sizeof r->json, "{\"command\":\"splice\",\"splice\":{\"from\":%s,\"to\":%s,\"delta\":%d}}\n", f,
             t, delta);
    describe(from, r->from, sizeof r->from);
    describe(to, r->to, sizeof r->to);
    r->delta = delta;
    queue_count++;
    start_worker_locked();
    pthread_cond_signal(&wake);
    return 0;
}

/* Under `lock`: a and b were reported together. */
static void mark_reported_locked(int a, int b) {
    fds[a].reported_with = b;
    fds[a].has_reported = 1;
    fds[b].reported_with = a;
    fds[b].has_reported = 1;
}

static inline int tracked(int fd) { return fd >= 0 && fd < MAX_FD; }

/* ---- the interposer ---- */

/* A successful splice moved bytes from `in` to `out`. */
static void note_splice(int in, int out) {
    if (!tracked(in) || !tracked(out)) return;
    int from, to;
    uint32_t from_gen, to_gen;
    pthread_mutex_lock(&lock);
    if (fds[out].role == PIPE_WRITE && fds[in].role == PIPE_NONE) {
        /* socket -> pipe: this pipe's bytes now come from `in`. */
        fds[out].src_fd = in;
        fds[out].src_gen = fds[in].gen;
        fds[out].has_src = 1;
        pthread_mutex_unlock(&lock);
        return;
    }
    if (fds[in].role != PIPE_READ || fds[out].role != PIPE_NONE) {
        pthread_mutex_unlock(&lock);
        return;
    }
    /* pipe -> socket: the pipe's source socket is the other end of the pair. */
    int w = fds[in].pipe_other;
    if (!tracked(w) || fds[w].role != PIPE_WRITE || fds[w].pipe_other != in || !fds[w].has_src) {
        pthread_mutex_unlock(&lock);
        return;
    }
    from = fds[w].src_fd;
    if (fds[from].gen != fds[w].src_gen || from == out ||
        (fds[from].has_reported && fds[from].reported_with == out) || fds[from].not_tcp4 || fds[out].not_tcp4) {
        pthread_mutex_unlock(&lock);
        return;
    }
    to = out;
    from_gen = fds[from].gen;
    to_gen = fds[to].gen;
    pthread_mutex_unlock(&lock);

    /* A new pair: read the addresses now, outside the lock (the fds are the proxy's until it closes them). */
    struct tuple tf, tt;
    int ok_from = tcp4_tuple(from, &tf) == 0;
    int ok_to = ok_from && tcp4_tuple(to, &tt) == 0;

    pthread_mutex_lock(&lock);
    /* Closed (and perhaps reused) meanwhile: nothing to say about it. close() bumps gen before closing. */
    if (fds[from].gen == from_gen && fds[to].gen == to_gen) {
        if (!ok_from) fds[from].not_tcp4 = 1;
        else if (!ok_to) fds[to].not_tcp4 = 1;
        else if (!(fds[from].has_reported && fds[from].reported_with == to)) {
            mark_reported_locked(from, to);
            enqueue_locked(&tf, &tt, 0);
        }
    }
    pthread_mutex_unlock(&lock);
}

static void note_pipe(const int p[2]) {
    if (!tracked(p[0]) || !tracked(p[1])) return;
    pthread_mutex_lock(&lock);
    fds[p[0]].role = PIPE_READ;
    fds[p[0]].pipe_other = p[1];
    fds[p[1]].role = PIPE_WRITE;
    fds[p[1]].pipe_other = p[0];
    fds[p[1]].has_src = 0;
    pthread_mutex_unlock(&lock);
}

API int pipe(int p[2]) {
    resolve();
    int r = real_pipe(p);
    if (r == 0) {
        int e = errno;
        note_pipe(p);
        errno = e;
    }
    return r;
}

API int pipe2(int p[2], int flags) {
    resolve();
    int r = real_pipe2(p, flags);
    if (r == 0) {
        int e = errno;
        note_pipe(p);
        errno = e;
    }
    return r;
}

API ssize_t splice(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out, size_t len, unsigned int flags) {
    resolve();
    ssize_t r = real_splice(fd_in, off_in, fd_out, off_out, len, flags);
    if (r > 0) {
        int e = errno;
        note_splice(fd_in, fd_out);
        errno = e;
    }
    return r;
}

API int close(int fd) {
    resolve();
    if (tracked(fd)) {
        int e = errno;
        pthread_mutex_lock(&lock);
        struct fd_entry *f = &fds[fd];
        f->gen++; /* before the real close: a reader of the old gen then knows the fd may be another's */
        if (f->has_reported) {
            int p = f->reported_with;
            if (tracked(p) && fds[p].has_reported && fds[p].reported_with == fd) fds[p].has_reported = 0;
            f->has_reported = 0;
        }
        f->role = PIPE_NONE;
        f->has_src = 0;
        f->not_tcp4 = 0;
        pthread_mutex_unlock(&lock);
        errno = e;
    }
    return real_close(fd);
}

/* ---- the paper's call ---- */

API int dysco_splice(int fd_in, int fd_out, int delta) {
    resolve();
    if (fd_in < 0 || fd_out < 0) {
        errno = EBADF;
        return -1;
    }
    struct tuple tf, tt;
    if (tcp4_tuple(fd_in, &tf) < 0 || tcp4_tuple(fd_out, &tt) < 0) return -1;
    pthread_mutex_lock(&lock);
    if (tracked(fd_in) && tracked(fd_out)) mark_reported_locked(fd_in, fd_out);
    int r = enqueue_locked(&tf, &tt, delta);
    pthread_mutex_unlock(&lock);
    if (r < 0) {
        errno = EAGAIN;
        return -1;
    }
    return 0;
}

/* ---- load and fork ---- */

static void before_fork(void) { pthread_mutex_lock(&lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&lock); }
static void after_fork_child(void) {
    /* The worker did not come along; the parent's queued reports are the parent's to send. */
    worker_running = 0;
    queue_head = queue_count = dropped = 0;
    pthread_cond_init(&wake, NULL);
    pthread_mutex_unlock(&lock);
}

__attribute__((constructor)) static void dysco_splice_init(void) {
    resolve();
    const char *path = getenv("DYSCO_CONTROL_SOCKET");
    snprintf(control_path, sizeof control_path, "%s", path && *path ? path : DEFAULT_CONTROL_SOCKET);
    const char *log = getenv("DYSCO_SPLICE_LOG");
    if (log && *log) snprintf(log_path, sizeof log_path, "%s", log);
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

#endif /* __linux__ */
