#!/usr/bin/env python3
"""The file SR on VHD: snapshot latency of a plugged VDI under load, the garbage
collector's coalesce throughput against `qemu-img commit` on the same data, and the time
it takes to bring a chain of 30 down to 1.

Installs the suite into a temporary root, starts smtap-xapi there, creates a file SR,
then:
  1. snapshots: a plugged VDI under fio random writes over NBD; --snapshots `xe
     vdi-snapshot` calls one a second, each older snapshot destroyed as the next is taken
     (as a snapshot schedule does): the whole xe call, and pause-to-unpause (pause
     requested -> tapdisk running on the new leaf, from the driver's log);
  2. coalesce: a hidden base holding --coalesce-mib of data (whole 2 MiB blocks, then
     scattered 4 KiB writes) merged into its parent by the GC (its log's copy time), and
     the same data in a qcow2 overlay committed into its backing file by `qemu-img
     commit -d` (qemu reads no differencing VHD); MB/s of data merged;
  3. chain: a VDI --chain deep (internal snapshots, data in each, GC off meanwhile), then
     the GC on: the time until it is idle with the chain at depth 1, the data unchanged.

    .venv/bin/python3 bench/filesr.py [--snapshots 20] [--coalesce-mib 128] [--chain 30]
"""
import argparse
import hashlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)

from smtap import names, settings                    # noqa: E402
from smtap.formats import vhd as V                    # noqa: E402
from smtap.sm import gcctl, vhdchain                     # noqa: E402
import benchlib                                       # noqa: E402

MiB = 1 << 20
BLOCK = 2 * MiB


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def new_vdi(x, sr, size, name):
    return x.VDI.create({"SR": sr, "virtual_size": str(size), "name_label": name,
                         "type": "user", "sharable": False, "read_only": False,
                         "other_config": {}, "sm_config": {}})


def vhd_path(location, x, vdi):
    return os.path.join(location, x.VDI.get_location(vdi) + ".vhd")


def chain_sha(path):
    h = hashlib.sha256()
    with V.Chain(path) as chain:
        for pos in range(0, chain.size, 8 * MiB):
            h.update(chain.read(pos, min(8 * MiB, chain.size - pos)))
    return h.hexdigest()


def log_since(offset):
    with open(settings.log_file()) as f:
        f.seek(offset)
        return f.read()


def log_size():
    try:
        return os.path.getsize(settings.log_file())
    except OSError:
        return 0


# -- 1. snapshot latency ----------------------------------------------------------------------
def snapshots(d, x, sr, host, dom0, count, rate, work):
    vdi = new_vdi(x, sr, 256 * MiB, "bench-live")
    vbd = x.VBD.create({"VM": dom0, "VDI": vdi, "userdevice": "autodetect", "bootable": False,
                        "mode": "RW", "type": "Disk", "empty": False, "other_config": {},
                        "qos_algorithm_type": "", "qos_algorithm_params": {}})
    x.VBD.plug(vbd)
    sr_uuid, vdi_uuid = x.SR.get_uuid(sr), x.VDI.get_uuid(vdi)
    uri = "nbd+unix:///%s?socket=%s" % (vdi_uuid, names.link_path(sr_uuid, vdi_uuid))
    argv = ["fio", "--name=load", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
            "--bs=4k", "--iodepth=8", "--size=256M", "--time_based", "--runtime=3600",
            "--output-format=terse"] + (["--rate=" + rate] if rate else [])
    fio = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    calls, previous = [], None
    start = log_size()
    try:
        time.sleep(2)
        for _ in range(count):
            t0 = time.perf_counter()
            snap = d.xe("vdi-snapshot", "uuid=" + vdi_uuid)
            calls.append(time.perf_counter() - t0)
            if previous:
                d.xe("vdi-destroy", "uuid=" + previous)
            previous = snap
            time.sleep(max(0, 1 - (time.perf_counter() - t0)))
    finally:
        fio.send_signal(signal.SIGINT)
        try:
            fio.wait(30)
        except subprocess.TimeoutExpired:
            fio.kill()
            fio.wait()
    held = [float(m) for m in re.findall(r"snapshot of %s: .* pause-to-unpause ([\d.]+) s"
                                         % vdi_uuid, log_since(start))]
    depth = vhdchain.depth(vhd_path(x.PBD.get_device_config(x.SR.get_PBDs(sr)[0])["location"],
                                    x, vdi))
    d.xe("vdi-destroy", "uuid=" + previous)
    x.VBD.unplug(vbd)
    x.VBD.destroy(vbd)
    x.VDI.destroy(vdi)
    gcctl.wait_idle(sr_uuid, timeout=600)
    return calls, held, depth


# -- 2. coalesce throughput ----------------------------------------------------------------------
def layout(size, mib, scattered):
    """The writes of the base and of the child: [(offset, length, pattern)]."""
    rng = random.Random(7)
    blocks = list(range(size // BLOCK))
    rng.shuffle(blocks)
    base = [(b * BLOCK, BLOCK, 0x11) for b in blocks[:len(blocks) // 4]]
    if scattered:
        child = [(rng.randrange(size // 4096) * 4096, 4096, 0x20 + i % 200)
                 for i in range(mib * MiB // 4096)]
    else:
        child = [(b * BLOCK, BLOCK, 0x20 + i % 200)
                 for i, b in enumerate(blocks[len(blocks) // 4:][:mib * MiB // BLOCK])]
    return base, child


def vhd_apply(path, writes):
    with V.VHD(path, writable=True) as img:
        for off, length, pat in writes:
            img.write(bytes([pat]) * length, off)


def qemu_apply(path, writes):
    script = "".join("write -P %d %d %d\n" % (pat, off, length) for off, length, pat in writes)
    subprocess.run(["qemu-io", "-f", "qcow2", path], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)


def coalesce(x, sr, location, mib, scattered, work):
    size = 1024 * MiB
    base_writes, child_writes = layout(size, mib, scattered)
    data = len(set(off for off, _, _ in child_writes)) * child_writes[0][1]
    vdi = new_vdi(x, sr, size, "bench-coalesce")
    vhd_apply(vhd_path(location, x, vdi), base_writes)
    snap1 = x.VDI.snapshot(vdi, {})
    vhd_apply(vhd_path(location, x, vdi), child_writes)
    snap2 = x.VDI.snapshot(vdi, {})             # the child's data now in a hidden base X
    sr_uuid = x.SR.get_uuid(sr)
    gcctl.wait_idle(sr_uuid, timeout=600)
    subprocess.run(["sync"], check=True)
    start = log_size()
    x.VDI.destroy(snap1)                        # X is the only child of its parent: merged
    gcctl.wait_idle(sr_uuid, timeout=1800)
    m = re.search(r"GC: coalescing \S+ into \S+: (\d+) sectors in ([\d.]+) s", log_since(start))
    if not m:
        raise RuntimeError("no coalesce in the GC's log")
    ours = float(m.group(2))
    for v in (snap2, vdi):
        x.VDI.destroy(v)
    gcctl.wait_idle(sr_uuid, timeout=600)

    base, top = os.path.join(work, "base.qcow2"), os.path.join(work, "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], check=True)
    qemu_apply(base, base_writes)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top],
                   check=True)
    qemu_apply(top, child_writes)
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", top], check=True)
    theirs = time.perf_counter() - t0
    os.unlink(base)
    os.unlink(top)
    return data, ours, theirs


# -- 3. a chain of 30 down to 1 ----------------------------------------------------------------------
def chain(x, sr, location, depth):
    sr_uuid = x.SR.get_uuid(sr)
    x.SR.add_to_other_config(sr, "gc", "false")
    vdi = new_vdi(x, sr, 128 * MiB, "bench-chain")
    path = vhd_path(location, x, vdi)
    rng = random.Random(3)
    for i in range(depth - 1):
        vhd_apply(path, [(rng.randrange(64) * BLOCK, BLOCK, i + 1)])
        x.VDI.snapshot(vdi, {"type": "internal"})
    vhd_apply(path, [(rng.randrange(64) * BLOCK, BLOCK, 0xee)])
    before, sha = vhdchain.depth(path), chain_sha(path)
    start = log_size()
    x.SR.remove_from_other_config(sr, "gc")
    t0 = time.perf_counter()
    x.SR.scan(sr)                               # kicks the GC
    gcctl.wait_idle(sr_uuid, timeout=3600)
    took = time.perf_counter() - t0
    text = log_since(start)
    after = vhdchain.depth(path)
    if chain_sha(path) != sha:
        raise RuntimeError("the chain's data changed")
    steps = (len(re.findall(r"GC: coalescing \S+ into \S+: \d+ sectors", text)),
             len(re.findall(r"GC: leaf-coalescing \S+ into \S+: \d+ sectors", text)))
    x.VDI.destroy(vdi)
    gcctl.wait_idle(sr_uuid, timeout=600)
    return before, after, took, steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--fio-rate", default="4m", help="fio's --rate during the snapshots "
                                                         "('' for none)")
    parser.add_argument("--coalesce-mib", type=int, default=128)
    parser.add_argument("--chain", type=int, default=30)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("filesr: needs root (loop devices, mounts, FUSE)\n")
        return 1
    with benchlib.local_toolstack("filesr") as (d, x):
        location = os.path.join(d.root, "srv", "bench")
        work = os.path.join(d.root, "work")
        os.makedirs(work)
        host = x.host.get_all()[0]
        dom0 = x.host.get_control_domain(host)
        sr = x.SR.create(host, {"location": location}, "0", "bench", "", "file", "user",
                         False, {})
        print("filesr: file SR on VHD, local toolstack, root %s" % d.root)
        if args.snapshots:
            calls, held, depth = snapshots(d, x, sr, host, dom0, args.snapshots,
                                           args.fio_rate, work)
            print("\n1. snapshot of a plugged 256 MiB VDI under fio randwrite 4k QD8%s, "
                  "%d snapshots 1 s apart, the older destroyed each time"
                  % (" at " + args.fio_rate + "B/s" if args.fio_rate else "", len(calls)))
            print("  %-34s %9s %9s %9s" % ("", "median", "p95", "max"))
            for name, values in (("pause-to-unpause (driver)", held),
                                 ("whole `xe vdi-snapshot` call", calls)):
                if values:
                    print("  %-34s %6.1f ms %6.1f ms %6.1f ms" % (
                        name, statistics.median(values) * 1000, pct(values, 95) * 1000,
                        max(values) * 1000))
            print("  chain depth of the VDI at the end: %d" % depth)
        if args.coalesce_mib:
            print("\n2. coalesce of %d MiB into its parent (1 GiB VDI, 256 MiB in the parent)"
                  % args.coalesce_mib)
            print("  %-26s %12s %12s %12s %7s" % ("child data", "GC", "qemu-img commit",
                                                  "GC MB/s", "ratio"))
            for scattered in (False, True):
                data, ours, theirs = coalesce(x, sr, location, args.coalesce_mib, scattered,
                                              work)
                print("  %-26s %10.2f s %10.2f s %12.1f %6.2fx" % (
                    "%s, %.0f MiB" % ("scattered 4 KiB" if scattered else "whole 2 MiB blocks",
                                      data / MiB), ours, theirs, data / ours / 1e6,
                    theirs / ours))
        if args.chain:
            before, after, took, (coalesces, leaves) = chain(x, sr, location, args.chain)
            print("\n3. a chain of %d (2 MiB written at each level) down to %d: %.2f s "
                  "(%d coalesces, %d leaf-coalesce)" % (before, after, took, coalesces, leaves))
        x.PBD.unplug(x.SR.get_PBDs(sr)[0])
        x.SR.destroy(sr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
