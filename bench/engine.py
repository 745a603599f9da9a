#!/usr/bin/env python3
"""Benchmark the tapdisk engine's NBD data path against its peers, in one invocation.

fio's nbd engine (unix socket) drives every server on the same data, one job at a time,
alternating servers within each job (order reversed every other round), like with like:
  * aio O_DIRECT:  engine aio  vs  qemu-nbd -f raw --cache=none --aio=native,
                   qemu-storage-daemon (raw, cache.direct=on, aio=native)
  * aio page cache: engine aio -D  vs  nbdkit file, qemu-nbd --cache=writeback,
                   qemu-storage-daemon (raw, cache.direct=off)
    (one 1 GiB raw file for all of them, in the page cache before each run)
  * memory:        engine ram  vs  nbdkit memory (both filled with the same data)
  * vhd O_DIRECT:  engine vhd  vs  qemu-nbd -f vpc --cache=none --aio=native,
                   qemu-storage-daemon (vpc, cache.direct=on, aio=native)
  * vhd page cache: engine vhd -D  vs  qemu-nbd -f vpc --cache=writeback,
                   qemu-storage-daemon (vpc, cache.direct=off)
    (each its own copy of one fully allocated 1 GiB dynamic VHD)
Jobs: 4k randread and randwrite at queue depth 1 (IOPS, p50/p99 completion latency;
fio and every server thread on one CPU, --qd1-cpu, so that no side pays a wakeup across
CPUs that the other is spared) and 32 (IOPS), 1M read and write at 8 (MB/s); for each run the server process's CPU
seconds per GB moved. Medians of --rounds runs. The ratio is the engine's over the best
peer of its kind. Then the scaling of several VBDs: N tapdisks (N = 1, 2, 4, one VBD
each, as upstream) serving N fio jobs (4k randread QD8, page cache) against as many
nbdkit file and qemu-nbd writeback instances: aggregate IOPS.

    .venv/bin/python3 bench/engine.py [--quick] [--runtime 2] [--rounds 3] [--size-mib 1024]
        [--groups aio,aio-D,ram,vhd,vhd-D,scaling] [--jobs '4k randread QD1,...']
        [--qd1-cpu 0 (-1: anywhere)]

The engine side runs through `tap-ctl create` under a private SMTAP_ROOT; SMTAP_IO
(io_uring, libaio) forces its I/O back end. bench/vhd.py uses the same machinery on
sparse and chained VHDs.
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

MiB = 1 << 20
# (label, fio rw, block size, queue depth)
JOBS = [
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD32", "randread", "4k", 32),
    ("1M read QD8", "read", "1M", 8),
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD32", "randwrite", "4k", 32),
    ("1M write QD8", "write", "1M", 8),
]
SCALING = (1, 2, 4)
SCALING_JOB = ("4k randread QD8", "randread", "4k", 8)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def median(runs):
    """The median run by its first figure (IOPS): one disturbed run does not move it."""
    runs = sorted(runs, key=lambda r: r[0])
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


def cpu_seconds(pid):
    """User + system CPU of a process, its exited threads included."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(CLK_TCK)


def run(*cmd, env=None):
    subprocess.run([str(c) for c in cmd], check=True, env=env, stdout=subprocess.DEVNULL)


class Server(object):
    """One server under test: its NBD URI, its pid (CPU), what stops it."""

    def __init__(self, name, uri, pid, stop, warm=None):
        self.name, self.uri, self.pid, self.stop, self.warm = name, uri, pid, stop, warm


class Servers(object):
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.taps = []
        self.io_backends = set()
        self.env = dict(os.environ, SMTAP_ROOT=os.path.join(tmp, "root"),
                        PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
        os.makedirs(self.env["SMTAP_ROOT"], exist_ok=True)

    def tap(self, params, *flags):
        """A tapdisk serving params: (URI, pid)."""
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
        stats = subprocess.run(["tap-ctl", "stats", "-p", str(pid), "-m", str(minor)],
                               env=self.env, stdout=subprocess.PIPE, text=True, check=True)
        io = json.loads(stats.stdout).get("io")
        if io:
            self.io_backends.add(io)        # what the VBD chose (or SMTAP_IO forced)
        return "nbd+unix:///?socket=" + path, pid

    def untap(self, uri):
        """Destroy the tapdisk tap() made for uri."""
        for pid, minor in list(self.taps):
            if uri.endswith(names.nbd_name(pid, minor)):
                subprocess.run(["tap-ctl", "destroy", "-p", str(pid), "-m", str(minor)],
                               env=self.env, check=True, stdout=subprocess.DEVNULL)
                self.taps.remove((pid, minor))

    def spawn(self, name, cmd, sock):
        """A peer server started with cmd, listening on sock: (URI, pid)."""
        if os.path.exists(sock):
            os.unlink(sock)                 # a previous one's: not ours to wait for
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        wait_socket(sock, proc, name)
        return "nbd+unix:///?socket=" + sock, proc.pid

    def unspawn(self, pid):
        for proc in list(self.procs):
            if proc.pid == pid:
                proc.terminate()
                proc.wait(10)
                self.procs.remove(proc)

    def sock(self, name):
        return os.path.join(self.tmp, "".join(c if c.isalnum() else "-" for c in name) + ".sock")

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

    # -- the servers, by kind -----------------------------------------------------------------
    def engine(self, name, params, *flags, warm=None):
        uri, pid = self.tap(params, *flags)
        return Server(name, uri, pid, lambda: self.untap(uri), warm)

    def peer(self, name, cmd, sock, warm=None):
        uri, pid = self.spawn(name, cmd, sock)
        return Server(name, uri, pid, lambda: self.unspawn(pid), warm)

    def nbdkit_file(self, name, path):
        sock = self.sock(name)
        return self.peer(name, ["nbdkit", "-f", "-U", sock, "file", "file=" + path], sock,
                         warm=path)

    def nbdkit_memory(self, name, size):
        sock = self.sock(name)
        return self.peer(name, ["nbdkit", "-f", "-U", sock, "memory", "size=%d" % size], sock)

    def qemu_nbd(self, name, path, fmt, direct):
        sock = self.sock(name)
        cache = ["--cache=none", "--aio=native"] if direct else ["--cache=writeback"]
        return self.peer(name, ["qemu-nbd", "-f", fmt] + cache + ["--shared=8", "-t", "-k",
                                                                   sock, path], sock,
                         warm=None if direct else path)

    def qsd(self, name, path, fmt, direct):
        """qemu-storage-daemon's NBD export of path (raw, vpc or qcow2). The format
        node's cache mode is what its backing files (opened by qemu, not here) inherit:
        without it a qcow2 chain's backing files were read through the page cache."""
        sock = self.sock(name)
        cache = "cache.direct=on,aio=native" if direct else "cache.direct=off"
        return self.peer(name, [
            "qemu-storage-daemon",
            "--blockdev", "driver=file,node-name=file0,filename=%s,%s" % (path, cache),
            "--blockdev", "driver=%s,node-name=disk0,file=file0,cache.direct=%s"
            % (fmt, "on" if direct else "off"),
            "--nbd-server", "addr.type=unix,addr.path=" + sock,
            "--export", "type=nbd,id=export0,node-name=disk0,name=,writable=on"], sock,
            warm=None if direct else path)


def fio_side(uri, rw, bs, qd, runtime, size, warm=None, time_based=True, cpu=None):
    """One fio run; its JSON for the direction it measured (iops, bw_bytes, clat_ns...).
    runtime None: the whole size once."""
    return fio_jobs([uri], rw, bs, qd, runtime, size, warm, time_based, cpu)[0]


def fio_jobs(uris, rw, bs, qd, runtime, size, warm=None, time_based=True, cpu=None):
    """One fio run with a job per URI, at once: each job's side."""
    # Each run starts with no dirty pages (else the page-cache writers' writeback lands on
    # whichever server runs next) and, for servers on a shared file, with the whole file
    # in the page cache (else a run after an O_DIRECT writer pays for the pages it evicted).
    os.sync()
    for path in ([warm] if isinstance(warm, str) else warm or []):
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    cmd = [] if cpu is None else ["taskset", "-c", str(cpu)]
    cmd += ["fio", "--ioengine=nbd", "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % qd,
           "--size=%d" % size, "--randrepeat=0", "--output-format=json"]
    if time_based:
        cmd += ["--runtime=%d" % runtime, "--time_based"]
    for i, uri in enumerate(uris):
        cmd += ["--name=job%d" % i, "--uri=" + uri]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        sys.exit("fio %s: %s" % (" ".join(uris), out.stderr.strip()))
    jobs = json.loads(out.stdout[out.stdout.index("{"):])["jobs"]
    return [job["write" if "write" in rw else "read"] for job in jobs]


def set_affinity(pid, cpus):
    """Every thread of process pid onto cpus (the threads it makes later inherit it)."""
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:
            pass                        # (a thread that just ended)


QD1_CPU = 0     # --qd1-cpu: QD1 runs with fio and the server on this CPU (None: anywhere)


def measure(server, rw, bs, qd, runtime, size):
    """(IOPS, MB/s, p50 us, p99 us, CPU s/GB) of one fio run on server. A QD1 run puts
    the client and every server thread on one CPU (QD1_CPU): on a VM a wakeup across
    vCPUs can cost more than the request (60 us here), and where the scheduler happens
    to put each side would decide the row."""
    pin = QD1_CPU if qd == 1 else None
    if pin is not None:
        set_affinity(server.pid, {pin})
    cpu = cpu_seconds(server.pid)
    try:
        side = fio_side(server.uri, rw, bs, qd, runtime, size, server.warm, cpu=pin)
    finally:
        if pin is not None:
            set_affinity(server.pid, os.sched_getaffinity(0))
    cpu = cpu_seconds(server.pid) - cpu
    pct = side.get("clat_ns", {}).get("percentile", {})
    gb = side["io_bytes"] / 1e9
    return (side["iops"], side["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1e3,
            pct.get("99.000000", 0) / 1e3, cpu / gb if gb else 0.0)


def run_group(gname, members, jobs, args, size, log=sys.stderr):
    """Every job on every member, alternating: {job label: {server name: median}}."""
    out = {}
    for label, rw, bs, qd in jobs:
        got = {s.name: [] for s in members}
        for rnd in range(args.rounds):
            for server in (members if rnd % 2 == 0 else members[::-1]):
                result = measure(server, rw, bs, qd, args.runtime, size)
                got[server.name].append(result)
                print("  %-14s %-18s %-30s %9.0f IOPS %8.1f MB/s %6.1f/%-7.1f us %6.2f CPU s/GB"
                      % ((gname, label, server.name) + result), file=log)
        out[label] = {name: median(r) for name, r in got.items()}
    return out


def cell(label, result):
    iops, mbs, p50, p99, _ = result
    if "1M" in label:
        return "%.0f MB/s" % mbs
    if "QD1" in label:
        return "%.0f (%.0f/%.0f us)" % (iops, p50, p99)
    return "%.0f" % iops


def print_group(title, names_, rows):
    """The table of one kind: engine first, its peers, the ratio to the best peer; then
    CPU seconds per GB moved."""
    engine, peers = names_[0], names_[1:]
    print("\n**%s**\n" % title)
    print("| job | %s | ratio |" % " | ".join(names_))
    print("|---|%s---:|" % ("---:|" * len(names_)))
    for label, res in rows.items():
        key = 1 if "1M" in label else 0
        best = max(res[p][key] for p in peers) if peers else 0
        ratio = res[engine][key] / best if best else 0
        print("| %s | %s | **%.2fx** |" % (label, " | ".join(cell(label, res[n]) for n in names_),
                                           ratio))
    if "4k randread QD32" not in rows and "1M read QD8" not in rows:
        return                          # (a table of other jobs: first writes)
    print("| CPU s/GB, 4k QD32 read / 1M read | %s | |" % " | ".join(
        "%.1f / %.2f" % (rows.get("4k randread QD32", {}).get(n, (0,) * 5)[4],
                         rows.get("1M read QD8", {}).get(n, (0,) * 5)[4]) for n in names_))


def written_vhd(servers, empty, data, dest, disk_type="vhd"):
    """dest: a copy of the empty image (VHD by default) with data's content written
    through the engine."""
    shutil.copy(empty, dest)
    uri, _ = servers.tap("%s:%s" % (disk_type, dest))
    run("nbdcopy", data, uri)
    servers.untap(uri)
    return dest


def make_raw(path, size):
    run("fio", "--name=fill", "--filename=" + path, "--rw=write", "--bs=1M", "--size=%d" % size,
        "--ioengine=psync", "--refill_buffers", "--output=/dev/null")
    return path


def versions(servers):
    def first(cmd, line=0, word=None):
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True).stdout.splitlines()
        text = out[line] if out else "?"
        return text.split()[word] if word is not None else text
    return "kernel %s; %s; nbdkit %s; %s; %s; I/O back end %s" % (
        os.uname().release, first(["fio", "--version"]), first(["nbdkit", "--version"], 0, -1),
        first(["qemu-nbd", "--version"]), first(["qemu-storage-daemon", "--version"]),
        ", ".join(sorted(servers.io_backends)) or "-")


def common_arguments(parser):
    """The options bench/engine.py and bench/vhd.py share."""
    parser.add_argument("--runtime", type=int, default=2, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and job")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--quick", action="store_true",
                        help="one round of 1 s per server and job (a check, not figures)")
    parser.add_argument("--qd1-cpu", type=int, default=0,
                        help="QD1 runs: fio and the server on this CPU (-1: anywhere)")


def parse(parser):
    global QD1_CPU
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.runtime = 1, 1
    QD1_CPU = None if args.qd1_cpu < 0 else args.qd1_cpu
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("--groups", default="aio,aio-D,ram,vhd,vhd-D,scaling",
                        help="which of aio, aio-D, ram, vhd, vhd-D, scaling to run")
    parser.add_argument("--jobs", default=",".join(j[0] for j in JOBS),
                        help="which jobs (labels, comma separated)")
    args = parse(parser)
    only = set(args.groups.split(","))
    jobs = [j for j in JOBS if j[0] in args.jobs.split(",")]
    size = args.size_mib << 20
    tmp = tempfile.mkdtemp(prefix="smtap-bench-", dir="/var/tmp")
    servers = Servers(tmp)
    started = time.time()
    tables = []
    try:
        data = make_raw(os.path.join(tmp, "disk.raw"), size)
        kinds = []
        if "aio" in only:
            kinds.append(("aio O_DIRECT", lambda: [
                servers.engine("engine aio", "aio:" + data),
                servers.qemu_nbd("qemu-nbd none/native", data, "raw", True),
                servers.qsd("qsd direct/native", data, "raw", True)]))
        if "aio-D" in only:
            kinds.append(("aio -D (page cache)", lambda: [
                servers.engine("engine aio -D", "aio:" + data, "-D", warm=data),
                servers.nbdkit_file("nbdkit file", data),
                servers.qemu_nbd("qemu-nbd writeback", data, "raw", False),
                servers.qsd("qsd writeback", data, "raw", False)]))
        if "ram" in only:
            def memory():
                ours = servers.engine("engine ram", "ram:" + data)     # the file is its seed
                peer = servers.nbdkit_memory("nbdkit memory", size)
                run("nbdcopy", data, peer.uri)                      # the same content
                return [ours, peer]
            kinds.append(("ram (memory)", memory))
        if only & {"vhd", "vhd-D"}:
            empty = os.path.join(tmp, "empty.vhd")
            run("vhd-util", "create", "-n", empty, "-s", size >> 20, env=servers.env)
            full = written_vhd(servers, empty, data, os.path.join(tmp, "full.vhd"))

            def copy(tag):
                dst = os.path.join(tmp, "full-%s.vhd" % tag)
                run("cp", "--sparse=always", full, dst)
                return dst
            if "vhd" in only:
                kinds.append(("vhd O_DIRECT", lambda: [
                    servers.engine("engine vhd", "vhd:" + copy("e")),
                    servers.qemu_nbd("qemu-nbd vpc none/native", copy("q"), "vpc", True),
                    servers.qsd("qsd vpc direct/native", copy("s"), "vpc", True)]))
            if "vhd-D" in only:
                def vhd_cached():
                    mine = copy("eD")
                    return [servers.engine("engine vhd -D", "vhd:" + mine, "-D", warm=mine),
                            servers.qemu_nbd("qemu-nbd vpc writeback", copy("qD"), "vpc", False),
                            servers.qsd("qsd vpc writeback", copy("sD"), "vpc", False)]
                kinds.append(("vhd -D (page cache)", vhd_cached))
        for title, make in kinds:
            members = make()
            rows = run_group(title.split(" (")[0], members, jobs, args, size)
            tables.append((title, [s.name for s in members], rows))
            for s in members:
                s.stop()
        scaling = None
        if "scaling" in only:
            scaling = run_scaling(servers, tmp, data, size, args)
    finally:
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - started

    print("\n%s, %s; %d s in all (%d rounds of %d s per server and job, medians; QD1: "
          "p50/p99 completion latency, %s)" % (
              time.strftime("%Y-%m-%d"), versions(servers), elapsed, args.rounds, args.runtime,
              "client and server on CPU %d" % QD1_CPU if QD1_CPU is not None
              else "client and server anywhere"))
    for title, names_, rows in tables:
        print_group(title, names_, rows)
    if scaling:
        label = SCALING_JOB[0]
        print("\n**several VBDs: one fio job each, %s, page cache (aggregate IOPS)**\n" % label)
        names_ = list(scaling[SCALING[0]])
        print("| VBDs | %s | ratio |" % " | ".join(names_))
        print("|---:|%s---:|" % ("---:|" * len(names_)))
        for n, res in scaling.items():
            best = max(res[p] for p in names_[1:])
            print("| %d | %s | **%.2fx** |" % (n, " | ".join("%.0f" % res[x] for x in names_),
                                               res[names_[0]] / best if best else 0))
    return 0


def run_scaling(servers, tmp, data, size, args):
    """N servers of each kind, each on its own copy of the data, N fio jobs at once:
    {N: {kind: median aggregate IOPS}}."""
    copies = []
    for i in range(max(SCALING)):
        dst = os.path.join(tmp, "scale-%d.raw" % i)
        shutil.copy(data, dst)
        copies.append(dst)
    kinds = [
        ("engine aio -D", lambda i: servers.engine("engine aio -D %d" % i, "aio:" + copies[i],
                                                   "-D")),
        ("nbdkit file", lambda i: servers.nbdkit_file("nbdkit file %d" % i, copies[i])),
        ("qemu-nbd writeback", lambda i: servers.qemu_nbd("qemu-nbd writeback %d" % i,
                                                          copies[i], "raw", False)),
    ]
    label, rw, bs, qd = SCALING_JOB
    out = {}
    for n in SCALING:
        made = {name: [make(i) for i in range(n)] for name, make in kinds}
        got = {name: [] for name, _ in kinds}
        for rnd in range(args.rounds):
            for name, _ in (kinds if rnd % 2 == 0 else kinds[::-1]):
                members = made[name]
                sides = fio_jobs([s.uri for s in members], rw, bs, qd, args.runtime, size,
                                 copies[:n])
                total = sum(side["iops"] for side in sides)
                got[name].append(total)
                print("  scaling  %d VBDs %-34s %9.0f IOPS" % (n, name, total), file=sys.stderr)
        for members in made.values():
            for s in members:
                s.stop()
        out[n] = {name: sorted(v)[len(v) // 2] for name, v in got.items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
