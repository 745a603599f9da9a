#!/usr/bin/env python3
"""Benchmark what a guest sees: fio inside the tiny guest (toolstack/guest), on a VDI of
this engine against the same guest on qemu's own backends, in one invocation.

One raw file (--size-mib, filled with random data first) is the disk of every side:
  * engine:    a file SR VDI (the engine's aio, O_DIRECT), plugged by `xe vm-start` on
               the local toolstack: virtio-blk on the VDI's NBD export (cache=none);
  * qemu-raw:  the same guest with qemu's own raw file backend (cache=none, aio=native);
  * qemu-nbd:  the same guest on qemu-nbd -f raw --cache=none --aio=native's export.
Jobs (fio in the guest, libaio, O_DIRECT, on the whole disk): 4k randread and randwrite
at QD1 and QD32, 1M read and write at QD8. Each boot runs every job once; each side
boots --rounds times, the sides alternating (order reversed every other round); the
table shows medians and the ratios engine / peer.

    .venv/bin/python3 bench/guest.py [--runtime 5] [--rounds 3] [--size-mib 512] [--vcpus 2]

Guests run with KVM where the host's KVM runs a stock kernel, under TCG otherwise
(SMTAP_GUEST_ACCEL decides): under TCG the guest's CPU is the bottleneck and the
ratios say little about the data path. The accelerator is printed with the table.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(TOP, ".venv", "bin", "python3")
sys.path.insert(0, TOP)

from smtap import settings                      # noqa: E402
from smtap.toolstack import hostroot, qemu     # noqa: E402

MiB = 1 << 20
JOBS = [  # name, rw, bs, iodepth, unit
    ("4k randread QD1", "randread", "4k", 1, "IOPS"),
    ("4k randread QD32", "randread", "4k", 32, "IOPS"),
    ("4k randwrite QD1", "randwrite", "4k", 1, "IOPS"),
    ("4k randwrite QD32", "randwrite", "4k", 32, "IOPS"),
    ("1M read QD8", "read", "1M", 8, "MB/s"),
    ("1M write QD8", "write", "1M", 8, "MB/s"),
]
SIDES = ("engine", "qemu-raw", "qemu-nbd")
BOOT_TIMEOUT = 900


def script(runtime):
    """The guest's script: every job once, each result on the console (terse v3:
    field 7/8 read bandwidth/IOPS, 48/49 write)."""
    lines = ["d=$(disk xvda)"]
    for n, (name, rw, bs, qd, unit) in enumerate(JOBS):
        lines.append(
            "fio --name=j%d --filename=$d --rw=%s --bs=%s --iodepth=%d --ioengine=libaio "
            "--direct=1 --time_based --runtime=%d --ramp_time=1 --output-format=terse "
            ">/run/j%d.out 2>&1 && result j%d \"$(tail -1 /run/j%d.out | cut -d';' -f7,8,48,49)\""
            % (n, rw, bs, qd, runtime, n, n, n))
    return "\n".join(lines) + "\n"


def parse(console):
    """{job name: value} from a boot's smtap-result lines."""
    out = {}
    for n, (name, rw, bs, qd, unit) in enumerate(JOBS):
        m = re.search(r"^smtap-result: j%d=([\d.]+);([\d.]+);([\d.]+);([\d.]+)" % n,
                      console, re.M)
        if not m:
            continue
        rbw, riops, wbw, wiops = (float(x) for x in m.groups())
        write = rw in ("write", "randwrite")
        out[name] = (wiops if write else riops) if unit == "IOPS" else \
            (wbw if write else rbw) * 1024 / 1e6
    return out


def median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


class Bench(object):
    def __init__(self, args):
        self.args = args
        self.root = hostroot.short_root("/tmp/b")
        os.environ[settings.ROOT_ENV] = self.root
        self.env = dict(os.environ)
        self.bin = os.path.join(self.root, "opt", "smtap", "bin")
        self.xapi = None
        self.qemu_nbd = None

    def run(self, *argv, **kw):
        return subprocess.run(list(argv), env=self.env, check=True, stdout=subprocess.PIPE,
                              universal_newlines=True, **kw).stdout.strip()

    def xe(self, *args):
        return self.run(os.path.join(self.bin, "xe"), *args)

    def setup(self):
        self.run("make", "-s", "-C", TOP, "install", "DESTDIR=" + self.root,
                 "PYTHON=" + VENV_PYTHON)
        log = open(os.path.join(self.root, "smtap-xapi.out"), "a")
        self.xapi = subprocess.Popen([os.path.join(self.bin, "smtap-xapi")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        if not hostroot.wait_for_socket(settings.xapi_socket(), 30):
            raise SystemExit("smtap-xapi did not start")
        files = os.path.join(self.root, "srv", "files")
        sr = self.xe("sr-create", "type=file", "name-label=bench",
                     "device-config:location=" + files)
        self.vdi = self.xe("vdi-create", "sr-uuid=" + sr, "name-label=bench-disk",
                           "virtual-size=%dMiB" % self.args.size_mib)
        self.file = os.path.join(files, self.vdi + ".raw")
        self.run("dd", "if=/dev/urandom", "of=" + self.file, "bs=1M",
                 "count=%d" % self.args.size_mib, "conv=notrunc,fsync", "status=none")
        self.vm = self.xe("vm-install", "template=smtap-guest", "new-name-label=bench")
        self.xe("vbd-create", "vm-uuid=" + self.vm, "vdi-uuid=" + self.vdi, "device=0")
        self.xe("vm-param-set", "uuid=" + self.vm, "VCPUs-max=%d" % self.args.vcpus,
                "VCPUs-at-startup=%d" % self.args.vcpus,
                "xenstore-data:vm-data/script=" + script(self.args.runtime))
        self.record = self.vm_record()

    def vm_record(self):
        fields = {}
        for name in ("PV-kernel", "PV-ramdisk", "memory-static-max"):
            fields[name] = self.xe("vm-param-get", "uuid=" + self.vm, "param-name=" + name)
        return {"uuid": str(uuid.uuid4()), "name_label": "bench-peer", "PV_args": "",
                "PV_kernel": fields["PV-kernel"], "PV_ramdisk": fields["PV-ramdisk"],
                "memory_static_max": int(fields["memory-static-max"]),
                "VCPUs_at_startup": self.args.vcpus}

    # -- the sides -------------------------------------------------------------------------
    def engine(self):
        console = os.path.join(settings.vm_log_dir(), self.vm + ".console.log")
        self.xe("vm-start", "uuid=" + self.vm)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.xe("vm-param-get", "uuid=" + self.vm, "param-name=power-state") != "halted":
            if time.monotonic() > deadline:
                self.xe("vm-shutdown", "uuid=" + self.vm, "--force")
                raise RuntimeError("the engine's guest did not finish")
            time.sleep(1)
        with open(console, errors="replace") as f:
            return f.read().rsplit("--- smtap: start", 1)[-1]

    def peer(self, disk):
        """The same guest with qemu's own backend for its disk."""
        rec = dict(self.record, uuid=str(uuid.uuid4()))
        paths = qemu.Paths(rec["uuid"])
        os.makedirs(os.path.join(paths.fw_cfg, "vm-data"))
        with open(os.path.join(paths.fw_cfg, "vm-data", "script"), "w") as f:
            f.write(script(self.args.runtime))
        fw_cfg = {"opt/org.smtap/vm-data/script": os.path.join(paths.fw_cfg, "vm-data",
                                                               "script")}
        argv = qemu.command_line(rec, paths, [dict(disk, id="xvda", read_only=False)],
                                 fw_cfg, qemu.accelerator())
        pid = qemu.launch(argv, paths)
        try:
            qemu.command(paths, "cont")
            if not qemu.wait_gone(pid, rec["uuid"], BOOT_TIMEOUT):
                raise RuntimeError("the guest on %s did not finish" % disk)
        finally:
            qemu.kill(pid, rec["uuid"])
            shutil.rmtree(paths.dir, ignore_errors=True)
        with open(paths.console, errors="replace") as f:
            return f.read()

    def qemu_raw(self):
        return self.peer({"filename": self.file})

    def qemu_nbd_side(self):
        sock = os.path.join(self.root, "qemu-nbd.sock")
        proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native",
                                 "-t", "--shared=8", "-k", sock, self.file],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not hostroot.wait_for_socket(sock, 30):
                raise RuntimeError("qemu-nbd did not start")
            return self.peer({"socket": sock, "export": ""})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait()

    def close(self):
        if self.xapi is not None:
            self.xapi.send_signal(signal.SIGTERM)
            self.xapi.wait()
        hostroot.cleanup(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--rounds", type=int, default=3, help="boots per side")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--vcpus", type=int, default=2)
    args = parser.parse_args()
    why = qemu.available()
    if why or os.geteuid() != 0:
        sys.exit("bench/guest.py: %s" % (why or "needs root"))
    bench = Bench(args)
    results = dict((side, dict((job[0], []) for job in JOBS)) for side in SIDES)
    try:
        bench.setup()
        runners = {"engine": bench.engine, "qemu-raw": bench.qemu_raw,
                   "qemu-nbd": bench.qemu_nbd_side}
        for r in range(args.rounds):
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                t0 = time.monotonic()
                got = parse(runners[side]())
                sys.stderr.write("round %d %-8s %.0f s: %s\n" % (r + 1, side,
                                                                  time.monotonic() - t0, got))
                for job, value in got.items():
                    results[side][job].append(value)
    finally:
        bench.close()
    print("guest fio on a %d MiB raw file, %d vCPU, accel %s, %d s per job, median of %d "
          "boots" % (args.size_mib, args.vcpus, qemu.accelerator(), args.runtime, args.rounds))
    print("| job | engine | qemu raw none/native | ratio | qemu-nbd none/native | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, _, _, unit in JOBS:
        e, raw, nbd = (median(results[s][name]) for s in SIDES)

        def cell(v):
            return "%.0f" % v if v is not None else "-"

        def ratio(a, b):
            return "%.2fx" % (a / b) if a and b else "-"
        print("| %s (%s) | %s | %s | %s | %s | %s |" % (name, unit, cell(e), cell(raw),
                                                       ratio(e, raw), cell(nbd), ratio(e, nbd)))


if __name__ == "__main__":
    main()
