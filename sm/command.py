"""Run one SMAPIv1 command: argv XML-RPC in, one methodResponse on stdout, exit 0.

A driver module ends with

    def main():
        return command.run(MySR, DRIVER_INFO)

run() decodes the call, checks the capability, takes the locks, builds the SR (and
VDI) objects, calls the method and encodes its result or the SR error as a fault.
While the command runs, fd 1 points at stderr, so neither a stray print nor a child
process can corrupt the response; only the response itself reaches the real stdout.
"""
import os
import sys
import traceback

from smtap.errtext import value_text

from smtap.sm import driverinfo
from smtap.sm import errors
from smtap.sm import lock
from smtap.sm import log
from smtap.sm import units
from smtap.sm import wire
from smtap.sm.request import COMMANDS, Request
from smtap.sm.vdi import VDI


class Op(object):
    """How to run one command.

    target: "sr", "new_vdi" (a VDI to be made) or "vdi" (an existing one);
    capability: the DRIVER_INFO capability it needs (None: always allowed);
    failure: the error name an unexpected exception becomes;
    result: "nil", "params" ({uuid, location}), "attach", "string" or "any";
    lock: "sr" (SR-exclusive), "vdi" (the VDI's lock) or None.
    """

    def __init__(self, call, target="sr", capability=None, failure="SMGeneral",
                 result="nil", lock=None):
        self.call, self.target, self.capability = call, target, capability
        self.failure, self.result, self.lock = failure, result, lock


def size_arg(request, index, name):
    try:
        size = int(request.args[index])
    except ValueError:
        raise errors.error("InvalidArg", "%s must be an integer, got %s"
                           % (name, request.args[index]))
    if size < 0:
        raise errors.error("VDISize", "%s must not be negative, got %d" % (name, size))
    return size


def bool_arg(request, index, name):
    return units.parse_bool(request.args[index], "%s (args[%d])" % (name, index))


def _uuid_of(vdi, ref):
    return vdi.xenapi.VDI.get_uuid(ref)


def _vdi_create(vdi, request):
    # args: size, name_label, name_description, metadata_of_pool, is_a_snapshot,
    #       snapshot_time, snapshot_of, read_only
    args = request.args
    vdi.label, vdi.description, vdi.metadata_of_pool = args[1], args[2], args[3]
    vdi.is_a_snapshot = bool_arg(request, 4, "is_a_snapshot")
    vdi.snapshot_time = args[5] or vdi.snapshot_time
    vdi.snapshot_of = args[6]
    vdi.read_only = bool_arg(request, 7, "read_only")
    vdi.sm_config = dict(request.vdi_sm_config)
    vdi.vdi_type = request.vdi_type or vdi.vdi_type
    return vdi.create(size_arg(request, 0, "size"))


def _vdi_introduce(vdi, request):
    vdi.location = request.vdi_location
    vdi.sm_config = dict(request.vdi_sm_config)
    return vdi.introduce()


OPS = {
    "sr_create": Op(lambda sr, r: sr.create(size_arg(r, 0, "physical_size")), lock="sr"),
    "sr_delete": Op(lambda sr, r: sr.delete(), lock="sr"),
    "sr_attach": Op(lambda sr, r: sr.attach(), lock="sr"),
    "sr_detach": Op(lambda sr, r: sr.detach(), lock="sr"),
    "sr_scan": Op(lambda sr, r: sr.scan(), failure="SRScan", lock="sr"),
    "sr_probe": Op(lambda sr, r: sr.probe(), capability="SR_PROBE", result="string"),
    "sr_update": Op(lambda sr, r: sr.update(), lock="sr"),
    "sr_content_type": Op(lambda sr, r: sr.content_type(), result="string"),
    "vdi_create": Op(_vdi_create, "new_vdi", "VDI_CREATE", "VDICreate", "params", "sr"),
    "vdi_introduce": Op(_vdi_introduce, "new_vdi", "VDI_INTRODUCE", result="params", lock="sr"),
    "vdi_update": Op(lambda v, r: v.update(), "vdi", lock="sr"),
    "vdi_delete": Op(lambda v, r: v.delete(), "vdi", "VDI_DELETE", "VDIDelete", lock="sr"),
    "vdi_attach": Op(lambda v, r: v.attach(bool_arg(r, 0, "writable")), "vdi", "VDI_ATTACH",
                     "VDIUnavailable", "attach", "sr"),
    "vdi_detach": Op(lambda v, r: v.detach(), "vdi", "VDI_DETACH", "VDIUnavailable", lock="sr"),
    "vdi_activate": Op(lambda v, r: v.activate(bool_arg(r, 0, "writable")), "vdi",
                       "VDI_ACTIVATE", "VDIUnavailable", lock="vdi"),
    "vdi_deactivate": Op(lambda v, r: v.deactivate(), "vdi", "VDI_DEACTIVATE",
                         "VDIUnavailable", lock="vdi"),
    "vdi_snapshot": Op(lambda v, r: v.snapshot(r.driver_params), "vdi", "VDI_SNAPSHOT",
                       "VDISnapshot", "params", "sr"),
    "vdi_clone": Op(lambda v, r: v.clone(r.driver_params), "vdi", "VDI_CLONE", "VDIClone",
                    "params", "sr"),
    "vdi_resize": Op(lambda v, r: v.resize(size_arg(r, 0, "new_size")), "vdi", "VDI_RESIZE",
                     "VDIResize", "params", "sr"),
    "vdi_resize_online": Op(lambda v, r: v.resize_online(size_arg(r, 0, "new_size")), "vdi",
                            "VDI_RESIZE_ONLINE", "VDIResize", "params", "sr"),
    "vdi_generate_config": Op(lambda v, r: v.generate_config(), "vdi", "VDI_GENERATE_CONFIG",
                              result="string"),
    "vdi_attach_from_config": Op(lambda v, r: v.attach_from_config(), "vdi",
                                 failure="VDIUnavailable", result="attach", lock="vdi"),
    "vdi_detach_from_config": Op(lambda v, r: v.detach_from_config(), "vdi",
                                 failure="VDIUnavailable", lock="vdi"),
    "vdi_compose": Op(lambda v, r: v.compose(_uuid_of(v, r.args[0])), "vdi", lock="sr"),
    "vdi_epoch_begin": Op(lambda v, r: v.epoch_begin(), "vdi", lock="vdi"),
    "vdi_epoch_end": Op(lambda v, r: v.epoch_end(), "vdi", lock="vdi"),
    "vdi_enable_cbt": Op(lambda v, r: v.enable_cbt(), "vdi", "VDI_CONFIG_CBT", lock="sr"),
    "vdi_disable_cbt": Op(lambda v, r: v.disable_cbt(), "vdi", "VDI_CONFIG_CBT", lock="sr"),
    "vdi_data_destroy": Op(lambda v, r: v.data_destroy(), "vdi", "VDI_CONFIG_CBT", lock="sr"),
    "vdi_list_changed_blocks": Op(lambda v, r: v.list_changed_blocks(_uuid_of(v, r.args[0])),
                                  "vdi", "VDI_CONFIG_CBT", result="string"),
}
assert set(OPS) | {"sr_get_driver_info"} == set(COMMANDS)


def check_result(op, command, value):
    """Results reach XAPI only in the shape it parses."""
    if op.result == "nil":
        return None
    if op.result == "params":
        if isinstance(value, VDI):
            value = value.get_params()
        if not isinstance(value, dict) or not value.get("uuid") or "location" not in value:
            raise TypeError("%s must return the VDI or its {uuid, location}, not %s"
                            % (command, value_text(value)))
        return {"uuid": value["uuid"], "location": value["location"]}
    if op.result == "attach":
        if not isinstance(value, dict) or not value.get("params_nbd"):
            raise TypeError("%s must return a struct with params_nbd, not %s"
                            % (command, value_text(value)))
        return value
    if op.result == "string":
        if not isinstance(value, str):
            raise TypeError("%s must return a string, not %s" % (command, value_text(value)))
    return value


class Locks(object):
    """The locks a command holds, released in reverse order."""

    def __init__(self):
        self.held = []

    def take(self, lk):
        lk.acquire()
        self.held.append(lk)

    def release_all(self):
        while self.held:
            self.held.pop().release()


def dispatch(sr_class, info, request, strict_keys=False):
    """Run the request; return the result value or raise SROSError."""
    command = request.command
    if command not in COMMANDS:
        raise errors.error("Unimplemented", command)
    if strict_keys:
        request.check_keys()
    request.check_args()
    if command == "sr_get_driver_info":
        return driverinfo.describe(info)
    op = OPS[command]
    if op.capability and not driverinfo.has(info, op.capability):
        raise errors.error("Unimplemented", "%s (capability %s not advertised)"
                           % (command, op.capability))
    if op.target != "sr" and not request.sr_uuid:
        raise errors.error("BadRequest", "%s needs sr_uuid" % command)
    if op.target == "vdi" and not request.vdi_uuid:
        raise errors.error("BadRequest", "%s needs vdi_uuid" % command)

    locks = Locks()
    try:
        if op.lock == "sr" and request.sr_uuid:
            locks.take(lock.Lock("sr", request.sr_uuid))
        if op.lock == "vdi":
            locks.take(lock.Lock("vdi", request.vdi_uuid))
        sr = sr_class(request)  # an exception while loading the SR is a bare one: 1200
        try:
            if op.target == "sr":
                value = op.call(sr, request)
            elif op.target == "new_vdi":
                value = op.call(sr.new_vdi(request.new_uuid or request.vdi_uuid), request)
            else:
                value = op.call(sr.vdi(request.vdi_uuid), request)
            value = check_result(op, command, value)
        except errors.SROSError:
            raise
        except Exception as e:
            log.exception("%s failed", command)
            raise errors.error(op.failure, errors.describe(e))
    finally:
        locks.release_all()
    if command == "vdi_delete":
        lock.cleanup(request.vdi_uuid)
    return value


def respond(sr_class, info, argv, strict_keys=False):
    """argv (without the program name) -> the methodResponse text."""
    log.setup()
    if len(argv) != 1:
        log.error("expected exactly one argument, got %d", len(argv))
        return wire.encode_fault(
            errors.code_of("BadRequest"),
            errors.error("BadRequest", "expected exactly one argument (the XML-RPC call), got %d"
                         % len(argv)).message)
    try:
        command, params = wire.decode_call(argv[0])
        log.set_context(command)
        request = Request(command, params)
        log.set_context(command, request.sr_uuid, request.vdi_uuid or request.new_uuid)
        log.info("%s args=%s%s", command, request.args,
                 " subtask_of=%s" % request.subtask_of if request.subtask_of else "")
        result = dispatch(sr_class, info, request, strict_keys)
        log.info("%s done: %r", command, result)
        return wire.encode_result(result)
    except errors.SROSError as e:
        log.error("fault %d: %s", e.code, e.message)
        return wire.encode_fault(e.code, e.message)
    except Exception as e:
        log.exception("unexpected failure")
        return wire.encode_fault(errors.code_of("GenericException"), errors.describe(e))


class StdoutGuard(object):
    """Points fd 1 (and sys.stdout) at stderr until write_response() restores it."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        try:
            os.dup2(2, 1)
        except OSError:  # no stderr: discard instead
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        return self

    def restore(self):
        if self.saved is not None:
            sys.stdout.flush()
            os.dup2(self.saved, 1)
            os.close(self.saved)
            self.saved = None

    def __exit__(self, *exc):
        self.restore()

    def write_response(self, text):
        self.restore()
        data = text.encode("utf-8")
        while data:
            data = data[os.write(1, data):]


def run(sr_class, info, argv=None, strict_keys=False):
    """The driver's main: answer the call in sys.argv; the exit status (0 once answered)."""
    argv = sys.argv[1:] if argv is None else argv
    with StdoutGuard() as guard:
        try:
            response = respond(sr_class, info, argv, strict_keys)
        except BaseException as e:  # even a logging failure must leave a response
            traceback.print_exc()
            response = wire.encode_fault(errors.code_of("GenericException"), str(e))
        try:
            guard.write_response(response)
        except OSError:
            traceback.print_exc()
            return 1
    return 0
