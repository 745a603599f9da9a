#!/usr/bin/env python3
"""SM operations on a ram SR through the local toolstack: how long a VDI's life takes.

Installs the suite into a temporary root, starts smtap-xapi there, creates a ram SR and
runs --rounds rounds of vdi-create, vbd-create + vbd-plug (dom0: tapdisk + nbdfuse +
loop device), vbd-unplug + vbd-destroy, vdi-destroy through the real XenAPI client (and,
unless --no-xe, the same through `xe`). Prints the median of each, and their sum against
the 1.0 s target for the four (vdi-create, vbd-plug, vbd-unplug, vdi-destroy).

Then where the time goes: the driver executions the toolstack logged (each SMAPI call is
one process of the SR driver), and the parts measured alone: Python start-up, the
driver's imports, a tapdisk's spawn + open (tap-ctl create) and destroy, nbdfuse + loop
attach and detach.

    .venv/bin/python3 bench/sm_ops.py [--rounds 20] [--vdi-size-mib 64] [--no-xe]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(TOP, ".venv", "bin", "python3")
sys.path.insert(0, TOP)

from smtap import names, settings               # noqa: E402
import benchlib                                 # noqa: E402

TARGET = 1.0
FOUR = ("vdi-create", "vbd-plug", "vbd-unplug", "vdi-destroy")
MiB = 1 << 20


def median_ms(values):
    return statistics.median(values) * 1000 if values else float("nan")


def timed(results, name, fn, *args, **kw):
    t0 = time.perf_counter()
    value = fn(*args, **kw)
    results.setdefault(name, []).append(time.perf_counter() - t0)
    return value


def api_rounds(x, sr, dom0, rounds, size):
    results = {}
    for i in range(rounds):
        vdi = timed(results, "vdi-create", x.VDI.create, {
            "SR": sr, "virtual_size": str(size), "name_label": "bench-%d" % i, "type": "user",
            "sharable": False, "read_only": False, "other_config": {}, "sm_config": {}})
        vbd = timed(results, "vbd-create", x.VBD.create, {
            "VM": dom0, "VDI": vdi, "userdevice": "autodetect", "bootable": False,
            "mode": "RW", "type": "Disk", "empty": False, "other_config": {},
            "qos_algorithm_type": "", "qos_algorithm_params": {}})
        timed(results, "vbd-plug", x.VBD.plug, vbd)
        if not x.VBD.get_device(vbd).startswith("loop"):
            raise RuntimeError("vbd-plug gave no loop device: %r" % x.VBD.get_device(vbd))
        timed(results, "vbd-unplug", x.VBD.unplug, vbd)
        timed(results, "vbd-destroy", x.VBD.destroy, vbd)
        timed(results, "vdi-destroy", x.VDI.destroy, vdi)
    return results


def xe_rounds(d, sr, dom0, rounds, size):
    results = {}
    for i in range(rounds):
        vdi = timed(results, "vdi-create", d.xe, "vdi-create", "sr-uuid=" + sr,
                    "name-label=bench-%d" % i, "virtual-size=%d" % size)
        vbd = timed(results, "vbd-create", d.xe, "vbd-create", "vm-uuid=" + dom0,
                    "vdi-uuid=" + vdi, "device=autodetect")
        timed(results, "vbd-plug", d.xe, "vbd-plug", "uuid=" + vbd)
        timed(results, "vbd-unplug", d.xe, "vbd-unplug", "uuid=" + vbd)
        timed(results, "vbd-destroy", d.xe, "vbd-destroy", "uuid=" + vbd)
        timed(results, "vdi-destroy", d.xe, "vdi-destroy", "uuid=" + vdi)
    return results


def driver_calls(log_text):
    """{SMAPI command: [seconds]} from the toolstack's "ramSR vdi_attach: exit 0 in 0.12s"."""
    calls = {}
    for m in re.finditer(r"ramSR (\w+): exit \d+ in ([\d.]+)s", log_text):
        calls.setdefault(m.group(1), []).append(float(m.group(2)))
    return calls


def parts(root, lib, sr_mount, rounds):
    """The pieces of a plug and an unplug, measured alone."""
    from smtap.tapdisk import blockdev, tapctl
    out = {}
    for _ in range(rounds):
        timed(out, "python3 -c pass (interpreter start-up)", subprocess.run,
              [VENV_PYTHON, "-c", "pass"], check=True)
        timed(out, "python3: import the ram driver (start-up + imports)", subprocess.run,
              [VENV_PYTHON, "-c", "import sys; sys.path.insert(0, %r); "
               "import smtap.sm.drivers.ramSR" % lib], check=True)
    image = os.path.join(sr_mount, "parts.ram")
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    for i in range(rounds):
        params = "ram:%s?writeback=1&budget=%d" % (image, 64 * MiB)
        pid, minor, _ = timed(out, "tapdisk spawn + attach + open (tap-ctl create)",
                              lambda: tapctl.create(params, export_name="parts"))
        mount_dir = os.path.join(root, "parts-mnt")
        sock = names.nbd_path(pid, minor)
        dev = timed(out, "nbdfuse + losetup (dom0 device attach)", blockdev.attach, sock,
                    "parts", mount_dir)
        timed(out, "losetup -d + fusermount -u (dom0 device detach)", blockdev.detach, mount_dir)
        timed(out, "tapdisk close + exit (tap-ctl destroy)", tapctl.destroy, pid, minor)
    os.unlink(image)
    return out


def table(title, results, names):
    print("\n%s" % title)
    print("  %-54s %10s" % ("operation", "median"))
    for name in names:
        if name in results:
            print("  %-54s %8.1f ms" % (name, median_ms(results[name])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--vdi-size-mib", type=int, default=64)
    parser.add_argument("--no-xe", action="store_true", help="skip the rounds through xe")
    parser.add_argument("--no-parts", action="store_true", help="skip the breakdown")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("sm_ops: needs root (loop devices, mounts, FUSE)\n")
        return 1
    size = args.vdi_size_mib * MiB
    with benchlib.local_toolstack("sm_ops") as (d, x):
        root = d.root
        host = x.host.get_all()[0]
        dom0 = x.host.get_control_domain(host)
        sr = x.SR.create(host, {"size": "%dMiB" % (2 * args.vdi_size_mib)}, "0", "bench", "",
                         "ram", "user", False, {})
        x.VDI.destroy(x.VDI.create({        # warm-up: first calls fill caches
            "SR": sr, "virtual_size": str(size), "name_label": "warm-up", "type": "user",
            "sharable": False, "read_only": False, "other_config": {}, "sm_config": {}}))
        print("sm_ops: ram SR, %d MiB VDIs, %d rounds, median per operation"
              % (args.vdi_size_mib, args.rounds))
        log_start = len(d.xapi_log())
        api = api_rounds(x, sr, dom0, args.rounds, size)
        calls = driver_calls(d.xapi_log()[log_start:])
        xe = None
        if not args.no_xe:
            xe = xe_rounds(d, x.SR.get_uuid(sr), x.VM.get_uuid(dom0), args.rounds, size)
        names = ["vdi-create", "vbd-create", "vbd-plug", "vbd-unplug", "vbd-destroy",
                 "vdi-destroy"]
        print("\n  %-14s %12s %12s" % ("operation", "XenAPI", "xe" if xe else ""))
        for name in names:
            print("  %-14s %9.1f ms %s" % (name, median_ms(api[name]),
                                          "%9.1f ms" % median_ms(xe[name]) if xe else ""))
        api_sum = sum(statistics.median(api[n]) for n in FOUR)
        line = "  %-14s %9.1f ms" % ("sum of the 4", api_sum * 1000)
        if xe:
            xe_sum = sum(statistics.median(xe[n]) for n in FOUR)
            line += " %9.1f ms" % (xe_sum * 1000)
        print(line)
        print("  (vdi-create + vbd-plug + vbd-unplug + vdi-destroy; target < %.1f s: %s)"
              % (TARGET, "met" if api_sum < TARGET else "MISSED"))
        order = ["vdi_create", "vdi_attach", "vdi_activate", "vdi_deactivate", "vdi_detach",
                 "vdi_delete"]
        print()
        table("Driver executions logged by the toolstack (one ramSR process each; "
              "10 ms resolution)", calls, order + sorted(set(calls) - set(order)))
        if not args.no_parts:
            lib = os.path.join(root, "opt", "smtap", "lib")
            sr_mount = os.path.join(settings.sr_mount_dir(), x.SR.get_uuid(sr))
            p = parts(root, lib, sr_mount, min(args.rounds, 10))
            table("Parts measured alone", p, list(p))
        x.PBD.unplug(x.SR.get_PBDs(sr)[0])
        x.SR.destroy(sr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
