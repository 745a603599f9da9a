"""aio: a raw file or block device, through asynchronous I/O (io_uring or libaio).

    aio:/path/disk.img

O_DIRECT when the file system allows it (buffers aligned), buffered otherwise and with
OPEN_NO_O_DIRECT (tap-ctl -D). Its requests go on the NBD connection's I/O queue
(io_uring or libaio, tapdisk/ioqueue.py) through tapdisk/aiofile.py, which the vhd type
shares. Requests O_DIRECT cannot take (not sector aligned) go through a second,
buffered descriptor.
"""
from smtap.tapdisk import aiofile
from smtap.tapdisk import driver, native
from smtap.tapdisk.drivers import register


@register
class AioDriver(driver.Driver):
    name = "aio"
    can_write = True
    can_flush = True
    can_trim = True
    can_zero = True
    can_extents = True
    can_multi_conn = True
    can_queue = True
    options = {"direct": driver.parse_bool}     # direct=0: never O_DIRECT (as -D)

    def __init__(self):
        super(AioDriver, self).__init__()
        self.file = None

    def open(self, path, flags, options):
        self.path, self.flags = path, flags
        direct = not flags & driver.OPEN_NO_O_DIRECT and options.get("direct", True)
        self.file = aiofile.AioFile(path, not flags & driver.OPEN_RDONLY, direct)
        # the queued path goes straight to the file's (a call less per batch)
        self.queue_reads, self.queue_writes = self.file.queue_reads, self.file.queue_writes
        self.size = self.file.size
        if self.file.block_device:
            self.can_extents = False

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
            del self.queue_reads, self.queue_writes

    def idle(self):
        if self.file is not None:
            self.file.idle()

    # the engine's queued path (open() binds these to the file's), and one call per
    # batch into the synchronous one
    def queue_reads(self, io, requests):
        self.file.queue_reads(io, requests)

    def queue_writes(self, io, requests):
        self.file.queue_writes(io, requests)

    def c_image(self):
        """A raw image: the disk's bytes are the file's (Driver.c_image)."""
        return native.file_image(self.file, self.size) if self.file is not None else None

    def preadv(self, requests):
        return self.file.preadv(requests)

    def pwritev(self, requests):
        self.file.pwritev(requests)

    def pread(self, length, offset):
        return self.file.pread(length, offset)

    def pwrite(self, buf, offset):
        self.file.pwrite(buf, offset)

    def flush(self):
        self.file.flush()

    def trim(self, length, offset):
        self.file.trim(length, offset)

    def zero(self, length, offset, may_trim=False):
        self.file.zero(length, offset, may_trim)

    def extents(self, length, offset):
        """SEEK_DATA / SEEK_HOLE: holes read as zeros."""
        return [(n, 0 if is_data else driver.EXTENT_HOLE | driver.EXTENT_ZERO)
                for n, is_data in self.file.extents(length, offset)]

    @property
    def direct(self):
        return self.file is not None and self.file.direct

    def debug(self):
        return {"direct": self.direct,
                "block_device": self.file is not None and self.file.block_device}
