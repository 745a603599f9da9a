"""null: reads zeros, discards writes. For tests and benchmarks.

    null:<anything>?size=<bytes>     (default 1 GiB)
"""
from smtap import units
from smtap.tapdisk import driver
from smtap.tapdisk.drivers import register

@register
class NullDriver(driver.Driver):
    name = "null"
    can_write = True
    can_flush = True
    can_trim = True
    can_zero = True
    can_extents = True
    can_multi_conn = True
    options = {"size": units.parse_size}

    def open(self, path, flags, options):
        self.path = path
        self.flags = flags
        self.size = options.get("size", 1 << 30)

    def pread(self, length, offset):
        return driver.zeros(length)

    def pwrite(self, buf, offset):
        pass

    def pwritev(self, requests):
        pass

    def zero(self, length, offset, may_trim=False):
        pass

    def extents(self, length, offset):
        return [(length, driver.EXTENT_HOLE | driver.EXTENT_ZERO)]
