"""Sparse-aware file copies (seed images, RAM snapshots): only data regions are read,
and blocks of zeros become holes, so a copy costs what the source really holds."""
import errno
import os

BLOCK = 1 << 16
_ZEROS = bytes(BLOCK)


def extents(fd, offset, length, limit=None):
    """[(length, is_data)] covering [offset, offset + length), or its first `limit`
    regions, from SEEK_DATA / SEEK_HOLE (holes read as zeros). Where the file system
    has no SEEK_DATA: all data."""
    end = offset + length
    out, pos = [], offset
    try:
        while pos < end and (limit is None or len(out) < limit):
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end                  # only a hole is left
            if data > pos:
                stop = min(data, end)
                out.append((stop - pos, False))
            else:
                stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
                out.append((stop - pos, True))
            pos = stop
    except OSError as e:
        if e.errno != errno.EINVAL or out:
            raise
        return [(length, True)]
    return out


def data_segments(fd, size):
    """[(start, end)] of the regions of fd's first `size` bytes that may hold data."""
    out, pos = [], 0
    for length, is_data in extents(fd, 0, size):
        if is_data:
            out.append((pos, pos + length))
        pos += length
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
