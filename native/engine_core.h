/* The C core of proxyd's userspace TCP engine (compiled into proxyd._engine by native/engine.pyx).
 *
 * Threads: N workers, each with its own epoll set, timer lists, pipe pool and
 * connections. Every listener is in every worker's epoll set with
 * EPOLLEXCLUSIVE, so one new connection wakes one worker, which then owns it
 * for its whole life (client socket, endpoint socket, pipes lent to it). No
 * worker ever touches another's connections; the workers never take the GIL.
 *
 * Shared state, written by the control thread (Python, holding the GIL but
 * never blocking workers for long):
 *   - services (pe_svc): endpoint list, round-robin cursor, ClientIP affinity;
 *     one mutex each, held for a pick (a few hundred ns); counters are atomics;
 *   - listeners (pe_lst): added/removed under the engine mutex; a removed
 *     listener is freed only after every worker has finished the epoll batch
 *     that might still name it (epochs);
 *   - engine-wide atomics: descriptor estimate, pause count, stop/reset flags.
 *
 * Connection life (kube-proxy userspace's semantics, as proxyd/modes/userspace/tcp.py):
 *   accept4 (batches of 64) -> source ranges -> pick (affinity, round robin,
 *   skipping endpoints tried until each was, then round again) -> non-blocking
 *   connect with four attempts, per-attempt timeouts
 *   250 ms, 500 ms, 1 s, 2 s (four FIFO timer lists: one timeout each, so
 *   insertion order is expiry order) -> splice(2) each direction through a
 *   pooled pipe (lent only while it holds data), backpressure by not reading
 *   while the pipe holds data, EOF passed on as shutdown(SHUT_WR), any error
 *   aborts both sockets with SO_LINGER 0 (RST). No endpoint / all failed: RST
 *   to the client at once.
 *
 * Per connection only what can matter is paid for: the client socket inherits
 * TCP_NODELAY and keepalive from the listener; the endpoint socket gets
 * TCP_NODELAY before its second write and keepalive once it has lived
 * PE_TUNE_AFTER; a short recv after a clean FIN was reported is the EOF; the
 * endpoint handshake's last ACK rides on the client's first bytes (pe_defer_ack).
 */
#ifndef PROXYD_ENGINE_CORE_H
#define PROXYD_ENGINE_CORE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef EPOLLEXCLUSIVE
#define EPOLLEXCLUSIVE (1u << 28)
#endif
#ifndef F_SETPIPE_SZ
#define F_SETPIPE_SZ 1031
#endif

#define PE_ATTEMPTS 4
#define PE_ACCEPT_BATCH 64
#define PE_EVENTS 256
#define PE_FD_RESERVE 16
#define PE_RESUME_AFTER 1.0
#define PE_STARVED_RETRY 0.02
#define PE_COPY_BUFFER (64 * 1024)
#define PE_SMALL (16 * 1024) /* first read of a wake-up: recv/send through the stack, as HAProxy does */
/* A batch that handled at least PE_NAP_EVENTS events or moved PE_NAP_BYTES is a worker under load: it naps
 * before it polls again (pe_worker_main), for the engine's stream_nap after a batch that moved
 * PE_NAP_BYTES, for its nap otherwise. */
#define PE_NAP_EVENTS 2
#define PE_NAP_BYTES (64 * 1024)
#define PE_KEEPALIVE 15

/* rejection reasons, in the order of proxyd.modes.userspace.engine.REJECT_REASONS */
enum { PE_REJ_NOEP, PE_REJ_FAILED, PE_REJ_SOURCE, PE_REJ_RESOURCES, PE_REJ_GONE, PE_REJ_N };

static const double PE_DIAL_TIMEOUTS[PE_ATTEMPTS] = {0.25, 0.5, 1.0, 2.0};
/* The endpoint socket's keepalive is switched on this long after the connection was established, from a
 * fifth timer list (PE_TUNE_LIST): connections that end sooner, most of them, never pay its three
 * setsockopt calls. Probes still start 15 s after the last segment received (see pe_keepalive). */
#define PE_TUNE_LIST PE_ATTEMPTS
#define PE_TUNE_AFTER 1.0
/* A sixth list (PE_HOLD_LIST): connections whose endpoint handshake ACK is held back for the client's
 * first bytes to carry it (pe_established), at most the engine's ack_hold seconds. */
#define PE_HOLD_LIST (PE_ATTEMPTS + 1)
#define PE_LISTS (PE_ATTEMPTS + 2)
/* pe_half.hup: what the source reported */
#define PE_HUP_FIN 1  /* RDHUP alone: the peer's FIN is queued behind its data; a short recv reached it */
#define PE_HUP_MORE 2 /* HUP or ERR too (a reset, both sides shut): read on until the EOF or the error */

static double pe_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- addresses */

/* An IPv4 or IPv6 socket address in 28 bytes, not sockaddr_storage's 128: an engine holds one per
 * endpoint of every service (100,000 at 10,000 services x 10) and four per connection being dialled.
 * ss_family overlays sin_family / sin6_family, the first member of both. */
typedef union {
    sa_family_t ss_family;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
} pe_sockaddr;

typedef struct {
    pe_sockaddr sa;
    socklen_t len;
} pe_addr;

/* a client IP as 16 bytes (IPv4 mapped into ::ffff:0:0/96), the affinity key */
typedef struct {
    unsigned char b[16];
} pe_ip;

static void pe_ip_of(const struct sockaddr_storage *sa, pe_ip *out) {
    memset(out->b, 0, 16);
    if (sa->ss_family == AF_INET) {
        out->b[10] = out->b[11] = 0xff;
        memcpy(out->b + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else {
        memcpy(out->b, &((const struct sockaddr_in6 *)sa)->sin6_addr, 16);
    }
}

static int pe_addr_eq(const pe_addr *a, const pe_addr *b) {
    if (a->sa.ss_family != b->sa.ss_family) return 0;
    if (a->sa.ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)&a->sa, *y = (const void *)&b->sa;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)&a->sa, *y = (const void *)&b->sa;
    return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, 16);
}

/* a source range (loadBalancerSourceRanges) in the same 16-byte form */
typedef struct {
    pe_ip net;
    int bits; /* prefix length over the 128-bit form */
    int v4;
} pe_cidr;

static int pe_cidr_has(const pe_cidr *c, const pe_ip *ip, int v4) {
    if (c->v4 != v4) return 0;
    int bits = c->bits;
    for (int i = 0; i < 16 && bits > 0; i++, bits -= 8) {
        unsigned char mask = bits >= 8 ? 0xff : (unsigned char)(0xff << (8 - bits));
        if ((ip->b[i] & mask) != (c->net.b[i] & mask)) return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- services */

typedef struct {
    pe_ip ip;
    int state; /* 0 empty, 1 used, 2 deleted */
    int ep;    /* slot in the service's endpoint list */
    double last;
} pe_aff;

/* The counters of one endpoint of a service (for `proxyd status`), keyed by its address: an endpoint
 * that stays across list replacements keeps its counters; one that goes moves to the service's gone
 * list, where connections still open to it keep counting until Python has read the last of it. */
typedef struct pe_epc {
    pe_addr addr;
    atomic_ullong opened, bytes_up, bytes_down; /* since Python last took them (pe_svc_take_eps) */
    atomic_int conns;                           /* connections holding it (from pick to close) */
    struct pe_epc *next;                        /* the gone list */
} pe_epc;

typedef struct pe_svc {
    pthread_mutex_t mu;
    atomic_int refs; /* the Python handle, listeners' configs and connections */
    pe_addr *eps;
    pe_epc **ctrs; /* one per endpoint of eps, made at its first connection (NULL before: nothing counted) */
    pe_epc *gone;  /* counters of endpoints no longer listed */
    int n;
    int cursor;
    double timeout; /* ClientIP affinity; 0 = off */
    pe_aff *aff;
    size_t aff_cap, aff_used, aff_live; /* used counts deleted slots too */
    atomic_ullong opened, bytes_up, bytes_down, retries;
    atomic_ullong rejected[PE_REJ_N];
    atomic_long active;
    atomic_uint gen; /* moves with every new endpoint list (engine_udp.h: flows whose endpoint left close) */
    atomic_int client_first; /* the last connection's client sent before its endpoint did */
} pe_svc;

static pe_svc *pe_svc_new(void) {
    pe_svc *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->refs, 1);
    return s;
}

static void pe_svc_ref(pe_svc *s) { atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed); }

static void pe_svc_unref(pe_svc *s) {
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1) {
        pthread_mutex_destroy(&s->mu);
        for (int i = 0; i < s->n; i++) free(s->ctrs[i]);
        free(s->ctrs);
        while (s->gone) {
            pe_epc *g = s->gone;
            s->gone = g->next;
            free(g);
        }
        free(s->eps);
        free(s->aff);
        free(s);
    }
}

static uint64_t pe_ip_hash(const pe_ip *ip) {
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < 16; i++) h = (h ^ ip->b[i]) * 1099511628211ULL;
    return h;
}

static pe_aff *pe_aff_find(pe_svc *s, const pe_ip *ip) {
    if (!s->aff_cap) return NULL;
    size_t mask = s->aff_cap - 1, i = pe_ip_hash(ip) & mask;
    for (size_t k = 0; k < s->aff_cap; k++, i = (i + 1) & mask) {
        pe_aff *e = &s->aff[i];
        if (e->state == 0) return NULL;
        if (e->state == 1 && !memcmp(e->ip.b, ip->b, 16)) return e;
    }
    return NULL;
}

static void pe_aff_del(pe_svc *s, pe_aff *e) {
    e->state = 2;
    s->aff_live--;
}

static int pe_aff_rehash(pe_svc *s, size_t cap) {
    pe_aff *old = s->aff;
    size_t oldcap = s->aff_cap;
    pe_aff *fresh = calloc(cap, sizeof(pe_aff));
    if (!fresh) return -1;
    s->aff = fresh;
    s->aff_cap = cap;
    s->aff_used = s->aff_live = 0;
    for (size_t i = 0; i < oldcap; i++) {
        if (old[i].state != 1) continue;
        size_t j = pe_ip_hash(&old[i].ip) & (cap - 1);
        while (fresh[j].state) j = (j + 1) & (cap - 1);
        fresh[j] = old[i];
        s->aff_used++;
        s->aff_live++;
    }
    free(old);
    return 0;
}

static void pe_aff_put(pe_svc *s, const pe_ip *ip, int ep, double now) {
    pe_aff *e = pe_aff_find(s, ip);
    if (e) {
        e->ep = ep;
        e->last = now;
        return;
    }
    if ((s->aff_used + 1) * 4 >= s->aff_cap * 3) {
        size_t cap = s->aff_cap ? s->aff_cap : 16;
        while ((s->aff_live + 1) * 2 >= cap) cap *= 2;
        if (pe_aff_rehash(s, cap) < 0) return; /* no memory: serve without recording affinity */
    }
    size_t mask = s->aff_cap - 1, i = pe_ip_hash(ip) & mask;
    while (s->aff[i].state == 1) i = (i + 1) & mask;
    if (s->aff[i].state == 0) s->aff_used++;
    s->aff[i].state = 1;
    s->aff[i].ip = *ip;
    s->aff[i].ep = ep;
    s->aff[i].last = now;
    s->aff_live++;
}

static int pe_excluded(const pe_addr *ep, const pe_addr *tried, int ntried) {
    for (int i = 0; i < ntried; i++)
        if (pe_addr_eq(ep, &tried[i])) return 1;
    return 0;
}

/* The counters of the endpoint in slot i, made on its first connection (s->mu held): most endpoints of a
 * big cluster never see one through this node, and counters for every endpoint of every service were
 * 8 MB at 10,000 services x 10. NULL when memory ran out (that connection is not counted). */
static pe_epc *pe_epc_of(pe_svc *s, int i) {
    pe_epc *c = s->ctrs[i];
    if (!c && (c = calloc(1, sizeof(pe_epc))) != NULL) {
        c->addr = s->eps[i];
        s->ctrs[i] = c;
    }
    return c;
}

/* proxyd.modes.userspace.conntable's pick: a live affinity entry not excluded wins (refreshed, the cursor stays);
 * an expired one is removed; else round robin from the cursor skipping the excluded endpoints,
 * the cursor moving past the choice, which affinity records. 1 and *out set, or 0.
 * epc (may be NULL): set to the endpoint's counters, held for the caller (pe_epc_release), or NULL. */
static int pe_pick(pe_svc *s, const pe_ip *ip, double now, const pe_addr *tried, int ntried, pe_addr *out,
                   pe_epc **epc) {
    int found = 0, slot = -1;
    pthread_mutex_lock(&s->mu);
    if (s->timeout > 0) {
        pe_aff *e = pe_aff_find(s, ip);
        if (e) {
            if (now - e->last < s->timeout) {
                if (!pe_excluded(&s->eps[e->ep], tried, ntried)) {
                    e->last = now;
                    *out = s->eps[e->ep];
                    slot = e->ep;
                    found = 1;
                }
            } else {
                pe_aff_del(s, e);
            }
        }
    }
    if (!found && s->n) {
        for (int k = 0; k < s->n; k++) {
            int i = (s->cursor + k) % s->n;
            if (pe_excluded(&s->eps[i], tried, ntried)) continue;
            s->cursor = (i + 1) % s->n;
            *out = s->eps[i];
            slot = i;
            found = 1;
            if (s->timeout > 0) pe_aff_put(s, ip, i, now);
            break;
        }
    }
    if (epc) {
        *epc = found ? pe_epc_of(s, slot) : NULL;
        if (*epc) atomic_fetch_add_explicit(&(*epc)->conns, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&s->mu);
    return found;
}

static void pe_epc_release(pe_epc **epc) {
    if (*epc) atomic_fetch_sub_explicit(&(*epc)->conns, 1, memory_order_release);
    *epc = NULL;
}

/* Install a de-duplicated endpoint list (the caller de-duplicates) with conntable's cursor rule:
 * keep pointing at the endpoint that was due next if still present, else keep the index. */
static int pe_svc_set(pe_svc *s, pe_addr *eps, int n, double timeout) {
    pthread_mutex_lock(&s->mu);
    pe_addr *old = s->eps;
    int oldn = s->n;
    int same = oldn == n;
    for (int i = 0; same && i < n; i++) same = pe_addr_eq(&old[i], &eps[i]);
    int *remap = NULL;
    if (!same) {
        remap = malloc(sizeof(int) * (oldn ? oldn : 1));
        pe_epc **ctrs = calloc(n ? n : 1, sizeof(pe_epc *));
        if (!remap || !ctrs) {
            pthread_mutex_unlock(&s->mu);
            free(remap);
            free(ctrs);
            return -1;
        }
        for (int i = 0; i < oldn; i++) {
            remap[i] = -1;
            for (int j = 0; j < n; j++)
                if (pe_addr_eq(&old[i], &eps[j])) {
                    remap[i] = j;
                    break;
                }
        }
        /* counters follow their endpoint: kept ones move to the new slot, removed ones to gone */
        for (int i = 0; i < oldn; i++) {
            pe_epc *c = s->ctrs[i];
            if (!c) continue;
            if (remap[i] >= 0) {
                ctrs[remap[i]] = c;
            } else {
                c->next = s->gone;
                s->gone = c;
            }
        }
        for (int j = 0; j < n; j++) {
            if (ctrs[j]) continue;
            pe_epc **g = &s->gone; /* an endpoint that comes back gets its counters back */
            while (*g && !pe_addr_eq(&(*g)->addr, &eps[j])) g = &(*g)->next;
            if (*g) { /* else none until its first connection (pe_epc_of) */
                ctrs[j] = *g;
                *g = (*g)->next;
                ctrs[j]->next = NULL;
            }
        }
        free(s->ctrs);
        s->ctrs = ctrs;
        if (oldn && remap[s->cursor] >= 0)
            s->cursor = remap[s->cursor];
        else
            s->cursor = n ? s->cursor % n : 0;
        s->eps = eps;
        s->n = n;
        atomic_fetch_add_explicit(&s->gen, 1, memory_order_release);
        eps = old; /* freed below */
    }
    s->timeout = timeout;
    if (s->aff_live) {
        for (size_t i = 0; i < s->aff_cap; i++) {
            pe_aff *e = &s->aff[i];
            if (e->state != 1) continue;
            if (timeout == 0.0) {
                pe_aff_del(s, e);
            } else if (remap) {
                if (remap[e->ep] < 0)
                    pe_aff_del(s, e);
                else
                    e->ep = remap[e->ep];
            }
        }
    }
    pthread_mutex_unlock(&s->mu);
    free(remap);
    free(eps);
    return 0;
}

static long pe_svc_sweep(pe_svc *s, double now) {
    long n = 0;
    pthread_mutex_lock(&s->mu);
    for (size_t i = 0; i < s->aff_cap && s->aff_live; i++) {
        pe_aff *e = &s->aff[i];
        if (e->state == 1 && now - e->last >= s->timeout) {
            pe_aff_del(s, e);
            n++;
        }
    }
    if (s->aff_cap > 16 && s->aff_live * 8 < s->aff_cap) {
        size_t cap = 16;
        while (s->aff_live * 2 >= cap) cap *= 2;
        pe_aff_rehash(s, cap);
    }
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* ---------------------------------------------------------------- listeners */

typedef struct pe_lst {
    int fd;
    pe_svc *svc;
    pe_cidr *ranges; /* NULL: everyone */
    int nranges;
    struct pe_lst *next;  /* engine's list (live) or graveyard */
    uint64_t *retired_at; /* each worker's epoch when removed (NULL while live) */
} pe_lst;

/* ---------------------------------------------------------------- connections */

typedef struct {
    int pr, pw, cap; /* pipe read/write ends (0 when none lent) and capacity */
    char *buf;       /* copy mode */
    int off;
    int buffered;
    int eof, done, starved;
    int bulk; /* the last read filled the small buffer: splice straight away */
    int hup;  /* PE_HUP_* bits: the source reported RDHUP/HUP, a short read does not mean idle */
    int nagle; /* destination is the endpoint socket, Nagle still on: 1 nothing sent yet, 2 sent once */
} pe_half;

struct pe_worker;

typedef struct pe_conn {
    int cfd, bfd;
    int state; /* 0 dialing, 1 pumping, 2 closed */
    pe_svc *svc;
    pe_epc *epc; /* the counters of the endpoint dialed or connected to (NULL: none) */
    struct pe_worker *w;
    pe_half up, down; /* up: client -> endpoint */
    pe_ip cip;
    int attempt, ntried, tlist;
    pe_addr tried[PE_ATTEMPTS];
    double deadline;
    struct pe_conn *tprev, *tnext; /* dial timer list, then the keepalive list (PE_TUNE_LIST) */
    struct pe_conn *prev, *next;   /* worker's connections */
    int on_starved;
    int cout; /* EPOLLOUT is in the client socket's interest (pe_client_out) */
    int spoke; /* bytes have moved (and the service learned who spoke first: pe_client_first) */
    struct pe_conn *snext;  /* closed-this-batch list */
    struct pe_conn *starved_next;
} pe_conn;

typedef struct {
    pe_conn *head, *tail;
} pe_tlist;

typedef struct pe_worker {
    struct pe_engine *eng;
    pthread_t thread;
    int ep, efd;
    pe_tlist timers[PE_LISTS]; /* one per dial timeout, then PE_TUNE_LIST and PE_HOLD_LIST */
    pe_conn conns; /* sentinel of the connection ring */
    long nconns;
    pe_conn *dead; /* closed this batch, freed after it */
    pe_conn *starved;
    double starved_at;
    int *pool; /* pooled pipes: triples r, w, cap */
    int npool, pool_max;
    int paused;
    double resume_at;
    int started;
    long nap_ns;                  /* the last batch found the worker under load: nap this long before polling */
    _Atomic int cpu;              /* the CPU it runs or naps on; -1 while blocked in epoll_wait (pe_alone) */
    unsigned long long moved;     /* bytes this batch moved */
    _Atomic uint64_t epoch; /* batches finished */
    _Atomic uint64_t naps;  /* naps taken (read by Python: Engine.naps) */
} pe_worker;

typedef struct pe_engine {
    pthread_mutex_t mu; /* listeners list, pause/resume registration */
    pe_worker *workers;
    int nworkers;
    pe_lst *listeners, *graveyard;
    atomic_int stop, reset;
    atomic_long fds;       /* descriptors held by the engine: sockets and pipes */
    atomic_long other_fds; /* what the rest of the process holds (set by Python) */
    long fd_limit;
    atomic_ullong pauses;
    atomic_long conns; /* connections (dialing or pumping) */
    atomic_long reset_count;
    int copy; /* recv/send instead of splice */
    int pipe_size;
    double ack_hold; /* longest wait of a held handshake ACK for the client's first bytes (pe_established) */
    long nap_ns;        /* a loaded worker's sleep before its next poll (pe_worker_main); 0: none */
    long stream_nap_ns; /* the same after a batch that moved PE_NAP_BYTES: bytes, not events, to gather */
} pe_engine;

#define PE_TAG_CLIENT 0
#define PE_TAG_BACKEND 1
#define PE_TAG_LISTENER 2
#define PE_TAG_WAKE 3

static void pe_wake(pe_worker *w) {
    uint64_t one = 1;
    ssize_t r = write(w->efd, &one, 8);
    (void)r;
}

static int pe_budget_full(pe_engine *e) {
    return atomic_load(&e->fds) + atomic_load(&e->other_fds) + 2 + PE_FD_RESERVE > e->fd_limit;
}

static int pe_fd_exhaustion(int err) { return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM; }

static void pe_close_fd(pe_engine *e, int fd, int rst) {
    if (rst) {
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(fd);
    atomic_fetch_sub_explicit(&e->fds, 1, memory_order_relaxed);
}

/* ---- pause and resume of accepting (descriptors ran short) */

static void pe_pause(pe_worker *w) {
    pe_engine *e = w->eng;
    if (w->paused) return;
    pthread_mutex_lock(&e->mu);
    w->paused = 1;
    for (pe_lst *l = e->listeners; l; l = l->next) epoll_ctl(w->ep, EPOLL_CTL_DEL, l->fd, NULL);
    pthread_mutex_unlock(&e->mu);
    w->resume_at = pe_now() + PE_RESUME_AFTER;
    atomic_fetch_add(&e->pauses, 1);
}

static void pe_resume(pe_worker *w) {
    pe_engine *e = w->eng;
    if (!w->paused || atomic_load(&e->stop)) return;
    if (pe_budget_full(e)) {
        w->resume_at = pe_now() + PE_RESUME_AFTER;
        return;
    }
    pthread_mutex_lock(&e->mu);
    w->paused = 0;
    for (pe_lst *l = e->listeners; l; l = l->next) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.u64 = (uint64_t)(uintptr_t)l | PE_TAG_LISTENER};
        epoll_ctl(w->ep, EPOLL_CTL_ADD, l->fd, &ev);
    }
    pthread_mutex_unlock(&e->mu);
}

/* ---- pipes */

static int pe_pipe_get(pe_worker *w, pe_half *h) {
    if (w->npool) {
        w->npool--;
        h->pr = w->pool[3 * w->npool];
        h->pw = w->pool[3 * w->npool + 1];
        h->cap = w->pool[3 * w->npool + 2];
        return 0;
    }
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
    atomic_fetch_add_explicit(&w->eng->fds, 2, memory_order_relaxed);
    int cap = fcntl(p[1], F_SETPIPE_SZ, w->eng->pipe_size);
    h->pr = p[0];
    h->pw = p[1];
    h->cap = cap > 0 ? cap : 65536;
    return 0;
}

static void pe_pipe_put(pe_worker *w, pe_half *h) {
    if (!h->pw) return;
    if (!h->buffered && w->npool < w->pool_max) {
        w->pool[3 * w->npool] = h->pr;
        w->pool[3 * w->npool + 1] = h->pw;
        w->pool[3 * w->npool + 2] = h->cap;
        w->npool++;
    } else {
        close(h->pr);
        close(h->pw);
        atomic_fetch_sub_explicit(&w->eng->fds, 2, memory_order_relaxed);
    }
    h->pr = h->pw = 0;
}

static int pe_pool_trim(pe_worker *w) {
    int n = w->npool;
    while (w->npool) {
        w->npool--;
        close(w->pool[3 * w->npool]);
        close(w->pool[3 * w->npool + 1]);
        atomic_fetch_sub_explicit(&w->eng->fds, 2, memory_order_relaxed);
    }
    return n;
}

/* ---- timers: one FIFO list per dial timeout */

static void pe_timer_add(pe_worker *w, pe_conn *c, int list, double now) {
    pe_tlist *t = &w->timers[list];
    c->tlist = list;
    c->deadline = now + (list < PE_ATTEMPTS      ? PE_DIAL_TIMEOUTS[list]
                         : list == PE_TUNE_LIST ? PE_TUNE_AFTER
                                                : w->eng->ack_hold);
    c->tnext = NULL;
    c->tprev = t->tail;
    if (t->tail)
        t->tail->tnext = c;
    else
        t->head = c;
    t->tail = c;
}

static void pe_timer_del(pe_worker *w, pe_conn *c) {
    if (c->tlist < 0) return;
    pe_tlist *t = &w->timers[c->tlist];
    if (c->tprev)
        c->tprev->tnext = c->tnext;
    else
        t->head = c->tnext;
    if (c->tnext)
        c->tnext->tprev = c->tprev;
    else
        t->tail = c->tprev;
    c->tprev = c->tnext = NULL;
    c->tlist = -1;
}

/* ---- connection end */

static void pe_conn_close(pe_conn *c, int rst) {
    if (c->state == 2) return;
    pe_worker *w = c->w;
    pe_engine *e = w->eng;
    int was_pumping = c->state == 1;
    c->state = 2;
    pe_timer_del(w, c);
    pe_pipe_put(w, &c->up);
    pe_pipe_put(w, &c->down);
    free(c->up.buf);
    free(c->down.buf);
    c->up.buf = c->down.buf = NULL;
    if (c->cfd >= 0) pe_close_fd(e, c->cfd, rst);
    if (c->bfd >= 0) pe_close_fd(e, c->bfd, rst);
    c->cfd = c->bfd = -1;
    if (was_pumping) atomic_fetch_sub_explicit(&c->svc->active, 1, memory_order_relaxed);
    pe_epc_release(&c->epc);
    c->prev->next = c->next;
    c->next->prev = c->prev;
    w->nconns--;
    atomic_fetch_sub_explicit(&e->conns, 1, memory_order_relaxed);
    c->snext = w->dead;
    w->dead = c;
    if (w->paused) pe_resume(w);
}

static void pe_reject(pe_conn *c, int reason) {
    atomic_fetch_add_explicit(&c->svc->rejected[reason], 1, memory_order_relaxed);
    pe_conn_close(c, 1);
}

/* ---- pumping */

static void pe_starve(pe_conn *c, pe_half *h) {
    pe_worker *w = c->w;
    h->starved = 1;
    if (!c->on_starved) {
        c->on_starved = 1;
        c->starved_next = w->starved;
        w->starved = c;
        w->starved_at = pe_now() + PE_STARVED_RETRY;
    }
    pe_pause(w);
}

/* Before a write to the endpoint socket. TCP_NODELAY is set there from the second write on: the first
 * write of a connection leaves nothing unacknowledged behind it, so Nagle's algorithm cannot hold any
 * of it back (a short tail after full segments goes out too: Minshall's rule delays a small segment
 * only behind another small one), and a connection that writes once (a request, then the close)
 * saves the setsockopt. Setting it pushes out anything already queued. */
static void pe_nagle_off(pe_half *h, int dst) {
    if (h->nagle == 2) {
        int one = 1;
        setsockopt(dst, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        h->nagle = 0;
    }
}

/* The client socket is registered without EPOLLOUT (pe_established); the first time the client does not
 * take all that is sent to it, EPOLLOUT joins its interest for good (edge-triggered: it costs nothing
 * while nothing waits). The modification reports the socket writable at once if it already is again,
 * so no wake-up is lost. Returns -1 when epoll refused. */
static int pe_client_out(pe_conn *c) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = (uint64_t)(uintptr_t)c | PE_TAG_CLIENT};
    if (epoll_ctl(c->w->ep, EPOLL_CTL_MOD, c->cfd, &ev) < 0) return -1;
    c->cout = 1;
    return 0;
}

/* Hold back the ACK that ends the endpoint handshake, as the kernel does for a connecting socket with
 * TCP_DEFER_ACCEPT (tcp_rcv_synsent_state_process: "save one ACK"): the connection is established and
 * reported writable as before, and the client's first bytes carry the ACK. The node sends one packet
 * fewer per connection, and the endpoint's kernel creates its connection from the data segment instead
 * of from a bare ACK first (the endpoint wakes once, for a connection with its request). The option has
 * no other effect on a socket that never listens. pe_established decides how long the ACK waits. */
static void pe_defer_ack(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof(one));
}

/* Send a held-back ACK now (TCP_QUICKACK pushes an ACK the socket has scheduled). */
static void pe_quickack(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}

/* Whether the service's clients speak first: set by the first bytes of each connection (pe_pump), read by
 * pe_established to decide whether the next connection's ACK waits for its client. Written only when it
 * changes: the workers share the service. */
static void pe_client_first(pe_svc *s, int yes) {
    if (atomic_load_explicit(&s->client_first, memory_order_relaxed) != yes)
        atomic_store_explicit(&s->client_first, yes, memory_order_relaxed);
}

/* The held ACK went out with the client's first bytes or FIN, or (expired) the client kept quiet for the
 * engine's ack_hold: send it now, and the service's next connections send it at once until a client
 * speaks first again (its endpoints may be ones that speak first, and they accept only on the ACK). */
static void pe_unhold(pe_conn *c, int expired) {
    pe_timer_del(c->w, c);
    if (expired) {
        pe_quickack(c->bfd);
        pe_client_first(c->svc, 0);
    }
    pe_timer_add(c->w, c, PE_TUNE_LIST, pe_now());
}

/* Move what can be moved in one direction. Returns -1 when the connection ended. */
static int pe_pump(pe_conn *c, pe_half *h, pe_half *other, int src, int dst, atomic_ullong *ctr) {
    pe_worker *w = c->w;
    pe_engine *e = w->eng;
    unsigned long long moved = 0, spliced = 0;
    int rc = 0;
    if (h->done || c->state != 1) return 0;
    for (;;) {
        if (h->buffered) {
            ssize_t m;
            if (h->nagle) pe_nagle_off(h, dst);
            if (e->copy)
                m = send(dst, h->buf + h->off, h->buffered, MSG_NOSIGNAL | MSG_DONTWAIT);
            else
                m = splice(h->pr, NULL, dst, NULL, h->buffered, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (m < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) break; /* destination full: wait for EPOLLOUT (backpressure) */
                rc = -1;
                break;
            }
            h->buffered -= (int)m;
            h->off += (int)m;
            moved += m;
            if (m > 0 && h->nagle == 1) h->nagle = 2;
            continue;
        }
        if (h->eof) {
            pe_pipe_put(w, h);
            free(h->buf);
            h->buf = NULL;
            h->done = 1;
            if (other->done) {
                rc = -2; /* both directions done: close (the close sends the last FIN) */
            } else {
                shutdown(dst, SHUT_WR);
            }
            break;
        }
        if (e->copy) {
            if (!h->buf && !(h->buf = malloc(PE_COPY_BUFFER))) {
                pe_starve(c, h);
                break;
            }
            ssize_t n = recv(src, h->buf, PE_COPY_BUFFER, MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) {
                    free(h->buf);
                    h->buf = NULL;
                    break;
                }
                rc = -1;
                break;
            }
            if (n == 0) {
                h->eof = 1;
                continue;
            }
            h->off = 0;
            h->buffered = (int)n;
            continue;
        }
        if (!h->bulk && !h->pw) {
            /* Small exchanges (requests, responses, greetings) cost one recv and one send instead of
             * three splices: a TCP recv that returns less than asked has emptied the receive queue,
             * and with edge-triggered epoll any later data raises a new event, so no read is wasted
             * on EAGAIN. What the destination does not take goes into a pipe (it always fits). */
            char small[PE_SMALL];
            ssize_t n = recv(src, small, sizeof(small), MSG_DONTWAIT);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) break;
                rc = -1;
                break;
            }
            if (n == 0) {
                h->eof = 1;
                continue;
            }
            /* Short read after a clean FIN was reported (RDHUP without HUP or ERR): a TCP recv stops
             * short only at the end of the receive queue or at urgent data, and RDHUP is raised once
             * the FIN is queued behind every byte it follows, so this was the last of the data: no
             * read for the 0. (Stopped at urgent data, the splice that used to read on stopped there
             * too and returned 0: the same ending.) The send says MSG_MORE then: the shutdown (or
             * close) that follows at once puts the FIN on the same segment, one packet fewer. */
            int drained = n < (ssize_t)sizeof(small);
            if (drained && h->hup == PE_HUP_FIN) h->eof = 1;
            if (h->nagle) pe_nagle_off(h, dst);
            ssize_t m = send(dst, small, n, MSG_NOSIGNAL | MSG_DONTWAIT | (h->eof ? MSG_MORE : 0));
            if (m < 0) {
                if (errno != EAGAIN && errno != EINTR) {
                    rc = -1;
                    break;
                }
                m = 0;
            }
            moved += m;
            if (m > 0 && h->nagle == 1) h->nagle = 2;
            if (m < n) {
                if (pe_pipe_get(w, h) < 0 || write(h->pw, small + m, n - m) != n - m) {
                    rc = -1; /* no pipe for the rest: bytes would be lost, so reset as for any error */
                    break;
                }
                h->buffered = (int)(n - m);
                continue;
            }
            if (h->eof) continue;
            if (drained && !h->hup) break; /* drained (the EOF, if any, raises RDHUP) */
            h->bulk = 1;
            continue;
        }
        if (!h->pw && pe_pipe_get(w, h) < 0) {
            pe_starve(c, h);
            break;
        }
        ssize_t n = splice(src, NULL, h->pw, NULL, h->cap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                pe_pipe_put(w, h); /* idle: the pipe goes back to the pool */
                /* The next wake-up starts small again unless this one moved a buffer's worth: a
                 * stream keeps splicing, instead of copying its first 16 KiB of every wake-up. */
                if (spliced && spliced < PE_SMALL) h->bulk = 0;
                break;
            }
            rc = -1;
            break;
        }
        if (n == 0) {
            h->eof = 1;
            continue;
        }
        h->buffered = (int)n;
        spliced += n;
    }
    if (rc == 0 && h->buffered && dst == c->cfd && !c->cout && pe_client_out(c) < 0) rc = -1;
    if (moved && !c->spoke) {
        c->spoke = 1;
        pe_client_first(c->svc, h == &c->up);
    }
    /* on PE_HOLD_LIST: the endpoint handshake's last ACK waits for the client's first bytes */
    if (c->tlist == PE_HOLD_LIST && rc == 0 && h == &c->up && (h->nagle != 1 || h->done)) pe_unhold(c, 0);
    if (moved) {
        w->moved += moved;
        atomic_fetch_add_explicit(ctr, moved, memory_order_relaxed);
        if (c->epc)
            atomic_fetch_add_explicit(h == &c->up ? &c->epc->bytes_up : &c->epc->bytes_down, moved,
                                      memory_order_relaxed);
    }
    if (rc == -1) {
        pe_conn_close(c, 1);
        return -1;
    }
    if (rc == -2) {
        pe_conn_close(c, 0);
        return -1;
    }
    return 0;
}

static void pe_pump_both(pe_conn *c) {
    if (pe_pump(c, &c->up, &c->down, c->cfd, c->bfd, &c->svc->bytes_up) < 0) return;
    pe_pump(c, &c->down, &c->up, c->bfd, c->cfd, &c->svc->bytes_down);
}

/* ---- dialing */

/* Keepalive on an established endpoint socket, PE_TUNE_AFTER after it connected (the client socket
 * inherits it from the listener). The order matters: SO_KEEPALIVE arms the kernel's timer with the
 * default idle time, then TCP_KEEPIDLE re-arms it for 15 s after the last segment received, so the
 * first probe comes when it would have with keepalive set before connect. */
static void pe_keepalive(int fd) {
    int one = 1, idle = PE_KEEPALIVE;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &idle, sizeof(idle));
}

/* backend_ready: the endpoint socket reported input (or the connect completed at once): read it now */
static void pe_established(pe_conn *c, int backend_ready) {
    pe_worker *w = c->w;
    pe_timer_del(w, c);
    c->state = 1;
    c->up.nagle = 1; /* the endpoint socket: TCP_NODELAY before its second write (pe_nagle_off) */
    atomic_fetch_add_explicit(&c->svc->opened, 1, memory_order_relaxed);
    if (c->epc) atomic_fetch_add_explicit(&c->epc->opened, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->svc->active, 1, memory_order_relaxed);
    /* Without EPOLLOUT until a direction is left holding data for the client (pe_client_out): a socket
     * added writable raises an event at once, a wasted epoll round per connection. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET,
                             .data.u64 = (uint64_t)(uintptr_t)c | PE_TAG_CLIENT};
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, c->cfd, &ev) < 0) {
        atomic_fetch_add_explicit(&c->svc->rejected[PE_REJ_GONE], 1, memory_order_relaxed);
        pe_conn_close(c, 1);
        return;
    }
    /* The handshake's last ACK was held back (pe_defer_ack) for the client's first bytes to carry it.
     * Where clients speak first (learned from the service's last connection, pe_client_first) it waits for
     * them, up to ack_hold: the client socket was just added, and epoll reports it at once if its
     * bytes are already there, so nothing is read here and no read is spent on EAGAIN. Elsewhere the
     * client is read now, and when nothing went to the endpoint (the client has not spoken yet, or the
     * endpoint speaks first) the ACK goes out at once, so the endpoint's accept is not delayed. */
    if (atomic_load_explicit(&c->svc->client_first, memory_order_relaxed)) {
        pe_timer_add(w, c, PE_HOLD_LIST, pe_now());
    } else {
        if (pe_pump(c, &c->up, &c->down, c->cfd, c->bfd, &c->svc->bytes_up) < 0) return;
        if (c->up.nagle == 1) pe_quickack(c->bfd);
        pe_timer_add(w, c, PE_TUNE_LIST, pe_now());
    }
    /* the endpoint's side only when it said it has something (else its next input raises an event) */
    if (backend_ready) pe_pump(c, &c->down, &c->up, c->bfd, c->cfd, &c->svc->bytes_down);
}

static void pe_dial(pe_conn *c) {
    pe_worker *w = c->w;
    pe_engine *e = w->eng;
    double now = pe_now();
    while (c->attempt < PE_ATTEMPTS) {
        pe_addr ep;
        pe_epc_release(&c->epc); /* the previous attempt's endpoint */
        if (!pe_pick(c->svc, &c->cip, now, c->tried, c->ntried, &ep, &c->epc)) {
            /* every endpoint tried, attempts left: round again, as kube-proxy picks anew per attempt */
            if (!c->ntried || !pe_pick(c->svc, &c->cip, now, NULL, 0, &ep, &c->epc)) break;
            c->ntried = 0;
        }
        c->tried[c->ntried++] = ep;
        int list = c->attempt++;
        int fd = socket(ep.sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 && pe_fd_exhaustion(errno) && pe_pool_trim(w))
            fd = socket(ep.sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            if (pe_fd_exhaustion(errno)) pe_pause(w);
            pe_reject(c, PE_REJ_RESOURCES);
            return;
        }
        atomic_fetch_add_explicit(&e->fds, 1, memory_order_relaxed);
        c->bfd = fd;
        pe_defer_ack(fd);
        int r = connect(fd, (struct sockaddr *)&ep.sa, ep.len);
        if (r == 0 || errno == EINPROGRESS || errno == EAGAIN) {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                     .data.u64 = (uint64_t)(uintptr_t)c | PE_TAG_BACKEND};
            if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
                pe_reject(c, PE_REJ_RESOURCES);
                return;
            }
            if (r == 0) {
                pe_established(c, 1);
                return;
            }
            pe_timer_add(w, c, list, now);
            return;
        }
        pe_close_fd(e, fd, 0);
        c->bfd = -1;
        atomic_fetch_add_explicit(&c->svc->retries, 1, memory_order_relaxed);
    }
    pe_reject(c, c->ntried ? PE_REJ_FAILED : PE_REJ_NOEP);
}

/* the endpoint socket of a dialing connection is ready, or the attempt timed out (timeout=1) */
static void pe_dial_event(pe_conn *c, int timeout, uint32_t events) {
    pe_worker *w = c->w;
    if (!timeout && (events & (EPOLLERR | EPOLLHUP)) == 0 && (events & EPOLLOUT)) {
        pe_established(c, (events & (EPOLLIN | EPOLLRDHUP)) != 0); /* writable without error: connected */
        return;
    }
    if (!timeout) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(c->bfd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err == EINPROGRESS || err == EAGAIN) return;
        if (!err) {
            pe_established(c, 1);
            return;
        }
    }
    pe_timer_del(w, c);
    pe_close_fd(w->eng, c->bfd, 0);
    c->bfd = -1;
    atomic_fetch_add_explicit(&c->svc->retries, 1, memory_order_relaxed);
    pe_dial(c);
}

/* ---- accepting */

static void pe_accept(pe_worker *w, pe_lst *l) {
    pe_engine *e = w->eng;
    for (int i = 0; i < PE_ACCEPT_BATCH && !w->paused; i++) {
        struct sockaddr_storage sa;
        socklen_t len = sizeof(sa);
        int fd = accept4(l->fd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (pe_fd_exhaustion(errno)) pe_pause(w);
            return;
        }
        atomic_fetch_add_explicit(&e->fds, 1, memory_order_relaxed);
        pe_svc *svc = l->svc;
        pe_conn *c = calloc(1, sizeof(*c));
        if (!c) {
            atomic_fetch_add_explicit(&svc->rejected[PE_REJ_RESOURCES], 1, memory_order_relaxed);
            pe_close_fd(e, fd, 1);
            continue;
        }
        pe_svc_ref(svc);
        c->svc = svc;
        c->w = w;
        c->cfd = fd;
        c->bfd = -1;
        c->tlist = -1;
        pe_ip_of(&sa, &c->cip);
        c->next = &w->conns;
        c->prev = w->conns.prev;
        w->conns.prev->next = c;
        w->conns.prev = c;
        w->nconns++;
        atomic_fetch_add_explicit(&e->conns, 1, memory_order_relaxed);
        if (l->ranges) {
            int ok = 0, v4 = sa.ss_family == AF_INET;
            for (int k = 0; k < l->nranges && !ok; k++) ok = pe_cidr_has(&l->ranges[k], &c->cip, v4);
            if (!ok) {
                pe_reject(c, PE_REJ_SOURCE);
                continue;
            }
        }
        pe_dial(c);
        if (pe_budget_full(e)) pe_pause(w);
    }
}

/* ---- the worker */

static void pe_free_dead(pe_worker *w) {
    while (w->dead) {
        pe_conn *c = w->dead;
        w->dead = c->snext;
        if (c->on_starved) continue; /* still on the starved list: freed from there */
        pe_svc_unref(c->svc);
        free(c);
    }
}

static void pe_retry_starved(pe_worker *w) {
    pe_conn *list = w->starved;
    w->starved = NULL;
    while (list) {
        pe_conn *c = list;
        list = c->starved_next;
        c->on_starved = 0;
        c->starved_next = NULL;
        if (c->state == 2) {
            pe_svc_unref(c->svc);
            free(c);
            continue;
        }
        c->up.starved = c->down.starved = 0;
        pe_pump_both(c);
    }
}

static void pe_reset_all(pe_worker *w) {
    while (w->conns.next != &w->conns) {
        pe_conn *c = w->conns.next;
        atomic_fetch_add(&w->eng->reset_count, c->state == 1 ? 1 : 0);
        pe_conn_close(c, 1);
    }
}

/* Whether no other worker runs or naps on this worker's CPU. A CPU that runs another worker does not go
 * idle between this one's events, so waking it costs no interrupt, and a nap would only make the two take
 * turns on one CPU (pe_worker_main). */
static int pe_alone(pe_worker *w) {
    pe_engine *e = w->eng;
    int cpu = atomic_load_explicit(&w->cpu, memory_order_relaxed);
    for (int i = 0; i < e->nworkers; i++)
        if (&e->workers[i] != w && atomic_load_explicit(&e->workers[i].cpu, memory_order_relaxed) == cpu)
            return 0;
    return 1;
}

/* Poll, marked as on no CPU while it may block (pe_alone). */
static int pe_wait(pe_worker *w, struct epoll_event *evs, int ms) {
    atomic_store_explicit(&w->cpu, -1, memory_order_relaxed);
    return epoll_wait(w->ep, evs, PE_EVENTS, ms);
}

static void *pe_worker_main(void *arg) {
    pe_worker *w = arg;
    pe_engine *e = w->eng;
    struct epoll_event evs[PE_EVENTS];
    sigset_t all;
    /* signals (SIGTERM, SIGCHLD, ...) are Python's business: let them land on its thread, not here */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    /* naps are tens to hundreds of microseconds: the default 50 us timer slack would stretch the short one */
    if (e->nap_ns || e->stream_nap_ns) prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    while (!atomic_load(&e->stop)) {
        double now = pe_now(), next = now + 1.0;
        for (int i = 0; i < PE_LISTS; i++)
            if (w->timers[i].head && w->timers[i].head->deadline < next) next = w->timers[i].head->deadline;
        if (w->paused && w->resume_at < next) next = w->resume_at;
        if (w->starved && w->starved_at < next) next = w->starved_at;
        int ms = next <= now ? 0 : (int)((next - now) * 1000) + 1;
        int n;
        if (w->nap_ns && ms) {
            /* Under load, events gather during a short sleep and are taken in one batch, instead of
             * each waking the worker: a worker blocked in epoll_wait is woken by the CPU that queued
             * the event, and waking a halted CPU costs that CPU an interprocessor interrupt, under a
             * hypervisor an exit to it, on the CPU that runs the clients and endpoints. Asleep here,
             * the worker is on no wait queue: events only queue up, and its own timer wakes it. */
            struct timespec nap = {0, w->nap_ns};
            nanosleep(&nap, NULL);
            atomic_fetch_add_explicit(&w->naps, 1, memory_order_relaxed);
            n = epoll_wait(w->ep, evs, PE_EVENTS, 0);
            if (n == 0) n = pe_wait(w, evs, ms);
        } else {
            n = pe_wait(w, evs, ms);
        }
        atomic_store_explicit(&w->cpu, sched_getcpu(), memory_order_relaxed);
        w->moved = 0;
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            int tag = (int)(d & 3);
            void *p = (void *)(uintptr_t)(d & ~(uint64_t)3);
            uint32_t ev = evs[i].events;
            if (tag == PE_TAG_LISTENER) {
                if (!w->paused) pe_accept(w, p);
            } else if (tag == PE_TAG_WAKE) {
                uint64_t v;
                ssize_t r = read(w->efd, &v, 8);
                (void)r;
            } else {
                pe_conn *c = p;
                if (c->state == 2) continue;
                if (c->state == 0) {
                    if (tag == PE_TAG_BACKEND) pe_dial_event(c, 0, ev);
                    continue;
                }
                if (ev & EPOLLERR) {
                    int err = 0;
                    socklen_t len = sizeof(err);
                    getsockopt(tag == PE_TAG_CLIENT ? c->cfd : c->bfd, SOL_SOCKET, SO_ERROR, &err, &len);
                    if (err) {
                        pe_conn_close(c, 1);
                        continue;
                    }
                }
                if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                    int hup = (ev & (EPOLLHUP | EPOLLERR)) ? PE_HUP_MORE : PE_HUP_FIN;
                    if (tag == PE_TAG_CLIENT)
                        c->up.hup |= hup;
                    else
                        c->down.hup |= hup;
                }
                if (tag == PE_TAG_CLIENT) {
                    /* readable: client -> endpoint; writable: endpoint -> client can go on */
                    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                        if (pe_pump(c, &c->up, &c->down, c->cfd, c->bfd, &c->svc->bytes_up) < 0) continue;
                    /* writable matters only to a direction holding data for this socket */
                    if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && c->down.buffered)
                        pe_pump(c, &c->down, &c->up, c->bfd, c->cfd, &c->svc->bytes_down);
                } else {
                    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                        if (pe_pump(c, &c->down, &c->up, c->bfd, c->cfd, &c->svc->bytes_down) < 0) continue;
                    if ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && c->up.buffered)
                        pe_pump(c, &c->up, &c->down, c->cfd, c->bfd, &c->svc->bytes_up);
                }
            }
        }
        now = pe_now();
        for (int i = 0; i < PE_ATTEMPTS; i++) {
            while (w->timers[i].head && w->timers[i].head->deadline <= now) pe_dial_event(w->timers[i].head, 1, 0);
        }
        while (w->timers[PE_HOLD_LIST].head && w->timers[PE_HOLD_LIST].head->deadline <= now)
            pe_unhold(w->timers[PE_HOLD_LIST].head, 1);
        while (w->timers[PE_TUNE_LIST].head && w->timers[PE_TUNE_LIST].head->deadline <= now) {
            pe_conn *c = w->timers[PE_TUNE_LIST].head;
            pe_timer_del(w, c);
            pe_keepalive(c->bfd);
        }
        if (w->starved && w->starved_at <= now) pe_retry_starved(w);
        if (w->paused && w->resume_at <= now) pe_resume(w);
        if (atomic_load(&e->reset)) pe_reset_all(w);
        pe_free_dead(w);
        /* a full batch leaves events behind: the next poll takes them at once, without sleeping */
        int stream = w->moved >= PE_NAP_BYTES;
        w->nap_ns = 0;
        if (n < PE_EVENTS && (n >= PE_NAP_EVENTS || stream) && pe_alone(w)) w->nap_ns = stream ? e->stream_nap_ns : e->nap_ns;
        atomic_fetch_add_explicit(&w->epoch, 1, memory_order_release);
    }
    pe_reset_all(w);
    pe_free_dead(w);
    if (w->starved) {
        pe_retry_starved(w); /* every connection is closed: this frees them */
    }
    pe_pool_trim(w);
    return NULL;
}

/* ---------------------------------------------------------------- engine control (Python's thread) */

static pe_engine *pe_engine_new(int nworkers, long fd_limit, int copy, int pipe_size, int pool_max,
                                double ack_hold, double nap, double stream_nap) {
    pe_engine *e = calloc(1, sizeof(*e));
    if (!e) return NULL;
    pthread_mutex_init(&e->mu, NULL);
    e->nworkers = nworkers;
    e->fd_limit = fd_limit;
    e->copy = copy;
    e->pipe_size = pipe_size;
    e->ack_hold = ack_hold;
    e->nap_ns = (long)(nap * 1e9);
    e->stream_nap_ns = (long)(stream_nap * 1e9);
    e->workers = calloc(nworkers, sizeof(pe_worker));
    if (!e->workers) goto fail;
    for (int i = 0; i < nworkers; i++) {
        pe_worker *w = &e->workers[i];
        w->eng = e;
        w->cpu = -1;
        w->conns.next = w->conns.prev = &w->conns;
        w->pool_max = pool_max;
        w->pool = calloc(3 * (pool_max ? pool_max : 1), sizeof(int));
        w->ep = epoll_create1(EPOLL_CLOEXEC);
        w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (!w->pool || w->ep < 0 || w->efd < 0) goto fail;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = PE_TAG_WAKE};
        if (epoll_ctl(w->ep, EPOLL_CTL_ADD, w->efd, &ev) < 0) goto fail;
    }
    return e;
fail:
    /* threads are not started yet: only descriptors and memory to give back */
    if (e->workers)
        for (int i = 0; i < nworkers; i++) {
            if (e->workers[i].ep > 0) close(e->workers[i].ep);
            if (e->workers[i].efd > 0) close(e->workers[i].efd);
            free(e->workers[i].pool);
        }
    free(e->workers);
    pthread_mutex_destroy(&e->mu);
    free(e);
    return NULL;
}

static int pe_engine_start(pe_engine *e) {
    for (int i = 0; i < e->nworkers; i++) {
        pe_worker *w = &e->workers[i];
        int err = pthread_create(&w->thread, NULL, pe_worker_main, w);
        if (err) return err;
        w->started = 1;
    }
    return 0;
}

static void pe_lst_free(pe_lst *l) {
    close(l->fd);
    free(l->retired_at);
    pe_svc_unref(l->svc);
    free(l->ranges);
    free(l);
}

/* listeners removed before every worker finished a batch after their removal may still be named
 * by an event being handled: free only those all workers are past */
static void pe_collect(pe_engine *e) {
    pe_lst **pp = &e->graveyard;
    while (*pp) {
        pe_lst *l = *pp;
        int safe = 1;
        for (int i = 0; i < e->nworkers; i++) {
            pe_worker *w = &e->workers[i];
            if (w->started && !atomic_load(&e->stop) &&
                (!l->retired_at || atomic_load(&w->epoch) <= l->retired_at[i]))
                safe = 0;
        }
        if (safe) {
            *pp = l->next;
            pe_lst_free(l);
        } else {
            pp = &l->next;
        }
    }
}

/* Takes ownership of fd (a listening, non-blocking socket) and of ranges. */
static pe_lst *pe_listener_add(pe_engine *e, int fd, pe_svc *svc, pe_cidr *ranges, int nranges) {
    pe_lst *l = calloc(1, sizeof(*l));
    if (!l) return NULL;
    l->fd = fd;
    l->svc = svc;
    pe_svc_ref(svc);
    l->ranges = ranges;
    l->nranges = nranges;
    pthread_mutex_lock(&e->mu);
    l->next = e->listeners;
    e->listeners = l;
    for (int i = 0; i < e->nworkers; i++) {
        pe_worker *w = &e->workers[i];
        if (w->paused) continue;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.u64 = (uint64_t)(uintptr_t)l | PE_TAG_LISTENER};
        epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev);
    }
    pthread_mutex_unlock(&e->mu);
    return l;
}

/* stop: shut the listening socket down now (a service's listener goes: clients are refused at once,
 * not left in a backlog nobody accepts from); otherwise the socket lives on (a listener replaced
 * by one with another configuration on the same socket) */
static void pe_listener_remove(pe_engine *e, pe_lst *l, int stop) {
    if (stop) shutdown(l->fd, SHUT_RDWR);
    pthread_mutex_lock(&e->mu);
    pe_lst **pp = &e->listeners;
    while (*pp && *pp != l) pp = &(*pp)->next;
    if (*pp) *pp = l->next;
    for (int i = 0; i < e->nworkers; i++) epoll_ctl(e->workers[i].ep, EPOLL_CTL_DEL, l->fd, NULL);
    /* each worker must finish a batch after this one (its own epoch, as seen now): an idle worker
     * woken below does so at once. Without memory for the snapshot, wait until the engine stops. */
    l->retired_at = calloc((size_t)e->nworkers, sizeof(uint64_t));
    for (int i = 0; l->retired_at && i < e->nworkers; i++) l->retired_at[i] = atomic_load(&e->workers[i].epoch);
    l->next = e->graveyard;
    e->graveyard = l;
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < e->nworkers; i++) pe_wake(&e->workers[i]);
    pe_collect(e);
}

static void pe_engine_stop(pe_engine *e) {
    atomic_store(&e->stop, 1);
    for (int i = 0; i < e->nworkers; i++) pe_wake(&e->workers[i]);
    for (int i = 0; i < e->nworkers; i++)
        if (e->workers[i].started) {
            pthread_join(e->workers[i].thread, NULL);
            e->workers[i].started = 0;
        }
}

static void pe_engine_free(pe_engine *e) {
    pe_engine_stop(e);
    while (e->listeners) {
        pe_lst *l = e->listeners;
        e->listeners = l->next;
        pe_lst_free(l);
    }
    while (e->graveyard) {
        pe_lst *l = e->graveyard;
        e->graveyard = l->next;
        pe_lst_free(l);
    }
    for (int i = 0; i < e->nworkers; i++) {
        close(e->workers[i].ep);
        close(e->workers[i].efd);
        free(e->workers[i].pool);
    }
    free(e->workers);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

/* ---------------------------------------------------------------- accessors for the Cython layer */

#define PE_NCOUNTERS (5 + PE_REJ_N)
/* opened, bytes to endpoint, bytes to client, retries, active, rejected[PE_REJ_N] */
static void pe_svc_read(pe_svc *s, unsigned long long *out) {
    out[0] = atomic_load_explicit(&s->opened, memory_order_relaxed);
    out[1] = atomic_load_explicit(&s->bytes_up, memory_order_relaxed);
    out[2] = atomic_load_explicit(&s->bytes_down, memory_order_relaxed);
    out[3] = atomic_load_explicit(&s->retries, memory_order_relaxed);
    long a = atomic_load_explicit(&s->active, memory_order_relaxed);
    out[4] = a > 0 ? (unsigned long long)a : 0;
    for (int i = 0; i < PE_REJ_N; i++) out[5 + i] = atomic_load_explicit(&s->rejected[i], memory_order_relaxed);
}

static long pe_svc_active(pe_svc *s) { return atomic_load_explicit(&s->active, memory_order_relaxed); }

/* endpoint counters for the Cython layer: the address and what was counted since the last take */
typedef struct {
    pe_addr addr;
    unsigned long long opened, bytes_up, bytes_down;
} pe_epc_out;

/* how many entries a take may return (listed and gone endpoints) */
static int pe_svc_epc_count(pe_svc *s) {
    pthread_mutex_lock(&s->mu);
    int k = s->n;
    for (pe_epc *g = s->gone; g; g = g->next) k++;
    pthread_mutex_unlock(&s->mu);
    return k;
}

static int pe_epc_take(pe_epc *c, pe_epc_out *o) {
    o->addr = c->addr;
    o->opened = atomic_exchange_explicit(&c->opened, 0, memory_order_relaxed);
    o->bytes_up = atomic_exchange_explicit(&c->bytes_up, 0, memory_order_relaxed);
    o->bytes_down = atomic_exchange_explicit(&c->bytes_down, 0, memory_order_relaxed);
    return o->opened || o->bytes_up || o->bytes_down;
}

/* Up to cap endpoints with counts since the last take (each count is taken once: the reader's deltas).
 * A gone endpoint no connection holds any more is read a last time and freed. */
static int pe_svc_take_eps(pe_svc *s, pe_epc_out *out, int cap) {
    int k = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n && k < cap; i++)
        if (s->ctrs[i] && pe_epc_take(s->ctrs[i], &out[k])) k++;
    pe_epc **g = &s->gone;
    while (*g && k < cap) {
        pe_epc *c = *g;
        /* no holder now means no holder ever again (a gone endpoint is never picked): read, then free */
        int last = atomic_load_explicit(&c->conns, memory_order_acquire) == 0;
        if (pe_epc_take(c, &out[k])) k++;
        if (last) {
            *g = c->next;
            free(c);
        } else {
            g = &c->next;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return k;
}

static int pe_addr_set(pe_addr *a, int family, const char *packed, int port) {
    memset(a, 0, sizeof(*a));
    if (family == 4) {
        struct sockaddr_in *x = (struct sockaddr_in *)&a->sa;
        x->sin_family = AF_INET;
        x->sin_port = htons((uint16_t)port);
        memcpy(&x->sin_addr, packed, 4);
        a->len = sizeof(*x);
    } else {
        struct sockaddr_in6 *x = (struct sockaddr_in6 *)&a->sa;
        x->sin6_family = AF_INET6;
        x->sin6_port = htons((uint16_t)port);
        memcpy(&x->sin6_addr, packed, 16);
        a->len = sizeof(*x);
    }
    return 0;
}

/* family 4/6, the packed address (4 or 16 bytes) and the port of an endpoint */
static int pe_addr_get(const pe_addr *a, char *packed, int *port) {
    if (a->sa.ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)&a->sa;
        memcpy(packed, &x->sin_addr, 4);
        *port = ntohs(x->sin_port);
        return 4;
    }
    const struct sockaddr_in6 *x = (const void *)&a->sa;
    memcpy(packed, &x->sin6_addr, 16);
    *port = ntohs(x->sin6_port);
    return 6;
}

static void pe_ip_set(pe_ip *ip, int family, const char *packed) {
    memset(ip->b, 0, 16);
    if (family == 4) {
        ip->b[10] = ip->b[11] = 0xff;
        memcpy(ip->b + 12, packed, 4);
    } else {
        memcpy(ip->b, packed, 16);
    }
}

static void pe_cidr_set(pe_cidr *c, int family, const char *packed, int prefix) {
    pe_ip_set(&c->net, family, packed);
    c->v4 = family == 4;
    c->bits = family == 4 ? 96 + prefix : prefix;
}

static size_t pe_svc_affinity_count(pe_svc *s) {
    pthread_mutex_lock(&s->mu);
    size_t n = s->aff_live;
    pthread_mutex_unlock(&s->mu);
    return n;
}

static long pe_engine_conns(pe_engine *e) { return atomic_load(&e->conns); }
static long pe_engine_fds(pe_engine *e) { return atomic_load(&e->fds); }
static unsigned long long pe_engine_pauses(pe_engine *e) { return atomic_load(&e->pauses); }

static unsigned long long pe_engine_naps(pe_engine *e) {
    unsigned long long n = 0;
    for (int i = 0; i < e->nworkers; i++) n += atomic_load(&e->workers[i].naps);
    return n;
}

static void pe_engine_set_other(pe_engine *e, long n) { atomic_store(&e->other_fds, n); }
static long pe_engine_reset_count(pe_engine *e) { return atomic_load(&e->reset_count); }
static void pe_engine_reset(pe_engine *e) {
    atomic_store(&e->reset, 1);
    for (int i = 0; i < e->nworkers; i++) pe_wake(&e->workers[i]);
}
static void pe_engine_collect(pe_engine *e) {
    pthread_mutex_lock(&e->mu);
    pthread_mutex_unlock(&e->mu);
    pe_collect(e);
}

#endif
