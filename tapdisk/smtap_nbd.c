/* smtap_nbd.c (libsmtap-aio): the NBD transmission loop's common case, in C.

   tapdisk/nbd.py's Session calls smtap_nbd_serve() through ctypes (the GIL released for
   the whole call, so connections run in parallel) when its connection has nothing in
   flight and every image of its chain tells where its data is (Driver.c_image, one
   struct smtap_image each, the leaf first): a raw file (the data of disk offset x at
   offset x of a descriptor), a block map (a VHD's BAT and bitmaps, qcow2's L2
   entries: per block its file offset, with a partial block's sector bitmap, "absent:
   ask the parent", "zeros" or "unknown: ask the driver") or a RAM disk's mapping. Like nbdkit's server/protocol.c it then receives, checks,
   handles and replies itself: READ, WRITE (FUA: fdatasync before the reply) and FLUSH
   where locate() finds the data in one place (a write: in the leaf, where nothing of
   the format's metadata changes, or in a block C allocates from the driver's reserve:
   struct smtap_alloc); pipelined requests go on the connection's I/O queue
   (smtap_aio.c), each answered as its own I/O completes, the replies of a turn in one
   sendmsg.

   Python stays the reference implementation: whatever is not that case (another
   command, a request failing a check, a range or alignment it does not take, a block
   the map does not know or that needs metadata changed, the VBD's pause gate raised)
   C does not start. It drains what it has in flight, sends those
   replies and returns; the receive buffer (Python's, shared) then starts with the bytes
   it did not consume, and Python's loop takes them. A request whose I/O failed is
   handed back unanswered (failed[]): Python redoes it on its path (retries, errno
   mapping, accounting of failures) and answers it.

   The pause gate (tapdisk/vbd.py): a pause sets gate->held (smtap_gate_set: a full
   barrier after the store), then reads each client's busy. Python sets busy before
   calling here; C leaves it set while it works, so a pause waits for it, and C sees
   held before it starts another request (it drains and returns; Python parks). C
   clears busy only to wait for the client with nothing in flight, in the order of
   Python's own loop: busy = 0, a full barrier, read held (raised: return, Python tells
   the pause); after the recv busy = 1, a full barrier, read held and the gate's
   generation (a pause came, perhaps a resume too, while C waited: the descriptor may
   be another file's now; return without touching it). Whichever of the pause and C
   comes second sees the other's store. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sched.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "smtap_aio.h"

/* the protocol (doc/proto.md), as tapdisk/nbdframe.py names it */
#define REQUEST_MAGIC 0x25609513U
#define SIMPLE_MAGIC 0x67446698U
#define STRUCTURED_MAGIC 0x668e33efU
#define REQUEST_SIZE 28
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_FLUSH 3
#define FLAG_FUA 1U
#define FLAG_DF 4U
#define READ_FLAGS (FLAG_FUA | FLAG_DF)
#define WRITE_FLAGS FLAG_FUA
#define REPLY_FLAG_DONE 1
#define REPLY_TYPE_OFFSET_DATA 1
#define REPLY_TYPE_OFFSET_HOLE 2
#define MAX_REQUEST (32LL << 20)

#define SLOTS 256               /* requests started and not answered (nbd.MAX_INFLIGHT) */
#define NCLASS 14               /* buffers of 4 KiB << 0..13 (up to MAX_REQUEST) */
#define DONE_MAX 256            /* completions per queue call */
#define PIPELINE_TURNS 256      /* as nbd.py: watch the socket that long after QD > 1 */
#define MAX_SEGS 64             /* places one read is put together from, at most */
#define SUBS (4 * SLOTS)        /* I/Os given to the queue per turn */
#define WAIT_SUBS 2             /* loop.waiting: subs[] is full */

#ifndef __NR_preadv2
#define __NR_preadv2 327        /* x86_64; el7's headers may lack it */
#endif
#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

/* why smtap_nbd_serve returned (< 0: -errno of the socket, the session ends) */
enum { RET_PYTHON = 1,          /* buf starts with a request C does not take (or failed[]) */
       RET_HELD = 2,            /* the pause gate is raised, or was while C waited */
       RET_IDLE = 3,            /* no request for the socket's receive timeout */
       RET_EOF = 4,             /* the client went away */
       RET_GROW = 5 };          /* the receive buffer is too small (a write) or was full */

struct smtap_gate { int held, gen; };           /* the VBD's (vbd.VBD.gate) */
struct smtap_client { int busy, inflight; };    /* what the gate sees (vbd.Client) */

/* Where an image's data is (native.CImage; the driver keeps what the pointers point
   at and changes entries only in ways a request in flight may see either side of). */
enum { IMG_FILE = 1, IMG_BLOCKS = 2, IMG_MEM = 3 };
/* IMG_BLOCKS entries, PAGE_ENTRIES per page; a NULL page: all unknown */
#define E_UNKNOWN 0LL           /* the driver's path: a partial block, metadata to read */
#define E_ABSENT 1LL            /* not in this image: the parent's (zeros past the last) */
#define E_ZERO 2LL              /* reads zeros */
#define E_DATA 4LL              /* | file offset (512-aligned) of the block's first byte */
#define E_WRITABLE 8LL          /* ... written in place with nothing else to change */
#define E_BITMAP 16LL           /* ... a partial block: per sector, here or the parent's,
                                   as its bitmap (bitmaps[], the same pages) says */
#define E_BUSY 32LL             /* | E_ABSENT or E_ZERO: C allocates the block (reads: as
                                   before; writes: after it) */
#define E_FLAGS 63LL
#define PAGE_BITS 12
#define PAGE_ENTRIES (1LL << PAGE_BITS)

/* A leaf whose driver lets C allocate blocks (qcow2 clusters; native.CAlloc): a write
   into one block the map says the leaf lacks (E_ABSENT, E_ZERO), in an L2 table of its
   own (l2off), takes a block of the reserve (refcounted by the driver, linked
   nowhere), writes it whole (the chain's data around the request's), then its L2 entry
   (through the page cache, as the driver writes its tables: a kill -9 keeps it), maps
   it E_DATA | E_WRITABLE and logs (block, host) for the driver, which puts it in its
   cached tables before it looks at them again; then the reply goes. The map, the
   reserve and the log have one writer at a time: C allocates only while one
   connection has joined the image (users == 1, its own thread, whose Python runs only
   once C drained); a second one's join waits until no C allocation is in flight
   (smtap_alloc_join). */
struct smtap_alloc {
    long long users;            /* connections joined */
    long long inflight;         /* C's allocations started and not logged */
    long long *reserve;         /* host offsets, taken from the top */
    long long nreserve;
    long long *log;             /* (block, host) pairs; block -1: a host lost (drain) */
    long long nlog, logcap;     /* pairs logged; room for */
    long long *absent_page;     /* the map's shared page of E_ABSENT entries: read only */
    long long *l2off;           /* per L1 entry: its L2 table's offset, 0: none of its own */
    long long nl1, l2bits;      /* L1 entries; log2 of the entries per table */
    long long meta_fd;          /* the descriptor the driver writes its tables through */
};

struct smtap_image {
    long long kind;
    long long size;             /* its virtual size: past it a (shorter) parent holds nothing */
    long long mask;             /* O_DIRECT's alignment - 1 of fd */
    long long *const *pages;    /* IMG_BLOCKS: npages pointers */
    long long npages;
    long long *const *bitmaps;  /* IMG_BLOCKS: pages as pages', the address of each
                                   E_BITMAP block's sector bitmap (bits set only, the
                                   driver's memory for the image's life; NULL: none) */
    char *base;                 /* IMG_MEM: the disk's mapping */
    const unsigned char *alloc; /* IMG_MEM: per block, 1: holds memory (writes need it) */
    unsigned char *dirty;       /* IMG_MEM: per block, set after a write (NULL: volatile) */
    long long *guard;           /* a leaf whose driver gives blocks back (qcow2 clusters,
                                   RAM chunks): smtap_guard_wait; NULL: they never move */
    struct smtap_alloc *allocator;  /* a leaf C may allocate blocks of; NULL: none */
    int fd, direct;             /* the data's descriptor (-1: none); O_DIRECT */
    int shift, shared;          /* log2 of a block's size; IMG_MEM: reads need alloc too */
};

struct smtap_failed {           /* a request whose I/O failed, handed back unanswered */
    long long kind;
    unsigned long long handle;
    long long offset, length, flags, addr, error;
};

/* One connection's loop, laid out as native.NbdLoop (ctypes). Python sets the first
   part (at a chain change; have before each call), C the rest. */
struct smtap_nbd {
    char *buf;                  /* the receive buffer (Python's) */
    long long cap, have;        /* its size; the bytes in it (in and out) */
    long long grow;             /* a buffer filled up below this size: RET_GROW */
    smtap_queue *queue;
    struct smtap_gate *gate;
    struct smtap_client *client;
    long long *acct;            /* Chain.counters(): C adds to them */
    long long size;             /* the export's */
    long long max_inflight, max_bytes;
    struct smtap_image *images; /* the chain, the leaf first */
    long long nimages;
    int sockfd, readonly, structured, nfailed;
    struct smtap_failed failed[SLOTS];
    void *priv;                 /* struct loop, C's; smtap_nbd_release frees it */
};

/* accounting, as image.Chain.counters() */
enum { SECS_READ, SECS_WRITTEN, READS, WRITES, READ_FAILS, WRITE_FAILS, SERVED_C };

/* where a request's data is */
enum { AT_PYTHON, AT_FILE, AT_MEM, AT_ZERO, AT_ALLOC, AT_WAIT };
/* a write allocating its block (slot.alloc) */
enum { ALLOC_NONE, ALLOC_COPYING, ALLOC_WRITING };

/* A run of a read in one place: its bytes [pos, pos + len) of the request, at phys
   of fd (AT_FILE), of the leaf's mapping (AT_MEM), or zeros (AT_ZERO). */
struct seg {
    long long pos, len, phys, mask;
    int kind, fd, direct;
};

struct slot {
    int kind, cls;
    unsigned flags;
    unsigned char handle[8];    /* the client's, as it sent it */
    long long offset, length;
    long long phys;             /* a write's place: offset phys of fd */
    int fd, direct;
    int pin;                    /* the guard's count it holds (1, 2; 0: none) */
    int parts;                  /* its I/Os given to the queue and not completed */
    long long status;           /* the first of them that failed (-errno), else 0 */
    char *data;                 /* a read's or write's buffer */
    unsigned char head[32];     /* the reply's header */
    int hlen;
    int hole;                   /* a read of zeros, answered by an OFFSET_HOLE chunk */
    long long cost;             /* its buffer's bytes, as l->bytes counts them */
    int alloc;                  /* ALLOC_*: data is the new block's content, the
                                   request's bytes at inner */
    long long inner, block, old;    /* ... the block, its entry before */
    long long *ep;              /* ... where the map keeps that entry */
};

struct loop {
    struct slot slots[SLOTS];
    int free[SLOTS], nfree;
    int ready[SLOTS], nready;   /* answered, to send */
    int failed[SLOTS], nfail;   /* handed back: freed at the next call */
    int nio;                    /* I/Os given to the queue */
    long long completed;        /* ... and completed, ever (drain) */
    long long bytes;            /* the buffers' size of the slots they are for */
    struct sreq subs[SUBS];
    int nsubs;
    long long done[2 * DONE_MAX];
    struct seg segs[MAX_SEGS];  /* the read dispatch() maps */
    char *pool[NCLASS];         /* free buffers per class, linked through their first bytes */
    int pipelined, nowait_off, stop;
    int waiting;                /* dispatch left a complete request for later (1: for
                                   I/O to complete; WAIT_SUBS: for subs[] to be given) */
};

int smtap_nbd_sizeof(void) { return (int)sizeof(struct smtap_nbd); }
int smtap_image_sizeof(void) { return (int)sizeof(struct smtap_image); }
int smtap_alloc_sizeof(void) { return (int)sizeof(struct smtap_alloc); }

/* The guard of a leaf whose driver frees blocks that a later allocation reuses: a C
   request holds guard[1 + epoch parity] from before it looks its block up until its
   I/O completed. The driver, having changed the map (under its lock, one caller at a
   time), moves the epoch on and waits until the requests of the old parity are done:
   those that looked the block up before the change. Whichever of the epoch's move
   and a request's count comes first, the other sees it (full barriers on both sides):
   a request counted in the old parity is waited for, one that sees the new epoch looks
   the block up after the change. Called without the GIL (ctypes); C's I/O completes
   without Python, so the wait is short and cannot deadlock. */
static void wait_zero(long long *count)
{
    for (int spin = 0; __atomic_load_n(count, __ATOMIC_SEQ_CST); spin++) {
        if (spin < 64) {
            sched_yield();
        } else {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
}

void smtap_guard_wait(long long *g)
{
    long long e = __atomic_fetch_add(&g[0], 1, __ATOMIC_SEQ_CST);
    wait_zero(&g[1 + (e & 1)]);
}

/* A connection that will serve an image C may allocate in (its Python included). The
   second one waits for C's allocations in flight (their I/O completes without Python):
   then no other thread's C allocates (it counts itself in flight before it reads
   users, as the join counts itself before it reads inflight: full barriers, one sees
   the other), and what they logged the driver links before it reads its tables. */
void smtap_alloc_join(struct smtap_alloc *a)
{
    if (__atomic_add_fetch(&a->users, 1, __ATOMIC_SEQ_CST) > 1)
        wait_zero(&a->inflight);
}

void smtap_alloc_part(struct smtap_alloc *a)
{
    __atomic_sub_fetch(&a->users, 1, __ATOMIC_SEQ_CST);
}

/* An allocation's end: its block mapped and logged for the driver (done), or the map
   as it was and the block back to the reserve (its I/O failed and is over), or lost
   (its I/O may still land: the driver frees it at close). */
enum { ALLOC_DONE, ALLOC_UNDONE, ALLOC_LOST };

static void alloc_end(struct smtap_image *m, struct slot *s, int how)
{
    struct smtap_alloc *a = m->allocator;
    long long host = s->phys;
    if (how == ALLOC_DONE || how == ALLOC_LOST) {
        long long *e = &a->log[2 * a->nlog];
        e[0] = how == ALLOC_DONE ? s->block : -1;
        e[1] = host;
        __atomic_store_n(&a->nlog, a->nlog + 1, __ATOMIC_RELEASE);
    } else {
        a->reserve[a->nreserve++] = host;
    }
    __atomic_store_n(s->ep, how == ALLOC_DONE ? host | E_DATA | E_WRITABLE : s->old,
                     __ATOMIC_RELEASE);
    s->alloc = ALLOC_NONE;
    __atomic_sub_fetch(&a->inflight, 1, __ATOMIC_SEQ_CST);
}

static void pin(struct smtap_image *m, struct slot *s)
{
    long long *g = m->guard;
    s->pin = 0;
    if (!g)
        return;
    for (;;) {
        long long e = __atomic_load_n(&g[0], __ATOMIC_SEQ_CST);
        int k = 1 + (int)(e & 1);
        __atomic_add_fetch(&g[k], 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&g[0], __ATOMIC_SEQ_CST) == e) {
            s->pin = k;
            return;
        }
        __atomic_sub_fetch(&g[k], 1, __ATOMIC_SEQ_CST);
    }
}

static void unpin(struct smtap_image *m, struct slot *s)
{
    if (s->pin)
        __atomic_sub_fetch(&m->guard[s->pin], 1, __ATOMIC_SEQ_CST);
    s->pin = 0;
}

/* Slots whose I/O the queue will never report (see drain) or whose queue is gone (see
   smtap_nbd_release): their guard counts go, or the driver's next smtap_guard_wait (a
   qcow2 free, a RAM chunk given back) would wait for them forever. */
static void unpin_queued(struct smtap_nbd *c, struct loop *l)
{
    for (int i = 0; i < SLOTS; i++)
        if (l->slots[i].parts) {
            unpin(c->images, &l->slots[i]);
            if (l->slots[i].alloc)
                alloc_end(c->images, &l->slots[i], ALLOC_LOST);
            l->slots[i].parts = 0;
        }
}

/* A pause raises the gate (held = 1: the generation moves on) or lowers it; the barrier
   orders the store before the caller's reads of the clients' busy. */
void smtap_gate_set(struct smtap_gate *g, int held)
{
    if (held)
        __atomic_add_fetch(&g->gen, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&g->held, held, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t be64(const unsigned char *p)
{
    return (uint64_t)be32(p) << 32 | be32(p + 4);
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void put64(unsigned char *p, uint64_t v)
{
    put32(p, v >> 32);
    put32(p + 4, (uint32_t)v);
}

/* ---- buffers: page aligned (O_DIRECT), kept per size class until released ---- */
static char *buf_get(struct loop *l, long long len, int *cls)
{
    int c = 0;
    while ((4096LL << c) < len)
        c++;
    char *b = l->pool[c];
    if (b) {
        l->pool[c] = *(char **)b;
    } else if (posix_memalign((void **)&b, 4096, (size_t)(4096LL << c))) {
        return NULL;
    }
    *cls = c;
    return b;
}

static void buf_put(struct loop *l, char *b, int cls)
{
    *(char **)b = l->pool[cls];
    l->pool[cls] = b;
}

static void slot_free(struct loop *l, int i)
{
    struct slot *s = &l->slots[i];
    if (s->data)
        buf_put(l, s->data, s->cls);
    s->data = NULL;
    l->free[l->nfree++] = i;
}

/* Free what the last call handed back (Python answered it) and everything pooled. */
void smtap_nbd_release(struct smtap_nbd *c)
{
    struct loop *l = c->priv;
    if (!l)
        return;
    /* An error return can leave I/O given to a failed queue (drain gave up on it),
       pinned. Python releases only after closing the queue, which waits for its I/O
       (libaio's io_destroy; smtap_queue_close reaps io_uring's first): done now, its
       pins go (c->images is still the chain they were taken on: the session ended at
       that return). Nothing is queued after a normal return. */
    unpin_queued(c, l);
    for (int i = 0; i < l->nfail; i++)
        slot_free(l, l->failed[i]);
    for (int k = 0; k < NCLASS; k++)
        while (l->pool[k]) {
            char *b = l->pool[k];
            l->pool[k] = *(char **)b;
            free(b);
        }
    free(l);
    c->priv = NULL;
    c->nfailed = 0;
}

static void inflight(struct smtap_nbd *c, struct loop *l)
{
    __atomic_store_n(&c->client->inflight, SLOTS - l->nfree, __ATOMIC_RELAXED);
}

/* ---- replies ---- */
static void answer(struct smtap_nbd *c, struct loop *l, int i)
{
    struct slot *s = &l->slots[i];
    unsigned char *h = s->head;
    if (!c->structured || s->kind != CMD_READ) {    /* a simple reply (a read's data
                                       follows it); on a structured connection too for
                                       what returns no data, as nbdframe.done_reply */
        put32(h, SIMPLE_MAGIC);
        put32(h + 4, 0);
        memcpy(h + 8, s->handle, 8);
        s->hlen = 16;
    } else if (s->hole) {           /* no payload: the client zero-fills */
        put32(h, STRUCTURED_MAGIC);
        h[4] = 0; h[5] = REPLY_FLAG_DONE;
        h[6] = 0; h[7] = REPLY_TYPE_OFFSET_HOLE;
        memcpy(h + 8, s->handle, 8);
        put32(h + 16, 12);
        put64(h + 20, (uint64_t)s->offset);
        put32(h + 28, (uint32_t)s->length);
        s->hlen = 32;
    } else {
        put32(h, STRUCTURED_MAGIC);
        h[4] = 0; h[5] = REPLY_FLAG_DONE;
        h[6] = 0; h[7] = REPLY_TYPE_OFFSET_DATA;
        memcpy(h + 8, s->handle, 8);
        put32(h + 16, (uint32_t)(s->length + 8));
        put64(h + 20, (uint64_t)s->offset);
        s->hlen = 28;
    }
    c->acct[SERVED_C]++;
    l->ready[l->nready++] = i;
}

/* A request whose I/O failed (status: -errno): handed back to Python, unanswered; no
   more requests start. */
static void fail(struct smtap_nbd *c, struct loop *l, int i, long long status)
{
    struct slot *s = &l->slots[i];
    struct smtap_failed *f = &c->failed[c->nfailed++];
    f->kind = s->kind;
    f->handle = be64(s->handle);
    f->offset = s->offset;
    f->length = s->length;
    f->flags = s->flags;
    f->addr = (long long)(intptr_t)(s->data + s->inner);
    f->error = status;
    l->failed[l->nfail++] = i;
    l->stop = RET_PYTHON;
}

/* The leaf's data is on its file (if it has one): stable storage, as flush and FUA want. */
static int sync_leaf(struct smtap_nbd *c)
{
    return c->images->fd >= 0 ? fdatasync(c->images->fd) : 0;
}

/* A write's data is on the file: FUA wants it on stable storage before the reply. */
static void written(struct smtap_nbd *c, struct loop *l, int i)
{
    if (l->slots[i].flags & FLAG_FUA && sync_leaf(c))
        fail(c, l, i, -errno);
    else
        answer(c, l, i);
}

/* Send the ready replies (one sendmsg, more if it sends part), then free their slots. */
static int send_ready(struct smtap_nbd *c, struct loop *l)
{
    struct iovec iov[2 * SLOTS];
    int n = 0;
    for (int k = 0; k < l->nready; k++) {
        struct slot *s = &l->slots[l->ready[k]];
        iov[n].iov_base = s->head;
        iov[n++].iov_len = s->hlen;
        if (s->kind == CMD_READ && !s->hole) {
            iov[n].iov_base = s->data;
            iov[n++].iov_len = s->length;
        }
    }
    struct iovec *v = iov;
    int err = 0;
    while (n) {
        struct msghdr m;
        memset(&m, 0, sizeof(m));
        m.msg_iov = v;
        m.msg_iovlen = n;
        ssize_t k = sendmsg(c->sockfd, &m, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            err = -errno;
            break;
        }
        while (n && (size_t)k >= v->iov_len) {
            k -= v->iov_len;
            v++;
            n--;
        }
        if (n) {
            v->iov_base = (char *)v->iov_base + k;
            v->iov_len -= k;
        }
    }
    for (int k = 0; k < l->nready; k++)
        slot_free(l, l->ready[k]);
    l->nready = 0;
    inflight(c, l);
    return err;
}

/* ---- I/O ---- */
static void write_block(struct smtap_nbd *c, struct loop *l, int i);
static long long link_block(struct smtap_image *m, struct slot *s);

static void completions(struct smtap_nbd *c, struct loop *l, int r)
{
    for (int k = 0; k < r >> 1; k++) {
        int i = (int)l->done[2 * k];
        long long status = l->done[2 * k + 1];
        struct slot *s = &l->slots[i];
        l->nio--;
        l->completed++;
        if (status && !s->status)
            s->status = status;
        if (--s->parts)
            continue;                   /* a read from several places: the others */
        l->bytes -= s->cost;
        if (s->alloc == ALLOC_COPYING && !s->status) {
            write_block(c, l, i);       /* the block's content is whole: write it */
            continue;
        }
        if (s->alloc == ALLOC_WRITING && !s->status)
            s->status = link_block(c->images, s);
        unpin(c->images, s);
        if (s->alloc)
            alloc_end(c->images, s, s->status ? ALLOC_UNDONE : ALLOC_DONE);
        if (s->status)
            fail(c, l, i, s->status);
        else if (s->kind == CMD_WRITE)
            written(c, l, i);
        else
            answer(c, l, i);
    }
}

/* Submit what dispatch() queued and collect completions, waiting as asked. */
static int run(struct smtap_nbd *c, struct loop *l, int wait)
{
    int r = smtap_queue_submit(c->queue, l->subs, l->nsubs, wait, c->sockfd, l->done,
                               DONE_MAX);
    l->nsubs = 0;
    if (r < 0)
        return r;
    completions(c, l, r);
    return r & FLAG_READABLE;
}

/* Wait for every I/O given (an error ends the call: the buffers must not go first).
   A queue asked to wait returns a completion whenever it holds I/O; twice none in a row
   (once can be a socket poll firing late, io_uring) means it holds none of what is
   left: requests a failed submit never took (ENOMEM) or completions a failing call
   reaped and dropped. That I/O can no longer complete: unpinned, the call ends (EIO).
   Without this the loop spun here for ever, the pins held. */
static int drain(struct smtap_nbd *c, struct loop *l)
{
    int idle = 0;
    while (l->nio || l->nsubs) {
        long long before = l->completed;    /* (a completion may queue a block's write) */
        int r = run(c, l, WAIT_IO);
        if (r < 0)
            return r;
        if (l->completed > before) {
            idle = 0;
        } else if (++idle == 2) {
            unpin_queued(c, l);         /* (their buffers stay: freed with the loop) */
            l->nio = 0;
            l->nsubs = 0;
            l->bytes = 0;
            return -EIO;
        }
    }
    return 0;
}

/* Give slot i's I/O of len bytes at offset phys of fd, into its buffer at pos. */
static void queue_io(struct loop *l, int i, long long op, int fd, long long phys,
                     long long pos, long long len)
{
    struct slot *s = &l->slots[i];
    struct sreq *q = &l->subs[l->nsubs++];
    q->op = op;
    q->fd = fd;
    q->off = phys;
    q->len = len;
    q->addr = (long long)(intptr_t)(s->data + pos);
    q->tag = i;
    if (!s->parts++)
        l->bytes += s->cost;
    l->nio++;
}

/* An allocating write's new block, whole (ALLOC_WRITING). */
static void write_block(struct smtap_nbd *c, struct loop *l, int i)
{
    struct smtap_image *m = c->images;
    struct slot *s = &l->slots[i];
    s->alloc = ALLOC_WRITING;
    queue_io(l, i, m->direct ? OP_WRITE : OP_WRITE | OP_INLINE, m->fd, s->phys, 0,
             1LL << m->shift);
}

/* An allocating write's block is written: its L2 entry (big-endian, the COPIED flag:
   refcount 1) into its table, through the page cache. 0 or -errno. */
static long long link_block(struct smtap_image *m, struct slot *s)
{
    struct smtap_alloc *a = m->allocator;
    long long l1i = s->block >> a->l2bits, i = s->block & ((1LL << a->l2bits) - 1);
    unsigned char e[8];
    put64(e, (uint64_t)s->phys | 1ULL << 63);
    for (;;) {
        ssize_t k = pwrite((int)a->meta_fd, e, 8, a->l2off[l1i] + 8 * i);
        if (k == 8)
            return 0;
        if (k >= 0 || errno != EINTR)
            return k < 0 ? -errno : -EIO;
    }
}

/* A buffered run at once if the page cache has it all (preadv2 RWF_NOWAIT, a system
   call: glibc 2.17 has no wrapper), else queued. */
static void read_buffered(struct loop *l, int i, const struct seg *g)
{
    struct slot *s = &l->slots[i];
    if (!l->nowait_off) {
        struct iovec v = {s->data + g->pos, (size_t)g->len};
        long r = syscall(__NR_preadv2, g->fd, &v, 1, (long)g->phys, 0L, RWF_NOWAIT);
        if (r == g->len)
            return;
        if (r < 0 && errno != EAGAIN)
            l->nowait_off = 1;          /* not here: queue them all */
    }
    queue_io(l, i, OP_READ | OP_INLINE, g->fd, g->phys, g->pos, g->len);
}

/* A buffered write, done before the receive buffer moves on: from the request's payload
   itself, no copy. 0, or -errno: the request is then left unstarted in the receive
   buffer, Python's to redo and answer. */
static int write_buffered(struct smtap_nbd *c, struct slot *s, const unsigned char *data)
{
    long long done = 0;
    while (done < s->length) {
        ssize_t k = pwrite(s->fd, data + done, s->length - done, s->phys + done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 ? -errno : -EIO;
        done += k;
    }
    return s->flags & FLAG_FUA && sync_leaf(c) ? -errno : 0;
}

/* ---- where the data is ---- */
static long long entry(const struct smtap_image *m, long long k)
{
    long long p = k >> PAGE_BITS;
    if (p >= m->npages)
        return E_UNKNOWN;
    long long *page = __atomic_load_n(&m->pages[p], __ATOMIC_ACQUIRE);
    return page ? __atomic_load_n(&page[k & (PAGE_ENTRIES - 1)], __ATOMIC_ACQUIRE)
                : E_UNKNOWN;
}

/* An E_BITMAP block's sector bitmap (a VHD's: bit 7 of byte 0 is sector 0). */
static const unsigned char *bitmap_of(const struct smtap_image *m, long long k)
{
    long long p = k >> PAGE_BITS;
    if (!m->bitmaps || p >= m->npages)
        return NULL;
    long long *page = __atomic_load_n(&m->bitmaps[p], __ATOMIC_ACQUIRE);
    return page ? (const unsigned char *)(intptr_t)
                  __atomic_load_n(&page[k & (PAGE_ENTRIES - 1)], __ATOMIC_ACQUIRE) : NULL;
}

/* How many sectors from s0 (to s1 at most) have the bit of s0 in bitmap bm; *set: it.
   The driver sets bits (after the data they describe is written) as C reads: a byte is
   either side. */
static long long sector_run(const unsigned char *bm, long long s0, long long s1, int *set)
{
    int bit = __atomic_load_n(&bm[s0 >> 3], __ATOMIC_ACQUIRE) >> (7 - (s0 & 7)) & 1;
    unsigned whole = bit ? 0xffU : 0;
    long long s = s0;
    *set = bit;
    while (s <= s1) {
        unsigned b = __atomic_load_n(&bm[s >> 3], __ATOMIC_ACQUIRE);
        if (!(s & 7) && s + 7 <= s1 && b == whole) {
            s += 8;
            continue;
        }
        if ((int)(b >> (7 - (s & 7)) & 1) != bit)
            break;
        s++;
    }
    return s - s0;
}

/* The place of the first run of [off, end) of the disk (> 0: its length; 0: the
   driver's path: a block not known, a parent's RAM): walking the chain from the leaf,
   each image's block (its sectors' bits) bounds the run, and where it holds nothing
   the parent's says. */
static long long place(struct smtap_nbd *c, long long off, long long end, struct seg *g)
{
    long long lim = end;
    for (long long i = 0; i < c->nimages; i++) {
        struct smtap_image *m = &c->images[i];
        if (off >= m->size)
            break;                      /* past a shorter image: zeros, as image.py */
        if (lim > m->size)
            lim = m->size;
        long long bmask = (1LL << m->shift) - 1;
        if (m->kind == IMG_FILE) {
            g->phys = off;
        } else if (m->kind == IMG_MEM) {
            if (i)
                return 0;               /* (C copies from the leaf's mapping only) */
            if (m->shared)
                for (long long k = off >> m->shift; k <= (lim - 1) >> m->shift; k++)
                    if (!m->alloc[k])
                        return 0;       /* a hole to keep */
            g->kind = AT_MEM;
            g->phys = off;
            return lim - off;
        } else if (m->kind == IMG_BLOCKS) {
            long long k = off >> m->shift, e = entry(m, k) & ~E_BUSY;    /* (as before) */
            if (lim > (k + 1) << m->shift)
                lim = (k + 1) << m->shift;
            if (e & E_BITMAP) {         /* the sectors' bits say where */
                const unsigned char *bm = bitmap_of(m, k);
                int here;
                if (!bm)
                    return 0;
                long long s0 = (off & bmask) >> 9;
                long long n = sector_run(bm, s0, ((lim - 1) & bmask) >> 9, &here);
                if (lim > (off & ~bmask) + ((s0 + n) << 9))
                    lim = (off & ~bmask) + ((s0 + n) << 9);
                if (!here)
                    continue;           /* the parent's */
            } else if (e == E_ABSENT) {
                continue;
            } else if (e == E_ZERO) {
                g->kind = AT_ZERO;
                return lim - off;
            } else if (!(e & E_DATA)) {
                return 0;
            }
            g->phys = (e & ~E_FLAGS) + (off & bmask);
        } else {
            return 0;
        }
        g->kind = AT_FILE;
        g->fd = m->fd;
        g->direct = m->direct;
        g->mask = m->mask;
        return lim - off;
    }
    g->kind = AT_ZERO;                  /* in no image: zeros */
    return lim - off;
}

/* The runs of [off, end) of the disk, at pos of a buffer, after segs[0, n) (runs of one
file end to end merged): how many then, or -1 for the driver's path (place() says so,
too many, unaligned for O_DIRECT: the driver reads that through the page cache). */
static int map_span(struct smtap_nbd *c, long long off, long long end, long long pos,
                    struct seg *segs, int n)
{
    int first = n;
    for (long long start = off; off < end; ) {
        struct seg g;
        long long len = place(c, off, end, &g);
        if (len <= 0)
            return -1;
        g.pos = pos + off - start;
        g.len = len;
        struct seg *p = n > first ? &segs[n - 1] : NULL;
        if (p && p->kind == g.kind && (g.kind != AT_FILE || (p->fd == g.fd
                                                             && p->phys + p->len == g.phys)))
            p->len += len;
        else if (n == MAX_SEGS)
            return -1;
        else
            segs[n++] = g;
        off += len;
    }
    for (int k = first; k < n; k++)
        if (segs[k].kind == AT_FILE && segs[k].direct
                && (segs[k].phys | segs[k].len | segs[k].pos) & segs[k].mask)
            return -1;
    return n;
}

static int map_read(struct smtap_nbd *c, const struct slot *s, struct seg *segs)
{
    return map_span(c, s->offset, s->offset + s->length, 0, segs, 0);
}

/* Where a write of [off, off + len) goes: the leaf's file in one run, or its mapping,
   where nothing of the format's metadata changes; else AT_PYTHON (a block to allocate
   or not known, bits to set, unaligned for O_DIRECT, a RAM chunk to account for). */
static int locate_write(struct smtap_nbd *c, struct slot *s)
{
    struct smtap_image *m = c->images;
    long long off = s->offset, end = off + s->length;
    if (end > m->size)
        return AT_PYTHON;
    long long k0 = off >> m->shift, k1 = (end - 1) >> m->shift, bmask = (1LL << m->shift) - 1;
    if (m->kind == IMG_FILE) {
        s->phys = off;
    } else if (m->kind == IMG_MEM) {
        if (m->dirty && s->flags & FLAG_FUA)
            return AT_PYTHON;           /* FUA: the writeback's, Python's */
        for (long long k = k0; k <= k1; k++)
            if (!m->alloc[k])
                return AT_PYTHON;       /* memory to account for */
        s->phys = off;
        return AT_MEM;
    } else if (m->kind == IMG_BLOCKS) {
        long long e = entry(m, k0);
        if (!(e & E_DATA) || !(e & E_WRITABLE))
            return AT_PYTHON;
        if (e & E_BITMAP) {
            const unsigned char *bm = k1 == k0 ? bitmap_of(m, k0) : NULL;
            long long s0 = (off & bmask) >> 9, s1 = ((end - 1) & bmask) >> 9;
            int set;
            if (!bm || sector_run(bm, s0, s1, &set) != s1 - s0 + 1 || !set)
                return AT_PYTHON;       /* bits to set */
        } else {
            for (long long k = k0 + 1; k <= k1; k++)
                if (entry(m, k) != e + ((k - k0) << m->shift))
                    return AT_PYTHON;   /* not one run of the file */
        }
        s->phys = (e & ~E_FLAGS) + (off & bmask);
    } else {
        return AT_PYTHON;
    }
    if (m->direct && (s->phys | s->length) & m->mask)
        return AT_PYTHON;
    s->fd = m->fd;
    s->direct = m->direct;
    return AT_FILE;
}

/* A write into one block the leaf lacks, C's to allocate (struct smtap_alloc): AT_ALLOC
   (segs[0, *nseg): the rest of the block as the chain reads it, at its place in the
   block's buffer), AT_WAIT (C allocates the block already: after that write), or
   AT_PYTHON. Nothing changes until alloc_start. */
static int plan_alloc(struct smtap_nbd *c, struct loop *l, struct slot *s,
                      struct seg *segs, int *nseg)
{
    struct smtap_image *m = c->images;
    struct smtap_alloc *a = m->allocator;
    if (!a || m->kind != IMG_BLOCKS)
        return AT_PYTHON;
    long long bs = 1LL << m->shift, k = s->offset >> m->shift;
    long long start = k << m->shift, end = s->offset + s->length;
    if ((end - 1) >> m->shift != k || k >> PAGE_BITS >= m->npages)
        return AT_PYTHON;
    long long *page = __atomic_load_n(&m->pages[k >> PAGE_BITS], __ATOMIC_ACQUIRE);
    if (!page || page == a->absent_page)
        return AT_PYTHON;               /* no entry of its own to change */
    long long e = __atomic_load_n(&page[k & (PAGE_ENTRIES - 1)], __ATOMIC_ACQUIRE);
    if (e & E_BUSY)
        return l->nio ? AT_WAIT : AT_PYTHON;
    long long l1i = k >> a->l2bits;
    if ((e != E_ABSENT && e != E_ZERO) || l1i >= a->nl1 || !a->l2off[l1i]
            || !a->nreserve || a->nlog + a->inflight >= a->logcap)
        return AT_PYTHON;               /* (a table to make, or to copy: the driver's) */
    if (m->direct && (a->reserve[a->nreserve - 1] | bs) & m->mask)
        return AT_PYTHON;
    long long tail = start + bs < m->size ? start + bs : m->size;
    int n = 0;
    if (start < s->offset && (n = map_span(c, start, s->offset, 0, segs, 0)) < 0)
        return AT_PYTHON;
    if (end < tail && (n = map_span(c, end, tail, end - start, segs, n)) < 0)
        return AT_PYTHON;
    s->inner = s->offset - start;
    s->block = k;
    s->old = e;
    s->ep = &page[k & (PAGE_ENTRIES - 1)];
    *nseg = n;
    return AT_ALLOC;
}

/* The allocation plan_alloc made begins (0), unless another connection joined (-1). */
static int alloc_start(struct smtap_image *m, struct slot *s)
{
    struct smtap_alloc *a = m->allocator;
    __atomic_add_fetch(&a->inflight, 1, __ATOMIC_SEQ_CST);
    long long old = s->old;     /* (and not changed since plan_alloc by another's turn) */
    if (__atomic_load_n(&a->users, __ATOMIC_SEQ_CST) != 1
            || !__atomic_compare_exchange_n(s->ep, &old, old | E_BUSY, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&a->inflight, 1, __ATOMIC_SEQ_CST);
        return -1;
    }
    s->phys = a->reserve[--a->nreserve];
    s->alloc = ALLOC_COPYING;
    return 0;
}

/* A write into the leaf's mapping (a RAM disk): the chunks it changed marked after. */
static void write_mem(struct smtap_nbd *c, struct slot *s, const unsigned char *data)
{
    struct smtap_image *m = &c->images[0];
    memcpy(m->base + s->offset, data, (size_t)s->length);
    if (m->dirty)
        for (long long k = s->offset >> m->shift; k <= (s->offset + s->length - 1) >> m->shift; k++)
            __atomic_store_n(&m->dirty[k], 1, __ATOMIC_RELEASE);
}

/* ---- requests ---- */
/* Slot i's reads of segs (a read's data; the rest of a block to allocate), into its
   buffer: queued, or done here (zeros, a RAM disk, the page cache). */
static void read_segs(struct smtap_nbd *c, struct loop *l, int i, const struct seg *segs,
                      int nseg)
{
    struct slot *s = &l->slots[i];
    for (int k = 0; k < nseg; k++) {
        const struct seg *g = &segs[k];
        if (g->kind == AT_ZERO) {
            if (!s->hole)
                memset(s->data + g->pos, 0, (size_t)g->len);
        }
        else if (g->kind == AT_MEM)
            memcpy(s->data + g->pos, c->images->base + g->phys, (size_t)g->len);
        else if (g->direct)
            queue_io(l, i, OP_READ, g->fd, g->phys, g->pos, g->len);
        else
            read_buffered(l, i, g);
    }
}

/* Start the complete requests at buf[*pos, have) until one C does not take (l->stop),
   one that must wait (I/O limits, a flush behind I/O in flight) or an incomplete one. */
static void dispatch(struct smtap_nbd *c, struct loop *l, long long *pos)
{
    const unsigned char *b = (const unsigned char *)c->buf;
    l->waiting = 0;
    while (!l->stop) {
        if (__atomic_load_n(&c->gate->held, __ATOMIC_ACQUIRE)) {
            l->stop = RET_HELD;
            return;
        }
        long long at = *pos, left = c->have - at;
        if (left < REQUEST_SIZE)
            return;
        const unsigned char *h = b + at;
        unsigned flags = (unsigned)h[4] << 8 | h[5];
        unsigned kind = (unsigned)h[6] << 8 | h[7];
        long long offset = (long long)be64(h + 16), length = be32(h + 24);
        int rw = kind == CMD_READ || kind == CMD_WRITE;
        long long need = REQUEST_SIZE + (kind == CMD_WRITE ? length : 0);
        if (be32(h) != REQUEST_MAGIC || length > MAX_REQUEST) {
            l->stop = RET_PYTHON;       /* Python hangs up, or refuses it */
            return;
        }
        if (left < need) {              /* a write's payload is still coming */
            if (need > c->cap)
                l->stop = RET_GROW;     /* Python grows the buffer for it */
            return;
        }
        /* complete: what Python answers (an error to report, a command) or takes */
        if (!(rw || kind == CMD_FLUSH)
                || (kind == CMD_READ && flags & ~READ_FLAGS)
                || (kind == CMD_WRITE && (flags & ~WRITE_FLAGS || c->readonly))
                || (kind == CMD_FLUSH && (flags || c->readonly))
                || (rw && (!length || offset < 0 || offset > c->size
                           || length > c->size - offset))) {
            l->stop = RET_PYTHON;
            return;
        }
        if (!l->nfree || (l->nio && (SLOTS - l->nfree >= c->max_inflight
                                     || l->bytes + length > c->max_bytes))) {
            l->waiting = 1;             /* until some complete */
            return;
        }
        struct smtap_image *leaf = c->images;
        if (kind == CMD_FLUSH) {
            if ((leaf->kind == IMG_MEM && leaf->dirty) || (leaf->kind == IMG_BLOCKS
                                                            && leaf->guard)) {
                l->stop = RET_PYTHON;   /* a writeback; the driver's refcounts, frees */
                return;
            }
            if (l->nio) {
                l->waiting = 1;         /* after the I/O before it */
                return;
            }
            if (sync_leaf(c)) {
                l->stop = RET_PYTHON;   /* Python flushes again and says why */
                return;
            }
        }
        int i = l->free[l->nfree - 1];
        struct slot *s = &l->slots[i];
        s->kind = (int)kind;
        s->flags = flags;
        memcpy(s->handle, h + 8, 8);
        s->offset = offset;
        s->length = s->cost = kind == CMD_FLUSH ? 0 : length;
        s->data = NULL;
        s->parts = 0;
        s->status = 0;
        s->hole = 0;
        s->alloc = ALLOC_NONE;
        s->inner = 0;
        int where = AT_PYTHON, nseg = 0;
        struct seg *segs = l->segs;
        if (rw) {
            pin(leaf, s);
            if (kind == CMD_READ)
                where = (nseg = map_read(c, s, segs)) < 0 ? AT_PYTHON : AT_FILE;
            else if ((where = locate_write(c, s)) == AT_PYTHON)
                where = plan_alloc(c, l, s, segs, &nseg);
        }
        if (rw && where == AT_PYTHON) {
            unpin(leaf, s);
            l->stop = RET_PYTHON;       /* the driver's path */
            return;
        }
        if (where == AT_ALLOC)
            s->cost = 1LL << leaf->shift;   /* its buffer: the whole block */
        if (where == AT_WAIT || (where == AT_ALLOC && l->nio
                                 && l->bytes + s->cost > c->max_bytes)) {
            unpin(leaf, s);
            l->waiting = 1;             /* until the write allocating its block is done,
                                           or until buffers are given back */
            return;
        }
        if (l->nsubs + (kind == CMD_READ ? nseg : where == AT_ALLOC ? nseg + 1 : 1) > SUBS) {
            unpin(leaf, s);
            l->waiting = WAIT_SUBS;     /* once these are given: no I/O to wait for */
            return;
        }
        /* all zeros, the client takes chunks (not DF): a hole chunk, no buffer */
        s->hole = kind == CMD_READ && c->structured && !(flags & FLAG_DF) && nseg == 1
                  && segs[0].kind == AT_ZERO;
        /* a buffer: for a read's data, an O_DIRECT write's payload (queued: the receive
           buffer moves on before it is done), a new block's content */
        if (rw && !s->hole && (where == AT_ALLOC || !(kind == CMD_WRITE
                                                     && (where == AT_MEM || !s->direct)))
                && !(s->data = buf_get(l, where == AT_ALLOC ? 1LL << leaf->shift : length,
                                       &s->cls))) {
            unpin(leaf, s);
            l->stop = RET_PYTHON;       /* no memory: Python's path */
            return;
        }
        if (where == AT_ALLOC && alloc_start(leaf, s)) {
            buf_put(l, s->data, s->cls);
            s->data = NULL;
            unpin(leaf, s);
            l->stop = RET_PYTHON;       /* another connection came: the driver's */
            return;
        }
        if (kind == CMD_WRITE && where == AT_FILE && !s->direct
                && write_buffered(c, s, h + REQUEST_SIZE)) {
            unpin(leaf, s);
            l->stop = RET_PYTHON;       /* failed: Python's path redoes and answers it */
            return;
        }
        l->nfree--;
        *pos = at + need;
        if (kind == CMD_READ) {
            c->acct[SECS_READ] += length >> 9;
            c->acct[READS]++;
            read_segs(c, l, i, segs, nseg);
            if (!s->parts)
                answer(c, l, i);        /* all of it here already */
        } else if (kind == CMD_WRITE) {
            c->acct[SECS_WRITTEN] += length >> 9;
            c->acct[WRITES]++;
            if (where == AT_ALLOC) {    /* the block: the chain's data around the request's */
                long long bs = 1LL << leaf->shift, start = offset - s->inner;
                long long tail = (start + bs < leaf->size ? start + bs : leaf->size) - start;
                memcpy(s->data + s->inner, h + REQUEST_SIZE, (size_t)length);
                if (tail < bs)
                    memset(s->data + tail, 0, (size_t)(bs - tail));
                read_segs(c, l, i, segs, nseg);
                if (!s->parts)
                    write_block(c, l, i);
            } else if (where == AT_MEM) {
                write_mem(c, s, h + REQUEST_SIZE);
                answer(c, l, i);
            } else if (s->direct) {
                memcpy(s->data, h + REQUEST_SIZE, (size_t)length);  /* the buffer moves on */
                queue_io(l, i, OP_WRITE, s->fd, s->phys, 0, length);
            } else {
                answer(c, l, i);        /* written above */
            }
        } else {
            answer(c, l, i);
        }
        if (!s->parts)
            unpin(leaf, s);             /* done with its block (or never looked one up) */
        if (SLOTS - l->nfree > 1)
            l->pipelined = PIPELINE_TURNS;  /* requests in flight together */
    }
}

/* Drop the consumed bytes: the receive buffer starts with what is left. */
static void consume(struct smtap_nbd *c, long long *pos)
{
    if (*pos) {
        memmove(c->buf, c->buf + *pos, (size_t)(c->have - *pos));
        c->have -= *pos;
        *pos = 0;
    }
}

/* Wait for the client with nothing in flight, quiet for the gate (see the top): 0 when
   data came, else why the call ends (RET_*, -errno). */
static int quiet_recv(struct smtap_nbd *c, int gen)
{
    struct smtap_gate *g = c->gate;
    struct smtap_client *cl = c->client;
    __atomic_store_n(&cl->busy, 0, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&g->held, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&cl->busy, 1, __ATOMIC_SEQ_CST);
        return RET_HELD;            /* Python tells the pause */
    }
    ssize_t n;
    do
        n = recv(c->sockfd, c->buf + c->have, (size_t)(c->cap - c->have), 0);
    while (n < 0 && errno == EINTR);
    int err = errno;
    __atomic_store_n(&cl->busy, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (n > 0)
        c->have += n;
    if (__atomic_load_n(&g->held, __ATOMIC_SEQ_CST)
            || __atomic_load_n(&g->gen, __ATOMIC_SEQ_CST) != gen)
        return RET_HELD;            /* the data stays for Python, which parks first */
    if (n == 0)
        return RET_EOF;
    if (n < 0)
        return err == EAGAIN || err == EWOULDBLOCK ? RET_IDLE : -err;
    return 0;
}

/* Serve requests until one that is not the common case; see the top. Called with
   nothing in flight, busy set; returns with busy set, nothing in flight in C, buf[0,
   have) what it did not consume, failed[0, nfailed) the requests Python must answer. */
int smtap_nbd_serve(struct smtap_nbd *c)
{
    struct loop *l = c->priv;
    if (!l) {
        if (!(l = c->priv = calloc(1, sizeof(*l))))
            return RET_PYTHON;          /* no memory: Python's loop goes on */
        for (int i = 0; i < SLOTS; i++)
            l->free[i] = SLOTS - 1 - i;
        l->nfree = SLOTS;
    }
    for (int i = 0; i < l->nfail; i++)
        slot_free(l, l->failed[i]);
    l->nfail = 0;
    c->nfailed = 0;
    l->stop = 0;
    int gen = __atomic_load_n(&c->gate->gen, __ATOMIC_SEQ_CST);
    long long pos = 0;
    int readable = 0, full = 0, err = 0;
    for (;;) {
        dispatch(c, l, &pos);
        consume(c, &pos);
        if (full && !l->stop && c->cap < c->grow)
            l->stop = RET_GROW;         /* after these: a bigger buffer batches more */
        full = 0;
        if (l->nsubs || l->nio) {
            int wait = WAIT_NONE;
            if (!l->nready && l->waiting != WAIT_SUBS)  /* nothing else to do: wait
                                           (the socket too if the client pipelines and
                                           more can start) */
                wait = l->pipelined && !l->stop && !l->waiting && c->have < c->cap
                       ? WAIT_IO_OR_SOCKET : WAIT_IO;
            int r = run(c, l, wait);
            if (r < 0) {
                err = r;
                break;
            }
            readable = r;
            if (l->pipelined)
                l->pipelined--;
        }
        inflight(c, l);
        if (l->nready && (err = send_ready(c, l)) < 0)
            break;
        if (!l->nio) {                  /* nothing in flight */
            if (l->stop)
                break;
            if (l->waiting)
                continue;               /* what waited for the I/O may start now */
            if (c->have == c->cap) {
                l->stop = RET_GROW;     /* full with nothing to start: a big write */
                break;
            }
            int r = quiet_recv(c, gen);
            if (r) {
                l->stop = r;
                break;
            }
            full = c->have == c->cap;
            continue;
        }
        if (readable && !l->stop && c->have < c->cap) {
            ssize_t n = recv(c->sockfd, c->buf + c->have, (size_t)(c->cap - c->have),
                             MSG_DONTWAIT);
            if (n == 0) {
                l->stop = RET_EOF;
            } else if (n > 0) {
                c->have += n;
                full = c->have == c->cap;
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                err = -errno;
                break;
            }
            readable = 0;
        }
    }
    if (err < 0) {
        int r = drain(c, l);
        for (int k = 0; k < l->nready; k++)
            slot_free(l, l->ready[k]);
        l->nready = 0;
        inflight(c, l);
        return r < 0 ? r : err;
    }
    inflight(c, l);
    return l->stop;
}
