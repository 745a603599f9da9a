"""The tapdisk engine: one process per virtual disk, pluggable disk drivers, NBD data path.

The engine knows nothing of SM: storage drivers reach it through tap-ctl or the
control socket only.
"""
