"""`make demo`: the suite end to end on a simulated host, through the real `xe`.

Installs the suite into a temporary root (as `make install` lays it out on a host),
starts the local toolstack there, and drives it with the installed `xe` like a person
would: a ram SR, a VDI, a dom0 VBD plugged -> /dev/loopN, mkfs.ext4, mount, files
written and read back, a snapshot (checked by plugging it read-only: e2fsck and the same
files), then everything unplugged and destroyed; then a file SR on VHD: a snapshot of the
mounted file system being written (frozen for it), a clone of the snapshot plugged,
checked and written, both compared, the garbage collector run until nothing is left.
With --guest, a guest too, on the first SR (ram by default): a VM of the built-in
template, booted with qemu, with a VDI of that SR as its disk: its script makes a file
system, writes, reads back and compares sha256, and powers off. Each step prints its
command line and its time. At the end nothing may be left behind: no process, loop
device, mount, socket, link or record of the root. Exit 0 only if every step worked and
nothing is left.

    make demo                       # = make build; .venv/bin/python3 -m smtap.toolstack.demo
    python3 -m smtap.toolstack.demo [--sr-type all|ram|file] [--vdi-size 128MiB] [--guest]
                                    [--keep-root]

What a root leaves behind is found and removed by smtap.toolstack.hostroot.
"""
import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

from smtap import settings, units
from smtap.toolstack.hostroot import (cleanup, leftovers, loops_under, mounts_under,
                                      processes_under, short_root, wait_for_socket)

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(TOP, ".venv", "bin", "python3")
MiB = 1 << 20
GUEST_BOOT = 180         # seconds for the guest to boot, run its script and power off
# The guest's script (toolstack/guest/init runs it; `disk` and `result` are its helpers).
GUEST_SCRIPT = """set -e
d=$(disk xvda)
mkfs.ext4 -q -F -L guest-demo $d
mount $d /mnt
dd if=/dev/urandom of=/mnt/random-8M.bin bs=1M count=8 2>/dev/null
echo "hello from a guest on the engine's NBD export" >/mnt/hello.txt
sha256sum /mnt/random-8M.bin /mnt/hello.txt >/run/sums
result written "$(sha256sum </run/sums | cut -c1-16)"
umount /mnt
mount -o ro $d /mnt
sha256sum -c /run/sums >/dev/null && result read-back "$(sha256sum </run/sums | cut -c1-16)"
umount /mnt
"""

class StepFailed(Exception):
    pass


# --- the demo ---------------------------------------------------------------------------
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Demo(object):
    def __init__(self, root, sr_type="ram", vdi_size="128MiB", sr_size="512MiB",
                 location=None, out=sys.stdout, guest=False):
        self.root = root
        self.sr_types = ["ram", "file"] if sr_type == "all" else [sr_type]
        self.vdi_size = vdi_size
        self.sr_size = sr_size
        self.location = location or os.path.join(root, "srv", "file-sr")
        self.out = out
        self.env = dict(os.environ, **{settings.ROOT_ENV: root})
        self.bin = os.path.join(root, "opt", "smtap", "bin")
        self.env["PATH"] = self.bin + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
        self.xapi = None
        self.frozen = None       # a file system fsfreeze -f'd, until -u
        self.steps = []          # (name, seconds, ok)
        self.files = {}          # name -> sha256
        self.groups = {}         # prefix -> the files written with it (its manifest)
        self.mnt = os.path.join(root, "mnt")
        # What exists, for the clean-up on failure (undone in reverse order).
        self.mounted = []
        self.plugged = []
        self.vbds = []
        self.vdis = []
        self.sr = None
        self.vms = []
        self.guest = guest
        self.vars = {"ROOT": root}   # shell variables of the printed command lines

    def forget(self, value):
        self.vars = {k: v for k, v in self.vars.items() if v != value or k == "ROOT"}

    # -- output --------------------------------------------------------------------------
    def line(self, seconds, text, status):
        self.out.write("[%6.3f s] %s ... %s\n" % (seconds, text, status))
        self.out.flush()

    def step(self, text, fn, *args):
        """Run one step: print it with its time; a failure raises StepFailed."""
        t0 = time.monotonic()
        try:
            result = fn(*args)
        except Exception as e:
            dt = time.monotonic() - t0
            self.steps.append((text, dt, False))
            self.line(dt, text, "FAILED")
            msg = str(e).strip()
            self.out.write("           " + msg.replace("\n", "\n           ") + "\n")
            raise StepFailed(text)
        dt = time.monotonic() - t0
        self.steps.append((text, dt, True))
        shown = result if isinstance(result, str) and result and len(result) < 60 else None
        self.line(dt, text, "ok" + (" -> %s" % shown if shown else ""))
        return result

    # -- commands ------------------------------------------------------------------------
    def run(self, argv, timeout=120, input=None):
        proc = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=timeout, input=input, cwd=self.root)
        if proc.returncode:
            raise RuntimeError("%s exited %d\n%s" % (
                " ".join(shlex.quote(a) for a in argv), proc.returncode,
                (proc.stderr.strip() or proc.stdout.strip())))
        return proc.stdout.strip()

    def xe(self, *args):
        return self.run([os.path.join(self.bin, "xe")] + list(args))

    def shown(self, argv):
        """A command line as a person types it: known uuids as $VARIABLES."""
        text = " ".join(shlex.quote(a) for a in argv)
        for name, value in self.vars.items():
            text = text.replace(value, "$" + name)
        return text

    def xe_step(self, *args, var=None):
        """A step that is one xe command, printed as typed (VAR=$(xe ...) if kept)."""
        text = self.shown(["xe"] + list(args))
        result = self.step("%s=$(%s)" % (var, text) if var else text, self.xe, *args)
        if var:
            self.vars[var] = result
        return result

    def cmd_step(self, argv, **kw):
        return self.step(self.shown(argv), self.run, argv, **kw)

    # -- the toolstack -------------------------------------------------------------------
    def install(self):
        subprocess.run(["make", "-s", "-C", TOP, "install", "DESTDIR=" + self.root,
                        "PYTHON=" + VENV_PYTHON], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, universal_newlines=True)

    def start(self):
        log = open(os.path.join(self.root, "smtap-xapi.out"), "a")
        self.xapi = subprocess.Popen([os.path.join(self.bin, "smtap-xapi")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     stdin=subprocess.DEVNULL)
        log.close()
        sock = os.path.join(self.root, "var", "lib", "xcp", "xapi")
        if not wait_for_socket(sock, 20):
            raise RuntimeError("smtap-xapi did not start:\n" + self.xapi_output())

    def xapi_log(self):
        """What smtap-xapi printed (its log: one line per driver call, with its time)."""
        try:
            with open(os.path.join(self.root, "smtap-xapi.out")) as f:
                return f.read()
        except OSError:
            return ""

    def xapi_output(self):
        return self.xapi_log()[-3000:]

    def stop(self):
        if self.xapi is None:
            return
        if self.xapi.poll() is None:
            self.xapi.send_signal(signal.SIGTERM)
            try:
                self.xapi.wait(10)
            except subprocess.TimeoutExpired:
                self.xapi.kill()
                self.xapi.wait()
        rc, self.xapi = self.xapi.returncode, None
        if rc not in (0, -signal.SIGTERM):
            raise RuntimeError("smtap-xapi exited %d\n%s" % (rc, self.xapi_output()))

    # -- the flow --------------------------------------------------------------------------
    def plug(self, vdi, dom0, mode="RW", var="VBD"):
        vbd = self.xe_step("vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi,
                           "device=%d" % len(self.vbds), "mode=" + mode, var=var)
        self.vbds.append(vbd)
        self.xe_step("vbd-plug", "uuid=" + vbd)
        self.plugged.append(vbd)
        name = self.xe_step("vbd-param-get", "uuid=" + vbd, "param-name=device")
        dev = "/dev/" + name

        def check_device():
            if not name or not os.path.exists(dev):
                raise RuntimeError("vbd-plug gave no block device (device=%s)" % name)
            backing = dict(loops_under(self.root)).get(dev)
            if backing is None:
                raise RuntimeError("%s is not a loop device backed under %s" % (dev, self.root))
            size = int(self.run(["blockdev", "--getsize64", dev]))
            want = int(self.xe("vdi-param-get", "uuid=" + vdi, "param-name=virtual-size"))
            if size != want:
                raise RuntimeError("%s is %d bytes, the VDI %d" % (dev, size, want))
            return "%d MiB" % (size // MiB)
        self.step("check %s: a loop device on the engine's NBD export" % dev, check_device)
        return vbd, dev

    def unplug(self, vbd):
        self.xe_step("vbd-unplug", "uuid=" + vbd)
        self.plugged.remove(vbd)
        self.xe_step("vbd-destroy", "uuid=" + vbd)
        self.vbds.remove(vbd)
        self.forget(vbd)

    def mount(self, dev, point, *options):
        os.makedirs(point, exist_ok=True)
        self.cmd_step(["mount"] + list(options) + [dev, point])
        self.mounted.append(point)

    def umount(self, point):
        self.cmd_step(["umount", point])
        self.mounted.remove(point)

    def write_files(self, point, seed=42, prefix=""):
        rng = random.Random(seed)
        sizes = {"hello.txt": None, "random-1M.bin": MiB, "random-8M.bin": 8 * MiB}
        for name, size in sizes.items():
            path = os.path.join(point, prefix + name)
            data = (b"hello from smtap: an SR through tapdisk, nbdfuse and a loop device\n"
                    if size is None else rng.getrandbits(8 * size).to_bytes(size, "little"))
            with open(path, "wb") as f:
                f.write(data)
            self.files[prefix + name] = hashlib.sha256(data).hexdigest()
        group = dict((n, d) for n, d in self.files.items() if n.startswith(prefix) and
                     (prefix or not [p for p in self.groups if p and n.startswith(p)]))
        self.groups[prefix] = group
        os.makedirs(os.path.join(point, "dir", "sub"), exist_ok=True)
        with open(os.path.join(point, "dir", "sub", prefix + "manifest.json"), "w") as f:
            json.dump(group, f, sort_keys=True)
        os.sync()
        return "%d files, %.1f MiB" % (len(self.files) + 1,
                                       sum(s or 0 for s in sizes.values()) / MiB)

    def read_back(self, point):
        for name, digest in self.files.items():
            got = sha256(os.path.join(point, name))
            if got != digest:
                raise RuntimeError("%s: sha256 %s, wrote %s" % (name, got, digest))
        for prefix, group in self.groups.items():
            if set(group) <= set(self.files):
                with open(os.path.join(point, "dir", "sub", prefix + "manifest.json")) as f:
                    if json.load(f) != group:
                        raise RuntimeError("%smanifest.json differs" % prefix)
        return "%d sha256 match" % len(self.files)

    def check_records(self):
        left = []
        for cls in ("vbd", "vdi", "pbd", "sr"):
            uuids = [u for u in self.xe(cls + "-list", "--minimal").split(",") if u]
            left += ["%s %s" % (cls.upper(), u) for u in uuids]
        left += ["VM %s" % u for u in self.xe("vm-list", "is-control-domain=false",
                                              "--minimal").split(",") if u]
        if left:
            raise RuntimeError("records left: " + ", ".join(left))
        return "none"

    def flow(self):
        self.step(self.shown(["make", "install", "DESTDIR=" + self.root, "PYTHON=" + VENV_PYTHON]),
                  self.install)
        self.step("SMTAP_ROOT=$ROOT smtap-xapi &", self.start)
        host = self.xe_step("host-list", "--minimal", var="HOST")
        dom0 = self.xe_step("vm-list", "is-control-domain=true", "--minimal", var="DOM0")
        for sr_type in self.sr_types:
            self.files, self.groups = {}, {}
            (self.ram_flow if sr_type == "ram" else self.file_flow)(host, dom0)
            self.forget_vars()
        self.step("no records left (xe vm-list, vbd-list, vdi-list, pbd-list, sr-list)",
                  self.check_records)
        self.step("stop smtap-xapi", self.stop)

    def forget_vars(self):
        self.vars = dict((k, v) for k, v in self.vars.items() if k in ("ROOT", "HOST", "DOM0"))

    def create_sr(self, host, sr_type, *config):
        self.sr = self.xe_step("sr-create", "host-uuid=" + host, "type=" + sr_type,
                               "name-label=demo-" + sr_type, *config, var="SR")
        vdi = self.xe_step("vdi-create", "sr-uuid=" + self.sr, "name-label=demo-disk",
                           "virtual-size=" + self.vdi_size, var="VDI")
        self.vdis.append(vdi)
        return vdi

    def destroy_sr(self):
        pbd = self.xe_step("pbd-list", "sr-uuid=" + self.sr, "--minimal", var="PBD")
        self.xe_step("pbd-unplug", "uuid=" + pbd)
        self.xe_step("sr-destroy", "uuid=" + self.sr)
        self.sr = None

    def ram_flow(self, host, dom0):
        vdi = self.create_sr(host, "ram", "device-config:size=" + self.sr_size)
        vbd, dev = self.plug(vdi, dom0)
        self.cmd_step(["mkfs.ext4", "-q", "-F", "-L", "smtap-demo", dev])
        point = os.path.join(self.mnt, "disk")
        self.mount(dev, point)
        self.step("write files to %s, sync" % self.shown([point]), self.write_files, point)
        self.umount(point)
        self.mount(dev, point)
        self.step("read back, compare sha256", self.read_back, point)
        self.umount(point)
        snap = self.xe_step("vdi-snapshot", "uuid=" + vdi, var="SNAP")
        self.vdis.append(snap)
        self.unplug(vbd)
        svbd, sdev = self.plug(snap, dom0, mode="RO", var="SNAP_VBD")
        self.cmd_step(["e2fsck", "-f", "-n", sdev])
        spoint = os.path.join(self.mnt, "snapshot")
        self.mount(sdev, spoint, "-o", "ro,noload")
        self.step("read the snapshot's files, compare sha256", self.read_back, spoint)
        self.umount(spoint)
        self.unplug(svbd)
        self.destroy_vdi(snap)
        self.destroy_vdi(vdi)
        self.guest_on_sr("ram")
        self.destroy_sr()

    def destroy_vdi(self, vdi):
        self.xe_step("vdi-destroy", "uuid=" + vdi)
        self.vdis.remove(vdi)
        self.forget(vdi)

    def file_flow(self, host, dom0):
        """A file SR on VHD: a snapshot of the mounted file system while it is written, a
        clone of it plugged and written, both compared, then the GC leaves one file."""
        vdi = self.create_sr(host, "file", "device-config:location=" + self.location)
        self.vars["SRDIR"] = self.location
        vbd, dev = self.plug(vdi, dom0)
        self.cmd_step(["mkfs.ext4", "-q", "-F", "-L", "smtap-demo", dev])
        point = os.path.join(self.mnt, "disk")
        self.mount(dev, point)
        self.step("write files to %s, sync" % self.shown([point]), self.write_files, point)
        before = dict(self.files)
        self.cmd_step(["fsfreeze", "-f", point])         # what a guest agent does for it
        self.frozen = point
        snap = self.xe_step("vdi-snapshot", "uuid=" + vdi, var="SNAP")
        self.vdis.append(snap)
        self.cmd_step(["fsfreeze", "-u", point])
        self.frozen = None
        self.step("write more files to %s (the VDI moves on), sync" % self.shown([point]),
                  self.write_files, point, 7, "after-")
        after = dict(self.files)
        clone = self.xe_step("vdi-clone", "uuid=" + snap, var="CLONE")
        self.vdis.append(clone)
        cvbd, cdev = self.plug(clone, dom0, var="CLONE_VBD")
        self.cmd_step(["e2fsck", "-f", "-n", cdev])
        cpoint = os.path.join(self.mnt, "clone")
        self.mount(cdev, cpoint)
        self.files = before
        self.step("read the clone's files, compare sha256", self.read_back, cpoint)
        self.step("the clone has none of the files written after the snapshot",
                  self.absent, cpoint, sorted(set(after) - set(before)))
        self.step("write files to the clone, sync", self.write_files, cpoint, 9, "clone-")
        self.umount(cpoint)
        self.files = after
        self.step("read the VDI's files, compare sha256", self.read_back, point)
        self.step("the VDI has none of the clone's files", self.absent, point,
                  ["clone-" + n for n in before])
        self.umount(point)
        self.unplug(cvbd)
        self.unplug(vbd)
        self.destroy_vdi(snap)
        self.destroy_vdi(clone)
        self.step(self.shown(["smtap-gc", "-u", self.sr, "-g"]), self.gc_run)
        self.step("ls $SRDIR: one VHD, no base copy left", self.one_file, vdi)
        self.destroy_vdi(vdi)
        self.guest_on_sr("file")
        self.destroy_sr()

    def absent(self, point, names):
        there = [n for n in names if os.path.exists(os.path.join(point, n))]
        if there:
            raise RuntimeError("unexpected: %s" % ", ".join(there))
        return "%d absent" % len(names)

    def gc_run(self):
        """The collector, by hand: an SR scan starts it; its status lines until idle."""
        lines = self.run([os.path.join(self.bin, "smtap-gc"), "-u", self.sr, "-g"],
                         timeout=300).splitlines()
        if lines[-1] != "idle":
            raise RuntimeError("the collector ended: %s" % "; ".join(lines[-2:]))
        done = []
        for line in lines:
            word = line.split()[0] if line.split() else ""
            if word.endswith("ing") and word not in done:
                done.append(word)
        return "idle, after: " + ", ".join(done) if done else "idle"

    def one_file(self, vdi):
        names = sorted(os.listdir(self.location))
        if names != [vdi + ".vhd"]:
            raise RuntimeError("%s holds %s" % (self.location, ", ".join(names)))
        return "$VDI.vhd"

    # -- the guest ---------------------------------------------------------------------------
    def guest_on_sr(self, sr_type):
        """--guest: the guest on the first SR of the demo's."""
        if self.guest and self.sr_types[0] == sr_type:
            self.guest_flow()

    def guest_flow(self):
        """A VM of the built-in template on a VDI of the SR: boots, runs GUEST_SCRIPT, powers
        off; the toolstack unplugs its disk when its qemu goes."""
        vdi = self.xe_step("vdi-create", "sr-uuid=" + self.sr, "name-label=guest-disk",
                           "virtual-size=64MiB", var="GVDI")
        self.vdis.append(vdi)
        vm = self.xe_step("vm-install", "template=smtap-guest", "new-name-label=demo-guest",
                          var="VM")
        self.vms.append(vm)
        vbd = self.xe_step("vbd-create", "vm-uuid=" + vm, "vdi-uuid=" + vdi, "device=0",
                           var="GVBD")
        self.vbds.append(vbd)
        self.step('xe vm-param-set uuid=$VM xenstore-data:vm-data/script="$SCRIPT" '
                  '(demo.py GUEST_SCRIPT)', self.xe, "vm-param-set", "uuid=" + vm,
                  "xenstore-data:vm-data/script=" + GUEST_SCRIPT)
        self.xe_step("vm-start", "uuid=" + vm)
        console = os.path.join(self.root, "var", "log", "smtap", "vm", vm + ".console.log")
        self.step("the guest boots, writes, reads back and powers off (%s)"
                  % self.shown([console]), self.guest_results, vm, console)
        self.xe_step("vm-param-get", "uuid=" + vm, "param-name=power-state")
        self.step("its disk unplugged (xe vbd-param-get uuid=$GVBD param-name=currently-attached)",
                  self.guest_unplugged, vbd)
        self.xe_step("vm-uninstall", "uuid=" + vm, "--force")
        self.vms.remove(vm)
        self.vbds.remove(vbd)
        self.vdis.remove(vdi)
        for name in ("VM", "GVBD", "GVDI"):
            self.vars.pop(name, None)

    def guest_results(self, vm, console):
        deadline = time.monotonic() + GUEST_BOOT
        while self.xe("vm-param-get", "uuid=" + vm, "param-name=power-state") != "halted":
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not power off within %d s" % GUEST_BOOT)
            time.sleep(0.3)
        with open(console, errors="replace") as f:
            boot = f.read().rsplit("--- smtap: start", 1)[-1]
        results = dict(line.split(": ", 1)[1].split("=", 1) for line in boot.splitlines()
                       if line.startswith("smtap-result: ") and "=" in line)
        if not results.get("written") or results.get("read-back") != results["written"]:
            raise RuntimeError("the guest's console:\n" + boot.strip()[-2000:])
        up = [line for line in boot.splitlines() if line.startswith("smtap-guest: up in")]
        return "sha256 %s match%s" % (results["written"], "; " + up[0][13:32] if up else "")

    def guest_unplugged(self, vbd):
        if units.parse_bool(self.xe("vbd-param-get", "uuid=" + vbd,
                                    "param-name=currently-attached"),
                            "currently-attached", units.XAPI_BOOL):
            raise RuntimeError("the guest's VBD is still attached")
        return "false"

    def undo(self):
        """After a failure: undo what exists, through xe while the toolstack runs."""
        if self.frozen:
            subprocess.run(["fsfreeze", "-u", self.frozen], stderr=subprocess.DEVNULL)
        for point in reversed(list(self.mounted)):
            subprocess.run(["umount", point], stderr=subprocess.DEVNULL)
        if self.xapi is not None and self.xapi.poll() is None:
            for vm in self.vms:
                self._try("vm-shutdown", "uuid=" + vm, "--force")
                self._try("vm-destroy", "uuid=" + vm)
            for vbd in reversed(list(self.plugged)):
                self._try("vbd-unplug", "uuid=" + vbd)
            for vbd in reversed(list(self.vbds)):
                self._try("vbd-destroy", "uuid=" + vbd)
            for vdi in reversed(list(self.vdis)):
                self._try("vdi-destroy", "uuid=" + vdi)
            if self.sr:
                try:
                    for pbd in self.xe("pbd-list", "sr-uuid=" + self.sr, "--minimal").split(","):
                        if pbd:
                            self._try("pbd-unplug", "uuid=" + pbd)
                except Exception:
                    pass
                self._try("sr-destroy", "uuid=" + self.sr)
        try:
            self.stop()
        except Exception:
            pass

    def _try(self, *args):
        try:
            self.xe(*args)
        except Exception as e:
            self.out.write("           clean-up: xe %s: %s\n"
                           % (" ".join(args), str(e).splitlines()[0]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="smtap demo", description=__doc__.split("\n")[0])
    parser.add_argument("--sr-type", choices=("all", "ram", "file"), default="all")
    parser.add_argument("--vdi-size", default="128MiB")
    parser.add_argument("--sr-size", default="512MiB", help="the ram SR's budget")
    parser.add_argument("--guest", action="store_true",
                        help="boot a guest on a VDI too (qemu: seconds with KVM, 15-30 s "
                             "under TCG)")
    parser.add_argument("--keep-root", action="store_true",
                        help="leave the temporary root (and its logs) in place")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("smtap demo: needs root (loop devices, mounts, FUSE)\n")
        return 1
    root = short_root()
    out = sys.stdout
    out.write("smtap demo: %s on the local toolstack, root %s\n" % (
        "a ram SR and a file SR" if args.sr_type == "all" else "a %s SR" % args.sr_type, root))
    demo = Demo(root, args.sr_type, args.vdi_size, args.sr_size, out=out, guest=args.guest)
    t0 = time.monotonic()
    ok = True
    try:
        demo.flow()
    except StepFailed as e:
        ok = False
        out.write("smtap demo: step failed: %s\n" % e)
        demo.undo()
    except BaseException:
        ok = False
        demo.undo()
        cleanup(root)
        raise
    t = time.monotonic()
    left = leftovers(root)
    if left:
        ok = False
        demo.line(time.monotonic() - t, "nothing left behind under %s" % root, "FAILED")
        for item in left:
            out.write("           left: %s\n" % item)
        still = cleanup(root)
        for item in still:
            out.write("           could not remove: %s\n" % item)
    else:
        demo.line(time.monotonic() - t,
                  "nothing left behind (processes, loop devices, mounts, runtime sockets "
                  "and links)", "ok")
    if not ok and args.keep_root:
        out.write("smtap demo: root kept for inspection: %s\n" % root)
    elif not processes_under(root) and not mounts_under(root):
        shutil.rmtree(root, ignore_errors=True)
    total = time.monotonic() - t0
    failed = [s for s in demo.steps if not s[2]]
    out.write("smtap demo: %s: %d steps in %.2f s%s\n" % (
        "ok" if ok else "FAILED", len(demo.steps), total,
        "" if ok else " (failed: %s)" % (failed[0][0] if failed else "leftovers")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
