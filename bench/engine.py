#!/usr/bin/env python3
"""Benchmark the tapdisk engine's NBD data path against its peers, in one invocation.

fio's nbd engine drives every server on the same data, one job at a time, alternating
servers within each job:
  * file:   engine aio (O_DIRECT), engine aio -D (page cache), nbdkit file (page cache),
            qemu-nbd -f raw --cache=none --aio=native (O_DIRECT),
            qemu-nbd -f raw --cache=writeback (page cache), on one 1 GiB raw file;
  * memory: engine ram vs nbdkit memory (both filled with the same 1 GiB first);
  * python: engine aio -D vs a minimal nbdkit python plugin on the same file.
Jobs: 4k randread QD32, 4k randwrite QD32, 1M read QD8, 1M write QD8; each server runs
each job --rounds times (order reversed every other round); the table shows the median.

    .venv/bin/python3 bench/engine.py [--runtime 5] [--size-mib 1024]

The engine side runs through `tap-ctl create` under a private SMTAP_ROOT.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(TOP, ".venv", "bin")
sys.path.insert(0, TOP)

from smtap import names, settings               # noqa: E402

JOBS = [
    ("4k randread QD32", "randread", "4k", 32),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M read QD8", "read", "1M", 8),
    ("1M write QD8", "write", "1M", 8),
]

PYTHON_PLUGIN = '''\
import os
import nbdkit
API_VERSION = 2
fd = -1

def config(key, value):
    global path
    if key == "file":
        path = value

def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL

def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)

def get_size(h):
    return os.fstat(h).st_size

def pread(h, buf, offset, flags):
    buf[:] = os.pread(h, len(buf), offset)

def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)

def close(h):
    os.close(h)
'''


# which engine configuration each peer is compared with: like for like
COUNTERPART = {
    "nbdkit file (page cache)": "engine aio -D (page cache)",
    "qemu-nbd cache=writeback": "engine aio -D (page cache)",
    "qemu-nbd cache=none aio=native": "engine aio (O_DIRECT)",
    "nbdkit memory": "engine ram",
    "nbdkit python plugin": "engine aio -D",
}


def median(runs):
    """(IOPS, MB/s) of the median run by IOPS: one disturbed run does not move it."""
    runs = sorted(runs)
    return runs[len(runs) // 2]


def wait_socket(path, proc, what, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            sys.exit("%s exited %d: %s" % (what, proc.returncode, err))
        if time.time() > deadline:
            sys.exit("%s: no socket %s after %ss" % (what, path, timeout))
        time.sleep(0.05)


class Servers(object):
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.taps = []
        self.env = dict(os.environ, SMTAP_ROOT=os.path.join(tmp, "root"),
                        PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))

    def tap(self, params, *flags):
        out = subprocess.run(["tap-ctl", "create", "-a", params] + list(flags), env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if out.returncode:
            sys.exit("tap-ctl create %s: %s" % (params, out.stderr.strip()))
        minor = int(out.stdout.strip().rsplit("-", 1)[1])
        listing = subprocess.run(["tap-ctl", "list", "-m", str(minor)], env=self.env,
                                 stdout=subprocess.PIPE, text=True, check=True).stdout
        pid = int(listing.split("pid=")[1].split()[0])
        self.taps.append((pid, minor))
        path = names.nbd_path(pid, minor, settings.runtime_dir(under=self.env["SMTAP_ROOT"]))
        wait_socket(path, None, params)
        return "nbd+unix:///?socket=" + path

    def spawn(self, name, cmd, sock):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        wait_socket(sock, proc, name)
        return "nbd+unix:///?socket=" + sock

    def sock(self, name):
        return os.path.join(self.tmp, name + ".sock")

    def untap(self, uri):
        """Destroy the tapdisk tap() made for uri."""
        for pid, minor in list(self.taps):
            if uri.endswith("nbd%d.%d" % (pid, minor)):
                subprocess.run(["tap-ctl", "destroy", "-p", str(pid), "-m", str(minor)],
                               env=self.env, check=True, stdout=subprocess.DEVNULL)
                self.taps.remove((pid, minor))

    def unspawn(self, uri):
        """Stop the server spawn() started for uri."""
        for proc in list(self.procs):
            if uri.endswith(proc.args[proc.args.index("-k") + 1] if "-k" in proc.args
                            else proc.args[proc.args.index("-U") + 1]):
                proc.terminate()
                proc.wait(10)
                self.procs.remove(proc)

    def close(self):
        for pid, minor in self.taps:
            subprocess.run(["tap-ctl", "destroy", "-p", str(pid), "-m", str(minor)],
                           env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fio_side(uri, rw, bs, qd, runtime, size, warm=None, time_based=True):
    """One fio run; its JSON for the direction it measured (iops, bw_bytes, clat_ns...).
    runtime None: the whole size once."""
    # Each run starts with no dirty pages (else the page-cache writers' writeback lands on
    # whichever server runs next) and, for servers sharing one file, with the whole file
    # in the page cache (else a run after an O_DIRECT writer pays for the pages it evicted).
    os.sync()
    if warm:
        subprocess.run(["cat", warm], stdout=subprocess.DEVNULL, check=True)
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=" + bs,
           "--iodepth=%d" % qd, "--size=%d" % size, "--randrepeat=0", "--output-format=json"]
    if time_based:
        cmd += ["--runtime=%d" % runtime, "--time_based"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        sys.exit("fio %s: %s" % (uri, out.stderr.strip()))
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return job["write" if "write" in rw else "read"]


def fio(uri, rw, bs, qd, runtime, size, warm=None):
    side = fio_side(uri, rw, bs, qd, runtime, size, warm)
    return side["iops"], side["bw_bytes"] / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", type=int, default=2, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and job")
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib << 20
    tmp = tempfile.mkdtemp(prefix="smtap-bench-", dir="/var/tmp")
    servers = Servers(tmp)
    try:
        data = os.path.join(tmp, "disk.raw")
        subprocess.run(["fio", "--name=fill", "--filename=" + data, "--rw=write", "--bs=1M",
                        "--size=%d" % size, "--ioengine=psync", "--refill_buffers",
                        "--output=/dev/null"], check=True)
        plugin = os.path.join(tmp, "plugin.py")
        with open(plugin, "w") as f:
            f.write(PYTHON_PLUGIN)

        groups = [
            ("file", [
                ("engine aio (O_DIRECT)", servers.tap("aio:" + data)),
                ("engine aio -D (page cache)", servers.tap("aio:" + data, "-D")),
                ("nbdkit file (page cache)", servers.spawn(
                    "nbdkit", ["nbdkit", "-f", "-U", servers.sock("nbdkit-file"), "file",
                               "file=" + data], servers.sock("nbdkit-file"))),
                ("qemu-nbd cache=none aio=native", servers.spawn(
                    "qemu-nbd", ["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native",
                                 "--shared=8", "-t", "-k", servers.sock("qemu-none"), data],
                    servers.sock("qemu-none"))),
                ("qemu-nbd cache=writeback", servers.spawn(
                    "qemu-nbd", ["qemu-nbd", "-f", "raw", "--cache=writeback", "--shared=8", "-t",
                                 "-k", servers.sock("qemu-wb"), data], servers.sock("qemu-wb"))),
            ]),
            ("memory", [
                ("engine ram", servers.tap("ram:" + data)),       # the file is its seed
                ("nbdkit memory", servers.spawn(
                    "nbdkit", ["nbdkit", "-f", "-U", servers.sock("nbdkit-mem"), "memory",
                               "size=%d" % size], servers.sock("nbdkit-mem"))),
            ]),
            ("python", [
                ("engine aio -D", None),
                ("nbdkit python plugin", servers.spawn(
                    "nbdkit", ["nbdkit", "-f", "-U", servers.sock("nbdkit-py"), "python", plugin,
                               "file=" + data], servers.sock("nbdkit-py"))),
            ]),
        ]
        groups[2][1][0] = ("engine aio -D", groups[0][1][1][1])
        # nbdkit memory gets the same content as the engine's ram disk
        subprocess.run(["nbdcopy", data, groups[1][1][1][1]], check=True)
        subprocess.run(["cat", data], stdout=subprocess.DEVNULL, check=True)   # warm the cache

        rows = []
        started = time.time()
        for gname, members in groups:
            for label, rw, bs, qd in JOBS:
                got = {name: [] for name, _ in members}
                for rnd in range(args.rounds):       # alternate, reversing the order each round
                    order = members if rnd % 2 == 0 else members[::-1]
                    for name, uri in order:
                        iops, mbs = fio(uri, rw, bs, qd, args.runtime, size,
                                        warm=data if gname != "memory" else None)
                        got[name].append((iops, mbs))
                        print("  %-7s %-18s %-32s %9.0f IOPS %8.1f MB/s"
                              % (gname, label, name, iops, mbs), file=sys.stderr)
                results = [(name,) + median(got[name]) for name, _ in members]
                rows.append((gname, label, results))
        elapsed = time.time() - started
    finally:
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| group | job | server | IOPS | MB/s | engine / server |")
    print("|---|---|---|---:|---:|---:|")
    for gname, label, results in rows:
        byname = {n: i for n, i, _ in results}
        for name, iops, mbs in results:
            twin = COUNTERPART.get(name)
            ratio = "%.2fx (%s)" % (byname[twin] / iops, twin) if twin and iops else ""
            print("| %s | %s | %s | %.0f | %.1f | %s |" % (gname, label, name, iops, mbs, ratio))
    print("\n%d s of fio runs (%d rounds of %d s, median); kernel %s; fio %s; nbdkit %s; %s" % (
        elapsed, args.rounds, args.runtime, os.uname().release,
        subprocess.run(["fio", "--version"], stdout=subprocess.PIPE, text=True).stdout.strip(),
        subprocess.run(["nbdkit", "--version"], stdout=subprocess.PIPE, text=True).stdout.split()[-1],
        subprocess.run(["qemu-nbd", "--version"], stdout=subprocess.PIPE,
                       text=True).stdout.splitlines()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
