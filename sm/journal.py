"""Journal entries in an SR's directory, as upstream sm's fjournaler keeps them: one
file <type>_<id> per entry holding its value (upstream's GC writes coalesce_<uuid>,
relink_<uuid> and leaf_<uuid> in the SR directory; the file SR's snapshot adds
clone_<uuid>). Same names, same contents, so upstream's cleanup.py and ours read each
other's journals. Each entry is written whole (a temporary file, fsync, rename), so a
crash leaves it either absent or complete.
"""
import errno
import os

SEPARATOR = "_"


class JournalError(Exception):
    pass


class Journal(object):
    def __init__(self, directory):
        self.dir = directory

    def _path(self, kind, ident):
        return os.path.join(self.dir, "%s%s%s" % (kind, SEPARATOR, ident))

    def create(self, kind, ident, value):
        """A new entry; refused if one exists already (as upstream)."""
        existing = self.get(kind, ident)
        if existing:
            raise JournalError("journal %s%s%s exists already: %s"
                               % (kind, SEPARATOR, ident, existing))
        self.set(kind, ident, value)

    def set(self, kind, ident, value):
        """Write (or replace) an entry atomically and durably."""
        path = self._path(kind, ident)
        tmp = os.path.join(self.dir, ".%s%s%s.tmp" % (kind, SEPARATOR, ident))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.write(fd, value.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:           # ENOSPC: nothing may be left behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        sync_dir(self.dir)

    def remove(self, kind, ident):
        try:
            os.unlink(self._path(kind, ident))
        except FileNotFoundError:
            return
        sync_dir(self.dir)

    def get(self, kind, ident):
        """The entry's value, or None."""
        try:
            with open(self._path(kind, ident)) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def get_all(self, kind):
        """{id: value} of every entry of this kind."""
        entries = {}
        prefix = kind + SEPARATOR
        for name in sorted(os.listdir(self.dir)):
            if not name.startswith(prefix) or len(name) == len(prefix):
                continue
            value = self.get(kind, name[len(prefix):])
            if value:
                entries[name[len(prefix):]] = value
        return entries


def sync_dir(path):
    """Make renames and unlinks in a directory durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
