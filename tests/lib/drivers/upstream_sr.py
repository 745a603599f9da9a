"""UpstreamSR: an SR driver written the way upstream sm's are (xapi-project/sm: SRCommand,
SR.from_uuid, util, blktap2, cleanup), on nothing of smtap's: XenAPI, the argv
methodCall, the host's XE_SR_ERRORCODES.xml, /etc/xensource-inventory. VDIs are raw files
in device-config:location; vdi_attach answers as blktap2 does when it starts no tapdisk
(an empty params_nbd, the file as params).

The only difference from a driver on a real host: every host path is under $SMTAP_ROOT
(empty on a host), as the local toolstack moves them all. Used by test_new_user.py."""
import os
import shutil
import sys
import traceback
import uuid
import xml.dom.minidom
import xmlrpc.client

import XenAPI

ROOT = os.environ.get("SMTAP_ROOT", "")
ERRORCODES = ROOT + "/opt/xensource/sm/XE_SR_ERRORCODES.xml"
INVENTORY = ROOT + "/etc/xensource-inventory"
SMLOG = ROOT + "/var/log/SMlog"
XAPI_SOCKET = ROOT + "/var/lib/xcp/xapi"

CAPABILITIES = ["SR_UPDATE", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH", "VDI_DETACH",
                "VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE"]
DRIVER_INFO = {
    "name": "Upstream-style", "description": "raw files, written as upstream sm drivers are",
    "vendor": "tests", "copyright": "(C) tests", "driver_version": "1.0",
    "required_api_version": "1.0", "capabilities": CAPABILITIES,
    "configuration": [["location", "directory holding the VDIs (required)"]],
}


def SMlog(message):
    with open(SMLOG, "a") as f:
        f.write("UpstreamSR[%d] %s\n" % (os.getpid(), message))


class SROSError(Exception):
    def __init__(self, errno, reason):
        Exception.__init__(self, reason)
        self.errno = errno


def XenError(key, opterr=None):
    """xs_errors.XenError: the code and text of a name in the host's table."""
    dom = xml.dom.minidom.parse(ERRORCODES)
    for node in dom.getElementsByTagName("code"):
        name = node.getElementsByTagName("name")[0].firstChild.data.strip()
        if name == key:
            text = node.getElementsByTagName("description")[0].firstChild.data
            value = int(node.getElementsByTagName("value")[0].firstChild.data)
            if opterr is not None:
                text += " [opterr=%s]" % opterr
            return SROSError(value, text)
    return SROSError(1, "Error reporting error, unknown key %s" % key)


def xapi_local():
    """XenAPI.xapi_local(), on this root's socket."""
    return XenAPI.Session("http://" + XAPI_SOCKET.replace("/", "_") + "/",
                          transport=XenAPI.UDSTransport())


def inventory(key):
    with open(INVENTORY) as f:
        for line in f:
            if line.startswith(key):
                return line.split("'")[1]
    raise XenError("APILocalhost")


def get_localhost_ref(session):
    """util.get_localhost_ref: dom0's record, by the inventory's uuid, says where we run."""
    domid = inventory("CONTROL_DOMAIN_UUID")
    vms = session.xenapi.VM.get_all_records_where('field "uuid" = "%s"' % domid)
    for record in vms.values():
        if record["uuid"] == domid:
            return record["resident_on"]
    raise XenError("APILocalhost")


def read_caching_is_restricted(session):
    """util.read_caching_is_restricted: the pool's license restrictions."""
    restrictions = list(session.xenapi.pool.get_all_records().values())[0]["restrictions"]
    return restrictions.get("restrict_read_caching") == "true"


def get_online_hosts(session):
    """util.get_online_hosts: the hosts whose metrics say they are live."""
    online = []
    for host_ref, host_rec in session.xenapi.host.get_all_records().items():
        if session.xenapi.host_metrics.get_record(host_rec["metrics"])["live"]:
            online.append(host_ref)
    return online


class SR(object):
    def __init__(self, params):
        self.params = params
        self.cmd = params["command"]
        self.dconf = params.get("device_config", {})
        self.session = None
        if "session_ref" in params:
            self.session = xapi_local()
            self.session._session = params["session_ref"]
            if "subtask_of" in params:
                self.session.transport.add_extra_header("Subtask-of", params["subtask_of"])
        self.sr_ref = params.get("sr_ref")
        self.uuid = params.get("sr_uuid")
        if "location" not in self.dconf or not self.dconf["location"]:
            raise XenError("ConfigLocationMissing")
        self.path = self.dconf["location"]

    def my_pbd(self):
        """As SR.from_uuid: this host's PBD of the SR, by a filter without spaces."""
        host_ref = get_localhost_ref(self.session)
        pbds = self.session.xenapi.PBD.get_all_records_where(
            'field "SR" = "%s" and' % self.sr_ref + 'field "host" = "%s"' % host_ref)
        pbd_ref, pbd = pbds.popitem()
        assert not pbds
        return pbd_ref, pbd

    def vdi_records(self):
        return self.session.xenapi.VDI.get_all_records_where('field "SR" = "%s"' % self.sr_ref)

    def sr_create(self, size):
        if not os.path.isdir(self.path):
            os.makedirs(self.path)

    def sr_attach(self):
        if not os.path.isdir(self.path):
            raise XenError("SRUnavailable", opterr="no directory %s" % self.path)

    def sr_detach(self):
        pass

    def sr_delete(self):
        # as FileSR.delete (its GC checks it): the SR must look plugged here
        if not self.my_pbd()[1]["currently_attached"]:
            raise XenError("SRUnavailable", opterr="PBD not plugged during sr_delete")
        if self.vdi_records():
            raise XenError("SRNotEmpty")
        shutil.rmtree(self.path, ignore_errors=True)

    def sr_scan(self):
        """Reconcile by location, reporting progress on a task as the GC does."""
        task = self.session.xenapi.task.create("Garbage Collection", "scan of %s" % self.uuid)
        try:
            self.session.xenapi.task.set_other_config(task, {"applies_to": self.sr_ref})
            known = {r["location"]: ref for ref, r in self.vdi_records().items()}
            files = sorted(f for f in os.listdir(self.path) if not f.startswith("."))
            for i, name in enumerate(files):
                if name not in known:
                    self.introduce(name, "found", os.path.getsize(os.path.join(self.path, name)))
                self.session.xenapi.task.set_progress(task, float(i + 1) / len(files))
            for location, ref in known.items():
                if location not in files:
                    self.session.xenapi.VDI.db_forget(ref)
            assert self.my_pbd()[0] and get_online_hosts(self.session)
            self.session.xenapi.task.set_status(task, "success")
        except Exception:
            self.session.xenapi.task.set_status(task, "failure")
            raise
        finally:
            self.session.xenapi.task.destroy(task)
        self.sr_update()

    def sr_update(self):
        st = os.statvfs(self.path)
        used = sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path))
        virtual = sum(int(r["virtual_size"]) for r in self.vdi_records().values())
        self.session.xenapi.SR.set_physical_size(self.sr_ref, str(st.f_blocks * st.f_frsize))
        self.session.xenapi.SR.set_physical_utilisation(self.sr_ref, str(used))
        self.session.xenapi.SR.set_virtual_allocation(self.sr_ref, str(virtual))

    def introduce(self, location, label, size, **extra):
        """VDI._db_introduce, with its DateTime snapshot_time."""
        vdi_uuid = location
        ref = self.session.xenapi.VDI.db_introduce(
            vdi_uuid, label, "", self.sr_ref, extra.get("ty", "user"), False, False, {},
            location, {}, {}, True, str(size), str(size), "OpaqueRef:NULL", False,
            xmlrpc.client.DateTime("19700101T00:00:00Z"), "OpaqueRef:NULL", False)
        return ref, {"uuid": vdi_uuid, "location": location}

    def file(self, location=None):
        return os.path.join(self.path, location or self.params["vdi_location"])

    def vdi_create(self, size, label):
        if self.dconf.get("unstable") == "true":
            raise XenError("VBDListNotStable")       # what upstream DummySR raises
        location = str(uuid.uuid4())
        with open(self.file(location), "wb") as f:
            f.truncate(int(size))
        return self.introduce(location, label, size, ty=self.params.get("vdi_type", "user"))[1]

    def vdi_delete(self):
        os.unlink(self.file())
        self.session.xenapi.VDI.db_forget(self.params["vdi_ref"])

    def vdi_copy(self):
        """snapshot and clone as upstream DummySR: a new VDI with no name, no snapshot
        fields; the toolstack finishes it."""
        location = str(uuid.uuid4())
        shutil.copyfile(self.file(), self.file(location))
        return self.introduce(location, "", os.path.getsize(self.file(location)))[1]

    def vdi_resize(self, size):
        with open(self.file(), "r+b") as f:
            f.truncate(int(size))
        self.session.xenapi.VDI.set_virtual_size(self.params["vdi_ref"], str(size))
        return {"uuid": self.params["vdi_uuid"], "location": self.params["vdi_location"]}

    def vdi_attach(self, writable):
        """As blktap2.VDI.attach when no tapdisk is wanted: no NBD export."""
        restricted = read_caching_is_restricted(self.session)
        return {"params_nbd": "", "params": self.file(), "o_direct": restricted,
                "o_direct_reason": "LICENSE_RESTRICTION" if restricted else "",
                "xenstore_data": {"storage-type": "ext"}}


def sr_get_driver_info():
    info = dict(DRIVER_INFO)
    info["configuration"] = [{"key": k, "description": d} for k, d in DRIVER_INFO["configuration"]]
    return info


def run(params):
    cmd = params["command"]
    if cmd == "sr_get_driver_info":
        return sr_get_driver_info()
    sr = SR(params)
    args = params.get("args", [])
    calls = {
        "sr_create": lambda: sr.sr_create(args[0]), "sr_attach": sr.sr_attach,
        "sr_detach": sr.sr_detach, "sr_delete": sr.sr_delete, "sr_scan": sr.sr_scan,
        "sr_update": sr.sr_update, "vdi_create": lambda: sr.vdi_create(args[0], args[1]),
        "vdi_delete": sr.vdi_delete, "vdi_snapshot": sr.vdi_copy, "vdi_clone": sr.vdi_copy,
        "vdi_resize": lambda: sr.vdi_resize(args[0]),
        "vdi_attach": lambda: sr.vdi_attach(args[0] == "true"), "vdi_detach": lambda: None,
    }
    if cmd not in calls:
        raise XenError("Unimplemented", opterr=cmd)
    return calls[cmd]()


def main():
    """SRCommand.run: one methodCall in argv[1], one methodResponse on stdout."""
    try:
        (params,), method = xmlrpc.client.loads(sys.argv[1])
        SMlog("%s" % method)
        result = run(params)
        print(xmlrpc.client.dumps((result,), "", True, allow_none=True))
    except SROSError as e:
        SMlog("%s failed: %s" % (sys.argv[1][:60], e))
        print(xmlrpc.client.dumps(xmlrpc.client.Fault(e.errno, str(e)), "", True))
    except Exception as e:
        SMlog(traceback.format_exc())
        print(xmlrpc.client.dumps(xmlrpc.client.Fault(1200, str(e)), "", True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
