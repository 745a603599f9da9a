/* libsmtap-aio's internals shared by its two sources: smtap_aio.c (the I/O queue) and
   smtap_nbd.c (the NBD loop's common case, which puts its I/O on the same queue). */
#ifndef SMTAP_AIO_H
#define SMTAP_AIO_H

/* request ops; OP_INLINE: a buffered I/O, run in the call itself by the libaio back end
   (libaio would do it synchronously inside io_submit anyway, plus an io_getevents) and,
   for writes, by io_uring's (it would hand them to a worker thread: a page cache write
   rarely blocks); io_uring tries buffered reads at once and waits for the rest */
enum { OP_READ = 0, OP_WRITE = 1, OP_INLINE = 0x100 };
/* wait modes of smtap_queue_run */
enum { WAIT_NONE = 0, WAIT_IO = 1, WAIT_IO_OR_SOCKET = 2 };
#define FLAG_READABLE 1         /* out[0]: the socket became readable */

struct sreq { long long op, fd, off, len, addr, tag; };    /* as Python passes them */

typedef struct smtap_queue smtap_queue;

/* smtap_queue_run with the caller's own arrays: the n requests of sub, and up to
   maxdone (tag, status) pairs into done. */
int smtap_queue_submit(smtap_queue *q, const struct sreq *sub, int n, int wait, int sockfd,
                       long long *done, int maxdone);

#endif
