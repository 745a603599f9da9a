"""Build smtap.tapdisk._smtap_aio: libaio (and a few syscalls Python lacks) via cffi.

API mode: one C call submits a whole batch of requests and reaps every completion, so
the Python side pays one crossing per batch, with the GIL released while the kernel works.

    python3 tapdisk/aio_build.py [--if-needed]

--if-needed rebuilds only when the module is missing or older than this file.
Compiled with the system C compiler directly (no setuptools needed).
"""
import os
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "_smtap_aio"

CDEF = """
typedef struct io_context *io_context_t;
int io_setup(int maxevents, io_context_t *ctxp);
int io_destroy(io_context_t ctx);

#define SMTAP_AIO_DEPTH ...

/* Run n requests of one kind (0 read, 1 write) on fd and wait for all of them.
   offlen holds n (offset, length) pairs; request i uses the buffer at
   base + the sum of the lengths before it. res[i] gets bytes done or -errno.
   Returns how many requests did not complete in full (0: all done; see res),
   or -errno if completions could not be reaped. */
int smtap_aio_batch(io_context_t ctx, int fd, int op, int n,
                    const long long *offlen, char *base, long long *res);

int posix_memalign(void **memptr, size_t alignment, size_t size);
void free(void *ptr);
int madvise(void *addr, size_t length, int advice);
int fallocate(int fd, int mode, long long offset, long long len);
int smtap_errno(void);
long long smtap_fs_type(int fd);   /* fstatfs f_type, or -errno */

#define TMPFS_MAGIC ...

#define MADV_DONTNEED ...
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <libaio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <sys/vfs.h>

#define SMTAP_AIO_DEPTH 128

static int smtap_errno(void) { return errno; }

static long long smtap_fs_type(int fd)
{
    struct statfs st;
    if (fstatfs(fd, &st))
        return -errno;
    return (long long)st.f_type;
}

static int smtap_aio_batch(io_context_t ctx, int fd, int op, int n,
                           const long long *offlen, char *base, long long *res)
{
    struct iocb cbs[SMTAP_AIO_DEPTH];
    struct iocb *ptrs[SMTAP_AIO_DEPTH];
    struct io_event events[SMTAP_AIO_DEPTH];
    int freeslots[SMTAP_AIO_DEPTH];
    int nfree = SMTAP_AIO_DEPTH, next = 0, inflight = 0, failed = 0, i, r;
    char *buf = base;

    for (i = 0; i < SMTAP_AIO_DEPTH; i++)
        freeslots[i] = i;

    while (next < n || inflight > 0) {
        int batch = 0, sub = 0, rollback = 0;

        /* prepare as many as there are free slots */
        while (next + batch < n && nfree > 0) {
            struct iocb *cb = &cbs[freeslots[--nfree]];
            long idx = next + batch;
            long long off = offlen[2 * idx], len = offlen[2 * idx + 1];
            if (op == 0)
                io_prep_pread(cb, fd, buf, (size_t)len, off);
            else
                io_prep_pwrite(cb, fd, buf, (size_t)len, off);
            cb->data = (void *)idx;
            ptrs[batch++] = cb;
            buf += len;
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
            buf = ptrs[sub]->u.c.buf;
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
                if (got != offlen[2 * idx + 1])
                    failed++;
                freeslots[nfree++] = (int)(events[i].obj - cbs);
            }
            inflight -= r;
        }
    }
    return failed;
}
"""


def target():
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.join(HERE, MODULE + suffix)


def needed():
    out = target()
    return not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(__file__)


def build():
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("smtap.tapdisk." + MODULE, SOURCE, libraries=["aio"])
    workdir = os.path.join(HERE, "_aio_build")
    if not os.path.isdir(workdir):
        os.makedirs(workdir)
    out = target()
    # One C file per interpreter (cffi versions differ): builds for 3.6 and 3.11 can overlap.
    csrc = os.path.join(workdir, os.path.basename(out)[:-len(".so")] + ".c")
    ffi.emit_c_code(csrc)
    tmp = out + ".tmp"
    cc = os.environ.get("CC", "gcc")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wno-unused-function",
           "-I" + sysconfig.get_paths()["include"], csrc, "-o", tmp, "-laio"]
    subprocess.check_call(cmd)
    os.rename(tmp, out)
    return out


def main(argv):
    if "--if-needed" in argv and not needed():
        return 0
    print("built", build())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
