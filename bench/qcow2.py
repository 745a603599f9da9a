#!/usr/bin/env python3
"""Benchmark the engine's qcow2 disk type against qemu-nbd -f qcow2, in one invocation.

bench/vhd.py's jobs, rounds and table, on qcow2 images (64 KiB clusters, made with
qcow2-util, data written through the engine); like with like, every server on its own
copy of each image:
  * engine qcow2 (O_DIRECT)          vs  qemu-nbd -f qcow2 --cache=none --aio=native
  * engine qcow2 -D (page cache)     vs  qemu-nbd -f qcow2 --cache=writeback
images: full (every cluster written; also engine aio on a raw file of the same data:
qcow2 / aio), sparse (every other 2 MiB written), chain3 (base (full) <- mid <- leaf,
64 KiB in every 4th 2 MiB; qemu follows backing files, so both sides serve the same
chain), and first-write allocation on a fresh empty image.

    .venv/bin/python3 bench/qcow2.py [--runtime 2] [--rounds 3] [--size-mib 1024]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vhd as vbench        # noqa: E402 - bench/vhd.py: images, jobs, rounds, the table

NAME = "qcow2"
PAIRS = [("engine qcow2 (O_DIRECT)", "qemu-nbd qcow2 none/native"),
         ("engine qcow2 -D", "qemu-nbd qcow2 writeback")]
AIO = vbench.AIO


class Images(vbench.Images):
    TYPE = "qcow2"

    def create(self, path):
        vbench.run("qcow2-util", "create", "-n", path, "-s", self.size >> 20, env=self.servers.env)

    def snap(self, path, parent):
        vbench.run("qcow2-util", "snapshot", "-e", "-n", path, "-p", parent, env=self.servers.env)

    def relink(self, child, parent):
        vbench.run("qcow2-util", "modify", "-n", child, "-p", parent, env=self.servers.env)

    def source_for(self, name, src):
        return self.raw if name == AIO else src


def start(servers, name, path):
    """A server of kind `name` on path; its URI."""
    if name.startswith("engine qcow2"):
        return servers.tap("qcow2:" + path, *(["-D"] if "-D" in name else []))
    if name == AIO:
        return servers.tap("aio:" + path)
    sock = servers.sock("%s-%s" % (vbench.slug(name), os.path.basename(path)))
    cache = ["--cache=none", "--aio=native"] if "none" in name else ["--cache=writeback"]
    return servers.spawn(name, ["qemu-nbd", "-f", "qcow2"] + cache +
                         ["--shared=8", "-t", "-k", sock, path], sock)


stop = vbench.stop


if __name__ == "__main__":
    sys.exit(vbench.main(sys.modules[__name__]))
