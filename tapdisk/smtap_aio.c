/* libsmtap-aio: one call submits a whole batch of requests to Linux native AIO and
   reaps every completion, so Python (ctypes, GIL released during the call) pays one
   crossing per batch; and fstatfs's f_type. A plain shared library: no Python ABI, the
   same object serves every interpreter; it needs libaio and glibc symbols no newer than
   el7's 2.17. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <libaio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>

#define SMTAP_AIO_DEPTH 128

int smtap_aio_depth(void) { return SMTAP_AIO_DEPTH; }

/* The file system type of fd (fstatfs f_type; struct statfs is the C library's to lay
   out), or -errno. */
long long smtap_fs_type(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st))
        return -errno;
    return (long long)st.f_type;
}

/* Run n requests of one kind (0 read, 1 write) on fd and wait for all of them.
   req holds n (offset, length, buffer position) triples: request i uses the buffer at
   base + its position (so a batch may leave gaps, e.g. an image's holes to zero).
   res[i] gets bytes done or -errno. Returns how many requests did not complete in
   full (0: all done; see res), or -errno if completions could not be reaped. */
int smtap_aio_batch(io_context_t ctx, int fd, int op, int n,
                    const long long *req, char *base, long long *res)
{
    struct iocb cbs[SMTAP_AIO_DEPTH];
    struct iocb *ptrs[SMTAP_AIO_DEPTH];
    struct io_event events[SMTAP_AIO_DEPTH];
    int freeslots[SMTAP_AIO_DEPTH];
    int nfree = SMTAP_AIO_DEPTH, next = 0, inflight = 0, failed = 0, i, r;

    for (i = 0; i < SMTAP_AIO_DEPTH; i++)
        freeslots[i] = i;

    while (next < n || inflight > 0) {
        int batch = 0, sub = 0, rollback = 0;

        /* prepare as many as there are free slots */
        while (next + batch < n && nfree > 0) {
            struct iocb *cb = &cbs[freeslots[--nfree]];
            long idx = next + batch;
            const long long *t = req + 3 * idx;
            if (op == 0)
                io_prep_pread(cb, fd, base + t[2], (size_t)t[1], t[0]);
            else
                io_prep_pwrite(cb, fd, base + t[2], (size_t)t[1], t[0]);
            cb->data = (void *)idx;
            ptrs[batch++] = cb;
        }
        while (sub < batch) {
            r = io_submit(ctx, batch - sub, ptrs + sub);
            if (r > 0) {
                sub += r;
                continue;
            }
            if (r == 0)
                r = -EAGAIN;
            if (r == -EINTR)
                continue;
            if (r == -EAGAIN && inflight + sub > 0) {
                rollback = 1;           /* reap some, then submit the rest */
                break;
            }
            for (i = sub; i < batch; i++) {    /* cannot submit: fail the rest */
                res[(long)ptrs[i]->data] = r;
                freeslots[nfree++] = (int)(ptrs[i] - cbs);
            }
            failed += batch - sub;
            break;
        }
        inflight += sub;
        if (rollback) {
            next = (int)(long)ptrs[sub]->data;
            for (i = sub; i < batch; i++)
                freeslots[nfree++] = (int)(ptrs[i] - cbs);
        } else {
            next += batch;
        }
        if (inflight > 0) {
            r = io_getevents(ctx, 1, inflight, events, NULL);
            if (r == -EINTR)
                continue;
            if (r < 0)
                return r;
            for (i = 0; i < r; i++) {
                long idx = (long)events[i].data;
                long long got = (long long)(long)events[i].res;
                res[idx] = got;
                if (got != req[3 * idx + 1])
                    failed++;
                freeslots[nfree++] = (int)(events[i].obj - cbs);
            }
            inflight -= r;
        }
    }
    return failed;
}
