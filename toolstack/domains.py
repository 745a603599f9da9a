"""Running guests: the VM lifecycle as xenopsd runs it, on qemu (qemu.py).

Start: for each VBD with a VDI, read-write ones first, vdi_epoch_begin and then the
plug's datapath (vdi_attach + vdi_activate through the SR driver, journalled exactly as
a dom0 plug: classes/vbd.py connect), then qemu with each disk on its VDI's NBD export.
Shutdown: qemu goes, then each VBD's datapath (vdi_deactivate + vdi_detach once its
last user goes) and vdi_epoch_end. Reboot: shutdown then start (xenopsd's VM_reboot).

A watcher thread per running VM holds qemu's event monitor and the guest agent's port.
When qemu goes (the guest powered off or reset, or qemu died), it tears the domain down
and then does what was asked (halt, reboot) or what the VM's actions_after_* say. The
VM's hidden `run` map journals the domain (state, pid, domid): a toolstack restart finds
its running guests again, and cleans up after those that went meanwhile (resync).
"""
import logging
import os
import re
import select
import shutil
import threading
import time

from smtap import names, units
from smtap.toolstack import dom0_device, errors, qemu, smapi
from smtap.toolstack.classes import vbd as vbd_module
from smtap.toolstack.context import Context
from smtap.toolstack.errors import ApiError, NULL_REF
from smtap.toolstack.objects import now
from smtap.toolstack.vm_lifecycle import HALTED, PAUSED, RUNNING

log = logging.getLogger("smtap.xapi.domains")

STARTING, UP, STOPPING = "starting", "running", "stopping"
HALT, REBOOT = "halt", "reboot"
UNPLUG_TIMEOUT = 30          # for the guest to release a hot-unplugged disk
KILL_WAIT = 10
FW_CFG_PREFIX = "opt/org.smtap/"
FW_CFG_NAME = re.compile(r"^vm-data/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
FW_CFG_MAX = 55              # fw_cfg file names hold 56 bytes with their NUL


def device_name(userdevice):
    """XAPI's name of a Linux guest's disk: userdevice 0 is xvda, 26 xvdaa."""
    n = vbd_module.disk_number(userdevice)
    letters = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "xvd" + letters


# --- the VM's disks ------------------------------------------------------------------------
def disk_vbds(ctx, vm):
    """The VBDs a start plugs: with a VDI, read-write ones first (xenopsd's order)."""
    vbds = [(ref, rec) for ref, rec in ctx.store.find("VBD", VM=vm)
            if not rec["empty"] and rec["VDI"] not in ("", NULL_REF)]
    return [ref for ref, rec in sorted(vbds, key=lambda v: (v[1]["mode"] != "RW",
                                                             vbd_module.disk_number(
                                                                 v[1]["userdevice"])))]


def disk_of(ctx, vbd):
    """What qemu needs of a plugged VBD: its device name and the VDI's NBD export."""
    rec = ctx.store.get("VBD", vbd)
    info = ctx.store.get("VDI", rec["VDI"])["attach"]
    try:
        path, export = dom0_device.parse_nbd(info.get("params_nbd", ""))
    except ValueError:
        raise ApiError(errors.FAILED_TO_START_EMULATOR, rec["VM"], "qemu",
                       "VDI %s has no NBD export (params_nbd %r)"
                       % (rec["VDI"], info.get("params_nbd", "")))
    read_only = rec["mode"] == "RO" or units.flag(info.get("writable")) is False
    # the link's target: the link's own path under a long root may not fit sun_path
    return {"id": device_name(rec["userdevice"]), "socket": os.path.realpath(path),
            "export": export, "read_only": read_only}


def epoch(ctx, vbd, command):
    """vdi_epoch_begin / vdi_epoch_end, as xenopsd sends them for every VBD; logged, not
    raised, at the end of an epoch."""
    vdi = ctx.store.get("VBD", vbd)["VDI"]
    sr = ctx.store.get("VDI", vdi)["SR"]
    try:
        smapi.call(ctx, sr, command, vdi_ref=vdi)
    except ApiError as e:
        if command == "vdi_epoch_begin":
            raise
        log.warning("%s of %s: %s", command, vdi, e)


def _claim_domid(ctx, vm):
    """The lowest domid no other domain has (running, or journalled while it starts or
    stops), recorded in this VM's journal at once: two starts never share one."""
    with ctx.ts.lock("domids"):
        used = set()
        for ref, rec in ctx.store.all("VM"):
            if ref != vm and rec["power_state"] in (RUNNING, PAUSED):
                used.add(rec["domid"])
            if ref != vm and (rec.get("run") or {}).get("domid"):
                used.add(rec["run"]["domid"])
        domid = min(n for n in range(1, len(used) + 2) if n not in used)
        ctx.store.update("VM", vm, {"run": {"state": STARTING, "domid": domid}})
        return domid


def _fw_cfg(paths, xenstore_data):
    """The VM's vm-data/ keys as fw_cfg files (what xenstore-data is on Xen: the data
    a toolstack hands the guest). Other keys are not the guest's."""
    files = {}
    for key, value in sorted(xenstore_data.items()):
        if not key.startswith("vm-data/") or not value:
            continue
        name = FW_CFG_PREFIX + key
        if not FW_CFG_NAME.match(key) or len(name) > FW_CFG_MAX or ".." in key:
            log.warning("xenstore-data key %r cannot be a fw_cfg name: not passed", key)
            continue
        path = os.path.join(paths.fw_cfg, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(value)
        files[name] = path
    return files


# --- start and stop ---------------------------------------------------------------------
def start(ctx, vm, paused=False):
    """Plug the VM's VBDs and start its qemu (the caller holds the VM's lock). On any
    failure, what was done is undone and the VM stays Halted."""
    store = ctx.store
    rec = store.get("VM", vm)
    why = qemu.available()
    if why:
        raise ApiError(errors.FAILED_TO_START_EMULATOR, vm, "qemu", why)
    for field in ("PV_kernel", "PV_ramdisk"):
        if rec.get(field) and not os.path.exists(rec[field]):
            raise ApiError(errors.FAILED_TO_START_EMULATOR, vm, "qemu",
                           "%s %s does not exist" % (field, rec[field]))
    if not rec.get("PV_kernel"):
        raise ApiError(errors.FAILED_TO_START_EMULATOR, vm, "qemu",
                       "the VM has no PV-kernel to boot (install it from a template)")
    paths = qemu.Paths(rec["uuid"])
    paths.check()
    store.update("VM", vm, {"run": {"state": STARTING}})
    plugged, pid = [], None
    try:
        for vbd in disk_vbds(ctx, vm):
            epoch(ctx, vbd, "vdi_epoch_begin")
            plugged.append(vbd)                # from here its epoch is ended on a failure
            vbd_module.connect(ctx, vbd, dom0=False)
            store.update("VBD", vbd, {"device": device_name(
                store.get("VBD", vbd)["userdevice"]), "status_code": 0, "status_detail": ""})
        disks = [disk_of(ctx, vbd) for vbd in plugged]
        shutil.rmtree(paths.dir, ignore_errors=True)
        os.makedirs(paths.dir)
        argv = qemu.command_line(rec, paths, disks, _fw_cfg(paths, rec["xenstore_data"]),
                                 qemu.accelerator())
        domid = _claim_domid(ctx, vm)
        _console_mark(paths, "start, domid %d" % domid)
        pid = qemu.launch(argv, paths)
        store.update("VM", vm, {"run": {"state": STARTING, "pid": pid, "domid": domid}})
        dom = Domain(ctx.ts, vm, rec["uuid"], pid, domid)
        dom.connect()
        if not paused:
            qemu.command(paths, "cont")
        with store.transaction():
            store.update("VM", vm, {"power_state": PAUSED if paused else RUNNING,
                                    "domid": domid, "resident_on": ctx.ts.host,
                                    "run": {"state": UP, "pid": pid, "domid": domid}})
        ctx.ts.domains[vm] = dom
        dom.watch()
        log.info("VM %s started: qemu %d, domid %d, %d disk(s)", rec["uuid"], pid, domid,
                 len(disks))
    except BaseException as e:
        log.warning("VM %s: start failed: %s", rec["uuid"], e)
        qemu.kill(pid, rec["uuid"])
        if pid:
            qemu.wait_gone(pid, rec["uuid"], KILL_WAIT)
        _release(ctx, vm, plugged)
        _halted(ctx, vm, paths)
        if isinstance(e, qemu.QemuError):
            raise ApiError(errors.FAILED_TO_START_EMULATOR, vm, "qemu", str(e))
        raise


def _console_mark(paths, what):
    os.makedirs(os.path.dirname(paths.console), exist_ok=True)
    with open(paths.console, "a") as f:
        f.write("\n--- smtap: %s at %s ---\n" % (what, now()))


def _release(ctx, vm, vbds):
    """Unplug VBDs (forced: the guest is gone) and end their epoch; errors logged."""
    for vbd in reversed(vbds):
        if ctx.store.get("VBD", vbd)["currently_attached"]:
            try:
                vbd_module.disconnect(ctx, vbd, force=True)
            except ApiError as e:
                log.warning("VM %s: unplugging VBD %s: %s", vm, vbd, e)
        ctx.store.update("VBD", vbd, {"device": ""})
        epoch(ctx, vbd, "vdi_epoch_end")


def _halted(ctx, vm, paths):
    store = ctx.store
    gm = store.get("VM", vm).get("guest_metrics")
    with store.transaction():
        if gm and store.exists("VM_guest_metrics", gm):
            store.destroy("VM_guest_metrics", gm)
        store.update("VM", vm, {"power_state": HALTED, "domid": -1, "resident_on": NULL_REF,
                                "guest_metrics": NULL_REF, "run": {}})
    shutil.rmtree(paths.dir, ignore_errors=True)


def teardown(ctx, vm):
    """After qemu: the VM's VBDs unplugged, the VM Halted (the caller holds its lock)."""
    rec = ctx.store.get("VM", vm)
    ctx.store.update("VM", vm, {"run": dict(rec.get("run") or {}, state=STOPPING)})
    attached = [ref for ref, v in ctx.store.find("VBD", VM=vm) if v["currently_attached"]]
    _release(ctx, vm, attached)
    _halted(ctx, vm, qemu.Paths(rec["uuid"]))
    log.info("VM %s halted", rec["uuid"])


# --- the watcher ---------------------------------------------------------------------------
class Domain(object):
    """One running qemu: its monitors and the thread that watches it."""

    def __init__(self, ts, vm, uuid, pid, domid):
        self.ts, self.vm, self.uuid, self.pid, self.domid = ts, vm, uuid, pid, domid
        self.paths = qemu.Paths(uuid)
        self.request = None          # what the toolstack asked for: HALT or REBOOT
        self.reason = None           # qemu's SHUTDOWN reason
        self.panicked = False
        self.ended = threading.Event()
        self.restart_error = None
        self.events = self.agent = None
        self.agent_ready = False
        self.io_errors = set()

    def connect(self):
        self.events = qemu.Monitor(self.paths.events, timeout=10)
        try:
            self.agent = qemu.Line(self.paths.agent, timeout=5)
        except qemu.QemuError as e:
            log.warning("VM %s: no agent port: %s", self.uuid, e)

    def watch(self):
        threading.Thread(target=self._run, name="vm-%s" % self.uuid[:8], daemon=True).start()

    def tell_agent(self, request):
        """Ask the guest (its agent) to power off or reboot; False if it cannot hear."""
        if not (self.agent and self.agent_ready):
            return False
        try:
            self.agent.send(request)
            return True
        except OSError:
            return False

    def _run(self):
        try:
            self._watch()
        except Exception:
            log.exception("VM %s: watcher failed", self.uuid)
        if not qemu.wait_gone(self.pid, self.uuid, KILL_WAIT):
            log.warning("VM %s: qemu %d lingers after its monitor closed: killed",
                        self.uuid, self.pid)
            qemu.kill(self.pid, self.uuid)
            qemu.wait_gone(self.pid, self.uuid, KILL_WAIT)
        try:
            self._end()
        finally:
            for conn in (self.events, self.agent):
                if conn:
                    conn.close()
            self.ended.set()

    def _watch(self):
        while True:
            conns = [c for c in (self.events, self.agent) if c and not c.eof]
            ready, _, _ = select.select(conns, [], [], 1.0)
            if self.events in ready:
                if not self.events.fill(0):
                    return                   # qemu closed its monitor: it is going
                for ev in self.events.take_events():
                    self._event(ev)
            if self.agent in ready and self.agent.fill(0):
                for line in self.agent.lines():
                    self._agent_said(line)
            if not ready and not qemu.running(self.pid, self.uuid):
                return

    def _event(self, ev):
        name, data = ev.get("event"), ev.get("data") or {}
        if name == "SHUTDOWN":
            self.reason = data.get("reason")
        elif name == "GUEST_PANICKED":
            self.panicked = True
        elif name == "BLOCK_IO_ERROR":
            self._io_error(data)

    def _agent_said(self, line):
        """The agent's announcement: as a guest's PV drivers fill its guest metrics."""
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if not line.startswith("smtap-agent ready"):
            return
        features = [f for f in words.get("features", "").split(",") if f]
        other = dict(("feature-" + f, "1") for f in features)
        store = self.ts.store
        with store.transaction():
            if not store.exists("VM", self.vm):
                return
            gm = store.create("VM_guest_metrics", {
                "os_version": {"name": "smtap guest", "uname": words.get("kernel", "")},
                "PV_drivers_detected": True, "PV_drivers_up_to_date": True,
                "can_use_hotplug_vbd": "yes" if "hotplug-vbd" in features else "no",
                "other": other, "live": True, "last_updated": now()})
            old = store.get("VM", self.vm).get("guest_metrics")
            if old and store.exists("VM_guest_metrics", old):
                store.destroy("VM_guest_metrics", old)
            store.update("VM", self.vm, {"guest_metrics": gm})
        self.agent_ready = True
        log.info("VM %s: agent ready (%s)", self.uuid, ", ".join(features))

    def _io_error(self, data):
        """qemu reported an I/O error on a disk: the VBD says why, once per domain."""
        dev = (data.get("node-name") or data.get("device") or "").split("-", 1)[0]
        if dev in self.io_errors:
            return
        self.io_errors.add(dev)
        store = self.ts.store
        for ref, rec in store.find("VBD", VM=self.vm):
            if rec["device"] != dev or not rec["currently_attached"]:
                continue
            detail = "I/O error on %s (%s): %s" % (dev, data.get("operation", "?"),
                                                   data.get("reason", "?"))
            dead = dead_tapdisk(store, rec["VDI"])
            if dead:
                detail += "; tapdisk %d serving VDI %s is gone" % (
                    dead, store.get("VDI", rec["VDI"])["uuid"])
            log.warning("VM %s: %s", self.uuid, detail)
            store.update("VBD", ref, {"status_code": 5, "status_detail": detail})

    def _action(self, rec):
        if self.request == HALT:
            return HALT
        if self.request == REBOOT:
            return REBOOT
        if self.panicked or self.reason == "guest-panic":
            after = rec.get("actions_after_crash", "destroy")
            return REBOOT if after in ("restart", "coredump_and_restart",
                                       "rename_restart") else HALT
        if self.reason == "guest-reset":
            return REBOOT if rec.get("actions_after_reboot") == "restart" else HALT
        if self.reason == "guest-shutdown":
            return REBOOT if rec.get("actions_after_shutdown") == "restart" else HALT
        return HALT            # qemu died or was killed: the VM is Halted

    def _end(self):
        ctx = Context(self.ts)
        with self.ts.lock("VM", self.vm):
            if self.ts.domains.get(self.vm) is self:
                del self.ts.domains[self.vm]
            if not self.ts.store.exists("VM", self.vm):
                return
            rec = self.ts.store.get("VM", self.vm)
            action = self._action(rec)
            log.info("VM %s: qemu %d exited (%s%s): %s", self.uuid, self.pid,
                     self.reason or "no shutdown event", ", panicked" if self.panicked else "",
                     action)
            _console_mark(self.paths, "qemu exited (%s)" % (self.reason or "killed"))
            teardown(ctx, self.vm)
            if action == REBOOT:
                try:
                    start(ctx, self.vm)
                except Exception as e:
                    log.warning("VM %s: restart failed: %s", self.uuid, e)
                    self.restart_error = e


def dead_tapdisk(store, vdi):
    """The pid of the tapdisk the VDI's export named, if that process is gone."""
    try:
        path, _ = dom0_device.parse_nbd(store.get("VDI", vdi)["attach"].get("params_nbd", ""))
        parsed = names.parse_nbd(os.readlink(path))
    except (ValueError, OSError):
        return None
    if not parsed:
        return None
    pid = parsed[0]
    try:
        with open("/proc/%d/stat" % pid) as f:
            alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"    # killed, not yet reaped
    except OSError:
        alive = False
    return None if alive else pid


# --- what the VM class asks ----------------------------------------------------------------
def domain(ctx, vm):
    dom = ctx.ts.domains.get(vm)
    if dom is None:
        raise ApiError(errors.INTERNAL_ERROR, "VM %s is %s but has no qemu here"
                       % (vm, ctx.store.get("VM", vm)["power_state"]))
    return dom


def _wait(ctx, vm, dom, timeout):
    if not dom.ended.wait(timeout):
        return False
    if dom.restart_error is not None:
        e = dom.restart_error
        raise e if isinstance(e, ApiError) else ApiError(errors.INTERNAL_ERROR, str(e))
    return True


def clean_stop(ctx, vm, request, timeout):
    """Ask the guest, and wait: the ACPI power button (QMP system_powerdown) to power
    off; its agent to reboot (no ACPI request for that: XAPI asks the PV drivers)."""
    dom = domain(ctx, vm)
    dom.request = request
    if request == HALT:
        try:
            qemu.command(dom.paths, "system_powerdown")
        except (qemu.QemuError, OSError) as e:
            log.warning("VM %s: system_powerdown: %s", dom.uuid, e)
    elif not dom.tell_agent("reboot"):
        dom.request = None
        raise ApiError(errors.VM_LACKS_FEATURE, vm)
    if not _wait(ctx, vm, dom, timeout):
        dom.request = None
        raise ApiError(errors.VM_SHUTDOWN_TIMEOUT, vm, str(timeout))


def hard_stop(ctx, vm, request):
    """qemu quits (or is killed); wait for the teardown (and the restart)."""
    dom = ctx.ts.domains.get(vm)
    if dom is None:                 # no qemu: nothing to stop, only records to fix
        with ctx.ts.lock("VM", vm):
            teardown(ctx, vm)
            if request == REBOOT:
                start(ctx, vm)
        return
    dom.request = request
    try:
        qemu.command(dom.paths, "quit", timeout=5)
    except (qemu.QemuError, OSError):
        pass
    if not dom.ended.wait(5):
        qemu.kill(dom.pid, dom.uuid)
    _wait(ctx, vm, dom, 120)


def pause(ctx, vm, paused):
    qemu.command(domain(ctx, vm).paths, "stop" if paused else "cont")
    ctx.store.update("VM", vm, {"power_state": PAUSED if paused else RUNNING})


# --- hot plug ------------------------------------------------------------------------------
def _assert_hotpluggable(ctx, vbd, rec, vm, vm_rec, op):
    """XAPI's VBD rules for a VM (xapi_vbd_helpers valid_operations)."""
    state = vm_rec["power_state"]
    if state != RUNNING:
        raise ApiError(errors.VM_BAD_POWER_STATE, vm, RUNNING, state)
    if op == "plug" and rec["currently_attached"]:
        raise ApiError(errors.DEVICE_ALREADY_ATTACHED, vbd)
    if op != "plug" and not rec["currently_attached"]:
        raise ApiError(errors.DEVICE_ALREADY_DETACHED, vbd)
    if op != "plug" and not rec["unpluggable"]:
        raise ApiError(errors.VBD_NOT_UNPLUGGABLE, vbd)
    for _, vm_op in (vm_rec.get("current_operations") or {}).items():
        if vm_op in ("clean_shutdown", "hard_shutdown", "suspend", "pause"):
            raise ApiError(errors.OPERATION_NOT_ALLOWED, "Current operation on VM:%s is %s"
                           % (vm, vm_op))
    if vm_rec.get("domain_type") == "hvm":
        gm = ctx.store.db.get("VM_guest_metrics", vm_rec.get("guest_metrics") or "")
        hotplug = units.flag(gm.get("can_use_hotplug_vbd"), units.YES_NO) if gm else None
        if gm is None or (hotplug is not True and not gm.get("PV_drivers_detected")):
            raise ApiError(errors.VM_MISSING_PV_DRIVERS, vm)
        if hotplug is False:
            raise ApiError(errors.OPERATION_NOT_ALLOWED,
                           "VM states it does not support VBD hotplug.")
        if rec["type"] == "CD":
            raise ApiError(errors.OPERATION_NOT_ALLOWED, "HVM CDROMs cannot be "
                           "hotplugged/unplugged, only inserted or ejected")


def hotplug(ctx, vbd):
    rec = ctx.store.get("VBD", vbd)
    vm = rec["VM"]
    with ctx.ts.lock("VM", vm):
        _assert_hotpluggable(ctx, vbd, rec, vm, ctx.store.get("VM", vm), "plug")
        if rec["empty"]:
            raise ApiError(errors.OPERATION_NOT_ALLOWED, "an empty VBD has nothing to plug")
        dom = domain(ctx, vm)
        vbd_module.connect(ctx, vbd, dom0=False)
        disk = disk_of(ctx, vbd)
        try:
            qemu.command(dom.paths, "blockdev-add", qemu.blockdev(disk))
            qemu.command(dom.paths, "device_add", qemu.device(disk))
        except (qemu.QemuError, OSError) as e:
            try:
                qemu.command(dom.paths, "blockdev-del", {"node-name": disk["id"]})
            except (qemu.QemuError, OSError):
                pass
            vbd_module.disconnect(ctx, vbd, force=True)
            raise ApiError(errors.INTERNAL_ERROR, "hotplug of %s: %s" % (disk["id"], e))
        ctx.store.update("VBD", vbd, {"device": disk["id"], "status_code": 0,
                                      "status_detail": ""})


def hotunplug(ctx, vbd, force):
    """device_del, and wait for the guest to release the disk (DEVICE_DELETED); forced,
    the datapath goes even if the guest holds on (it then sees I/O errors)."""
    rec = ctx.store.get("VBD", vbd)
    vm = rec["VM"]
    with ctx.ts.lock("VM", vm):
        _assert_hotpluggable(ctx, vbd, rec, vm, ctx.store.get("VM", vm),
                             "unplug_force" if force else "unplug")
        dom = domain(ctx, vm)
        dev = rec["device"]
        mon = qemu.Monitor(dom.paths.qmp, timeout=5)
        try:
            mon.execute("device_del", {"id": dev})
            released = mon.wait_event("DEVICE_DELETED", {"device": dev}, UNPLUG_TIMEOUT)
            if released:
                mon.execute("blockdev-del", {"node-name": dev})
        except qemu.QemuError as e:
            if not force:
                raise ApiError(errors.DEVICE_DETACH_REJECTED, "VBD", vbd, str(e))
            released = None
        finally:
            mon.close()
        if not released and not force:
            raise ApiError(errors.DEVICE_DETACH_REJECTED, "VBD", vbd, "the guest did not "
                           "release %s within %d s" % (dev, UNPLUG_TIMEOUT))
        vbd_module.disconnect(ctx, vbd, force=force)
        ctx.store.update("VBD", vbd, {"device": ""})


# --- start-up ------------------------------------------------------------------------------
def resync(ctx):
    """At start-up: a VM whose qemu still runs is watched again; one whose qemu went
    (or whose start or stop was cut short) is torn down and Halted."""
    store = ctx.store
    for vm, rec in store.all("VM"):
        if rec.get("is_control_domain"):
            continue
        run = rec.get("run") or {}
        if not run and rec["power_state"] == HALTED:
            continue
        with ctx.ts.lock("VM", vm):
            try:
                _resync_vm(ctx, vm, rec, run)
            except Exception as e:
                log.warning("resync of VM %s: %s", rec["uuid"], e)


def _resync_vm(ctx, vm, rec, run):
    paths = qemu.Paths(rec["uuid"])
    pid = run.get("pid") or paths.pid()
    if run.get("state") == UP and qemu.running(pid, rec["uuid"]):
        dom = Domain(ctx.ts, vm, rec["uuid"], pid, run.get("domid", rec["domid"]))
        try:
            dom.connect()
        except qemu.QemuError as e:
            log.warning("VM %s: qemu %d does not answer (%s): killed", rec["uuid"], pid, e)
        else:
            # the agent said it was ready to the previous toolstack: its metrics say so
            gm = ctx.store.db.get("VM_guest_metrics", rec.get("guest_metrics") or "")
            dom.agent_ready = bool(gm and gm.get("PV_drivers_detected"))
            ctx.ts.domains[vm] = dom
            dom.watch()
            log.info("VM %s: qemu %d still runs: watched again", rec["uuid"], pid)
            return
    qemu.kill(pid, rec["uuid"])
    qemu.wait_gone(pid, rec["uuid"], KILL_WAIT)
    log.info("VM %s: %s, qemu gone: halting", rec["uuid"], run.get("state") or "no journal")
    teardown(ctx, vm)
