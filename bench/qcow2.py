#!/usr/bin/env python3
"""Benchmark the engine's qcow2 disk type against qemu-nbd -f qcow2, in one invocation.

bench/vhd.py's machinery, jobs, images and tables on qcow2 images (64 KiB clusters,
made with qcow2-util, data written through the engine); like with like, every server on
its own copy of each image:
  * engine qcow2 (O_DIRECT)  vs  qemu-nbd -f qcow2 --cache=none --aio=native,
                                 qemu-storage-daemon (qcow2, cache.direct=on, aio=native)
  * engine qcow2 -D          vs  qemu-nbd -f qcow2 --cache=writeback,
                                 qemu-storage-daemon (qcow2, cache.direct=off)
on full (also engine qcow2 against engine aio on a raw file of the same data), sparse
(every other 2 MiB written), chain3 (base (full) <- mid <- leaf, 64 KiB in every 4th
2 MiB; qemu follows backing files, so every side serves the same chain) and empty
(first-write allocation on a fresh image).

    .venv/bin/python3 bench/qcow2.py [--quick] [--runtime 2] [--rounds 3] [--size-mib 1024]
        [--images full,sparse,chain3,empty]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vhd as vbench        # noqa: E402 - bench/vhd.py: images, jobs, rounds, the table


class Images(vbench.Images):
    TYPE, TOOL, PEER = "qcow2", "qcow2-util", "qcow2"
    FLATTEN = False                 # qemu follows qcow2 backing files


if __name__ == "__main__":
    sys.exit(vbench.main(Images, __doc__))
