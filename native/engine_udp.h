/* The UDP half of proxyd's userspace engine (compiled into proxyd._engine with engine_core.h).
 *
 * Semantics are proxyd/modes/userspace/udp.py's (its pure-Python twin): one flow per (service,
 * client address), one socket connected to the endpoint per flow; the first datagram of a
 * client picks the endpoint through the service's table (pe_pick: round robin, ClientIP
 * affinity); replies read from the endpoint socket leave through the listening socket, so they
 * come from the service address, and on a wildcard (NodePort) listener from the address the
 * client used (IP_PKTINFO / IPV6_PKTINFO, as the twin sends them).
 *
 * Thread: one UDP thread with its own epoll set (level-triggered), separate from the TCP workers.
 * It owns every flow and the one flow table, so the table needs no lock per datagram and its
 * least-recently-used order is global, as the twin's is. The control thread (Python) and the UDP
 * thread share only u->mu: the UDP thread holds it while it handles one epoll batch; the control
 * thread holds it to add, reconfigure or remove a listener. A listener removed while an event
 * naming it waits is marked dead and freed after a batch, once no flow holds it.
 *
 * Datagrams move in batches: recvmmsg (up to PU_BATCH) from a listener, then sendmmsg of each run
 * of consecutive datagrams of one flow to its endpoint socket; recvmmsg from an endpoint socket,
 * then one sendmmsg of the batch to the client through the listener.
 *
 * A flow ends (as in the twin) when idle for idle_timeout, when the table is full and it is the
 * least recently used (counted in evicted), when its endpoint left the service's list (the
 * service's generation moved: checked at once when Python says the lists changed, and before
 * each datagram), when a send or receive on its socket fails (ICMP unreachable: the next
 * datagram picks again), or when the engine stops.
 */
#ifndef PROXYD_ENGINE_UDP_H
#define PROXYD_ENGINE_UDP_H

#include "engine_core.h"

#define PU_BATCH 64
#define PU_MAX_DATAGRAM 65535
#define PU_EVENTS 64
#define PU_TAG_LISTENER 0
#define PU_TAG_FLOW 1
#define PU_TAG_WAKE 2

typedef struct pu_lst {
    int fd;          /* the engine's duplicate; -1 once removed (replies of its flows are dropped) */
    pe_svc *svc;     /* the table key it feeds */
    pe_cidr *ranges; /* NULL: every source */
    int nranges;
    int refs; /* the live list and each flow (under u->mu) */
    int dead;
    struct pu_lst *next; /* live list, or graveyard */
} pu_lst;

typedef struct pu_flow {
    pe_svc *svc; /* the key (held) */
    pu_lst *lst; /* replies go out through it (held) */
    pe_epc *epc; /* the endpoint's counters (held), or NULL */
    struct sockaddr_storage client;
    socklen_t clen;
    pe_addr ep;
    unsigned char local[16]; /* the address the client used, on a wildcard listener */
    int has_local;
    int fd;
    unsigned gen; /* the service's generation when the endpoint was last known listed */
    double last;
    int dead;
    struct pu_flow *prev, *next; /* least recently used first */
    struct pu_flow *hnext;       /* hash chain */
    struct pu_flow *dnext;       /* closed this batch */
} pu_flow;

typedef struct {
    struct mmsghdr msgs[PU_BATCH];
    struct iovec iov[PU_BATCH];
    struct sockaddr_storage names[PU_BATCH];
    char ctl[PU_BATCH][CMSG_SPACE(sizeof(struct in6_pktinfo))] __attribute__((aligned(8)));
    char *bufs; /* PU_BATCH datagrams of PU_MAX_DATAGRAM bytes */
} pu_batch;

typedef struct pu_engine {
    pthread_mutex_t mu;
    pe_engine *eng; /* descriptor budget shared with the TCP engine (its fds counter) */
    pthread_t thread;
    int started;
    int ep, efd;
    atomic_int stop;
    pu_lst *listeners, *graveyard;
    pu_flow **buckets;
    size_t nbuckets;
    long max_flows;
    double idle;
    pu_flow lru; /* sentinel */
    atomic_long nflows;
    atomic_ullong evicted;
    pu_flow *dead;
    pu_batch in, out;
} pu_engine;

static uint64_t pu_hash(const pe_svc *svc, const struct sockaddr_storage *sa) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)(uintptr_t)svc;
    const unsigned char *p;
    size_t n;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)sa;
        h = (h ^ x->sin_port) * 1099511628211ULL;
        p = (const unsigned char *)&x->sin_addr;
        n = 4;
    } else {
        const struct sockaddr_in6 *x = (const void *)sa;
        h = (h ^ x->sin6_port) * 1099511628211ULL;
        p = (const unsigned char *)&x->sin6_addr;
        n = 16;
    }
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static int pu_client_eq(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    pe_addr x, y; /* a client is IPv4 or IPv6: its address fits pe_sockaddr */
    memcpy(&x.sa, a, sizeof(x.sa));
    memcpy(&y.sa, b, sizeof(y.sa));
    return pe_addr_eq(&x, &y);
}

static pu_flow **pu_slot(pu_engine *u, pe_svc *svc, const struct sockaddr_storage *client) {
    pu_flow **pp = &u->buckets[pu_hash(svc, client) & (u->nbuckets - 1)];
    while (*pp && !((*pp)->svc == svc && pu_client_eq(&(*pp)->client, client))) pp = &(*pp)->hnext;
    return pp;
}

static void pu_lru_unlink(pu_flow *f) {
    f->prev->next = f->next;
    f->next->prev = f->prev;
}

static void pu_lru_append(pu_engine *u, pu_flow *f) {
    f->prev = u->lru.prev;
    f->next = &u->lru;
    u->lru.prev->next = f;
    u->lru.prev = f;
}

/* Close a flow (its table entry, socket and holds); freed after the batch. */
static void pu_flow_close(pu_engine *u, pu_flow *f) {
    if (f->dead) return;
    f->dead = 1;
    pu_flow **pp = pu_slot(u, f->svc, &f->client);
    if (*pp == f) *pp = f->hnext;
    pu_lru_unlink(f);
    atomic_fetch_sub_explicit(&u->nflows, 1, memory_order_relaxed);
    pe_close_fd(u->eng, f->fd, 0);
    atomic_fetch_sub_explicit(&f->svc->active, 1, memory_order_relaxed);
    pe_epc_release(&f->epc);
    f->lst->refs--; /* a removed listener is on the graveyard: freed after the batch once unheld */
    f->dnext = u->dead;
    u->dead = f;
}

static void pu_free_dead(pu_engine *u) {
    while (u->dead) {
        pu_flow *f = u->dead;
        u->dead = f->dnext;
        pe_svc_unref(f->svc);
        free(f);
    }
    pu_lst **pp = &u->graveyard;
    while (*pp) {
        pu_lst *l = *pp;
        if (l->refs == 0) {
            *pp = l->next;
            pe_svc_unref(l->svc);
            free(l->ranges);
            free(l);
        } else {
            pp = &l->next;
        }
    }
}

/* Whether the flow's endpoint is still in its service's list (the generation moved since last seen). */
static int pu_flow_listed(pu_flow *f) {
    pe_svc *s = f->svc;
    unsigned gen = atomic_load_explicit(&s->gen, memory_order_acquire);
    if (gen == f->gen) return 1;
    int found = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n && !found; i++) found = pe_addr_eq(&s->eps[i], &f->ep);
    gen = atomic_load_explicit(&s->gen, memory_order_relaxed);
    pthread_mutex_unlock(&s->mu);
    if (found) f->gen = gen;
    return found;
}

/* Python changed endpoint lists: close the flows whose endpoint went (the twin's closed_by_table). */
static void pu_recheck_all(pu_engine *u) {
    pu_flow *f = u->lru.next;
    while (f != &u->lru) {
        pu_flow *nx = f->next;
        if (!pu_flow_listed(f)) pu_flow_close(u, f);
        f = nx;
    }
}

/* The live flow of (l's service, client) for a datagram that came through l, refreshed; or NULL. */
static pu_flow *pu_lookup(pu_engine *u, pu_lst *l, const struct sockaddr_storage *client, double now) {
    pu_flow *f = *pu_slot(u, l->svc, client);
    if (!f) return NULL;
    if (f->lst != l || !pu_flow_listed(f)) {
        /* another listener of the key (the twin replaces such a flow), or an endpoint that went */
        pu_flow_close(u, f);
        return NULL;
    }
    f->last = now;
    pu_lru_unlink(f);
    pu_lru_append(u, f);
    return f;
}

/* A new flow for client through l: pick, socket, connect; the least recently used flow goes if full. */
static pu_flow *pu_open(pu_engine *u, pu_lst *l, const struct sockaddr_storage *client, socklen_t clen,
                        const unsigned char *local, int has_local, double now) {
    pe_svc *s = l->svc;
    pe_ip ip;
    pe_addr ep;
    pe_epc *epc = NULL;
    pe_ip_of(client, &ip);
    unsigned gen = atomic_load_explicit(&s->gen, memory_order_acquire);
    if (!pe_pick(s, &ip, now, NULL, 0, &ep, &epc)) {
        atomic_fetch_add_explicit(&s->rejected[PE_REJ_NOEP], 1, memory_order_relaxed);
        return NULL;
    }
    if (pe_budget_full(u->eng)) {
        pe_epc_release(&epc);
        atomic_fetch_add_explicit(&s->rejected[PE_REJ_RESOURCES], 1, memory_order_relaxed);
        return NULL;
    }
    int fd = socket(ep.sa.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        pe_epc_release(&epc);
        atomic_fetch_add_explicit(&s->rejected[PE_REJ_RESOURCES], 1, memory_order_relaxed);
        return NULL;
    }
    atomic_fetch_add_explicit(&u->eng->fds, 1, memory_order_relaxed);
    if (connect(fd, (struct sockaddr *)&ep.sa, ep.len) < 0) {
        pe_close_fd(u->eng, fd, 0);
        pe_epc_release(&epc);
        atomic_fetch_add_explicit(&s->rejected[PE_REJ_FAILED], 1, memory_order_relaxed);
        return NULL;
    }
    pu_flow *f = calloc(1, sizeof(*f));
    if (!f) {
        pe_close_fd(u->eng, fd, 0);
        pe_epc_release(&epc);
        atomic_fetch_add_explicit(&s->rejected[PE_REJ_RESOURCES], 1, memory_order_relaxed);
        return NULL;
    }
    f->svc = s;
    pe_svc_ref(s);
    f->lst = l;
    l->refs++;
    f->epc = epc;
    f->client = *client;
    f->clen = clen;
    f->ep = ep;
    if (has_local) memcpy(f->local, local, 16);
    f->has_local = has_local;
    f->fd = fd;
    f->gen = gen;
    f->last = now;
    pu_flow **pp = pu_slot(u, s, client);
    if (*pp) pu_flow_close(u, *pp); /* a dead or foreign flow of this client: replaced, not evicted */
    while (atomic_load_explicit(&u->nflows, memory_order_relaxed) >= u->max_flows && u->lru.next != &u->lru) {
        pu_flow_close(u, u->lru.next);
        atomic_fetch_add_explicit(&u->evicted, 1, memory_order_relaxed);
    }
    pp = pu_slot(u, s, client);
    f->hnext = *pp;
    *pp = f;
    pu_lru_append(u, f);
    atomic_fetch_add_explicit(&u->nflows, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->opened, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->active, 1, memory_order_relaxed);
    if (epc) atomic_fetch_add_explicit(&epc->opened, 1, memory_order_relaxed);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(uintptr_t)f | PU_TAG_FLOW};
    epoll_ctl(u->ep, EPOLL_CTL_ADD, fd, &ev);
    return f;
}

static void pu_batch_prepare(pu_batch *b, int n, int with_ctl) {
    for (int i = 0; i < n; i++) {
        struct msghdr *m = &b->msgs[i].msg_hdr;
        b->iov[i].iov_base = b->bufs + (size_t)i * PU_MAX_DATAGRAM;
        b->iov[i].iov_len = PU_MAX_DATAGRAM;
        m->msg_iov = &b->iov[i];
        m->msg_iovlen = 1;
        m->msg_name = &b->names[i];
        m->msg_namelen = sizeof(b->names[i]);
        m->msg_control = with_ctl ? b->ctl[i] : NULL;
        m->msg_controllen = with_ctl ? sizeof(b->ctl[i]) : 0;
        m->msg_flags = 0;
        b->msgs[i].msg_len = 0;
    }
}

/* The destination the client used (IP_PKTINFO / IPV6_PKTINFO), as 16 bytes (IPv4: the first 4). */
static int pu_pktinfo_dst(struct msghdr *m, unsigned char *out) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof(pi));
            memset(out, 0, 16);
            memcpy(out, &pi.ipi_addr, 4);
            return 1;
        }
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof(pi));
            memcpy(out, &pi.ipi6_addr, 16);
            return 1;
        }
    }
    return 0;
}

/* Send datagrams [from, to) of the in-batch to f's endpoint (one sendmmsg for the run). */
static void pu_send_run(pu_engine *u, pu_flow *f, int from, int to) {
    /* closed meanwhile (its endpoint left the list): its descriptor number may name another socket now */
    if (f->dead) return;
    pu_batch *b = &u->in;
    struct mmsghdr out[PU_BATCH];
    int n = 0;
    for (int i = from; i < to; i++) {
        memset(&out[n], 0, sizeof(out[n]));
        b->iov[i].iov_len = b->msgs[i].msg_len;
        out[n].msg_hdr.msg_iov = &b->iov[i];
        out[n].msg_hdr.msg_iovlen = 1;
        n++;
    }
    int i = 0;
    while (i < n) {
        int r = sendmmsg(f->fd, out + i, (unsigned)(n - i), MSG_DONTWAIT);
        if (r > 0) {
            unsigned long long bytes = 0;
            for (int k = i; k < i + r; k++) bytes += out[k].msg_len;
            atomic_fetch_add_explicit(&f->svc->bytes_up, bytes, memory_order_relaxed);
            if (f->epc) atomic_fetch_add_explicit(&f->epc->bytes_up, bytes, memory_order_relaxed);
            i += r;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        /* a full socket buffer drops the rest, as a router would; any other error (ICMP unreachable
         * reported on the connected socket) ends the flow, and the client's next datagram picks again */
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) pu_flow_close(u, f);
        return;
    }
}

/* Datagrams from clients on listener l. */
static void pu_forward(pu_engine *u, pu_lst *l) {
    pu_batch *b = &u->in;
    int n;
    for (int tries = 0;; tries++) {
        pu_batch_prepare(b, PU_BATCH, 1);
        n = recvmmsg(l->fd, b->msgs, PU_BATCH, MSG_DONTWAIT, NULL);
        if (n >= 0) break;
        /* ICMP errors for replies we sent surface here; they are not fatal */
        if (errno == EAGAIN || errno == EWOULDBLOCK || tries >= PU_BATCH) return;
    }
    double now = pe_now();
    pu_flow *run = NULL;
    int start = 0;
    for (int i = 0; i < n; i++) {
        struct msghdr *m = &b->msgs[i].msg_hdr;
        const struct sockaddr_storage *client = &b->names[i];
        if (l->nranges) {
            pe_ip ip;
            pe_ip_of(client, &ip);
            int ok = 0;
            for (int k = 0; k < l->nranges && !ok; k++) ok = pe_cidr_has(&l->ranges[k], &ip, client->ss_family == AF_INET);
            if (!ok) { /* outside loadBalancerSourceRanges: dropped, as the kernel modes do */
                if (run) pu_send_run(u, run, start, i);
                run = NULL;
                continue;
            }
        }
        pu_flow *f = pu_lookup(u, l, client, now);
        if (f && f == run) continue;
        if (run) pu_send_run(u, run, start, i); /* before an open can evict the run's flow */
        run = NULL;
        if (!f) {
            unsigned char local[16];
            int has_local = pu_pktinfo_dst(m, local);
            f = pu_open(u, l, client, m->msg_namelen, local, has_local, now);
        }
        run = f;
        start = i;
    }
    if (run) pu_send_run(u, run, start, n);
}

/* Replies from f's endpoint, sent to the client from the service address (and the one it used). */
static void pu_reply(pu_engine *u, pu_flow *f) {
    pu_batch *b = &u->out;
    pu_batch_prepare(b, PU_BATCH, 0);
    int n;
    do {
        n = recvmmsg(f->fd, b->msgs, PU_BATCH, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        /* ICMP unreachable from the endpoint: the next datagram picks again */
        if (errno != EAGAIN && errno != EWOULDBLOCK) pu_flow_close(u, f);
        return;
    }
    if (!pu_flow_listed(f)) { /* the endpoint left the service: nothing of it reaches the client */
        pu_flow_close(u, f);
        return;
    }
    unsigned long long bytes = 0;
    for (int i = 0; i < n; i++) bytes += b->msgs[i].msg_len;
    atomic_fetch_add_explicit(&f->svc->bytes_down, bytes, memory_order_relaxed);
    if (f->epc) atomic_fetch_add_explicit(&f->epc->bytes_down, bytes, memory_order_relaxed);
    if (f->lst->fd < 0 || n == 0) return; /* the listener is gone: the twin's reply fails the same way */
    union {
        char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
        struct cmsghdr align;
    } ctlu;
    char *ctl = ctlu.buf;
    size_t ctllen = 0;
    if (f->has_local) {
        memset(ctl, 0, sizeof(ctlu.buf));
        struct cmsghdr *c = (struct cmsghdr *)ctl;
        if (f->client.ss_family == AF_INET6) {
            struct in6_pktinfo pi;
            memset(&pi, 0, sizeof(pi));
            memcpy(&pi.ipi6_addr, f->local, 16);
            c->cmsg_level = IPPROTO_IPV6;
            c->cmsg_type = IPV6_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof(pi));
            memcpy(CMSG_DATA(c), &pi, sizeof(pi));
            ctllen = CMSG_SPACE(sizeof(pi));
        } else {
            struct in_pktinfo pi;
            memset(&pi, 0, sizeof(pi));
            memcpy(&pi.ipi_spec_dst, f->local, 4);
            c->cmsg_level = IPPROTO_IP;
            c->cmsg_type = IP_PKTINFO;
            c->cmsg_len = CMSG_LEN(sizeof(pi));
            memcpy(CMSG_DATA(c), &pi, sizeof(pi));
            ctllen = CMSG_SPACE(sizeof(pi));
        }
    }
    for (int i = 0; i < n; i++) {
        struct msghdr *m = &b->msgs[i].msg_hdr;
        b->iov[i].iov_len = b->msgs[i].msg_len;
        m->msg_name = &f->client;
        m->msg_namelen = f->clen;
        m->msg_control = ctllen ? ctl : NULL;
        m->msg_controllen = ctllen;
        m->msg_flags = 0;
    }
    int i = 0;
    while (i < n) {
        int r = sendmmsg(f->lst->fd, b->msgs + i, (unsigned)(n - i), MSG_DONTWAIT);
        if (r > 0) {
            i += r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            i++; /* this datagram failed (the twin logs and drops it): go on with the next */
        } else {
            return;
        }
    }
}

static void pu_expire(pu_engine *u, double now) {
    while (u->lru.next != &u->lru && now - u->lru.next->last >= u->idle) pu_flow_close(u, u->lru.next);
}

static void *pu_main(void *arg) {
    pu_engine *u = arg;
    struct epoll_event evs[PU_EVENTS];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are Python's business */
    while (!atomic_load(&u->stop)) {
        double now = pe_now(), next = now + 1.0;
        pthread_mutex_lock(&u->mu);
        if (u->lru.next != &u->lru && u->lru.next->last + u->idle < next) next = u->lru.next->last + u->idle;
        pthread_mutex_unlock(&u->mu);
        int ms = next <= now ? 0 : (int)((next - now) * 1000) + 1;
        int n = epoll_wait(u->ep, evs, PU_EVENTS, ms);
        pthread_mutex_lock(&u->mu);
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            int tag = (int)(d & 3);
            void *p = (void *)(uintptr_t)(d & ~(uint64_t)3);
            if (tag == PU_TAG_LISTENER) {
                pu_lst *l = p;
                if (!l->dead) pu_forward(u, l);
            } else if (tag == PU_TAG_FLOW) {
                pu_flow *f = p;
                if (!f->dead) pu_reply(u, f);
            } else {
                uint64_t v;
                ssize_t r = read(u->efd, &v, 8);
                (void)r;
            }
        }
        pu_expire(u, pe_now());
        pu_free_dead(u);
        pthread_mutex_unlock(&u->mu);
    }
    return NULL;
}

/* ---------------------------------------------------------------- control (Python's thread) */

static void pu_wake(pu_engine *u) {
    uint64_t one = 1;
    ssize_t r = write(u->efd, &one, 8);
    (void)r;
}

static pu_engine *pu_engine_new(pe_engine *e, long max_flows, double idle) {
    pu_engine *u = calloc(1, sizeof(*u));
    if (!u) return NULL;
    pthread_mutex_init(&u->mu, NULL);
    u->eng = e;
    u->max_flows = max_flows < 1 ? 1 : max_flows;
    u->idle = idle;
    u->lru.next = u->lru.prev = &u->lru;
    u->nbuckets = 64;
    while ((long)u->nbuckets < u->max_flows) u->nbuckets *= 2;
    u->buckets = calloc(u->nbuckets, sizeof(pu_flow *));
    u->in.bufs = malloc((size_t)PU_BATCH * PU_MAX_DATAGRAM);
    u->out.bufs = malloc((size_t)PU_BATCH * PU_MAX_DATAGRAM);
    u->ep = epoll_create1(EPOLL_CLOEXEC);
    u->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = PU_TAG_WAKE};
    if (!u->buckets || !u->in.bufs || !u->out.bufs || u->ep < 0 || u->efd < 0 ||
        epoll_ctl(u->ep, EPOLL_CTL_ADD, u->efd, &ev) < 0) {
        if (u->ep >= 0) close(u->ep);
        if (u->efd >= 0) close(u->efd);
        free(u->buckets);
        free(u->in.bufs);
        free(u->out.bufs);
        pthread_mutex_destroy(&u->mu);
        free(u);
        return NULL;
    }
    return u;
}

static int pu_engine_start(pu_engine *u) {
    if (u->started) return 0;
    int err = pthread_create(&u->thread, NULL, pu_main, u);
    if (!err) u->started = 1;
    return err;
}

static void pu_engine_stop(pu_engine *u) {
    atomic_store(&u->stop, 1);
    pu_wake(u);
    if (u->started) {
        pthread_join(u->thread, NULL);
        u->started = 0;
    }
}

/* Takes ownership of fd (a bound, non-blocking UDP socket) and of ranges; holds svc. */
static pu_lst *pu_listener_add(pu_engine *u, int fd, pe_svc *svc, pe_cidr *ranges, int nranges) {
    pu_lst *l = calloc(1, sizeof(*l));
    if (!l) return NULL;
    l->fd = fd;
    l->svc = svc;
    pe_svc_ref(svc);
    l->ranges = ranges;
    l->nranges = nranges;
    l->refs = 1;
    atomic_fetch_add_explicit(&u->eng->fds, 1, memory_order_relaxed);
    pthread_mutex_lock(&u->mu);
    l->next = u->listeners;
    u->listeners = l;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(uintptr_t)l | PU_TAG_LISTENER};
    epoll_ctl(u->ep, EPOLL_CTL_ADD, fd, &ev);
    pthread_mutex_unlock(&u->mu);
    return l;
}

/* A new table key or source ranges for l (takes ranges; holds svc): flows of the old key keep
 * replying through it, as the twin's retargeted listener does; new datagrams look the new key up. */
static void pu_listener_set(pu_engine *u, pu_lst *l, pe_svc *svc, pe_cidr *ranges, int nranges) {
    pe_svc_ref(svc);
    pthread_mutex_lock(&u->mu);
    pe_svc *old = l->svc;
    pe_cidr *old_ranges = l->ranges;
    l->svc = svc;
    l->ranges = ranges;
    l->nranges = nranges;
    pthread_mutex_unlock(&u->mu);
    pe_svc_unref(old);
    free(old_ranges);
}

/* The listener stops receiving; its descriptor closes now (its flows' replies are dropped, as the
 * twin's fail on the closed socket), its memory goes once no flow and no pending event names it. */
static void pu_listener_remove(pu_engine *u, pu_lst *l) {
    pthread_mutex_lock(&u->mu);
    pu_lst **pp = &u->listeners;
    while (*pp && *pp != l) pp = &(*pp)->next;
    if (*pp) *pp = l->next;
    epoll_ctl(u->ep, EPOLL_CTL_DEL, l->fd, NULL);
    pe_close_fd(u->eng, l->fd, 0);
    l->fd = -1;
    l->dead = 1;
    l->refs--;
    l->next = u->graveyard;
    u->graveyard = l;
    if (!u->started) pu_free_dead(u); /* no thread: no event can name it */
    pthread_mutex_unlock(&u->mu);
}

/* Endpoint lists changed: the flows whose endpoint left close now, before the caller goes on (as the
 * twin's set_endpoints closes them), so an endpoint removed and put back at once still ends them. The
 * UDP thread skips a closed flow's pending events and frees it after its batch. */
static void pu_recheck(pu_engine *u) {
    pthread_mutex_lock(&u->mu);
    pu_recheck_all(u);
    if (!u->started) pu_free_dead(u); /* no thread: no event can name it */
    pthread_mutex_unlock(&u->mu);
}

static void pu_engine_free(pu_engine *u) {
    pu_engine_stop(u);
    pthread_mutex_lock(&u->mu);
    while (u->lru.next != &u->lru) pu_flow_close(u, u->lru.next);
    while (u->listeners) {
        pu_lst *l = u->listeners;
        u->listeners = l->next;
        epoll_ctl(u->ep, EPOLL_CTL_DEL, l->fd, NULL);
        pe_close_fd(u->eng, l->fd, 0);
        l->fd = -1;
        l->dead = 1;
        l->refs--;
        l->next = u->graveyard;
        u->graveyard = l;
    }
    pu_free_dead(u);
    pthread_mutex_unlock(&u->mu);
    close(u->ep);
    close(u->efd);
    free(u->buckets);
    free(u->in.bufs);
    free(u->out.bufs);
    pthread_mutex_destroy(&u->mu);
    free(u);
}

/* Close every flow now (shutdown); counted as closed, not evicted. */
static void pu_close_flows(pu_engine *u) {
    pthread_mutex_lock(&u->mu);
    while (u->lru.next != &u->lru) pu_flow_close(u, u->lru.next);
    if (!u->started) pu_free_dead(u);
    pthread_mutex_unlock(&u->mu);
    pu_wake(u); /* the thread frees them after its batch */
}

static long pu_flows(pu_engine *u) { return atomic_load(&u->nflows); }
static unsigned long long pu_evicted(pu_engine *u) { return atomic_load(&u->evicted); }

#endif
