"""Helpers for the driver tests: NBD I/O on a VDI's link, engine state under the root."""
import os
import subprocess
import xmlrpc.client

import pytest
import XenAPI

from smtap import names, settings

MiB = 1 << 20


def failure(fn, *args):
    """The ErrorDescription of a XenAPI call that must fail."""
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


def link_path(x, vdi):
    """The VDI's runtime link, as the glue makes it."""
    return names.link_path(x.SR.get_uuid(x.VDI.get_SR(vdi)), x.VDI.get_uuid(vdi))


def nbd_uri(x, vdi):
    return "nbd+unix:///%s?socket=%s" % (x.VDI.get_uuid(vdi), link_path(x, vdi))


def qemu_io(x, vdi, *commands, check=True, read_only=False):
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run(argv + [nbd_uri(x, vdi)], capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, (commands, proc.stdout, proc.stderr)
    return proc


def write(x, vdi, pattern, offset, length):
    qemu_io(x, vdi, "write -P %#x %d %d" % (pattern, offset, length))


def holds(x, vdi, pattern, offset, length):
    """True if the VDI reads `pattern` bytes over [offset, offset + length)."""
    return qemu_io(x, vdi, "read -P %#x %d %d" % (pattern, offset, length),
                   check=False, read_only=True).returncode == 0


def tapdisk_of(x, vdi):
    """(pid, minor) named by the VDI's link."""
    return names.parse_nbd(os.readlink(link_path(x, vdi)))


def minor_allocated(minor):
    return os.path.exists(names.marker_path(minor))


def host_tags(x, vdi):
    return sorted(k for k in x.VDI.get_sm_config(vdi) if k.startswith("host_"))


def tap_list():
    out = subprocess.run(["tap-ctl", "list"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [[f.split("=") for f in line.split()] for line in out.stdout.splitlines()]
    assert all(len(f) == 2 for row in rows for f in row), out.stdout   # upstream's rule
    return [dict(row) for row in rows]


def run_driver(host, sr_type, command, params):
    """Call an installed driver as XAPI does (for calls the toolstack has no API for)."""
    name = {"ram": "ramSR", "file": "FileSR"}[sr_type]
    path = os.path.join(settings.sm_dir(), name)
    proc = subprocess.run([path, xmlrpc.client.dumps((params,), command)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, ORIGINATOR="SM"))
    assert proc.returncode == 0, proc.stderr
    return xmlrpc.client.loads(proc.stdout)[0][0]


def vdi_call(host, vdi, command, args=()):
    """The parameters XAPI sends for a command on an existing VDI, from its records."""
    x = host.x
    sr = x.VDI.get_SR(vdi)
    pbd = x.PBD.get_record(x.SR.get_PBDs(sr)[0])
    params = {"host_ref": host.host_ref, "command": command, "args": list(args),
              "device_config": dict(pbd["device_config"], SRmaster="true"),
              "session_ref": host.session_obj._session, "sr_ref": sr,
              "sr_uuid": x.SR.get_uuid(sr), "vdi_ref": vdi,
              "vdi_location": x.VDI.get_location(vdi), "vdi_uuid": x.VDI.get_uuid(vdi),
              "vdi_on_boot": x.VDI.get_on_boot(vdi), "vdi_allow_caching": "false"}
    return run_driver(host, x.SR.get_type(sr), command, params)
