"""The SM harness: XAPI's encoding of a driver call, a driver runner, and a small real
XenAPI server on a unix socket (the toolstack's server replaces it end to end)."""
import contextlib
import os
import re
import socketserver
import threading
import uuid
import xmlrpc.client
from xml.sax.saxutils import escape
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from lib.checkout import TOP, VENV_PYTHON
from lib.procs import run
from smtap import settings

# The interpreter drivers run with; SMTAP_SM_PYTHON=/path/to/python3.6 (with
# PYTHONPATH=<checkout>) runs them as dom0 would.
PYTHON = os.environ.get("SMTAP_SM_PYTHON") or VENV_PYTHON
HOST_REF = "OpaqueRef:host-0"
SESSION_REF = "OpaqueRef:session-sm"
SR_REF = "OpaqueRef:sr-0"


# --- XAPI's encoding of the argv call -------------------------------------------------
def xapi_value(v):
    """XAPI's encoder: untyped strings, <value/> for "", no whitespace."""
    if isinstance(v, bool):
        return "<value><boolean>%d</boolean></value>" % v
    if isinstance(v, str):
        return "<value>%s</value>" % escape(v) if v else "<value/>"
    if isinstance(v, dict):
        return "<value><struct>%s</struct></value>" % "".join(
            "<member><name>%s</name>%s</member>" % (escape(k), xapi_value(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "<value><array><data>%s</data></array></value>" % "".join(map(xapi_value, v))
    raise TypeError(v)


def xapi_call(method, params):
    return ("<methodCall><methodName>%s</methodName><params><param>%s</param></params>"
            "</methodCall>" % (method, xapi_value(params)))


VDI_COMMANDS = {"vdi_update", "vdi_delete", "vdi_attach", "vdi_detach", "vdi_activate",
                "vdi_deactivate", "vdi_snapshot", "vdi_clone", "vdi_resize", "vdi_resize_online",
                "vdi_generate_config", "vdi_compose", "vdi_epoch_begin", "vdi_epoch_end",
                "vdi_enable_cbt", "vdi_disable_cbt", "vdi_data_destroy",
                "vdi_list_changed_blocks"}


def params_for(command, sr_uuid, args=(), vdi=None, **extra):
    """The keys XAPI sends for `command` (smapi-v1.md); vdi = (ref, uuid, location)."""
    p = {"host_ref": HOST_REF, "command": command, "args": list(args),
         "device_config": {"SRmaster": "true"}}
    if command == "sr_get_driver_info":
        p["device_config"] = {}
        return dict(p, **extra)
    p["session_ref"] = SESSION_REF
    if command == "sr_probe":
        p["sr_sm_config"] = {}
        return dict(p, **extra)
    p["sr_ref"], p["sr_uuid"] = SR_REF, sr_uuid
    if command in VDI_COMMANDS:
        ref, vuuid, location = vdi
        p.update(vdi_ref=ref, vdi_uuid=vuuid, vdi_location=location, vdi_on_boot="persist",
                 vdi_allow_caching="false")
    if command == "vdi_create":
        p.update(vdi_sm_config={}, vdi_type="user")
    if command in ("vdi_snapshot", "vdi_clone"):
        p["driver_params"] = {}
    p.update(extra)
    return p


def vdi_create_args(size, label="disk", read_only=False):
    return [str(size), label, "", "", "false", "19700101T00:00:00Z", "", str(read_only).lower()]


# --- running a driver -----------------------------------------------------------------
def install_driver(module, name):
    """The launcher `make install` writes, under the test root's sm_dir()."""
    with open(os.path.join(TOP, "bin", "launcher.in")) as f:
        text = f.read()
    text = (text.replace("@PYTHON@", PYTHON).replace("@LIBREL@", "../../smtap/lib")
            .replace("@MODULE@", module))
    os.makedirs(settings.sm_dir(), exist_ok=True)
    path = os.path.join(settings.sm_dir(), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


class Reply(object):
    def __init__(self, proc):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        try:
            self.value = xmlrpc.client.loads(proc.stdout)[0][0]
            self.fault = None
        except xmlrpc.client.Fault as f:
            self.value = None
            self.fault = f

    @property
    def code(self):
        return self.fault.faultCode if self.fault else None

    @property
    def message(self):
        return self.fault.faultString if self.fault else None


def run_driver(argv, env=None, timeout=60):
    """Run a driver's argv as XAPI does (ORIGINATOR=SM): its Reply."""
    e = dict(os.environ, ORIGINATOR="SM")
    e.update(env or {})
    return Reply(run(argv, check=False, env=e, timeout=timeout))


class Driver(object):
    """Calls one installed driver as XAPI would."""

    def __init__(self, path, sr_uuid):
        self.path = path
        self.sr_uuid = sr_uuid

    def argv(self, command, args=(), vdi=None, **extra):
        return [self.path, xapi_call(command, params_for(command, self.sr_uuid, args, vdi, **extra))]

    def call(self, command, args=(), vdi=None, **extra):
        reply = run_driver(self.argv(command, args, vdi, **extra))
        assert reply.returncode == 0, reply.stderr
        return reply

    def ok(self, command, args=(), vdi=None, **extra):
        reply = self.call(command, args, vdi, **extra)
        assert reply.fault is None, (reply.fault, reply.stderr)
        return reply.value


# --- a small XenAPI server ------------------------------------------------------------
class FakeXapi(object):
    """The VDI and SR calls drivers make, on XAPI's wire format (Status/Value)."""

    def __init__(self, sr_uuid):
        self.sr_uuid = sr_uuid
        self.srs = {SR_REF: {"uuid": sr_uuid, "physical_size": "0",
                             "physical_utilisation": "0", "virtual_allocation": "0",
                             "other_config": {}}}
        self.vdis = {}
        self.calls = []  # (method, args, headers)
        self.lock = threading.Lock()

    def handle(self, method, params, headers):
        with self.lock:
            self.calls.append((method, params, headers))
            if not params or params[0] != SESSION_REF:
                return {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", str(params[:1])]}
            try:
                fn = getattr(self, method.replace(".", "_"))
            except AttributeError:
                return {"Status": "Failure", "ErrorDescription": ["MESSAGE_METHOD_UNKNOWN", method]}
            try:
                return {"Status": "Success", "Value": fn(*params[1:])}
            except LookupError as e:
                return {"Status": "Failure", "ErrorDescription": ["HANDLE_INVALID", str(e)]}

    def called(self, method):
        return [c for c in self.calls if c[0] == method]

    def vdi_by_uuid(self, vuuid):
        return next((ref, r) for ref, r in self.vdis.items() if r["uuid"] == vuuid)

    # VDI
    def VDI_db_introduce(self, uuid_, name_label, name_description, sr, type_, sharable,
                         read_only, other_config, location, xenstore_data, sm_config, managed,
                         virtual_size, physical_utilisation, metadata_of_pool, is_a_snapshot,
                         snapshot_time, snapshot_of, cbt_enabled):
        for v in (virtual_size, physical_utilisation):
            assert isinstance(v, str) and v.isdigit(), "int64 must travel as a string: %r" % v
        ref = "OpaqueRef:vdi-%s" % uuid.uuid4()
        self.vdis[ref] = dict(
            uuid=uuid_, name_label=name_label, name_description=name_description, SR=sr,
            type=type_, sharable=sharable, read_only=read_only, other_config=other_config,
            location=location, xenstore_data=xenstore_data, sm_config=sm_config,
            managed=managed, virtual_size=virtual_size,
            physical_utilisation=physical_utilisation, metadata_of_pool=metadata_of_pool,
            is_a_snapshot=is_a_snapshot, snapshot_time=snapshot_time, snapshot_of=snapshot_of,
            cbt_enabled=cbt_enabled)
        return ref

    def VDI_db_forget(self, ref):
        del self.vdis[ref]
        return ""

    def VDI_get_by_uuid(self, vuuid):
        for ref, r in self.vdis.items():
            if r["uuid"] == vuuid:
                return ref
        raise LookupError(vuuid)

    def VDI_get_record(self, ref):
        return self.vdis[ref]

    def VDI_get_uuid(self, ref):
        return self.vdis[ref]["uuid"]

    def VDI_get_all_records_where(self, expr):
        m = re.match(r'field "SR" = "([^"]*)"$', expr)
        assert m, expr
        return {ref: r for ref, r in self.vdis.items() if r["SR"] == m.group(1)}

    def _set(self, ref, field, value):
        self.vdis[ref][field] = value
        return ""

    def VDI_set_virtual_size(self, ref, value):
        assert isinstance(value, str)
        return self._set(ref, "virtual_size", value)

    def VDI_set_physical_utilisation(self, ref, value):
        assert isinstance(value, str)
        return self._set(ref, "physical_utilisation", value)

    def VDI_set_read_only(self, ref, value):
        return self._set(ref, "read_only", value)

    def VDI_set_sm_config(self, ref, value):
        return self._set(ref, "sm_config", value)

    def VDI_add_to_sm_config(self, ref, key, value):
        assert key not in self.vdis[ref]["sm_config"], "MAP_DUPLICATE_KEY"
        self.vdis[ref]["sm_config"][key] = value
        return ""

    def VDI_remove_from_sm_config(self, ref, key):
        self.vdis[ref]["sm_config"].pop(key, None)
        return ""

    # SR
    def SR_get_by_uuid(self, sr_uuid):
        for ref, r in self.srs.items():
            if r["uuid"] == sr_uuid:
                return ref
        raise LookupError(sr_uuid)

    def SR_get_record(self, ref):
        return self.srs[ref]

    def SR_set_physical_size(self, ref, value):
        self.srs[ref]["physical_size"] = value
        return ""

    def SR_set_physical_utilisation(self, ref, value):
        self.srs[ref]["physical_utilisation"] = value
        return ""

    def SR_set_virtual_allocation(self, ref, value):
        self.srs[ref]["virtual_allocation"] = value
        return ""


class _Handler(SimpleXMLRPCRequestHandler):
    disable_nagle_algorithm = False  # a TCP option: not on a unix socket

    def _dispatch(self, method, params):  # used by _marshaled_dispatch; sees the headers
        return self.server.xapi.handle(method, params, dict(self.headers))

    def log_message(self, *args):
        pass


class UnixXMLRPCServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer,
                       SimpleXMLRPCDispatcher):
    daemon_threads = True
    logRequests = False

    def __init__(self, path, xapi):
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding=None)
        socketserver.UnixStreamServer.__init__(self, path, _Handler)
        self.xapi = xapi


@contextlib.contextmanager
def fake_xapi_server():
    """A XenAPI server on settings.xapi_socket() knowing one SR: yields its FakeXapi."""
    path = settings.xapi_socket()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fake = FakeXapi(str(uuid.uuid4()))
    server = UnixXMLRPCServer(path, fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        os.unlink(path)


def dummy_driver(fake):
    """The installed DummySR, called as XAPI would for the fake's SR."""
    return Driver(install_driver("smtap.sm.drivers.DummySR", "DummySR"), fake.sr_uuid)


def log_lines():
    with open(settings.log_file()) as f:
        return f.read().splitlines()


def helper_driver(name):
    """A test driver of tests/lib/drivers, run as a script."""
    return [PYTHON, os.path.join(os.path.dirname(os.path.abspath(__file__)), "drivers", name)]
