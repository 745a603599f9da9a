"""Sparse-aware file copies (seed images, RAM snapshots): only data regions are read,
and blocks of zeros become holes, so a copy costs what the source really holds."""
import errno
import os

BLOCK = 1 << 16
_ZEROS = bytes(BLOCK)


def data_segments(fd, size):
    """[(start, end)] of the regions of fd that may hold data (holes skipped)."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break                       # only a hole is left
            return [(pos, size)]            # no SEEK_DATA here: read it all
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def copy(src, dst, size=None):
    """Make dst (created or truncated) a sparse copy of src's first `size` bytes
    (default: all of it); dst's length is `size`."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        if size is None:
            size = os.lseek(sfd, 0, os.SEEK_END)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(dfd, size)
            for start, end in data_segments(sfd, size):
                pos = start
                while pos < end:
                    data = os.pread(sfd, min(BLOCK * 64, end - pos), pos)
                    if not data:
                        break
                    for i in range(0, len(data), BLOCK):
                        piece = data[i:i + BLOCK]
                        if piece != _ZEROS[:len(piece)]:
                            pwrite_all(dfd, piece, pos + i)
                    pos += len(data)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def pwrite_all(fd, data, offset):
    """os.pwrite until every byte is written (a pwrite may write less)."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def allocated(path):
    """Bytes the file really occupies."""
    return os.stat(path).st_blocks * 512
