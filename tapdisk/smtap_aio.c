/* libsmtap-aio: the engine's I/O queue, one per NBD connection, so that Python
   (ctypes, GIL released during each call) pays one crossing per loop turn: a call hands
   over the requests parsed since the last one, submits what fits, and returns the
   completions there are (waiting for one, or for the client's socket, if asked).

   Two back ends behind one interface, chosen when a queue is opened:
   - io_uring, through its raw system calls (no liburing: nothing new for the RPM to
     depend on), where the kernel has it (5.1+);
   - Linux native AIO (libaio), on dom0's 4.19: completions are reaped from the ring
     the kernel maps into the process (as fio's userspace_reap), an eventfd tells
     poll() about them.
   A plain shared library: no Python ABI, the same object serves every interpreter; it
   needs libaio and glibc symbols no newer than el7's 2.17. And fstatfs's f_type. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <libaio.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "smtap_aio.h"

#define QUEUE_DEPTH 127         /* I/Os in the kernel per queue (io_uring: one entry more
                                   of its 128 for the socket's poll) */

enum { BACKEND_AUTO = 0, BACKEND_LIBAIO = 1, BACKEND_URING = 2 };
int smtap_aio_depth(void) { return QUEUE_DEPTH; }

/* The file system type of fd (fstatfs f_type; struct statfs is the C library's to lay
   out), or -errno. */
long long smtap_fs_type(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st))
        return -errno;
    return (long long)st.f_type;
}

/* ---- io_uring ABI (linux/io_uring.h, 5.1), declared here: el7's headers lack it ---- */
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#endif
#define IORING_OFF_SQ_RING 0ULL
#define IORING_OFF_CQ_RING 0x8000000ULL
#define IORING_OFF_SQES 0x10000000ULL
#define IORING_ENTER_GETEVENTS 1U
#define IORING_FEAT_SINGLE_MMAP 1U
#define IORING_OP_READV 1
#define IORING_OP_WRITEV 2
#define IORING_OP_POLL_ADD 6
#define POLL_TAG (~0ULL)         /* user_data of the socket's poll */

struct uring_sqe {
    uint8_t opcode, flags;
    uint16_t ioprio;
    int32_t fd;
    uint64_t off, addr;
    uint32_t len;
    uint32_t op_flags;          /* rw_flags, poll32_events (little-endian: poll_events) */
    uint64_t user_data;
    uint64_t pad[3];
};
struct uring_cqe { uint64_t user_data; int32_t res; uint32_t flags; };
struct uring_sq_offsets { uint32_t head, tail, ring_mask, ring_entries, flags, dropped,
                          array, resv1; uint64_t resv2; };
struct uring_cq_offsets { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes,
                          flags, resv1; uint64_t resv2; };
struct uring_params { uint32_t sq_entries, cq_entries, flags, sq_thread_cpu,
                      sq_thread_idle, features, wq_fd, resv[3];
                      struct uring_sq_offsets sq_off; struct uring_cq_offsets cq_off; };

/* ---- libaio's completion ring as the kernel maps it (fs/aio.c) ---- */
#define AIO_RING_MAGIC 0xa10a10a1
struct aio_ring { unsigned id, nr, head, tail, magic, compat_features, incompat_features,
                  header_length; struct io_event io_events[]; };

struct smtap_queue {
    int backend;
    int inflight;               /* I/Os the kernel has */
    struct sreq *backlog;       /* given, not submitted yet (no free slot) */
    int nback, backhead, backcap;
    long long tags[QUEUE_DEPTH], lens[QUEUE_DEPTH];     /* per slot */
    int freeslots[QUEUE_DEPTH], nfree;
    /* libaio */
    io_context_t ctx;
    int efd;
    struct iocb cbs[QUEUE_DEPTH];
    struct iocb *ptrs[QUEUE_DEPTH];
    /* io_uring */
    int rfd, poll_armed;
    unsigned sq_local;          /* our tail: entries written, published on submission */
    void *sq_map, *cq_map;
    size_t sq_size, cq_size;
    struct uring_sqe *sqes;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct uring_cqe *cqes;
    struct iovec iov[QUEUE_DEPTH];
    /* the caller's arrays (smtap_queue_buffers) */
    const long long *sub;
    long long *done;
    int maxdone;
};

static int uring_open(smtap_queue *q)
{
    struct uring_params p;
    memset(&p, 0, sizeof(p));
    /* room for the socket's poll beside a full load of I/O */
    int fd = (int)syscall(__NR_io_uring_setup, QUEUE_DEPTH + 1, &p);
    if (fd < 0)
        return -errno;
    q->rfd = fd;
    q->sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    q->cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP && q->cq_size > q->sq_size)
        q->sq_size = q->cq_size;
    q->sq_map = mmap(NULL, q->sq_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                     IORING_OFF_SQ_RING);
    if (q->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        q->cq_map = q->sq_map;
    } else {
        q->cq_map = mmap(NULL, q->cq_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                         IORING_OFF_CQ_RING);
        if (q->cq_map == MAP_FAILED)
            goto fail;
    }
    q->sqes = mmap(NULL, p.sq_entries * sizeof(struct uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED, fd, IORING_OFF_SQES);
    if (q->sqes == MAP_FAILED) {
        q->sqes = NULL;
        goto fail;
    }
    char *sq = q->sq_map, *cq = q->cq_map;
    q->sq_head = (unsigned *)(sq + p.sq_off.head);
    q->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    q->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    q->sq_array = (unsigned *)(sq + p.sq_off.array);
    q->cq_head = (unsigned *)(cq + p.cq_off.head);
    q->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    q->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    q->cqes = (struct uring_cqe *)(cq + p.cq_off.cqes);
    q->sq_local = *q->sq_tail;
    return 0;
fail:;
    int err = errno;
    if (q->cq_map && q->cq_map != MAP_FAILED && q->cq_map != q->sq_map)
        munmap(q->cq_map, q->cq_size);
    if (q->sq_map && q->sq_map != MAP_FAILED)
        munmap(q->sq_map, q->sq_size);
    q->sq_map = q->cq_map = NULL;
    close(fd);
    q->rfd = -1;
    return -err;
}

static int libaio_open(smtap_queue *q)
{
    int r = io_setup(QUEUE_DEPTH, &q->ctx);
    if (r < 0)
        return r;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        r = -errno;
        io_destroy(q->ctx);
        return r;
    }
    return 0;
}

/* A queue on `backend` (AUTO: io_uring if the kernel has it, else libaio). Returns the
   back end it got (1 libaio, 2 io_uring) or -errno; *out the queue. */
int smtap_queue_open(int backend, smtap_queue **out)
{
    smtap_queue *q = calloc(1, sizeof(*q));
    int r = -EINVAL;
    if (!q)
        return -ENOMEM;
    q->rfd = q->efd = -1;
    q->nfree = QUEUE_DEPTH;
    for (int i = 0; i < QUEUE_DEPTH; i++)
        q->freeslots[i] = QUEUE_DEPTH - 1 - i;
    if (backend == BACKEND_URING || backend == BACKEND_AUTO) {
        r = uring_open(q);
        if (r == 0)
            q->backend = BACKEND_URING;
    }
    if (q->backend == 0 && (backend == BACKEND_LIBAIO || backend == BACKEND_AUTO)) {
        r = libaio_open(q);
        if (r == 0)
            q->backend = BACKEND_LIBAIO;
    }
    if (q->backend == 0) {
        free(q);
        return r;
    }
    *out = q;
    return q->backend;
}

static int uring_reap(smtap_queue *q, long long *done, int *ndone, int maxdone, int *flags);

/* Close a queue. The caller waited for every I/O first (their buffers are its), unless
   a call failed: then what is still in flight is waited for here (libaio's io_destroy
   does so itself; closing an io_uring would not), so that the C loop may drop the guard
   counts of its requests after this (smtap_nbd_release). A ring that fails here too
   is closed as it is. */
void smtap_queue_close(smtap_queue *q)
{
    if (!q)
        return;
    if (q->backend == BACKEND_URING) {
        long long done[2 * 64];
        while (q->inflight > 0) {
            int ndone = 0, flags = 0;
            uring_reap(q, done, &ndone, 64, &flags);
            if (q->inflight > 0 && syscall(__NR_io_uring_enter, q->rfd, 0, 1,
                                           IORING_ENTER_GETEVENTS, NULL, 0) < 0
                    && errno != EINTR)
                break;
        }
        munmap(q->sqes, (*q->sq_mask + 1) * sizeof(struct uring_sqe));
        if (q->cq_map != q->sq_map)
            munmap(q->cq_map, q->cq_size);
        munmap(q->sq_map, q->sq_size);
        close(q->rfd);
    } else {
        io_destroy(q->ctx);
        close(q->efd);
    }
    free(q->backlog);
    free(q);
}

static int backlog_add(smtap_queue *q, const struct sreq *r, int n)
{
    if (q->backhead && q->backhead == q->nback)
        q->backhead = q->nback = 0;
    if (q->nback + n > q->backcap) {
        if (q->backhead) {          /* slide what is left to the front */
            memmove(q->backlog, q->backlog + q->backhead,
                    (q->nback - q->backhead) * sizeof(*r));
            q->nback -= q->backhead;
            q->backhead = 0;
        }
        if (q->nback + n > q->backcap) {
            int cap = q->backcap ? q->backcap : 64;
            while (cap < q->nback + n)
                cap *= 2;
            struct sreq *b = realloc(q->backlog, cap * sizeof(*r));
            if (!b)
                return -ENOMEM;
            q->backlog = b;
            q->backcap = cap;
        }
    }
    memcpy(q->backlog + q->nback, r, n * sizeof(*r));
    q->nback += n;
    return 0;
}

/* A buffered I/O done here and now: bytes done (short only at the end of the file) or
   -errno. */
static long long inline_io(const struct sreq *r)
{
    long long done = 0;
    char *p = (char *)(intptr_t)r->addr;
    while (done < r->len) {
        ssize_t k = (r->op & 1) ? pwrite((int)r->fd, p + done, r->len - done, r->off + done)
                                : pread((int)r->fd, p + done, r->len - done, r->off + done);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return done ? done : -errno;
        }
        if (k == 0)
            break;
        done += k;
    }
    return done;
}

/* A completion as the caller sees it: 0 done in full, else -errno (-ENODATA: short,
   the end of the file) */
static long long status(long long res, long long len)
{
    return res == len ? 0 : res < 0 ? res : -ENODATA;
}

/* Move backlog requests into free slots (prepared, not submitted yet); inline ones run
   at once, their completions into done. Returns how many slots were filled. */
static int fill(smtap_queue *q, long long *done, int *ndone, int maxdone)
{
    int filled = 0;
    while (q->backhead < q->nback && *ndone < maxdone) {
        struct sreq *r = &q->backlog[q->backhead];
        if ((r->op & OP_INLINE) && (q->backend == BACKEND_LIBAIO || (r->op & OP_WRITE))) {
            done[2 * *ndone] = r->tag;
            done[2 * *ndone + 1] = status(inline_io(r), r->len);
            (*ndone)++;
            q->backhead++;
            continue;
        }
        if (!q->nfree)
            break;
        int slot = q->freeslots[--q->nfree];
        q->tags[slot] = r->tag;
        q->lens[slot] = r->len;
        if (q->backend == BACKEND_URING) {
            unsigned idx = q->sq_local++ & *q->sq_mask;
            struct uring_sqe *sqe = &q->sqes[idx];
            memset(sqe, 0, sizeof(*sqe));
            q->iov[slot].iov_base = (void *)(intptr_t)r->addr;
            q->iov[slot].iov_len = (size_t)r->len;
            sqe->opcode = (r->op & 1) ? IORING_OP_WRITEV : IORING_OP_READV;
            sqe->fd = (int32_t)r->fd;
            sqe->off = (uint64_t)r->off;
            sqe->addr = (uint64_t)(uintptr_t)&q->iov[slot];
            sqe->len = 1;
            sqe->user_data = (uint64_t)slot;
            q->sq_array[idx] = idx;
        } else {
            struct iocb *cb = &q->cbs[slot];
            if (r->op & 1)
                io_prep_pwrite(cb, (int)r->fd, (void *)(intptr_t)r->addr, (size_t)r->len, r->off);
            else
                io_prep_pread(cb, (int)r->fd, (void *)(intptr_t)r->addr, (size_t)r->len, r->off);
            io_set_eventfd(cb, q->efd);
            cb->data = (void *)(intptr_t)slot;
            q->ptrs[filled] = cb;
        }
        filled++;
        q->backhead++;
    }
    return filled;
}

static void complete(smtap_queue *q, int slot, long long res, long long *done, int *ndone)
{
    done[2 * *ndone] = q->tags[slot];
    done[2 * *ndone + 1] = status(res, q->lens[slot]);
    (*ndone)++;
    q->freeslots[q->nfree++] = slot;
    q->inflight--;
}

/* ---- io_uring: submit and wait in one io_uring_enter ---- */
static int uring_reap(smtap_queue *q, long long *done, int *ndone, int maxdone, int *flags)
{
    unsigned head = *q->cq_head;
    unsigned tail = __atomic_load_n(q->cq_tail, __ATOMIC_ACQUIRE);
    int n = 0;
    while (head != tail && *ndone < maxdone) {
        struct uring_cqe *cqe = &q->cqes[head & *q->cq_mask];
        if (cqe->user_data == POLL_TAG) {
            q->poll_armed = 0;
            *flags |= FLAG_READABLE;
        } else {
            complete(q, (int)cqe->user_data, cqe->res, done, ndone);
            n++;
        }
        head++;
    }
    __atomic_store_n(q->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

static int uring_run(smtap_queue *q, int wait, int sockfd, long long *done, int *ndone,
                     int maxdone, int *flags)
{
    q->inflight += fill(q, done, ndone, maxdone);
    if (wait == WAIT_IO_OR_SOCKET && sockfd >= 0 && !q->poll_armed && q->inflight) {
        unsigned idx = q->sq_local++ & *q->sq_mask;
        struct uring_sqe *sqe = &q->sqes[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->opcode = IORING_OP_POLL_ADD;
        sqe->fd = sockfd;
        sqe->op_flags = POLLIN;
        sqe->user_data = POLL_TAG;
        q->sq_array[idx] = idx;
        q->poll_armed = 1;
    }
    /* the entries are written before the kernel sees the tail */
    __atomic_store_n(q->sq_tail, q->sq_local, __ATOMIC_RELEASE);
    for (;;) {
        uring_reap(q, done, ndone, maxdone, flags);
        unsigned to_submit = q->sq_local - __atomic_load_n(q->sq_head, __ATOMIC_ACQUIRE);
        int block = wait && !*ndone && !(*flags & FLAG_READABLE) && q->inflight > 0;
        if (!to_submit && !block)
            return 0;
        if (syscall(__NR_io_uring_enter, q->rfd, to_submit, block ? 1 : 0,
                    block ? IORING_ENTER_GETEVENTS : 0, NULL, 0) < 0 &&
                errno != EINTR && errno != EAGAIN && errno != EBUSY)
            return -errno;
    }
}

/* ---- libaio: io_submit, then the mapped ring; poll() on the socket and the eventfd ---- */
static int aio_reap(smtap_queue *q, long long *done, int *ndone, int maxdone)
{
    struct aio_ring *ring = (struct aio_ring *)q->ctx;
    int n = 0;
    if (ring->magic == AIO_RING_MAGIC && !ring->incompat_features) {
        unsigned head = ring->head;
        unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
        while (head != tail && *ndone < maxdone) {
            struct io_event *ev = &ring->io_events[head];
            complete(q, (int)(intptr_t)ev->data, (long long)(long)ev->res, done, ndone);
            head = (head + 1) % ring->nr;
            n++;
        }
        __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
        return n;
    }
    struct io_event evs[QUEUE_DEPTH];
    struct timespec zero = {0, 0};
    int room = maxdone - *ndone;
    int r = io_getevents(q->ctx, 0, room < QUEUE_DEPTH ? room : QUEUE_DEPTH, evs, &zero);
    for (int i = 0; i < r; i++)
        complete(q, (int)(intptr_t)evs[i].data, (long long)(long)evs[i].res, done, ndone);
    return r;
}

static int aio_run(smtap_queue *q, int wait, int sockfd, long long *done, int *ndone,
                   int maxdone, int *flags)
{
    int filled = fill(q, done, ndone, maxdone), sub = 0;
    while (sub < filled) {
        int r = io_submit(q->ctx, filled - sub, q->ptrs + sub);
        if (r > 0) {
            sub += r;
            q->inflight += r;
            continue;
        }
        if (r == -EINTR)
            continue;
        if (r == 0)
            r = -EAGAIN;
        for (int i = sub; i < filled; i++) {    /* cannot submit: they fail */
            int slot = (int)(intptr_t)q->ptrs[i]->data;
            q->inflight++;
            complete(q, slot, r, done, ndone);
        }
        break;
    }
    for (;;) {
        int r = aio_reap(q, done, ndone, maxdone);
        if (r < 0)
            return r;
        if (!wait || *ndone || q->inflight == 0)
            return 0;
        if (wait == WAIT_IO || sockfd < 0) {
            struct io_event evs[QUEUE_DEPTH];
            r = io_getevents(q->ctx, 1, QUEUE_DEPTH < maxdone - *ndone ? QUEUE_DEPTH
                             : maxdone - *ndone, evs, NULL);
            if (r == -EINTR)
                continue;
            if (r < 0)
                return r;
            for (int i = 0; i < r; i++)
                complete(q, (int)(intptr_t)evs[i].data, (long long)(long)evs[i].res,
                         done, ndone);
            return 0;
        }
        struct pollfd fds[2] = {{q->efd, POLLIN, 0}, {sockfd, POLLIN, 0}};
        r = poll(fds, 2, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[0].revents) {
            uint64_t count;
            if (read(q->efd, &count, sizeof(count)) < 0 && errno != EAGAIN)
                return -errno;
        }
        if (fds[1].revents) {
            *flags |= FLAG_READABLE;
            aio_reap(q, done, ndone, maxdone);
            return 0;
        }
    }
}

/* The caller's arrays, given once: sub holds the requests a smtap_queue_run passes
   (6 long longs each: op, fd, offset, length, buffer address, tag), done gets up to
   maxdone (tag, status) pairs. */
void smtap_queue_buffers(smtap_queue *q, const long long *sub, long long *done, int maxdone)
{
    q->sub = sub;
    q->done = done;
    q->maxdone = maxdone;
}

/* One turn of a connection's loop (four arguments: each costs the caller, ctypes).
   The n requests in sub are queued behind any not submitted yet and as many as there
   are free slots are submitted (OP_INLINE ones may run here, libaio). Completions go to
   done as (tag, status) pairs (status 0: done in full, else -errno; -ENODATA: short,
   past the end of the file); with wait, at least one, blocking for it if any I/O is
   outstanding (WAIT_IO_OR_SOCKET: or until sockfd is readable). Returns twice the
   number of completions, plus FLAG_READABLE if the socket became readable; or -errno
   (the queue is then unusable). */
int smtap_queue_run(smtap_queue *q, int n, int wait, int sockfd)
{
    return smtap_queue_submit(q, (const struct sreq *)q->sub, n, wait, sockfd, q->done,
                              q->maxdone);
}

int smtap_queue_submit(smtap_queue *q, const struct sreq *sub, int n, int wait, int sockfd,
                       long long *done, int maxdone)
{
    int ndone = 0, flags = 0, r;
    if (n > 0 && (r = backlog_add(q, sub, n)) < 0)
        return r;
    if (q->backhead == q->nback && !q->inflight)
        wait = WAIT_NONE;       /* nothing to wait for */
    r = q->backend == BACKEND_URING
        ? uring_run(q, wait, sockfd, done, &ndone, maxdone, &flags)
        : aio_run(q, wait, sockfd, done, &ndone, maxdone, &flags);
    if (r < 0)
        return r;
    return 2 * ndone + flags;
}
