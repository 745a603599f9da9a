#!/usr/bin/env python3
"""Benchmark the engine's vhd disk type on sparse and chained VHDs, in one invocation.

bench/engine.py's machinery, jobs and tables (its vhd rows are a fully allocated VHD),
here on more images of --size-mib, each server on its own copy (two servers writing one
VHD would allocate over each other's blocks), like with like:
  * engine vhd (O_DIRECT)  vs  qemu-nbd -f vpc --cache=none --aio=native,
                               qemu-storage-daemon (vpc, cache.direct=on, aio=native)
  * engine vhd -D          vs  qemu-nbd -f vpc --cache=writeback,
                               qemu-storage-daemon (vpc, cache.direct=off)
on
  * full:   every block written (by the engine: batmap full); and engine vhd against
            engine aio (O_DIRECT) on a raw file of the same data (vhd / aio);
  * sparse: every other 2 MiB block written, the rest unallocated;
  * chain3: base (full) <- mid (64 KiB in every 4th block) <- leaf (64 KiB in every
            4th block, others), reads through all three. qemu's vpc driver does not
            follow VHD parents, so its side serves a dynamic VHD of the same content
            (the chain flattened): the engine does more work there, not less;
  * empty:  first-write allocation, 1M sequential writes QD8 over the whole of a fresh
            empty VHD (MB/s).
Reads run before writes in bench/engine.py's job list, so they see the images as made.

    .venv/bin/python3 bench/vhd.py [--quick] [--runtime 2] [--rounds 3] [--size-mib 1024]
        [--images full,sparse,chain3,empty]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine as base       # noqa: E402 - bench/engine.py: servers, fio, jobs, tables

JOBS = [j for j in base.JOBS if "read" in j[1]] + [j for j in base.JOBS if "write" in j[1]]
ALLOC_JOB = ("first-write allocation 1M QD8", "write", "1M", 8)
MiB = 1 << 20
BLOCK = 2 * MiB


class Images(object):
    """The images, made once: full.vhd, sparse.vhd, chain (base/mid/leaf), flat.vhd.
    The format's names are class attributes (bench/qcow2.py's subclass: qcow2)."""
    TYPE, TOOL, PEER = "vhd", "vhd-util", "vpc"     # disk type and extension, tool, qemu's
    FLATTEN = True                  # qemu's vpc driver does not follow VHD parents

    def __init__(self, tmp, servers, size):
        self.tmp, self.servers, self.size = tmp, servers, size
        env = servers.env
        ext = "." + self.TYPE
        self.raw = base.make_raw(self.path("data.raw"), size)
        self.empty = self.path("empty" + ext)
        base.run(self.TOOL, "create", "-n", self.empty, "-s", size >> 20, env=env)
        self.full = self.written("full" + ext, self.raw)
        half = self.path("half.raw")                    # every other block, holes between
        with open(self.raw, "rb") as src, open(half, "wb") as dst:
            dst.truncate(size)
            for off in range(0, size, 2 * BLOCK):
                src.seek(off)
                dst.seek(off)
                dst.write(src.read(BLOCK))
        self.sparse = self.written("sparse" + ext, half)
        self.chain_base = self.path("base" + ext)
        shutil.copy(self.full, self.chain_base)
        self.mid = self.snapshot("mid" + ext, self.chain_base, 0)
        self.leaf = self.snapshot("leaf" + ext, self.mid, 2)
        self.flat = self.leaf
        if self.FLATTEN:
            uri, _ = servers.tap("%s:%s" % (self.TYPE, self.leaf), "-R")
            flat_raw = self.path("flat.raw")
            base.run("nbdcopy", uri, flat_raw)
            servers.untap(uri)
            self.flat = self.written("flat" + ext, flat_raw)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def written(self, name, src):
        return base.written_vhd(self.servers, self.empty, src, self.path(name), self.TYPE)

    def snapshot(self, name, parent, phase):
        """A snapshot of parent with 64 KiB of new data in every 4th block (from phase)."""
        path = self.path(name)
        base.run(self.TOOL, "snapshot", "-n", path, "-p", parent, env=self.servers.env)
        uri, _ = self.servers.tap("%s:%s" % (self.TYPE, path))
        cmds = []
        for off in range(phase * BLOCK, self.size, 4 * BLOCK):
            cmds += ["-c", "write -P %d %d 65536" % (0x30 + phase, off + 65536 * phase)]
        for i in range(0, len(cmds), 200):
            base.run("qemu-io", "-f", "raw", *(cmds[i:i + 200] + [uri]))
        self.servers.untap(uri)
        return path

    def copy(self, src, tag):
        """A private copy (sparse) of an image; a chain's leaf copies the whole chain."""
        out = []
        for path in ([self.chain_base, self.mid, self.leaf] if src == self.leaf else [src]):
            dst = self.path("%s-%s" % (tag, os.path.basename(path)))
            base.run("cp", "--sparse=always", path, dst)
            out.append(dst)
        if src == self.leaf:        # re-link the copies to each other
            base.run(self.TOOL, "modify", "-n", out[1], "-p", out[0], env=self.servers.env)
            base.run(self.TOOL, "modify", "-n", out[2], "-p", out[1], env=self.servers.env)
        return out[-1]


def kinds(servers, images, src):
    """The two kinds (O_DIRECT, page cache) on image src: (title, servers) pairs."""
    peer_src = images.flat if src == images.leaf else src      # qemu: no VHD chains
    mine, cached = images.copy(src, "e"), images.copy(src, "eD")
    t, p = images.TYPE, images.PEER
    return [
        ("O_DIRECT", [servers.engine("engine " + t, "%s:%s" % (t, mine)),
                      servers.qemu_nbd("qemu-nbd %s none/native" % p,
                                       images.copy(peer_src, "q"), p, True),
                      servers.qsd("qsd %s direct/native" % p, images.copy(peer_src, "s"), p,
                                  True)]),
        ("page cache", [servers.engine("engine %s -D" % t, "%s:%s" % (t, cached), "-D",
                                       warm=cached),
                        servers.qemu_nbd("qemu-nbd %s writeback" % p,
                                         images.copy(peer_src, "qD"), p, False),
                        servers.qsd("qsd %s writeback" % p, images.copy(peer_src, "sD"), p,
                                    False)]),
    ]


def main(images_class=Images, doc=__doc__):
    """images_class: the format's Images (bench/qcow2.py passes its own)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    base.common_arguments(parser)
    parser.add_argument("--images", default="full,sparse,chain3,empty",
                        help="which of full, sparse, chain3, empty (first writes) to run")
    args = base.parse(parser)
    only = set(args.images.split(","))
    size = args.size_mib << 20
    t, p = images_class.TYPE, images_class.PEER
    tmp = tempfile.mkdtemp(prefix="smtap-bench-%s-" % t, dir="/var/tmp")
    servers = base.Servers(tmp)
    tables = []
    started = time.time()
    try:
        images = images_class(tmp, servers, size)
        for sname, src in (("full", images.full), ("sparse", images.sparse),
                           ("chain3", images.leaf)):
            if sname not in only:
                continue
            for title, members in kinds(servers, images, src):
                rows = base.run_group(sname, members, JOBS, args, size)
                tables.append(("%s, %s" % (sname, title), [s.name for s in members], rows))
                for s in members:
                    s.stop()
            if sname == "full":         # the disk type against raw on the same path, each
                # on a fresh copy (as every server here: the same history of the file)
                members = [servers.engine("engine " + t, "%s:%s" % (t, images.copy(src, "v"))),
                           servers.engine("engine aio", "aio:" + images.copy(images.raw, "a"))]
                rows = base.run_group(sname, members, JOBS, args, size)
                tables.append(("full: %s / aio, O_DIRECT" % t, [s.name for s in members], rows))
                for s in members:
                    s.stop()
        if "empty" in only:
            tables.append(("empty: " + ALLOC_JOB[0], ["engine " + t, "qemu-nbd %s none/native" % p,
                                                       "qsd %s direct/native" % p],
                           {ALLOC_JOB[0]: allocation(servers, images, args, size)}))
    finally:
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n%s, %s; %d s in all (%d rounds of %d s, medians; QD1: p50/p99 completion "
          "latency, %s)" % (time.strftime("%Y-%m-%d"), base.versions(servers),
                            time.time() - started, args.rounds, args.runtime,
                            "client and server on CPU %d" % base.QD1_CPU
                            if base.QD1_CPU is not None else "client and server anywhere"))
    for title, names, rows in tables:
        base.print_group(title, names, rows)
    return 0


def allocation(servers, images, args, size):
    """First writes: a fresh empty image per run, the whole of it once."""
    _, rw, bs, qd = ALLOC_JOB
    t, peer = images.TYPE, images.PEER
    makers = [lambda p: servers.engine("engine " + t, "%s:%s" % (t, p)),
              lambda p: servers.qemu_nbd("qemu-nbd %s none/native" % peer, p, peer, True),
              lambda p: servers.qsd("qsd %s direct/native" % peer, p, peer, True)]
    got = {}
    for rnd in range(args.rounds):
        for make in (makers if rnd % 2 == 0 else makers[::-1]):
            path = images.copy(images.empty, "alloc")
            server = make(path)
            cpu = base.cpu_seconds(server.pid)
            side = base.fio_side(server.uri, rw, bs, qd, None, size, time_based=False)
            cpu = base.cpu_seconds(server.pid) - cpu
            server.stop()
            os.unlink(path)
            result = (side["iops"], side["bw_bytes"] / 1e6, 0, 0, cpu / (side["io_bytes"] / 1e9))
            got.setdefault(server.name, []).append(result)
            print("  %-7s %-18s %-28s %8.1f MB/s" % ("empty", ALLOC_JOB[0], server.name,
                                                   result[1]), file=sys.stderr)
    return {name: base.median(r) for name, r in got.items()}


if __name__ == "__main__":
    sys.exit(main())
