#!/usr/bin/env python3
"""Benchmark the engine's vhd disk type against qemu-nbd -f vpc, in one invocation.

Like with like, every server on its own copy of the same image (two servers writing one
VHD would allocate over each other's blocks):
  * engine vhd (O_DIRECT)            vs  qemu-nbd -f vpc --cache=none --aio=native
  * engine vhd -D (page cache)       vs  qemu-nbd -f vpc --cache=writeback
on three images of --size-mib:
  * full:   a dynamic VHD with every block written (by the engine: batmap full); here
            also engine aio (O_DIRECT) on a raw file of the same data (vhd / aio);
  * sparse: every other 2 MiB block written, the rest unallocated;
  * chain3: base (full) <- mid (64 KiB in every 4th block) <- leaf (64 KiB in every
            4th block, others), reads through all three. qemu's vpc driver does not
            follow VHD parents, so its side serves a dynamic VHD of the same content
            (the chain flattened): the engine does more work there, not less.
Jobs (fio's nbd engine, unix socket): 4k randread/randwrite QD32 (IOPS), 4k randread/
randwrite QD1 (IOPS; latency p50/p99 in us), 1M read/write QD8 (MB/s); and first-write
allocation: 1M sequential writes QD8 over the whole of a fresh empty VHD (MB/s). Each
server runs each job --rounds times, alternating (order reversed every other round);
the table shows medians and engine / peer ratios.

    .venv/bin/python3 bench/vhd.py [--runtime 2] [--rounds 3] [--size-mib 1024]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine as base       # noqa: E402 - bench/engine.py: servers, fio, medians

JOBS = [    # reads first: they see the images as made, not as the write jobs left them
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randread QD1", "randread", "4k", 1),
    ("1M read QD8", "read", "1M", 8),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("1M write QD8", "write", "1M", 8),
]
ALLOC_JOB = ("first-write allocation 1M QD8", "write", "1M", 8)
MiB = 1 << 20
BLOCK = 2 * MiB

# (engine server, its peer): like with like
PAIRS = [("engine vhd (O_DIRECT)", "qemu-nbd vpc none/native"),
         ("engine vhd -D", "qemu-nbd vpc writeback")]
AIO = "engine aio (O_DIRECT)"


def run(*cmd, env=None):
    subprocess.run([str(c) for c in cmd], check=True, env=env, stdout=subprocess.DEVNULL)


class Images(object):
    """The images, made once: full.vhd, sparse.vhd, chain (base/mid/leaf), flat.vhd."""

    def __init__(self, tmp, servers, size):
        self.tmp, self.servers, self.size = tmp, servers, size
        env = servers.env
        self.raw = self.path("data.raw")
        run("fio", "--name=fill", "--filename=" + self.raw, "--rw=write", "--bs=1M",
            "--size=%d" % size, "--ioengine=psync", "--refill_buffers", "--output=/dev/null")
        self.empty = self.path("empty.vhd")
        run("vhd-util", "create", "-n", self.empty, "-s", size >> 20, env=env)
        self.full = self.written("full.vhd", self.raw)
        half = self.path("half.raw")                    # every other block, holes between
        with open(self.raw, "rb") as src, open(half, "wb") as dst:
            dst.truncate(size)
            for off in range(0, size, 2 * BLOCK):
                src.seek(off)
                dst.seek(off)
                dst.write(src.read(BLOCK))
        self.sparse = self.written("sparse.vhd", half)
        self.chain_base = self.path("base.vhd")
        shutil.copy(self.full, self.chain_base)
        self.mid = self.snapshot("mid.vhd", self.chain_base, 0)
        self.leaf = self.snapshot("leaf.vhd", self.mid, 2)
        uri = servers.tap("vhd:" + self.leaf, "-R")
        flat_raw = self.path("flat.raw")
        run("nbdcopy", uri, flat_raw)
        servers.untap(uri)
        self.flat = self.written("flat.vhd", flat_raw)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def written(self, name, src):
        """A copy of the empty VHD with src's data written through the engine."""
        path = self.path(name)
        shutil.copy(self.empty, path)
        uri = self.servers.tap("vhd:" + path)
        run("nbdcopy", src, uri)
        self.servers.untap(uri)
        return path

    def snapshot(self, name, parent, phase):
        """A snapshot of parent with 64 KiB of new data in every 4th block (from phase)."""
        path = self.path(name)
        run("vhd-util", "snapshot", "-n", path, "-p", parent, env=self.servers.env)
        uri = self.servers.tap("vhd:" + path)
        cmds = []
        for off in range(phase * BLOCK, self.size, 4 * BLOCK):
            cmds += ["-c", "write -P %d %d 65536" % (0x30 + phase, off + 65536 * phase)]
        for i in range(0, len(cmds), 200):
            run("qemu-io", "-f", "raw", *(cmds[i:i + 200] + [uri]))
        self.servers.untap(uri)
        return path

    def copy(self, src, tag):
        """A private copy (sparse) of an image; a chain's leaf copies the whole chain."""
        out = []
        for path in ([self.chain_base, self.mid, self.leaf] if src == self.leaf else [src]):
            dst = self.path("%s-%s" % (tag, os.path.basename(path)))
            run("cp", "--sparse=always", path, dst)
            out.append(dst)
        if src == self.leaf:        # re-link the copies to each other
            run("vhd-util", "modify", "-n", out[1], "-p", out[0], env=self.servers.env)
            run("vhd-util", "modify", "-n", out[2], "-p", out[1], env=self.servers.env)
        return out[-1]


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name)


def start(servers, name, path):
    """A server of kind `name` on path; its URI."""
    sock = servers.sock("%s-%s" % (slug(name), os.path.basename(path)))
    if name.startswith("engine vhd"):
        return servers.tap("vhd:" + path, *(["-D"] if "-D" in name else []))
    if name == AIO:
        return servers.tap("aio:" + path)
    cache = ["--cache=none", "--aio=native"] if "none" in name else ["--cache=writeback"]
    return servers.spawn(name, ["qemu-nbd", "-f", "vpc"] + cache +
                         ["--shared=8", "-t", "-k", sock, path], sock)


def stop(servers, name, uri):
    if name.startswith("engine"):
        servers.untap(uri)
    else:
        servers.unspawn(uri)


def measure(side):
    """(IOPS, MB/s, p50 us, p99 us) of one fio run."""
    pct = side.get("clat_ns", {}).get("percentile", {})
    return (side["iops"], side["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1e3,
            pct.get("99.000000", 0) / 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=2, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and job")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--images", default="full,sparse,chain3,empty",
                        help="which of full, sparse, chain3, empty (first writes) to run")
    args = parser.parse_args()
    only = set(args.images.split(","))
    size = args.size_mib << 20
    tmp = tempfile.mkdtemp(prefix="smtap-bench-vhd-", dir="/var/tmp")
    servers = base.Servers(tmp)
    os.makedirs(servers.env["SMTAP_ROOT"])
    rows = []
    started = time.time()
    try:
        images = Images(tmp, servers, size)
        names = [n for pair in PAIRS for n in pair]
        sets = [("full", images.full, names + [AIO]), ("sparse", images.sparse, names),
                ("chain3", images.leaf, names)]
        for sname, src, members in sets:
            if sname not in only:
                continue
            uris = {}
            for name in members:
                if name == AIO:
                    src_of = images.raw
                elif name.startswith("qemu") and src == images.leaf:
                    src_of = images.flat                            # qemu: no VHD chains
                else:
                    src_of = src
                path = images.copy(src_of, slug(name))
                uris[name] = (start(servers, name, path), path)
            for label, rw, bs, qd in JOBS:
                got = {name: [] for name in members}
                for rnd in range(args.rounds):
                    for name in (members if rnd % 2 == 0 else members[::-1]):
                        uri, path = uris[name]
                        cached = "-D" in name or "writeback" in name
                        side = base.fio_side(uri, rw, bs, qd, args.runtime, size,
                                             warm=path if cached else None)
                        got[name].append(measure(side))
                        print("  %-7s %-18s %-28s %9.0f IOPS %8.1f MB/s" % (
                            sname, label, name, side["iops"], side["bw_bytes"] / 1e6),
                            file=sys.stderr)
                rows.append((sname, label, {n: base.median(r) for n, r in got.items()}))
            for name, (uri, _) in uris.items():
                stop(servers, name, uri)
        # first-write allocation: a fresh empty VHD per run
        label, rw, bs, qd = ALLOC_JOB
        got = {name: [] for name in names}
        for rnd in range(args.rounds if "empty" in only else 0):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                path = images.copy(images.empty, "alloc")
                uri = start(servers, name, path)
                side = base.fio_side(uri, rw, bs, qd, None, size, time_based=False)
                stop(servers, name, uri)
                os.unlink(path)
                got[name].append(measure(side))
                print("  %-7s %-18s %-28s %8.1f MB/s" % ("empty", label, name,
                                                       side["bw_bytes"] / 1e6), file=sys.stderr)
        if "empty" in only:
            rows.append(("empty", label, {n: base.median(r) for n, r in got.items()}))
    finally:
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - started

    print("\n| image | job | %s | %s | ratio | %s | %s | ratio | %s | vhd/aio |" % (
        PAIRS[0][0], PAIRS[0][1], PAIRS[1][0], PAIRS[1][1], AIO))
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sname, label, res in rows:
        mbs = "1M" in label
        cells = []
        for ours, peer in PAIRS:
            for name in (ours, peer):
                iops, mb, p50, p99 = res[name]
                cell = "%.0f MB/s" % mb if mbs else "%.0f" % iops
                if "QD1" in label:
                    cell += " (%.0f/%.0f us)" % (p50, p99)
                cells.append(cell)
            a, b = res[ours][1 if mbs else 0], res[peer][1 if mbs else 0]
            cells.append("**%.2fx**" % (a / b) if b else "")
        if AIO in res:
            a, b = res[PAIRS[0][0]][1 if mbs else 0], res[AIO][1 if mbs else 0]
            cells += ["%.0f MB/s" % b if mbs else "%.0f" % b, "%.2fx" % (a / b) if b else ""]
        else:
            cells += ["", ""]
        print("| %s | %s | %s |" % (sname, label, " | ".join(cells)))
    print("\n%d s in all (%d rounds of %d s, median; QD1: p50/p99 completion latency); "
          "kernel %s; %s; %s" % (
              elapsed, args.rounds, args.runtime, os.uname().release,
              subprocess.run(["fio", "--version"], stdout=subprocess.PIPE,
                             text=True).stdout.strip(),
              subprocess.run(["qemu-nbd", "--version"], stdout=subprocess.PIPE,
                             text=True).stdout.splitlines()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
