"""A VDI seen from dom0 through XenAPI (x: a session's xenapi, vdi: its ref): its
runtime link and tapdisk, NBD I/O on it, its host tags; a driver command run on it
the way XAPI runs one."""
import os
import xmlrpc.client

from lib import engine, sm
from lib.engine import tap_list                 # noqa: F401  (drivers_helpers' names)
from lib.sizes import MiB                       # noqa: F401
from smtap import names, settings


def link_path(x, vdi):
    """The VDI's runtime link, as the glue makes it."""
    return names.link_path(x.SR.get_uuid(x.VDI.get_SR(vdi)), x.VDI.get_uuid(vdi))


def nbd_uri(x, vdi):
    return engine.nbd_uri(link_path(x, vdi), x.VDI.get_uuid(vdi))


def qemu_io(x, vdi, *commands, check=True, read_only=False):
    """engine.qemu_io on the VDI's export."""
    return engine.qemu_io(nbd_uri(x, vdi), *commands, check=check, readonly=read_only)


def write(x, vdi, pattern, offset, length):
    qemu_io(x, vdi, "write -P %#x %d %d" % (pattern, offset, length))


def holds(x, vdi, pattern, offset, length):
    """True if the VDI reads `pattern` bytes over [offset, offset + length)."""
    return qemu_io(x, vdi, "read -P %#x %d %d" % (pattern, offset, length),
                   check=False, read_only=True).returncode == 0


def tapdisk_of(x, vdi):
    """(pid, minor) named by the VDI's link."""
    return engine.linked_tapdisk(link_path(x, vdi))


def minor_allocated(minor):
    return os.path.exists(names.marker_path(minor))


def host_tags(x, vdi):
    """The host_<ref> keys the glue keeps in the VDI's sm_config while it is active."""
    return sorted(k for k in x.VDI.get_sm_config(vdi) if k.startswith("host_"))


def vdi_call(host, vdi, command, args=()):
    """Run `command` on an existing VDI through its installed driver, with the parameters
    XAPI sends (from the VDI's records), for calls the toolstack has no API for; the
    driver's result."""
    x = host.x
    sr = x.VDI.get_SR(vdi)
    pbd = x.PBD.get_record(x.SR.get_PBDs(sr)[0])
    params = {"host_ref": host.host_ref, "command": command, "args": list(args),
              "device_config": dict(pbd["device_config"], SRmaster="true"),
              "session_ref": host.session_obj._session, "sr_ref": sr,
              "sr_uuid": x.SR.get_uuid(sr), "vdi_ref": vdi,
              "vdi_location": x.VDI.get_location(vdi), "vdi_uuid": x.VDI.get_uuid(vdi),
              "vdi_on_boot": x.VDI.get_on_boot(vdi), "vdi_allow_caching": "false"}
    name = {"ram": "ramSR", "file": "FileSR"}[x.SR.get_type(sr)]
    reply = sm.run_driver([os.path.join(settings.sm_dir(), name),
                           xmlrpc.client.dumps((params,), command)], timeout=120)
    assert reply.returncode == 0, reply.stderr
    if reply.fault:
        raise reply.fault
    return reply.value
