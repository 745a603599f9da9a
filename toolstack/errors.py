"""XenAPI errors: a code and string parameters, sent as ErrorDescription."""
from smtap.errtext import value_text

NULL_REF = "OpaqueRef:NULL"


class ApiError(Exception):
    """A XenAPI failure; `description` is the ErrorDescription list."""

    def __init__(self, code, *params):
        Exception.__init__(self, code, *params)
        self.description = [code] + [value_text(p) for p in params]

    @property
    def code(self):
        return self.description[0]

    def __str__(self):
        return " ".join(self.description)


# XAPI's names, used by several modules.
HANDLE_INVALID = "HANDLE_INVALID"
UUID_INVALID = "UUID_INVALID"
SESSION_INVALID = "SESSION_INVALID"
SESSION_AUTHENTICATION_FAILED = "SESSION_AUTHENTICATION_FAILED"
MESSAGE_METHOD_UNKNOWN = "MESSAGE_METHOD_UNKNOWN"
MESSAGE_PARAMETER_COUNT_MISMATCH = "MESSAGE_PARAMETER_COUNT_MISMATCH"
XMLRPC_UNMARSHAL_FAILURE = "XMLRPC_UNMARSHAL_FAILURE"
FIELD_TYPE_ERROR = "FIELD_TYPE_ERROR"
MAP_DUPLICATE_KEY = "MAP_DUPLICATE_KEY"
INVALID_VALUE = "INVALID_VALUE"
RBAC_PERMISSION_DENIED = "RBAC_PERMISSION_DENIED"
INTERNAL_ERROR = "INTERNAL_ERROR"
OPERATION_NOT_ALLOWED = "OPERATION_NOT_ALLOWED"
SR_UNKNOWN_DRIVER = "SR_UNKNOWN_DRIVER"
SR_NOT_EMPTY = "SR_NOT_EMPTY"
SR_HAS_PBD = "SR_HAS_PBD"
SR_HAS_NO_PBDS = "SR_HAS_NO_PBDS"
SR_OPERATION_NOT_SUPPORTED = "SR_OPERATION_NOT_SUPPORTED"
SR_DEVICE_IN_USE = "SR_DEVICE_IN_USE"
SR_BACKEND_FAILURE = "SR_BACKEND_FAILURE"
VDI_IN_USE = "VDI_IN_USE"
VDI_MISSING = "VDI_MISSING"
DEVICE_ALREADY_ATTACHED = "DEVICE_ALREADY_ATTACHED"
DEVICE_ALREADY_DETACHED = "DEVICE_ALREADY_DETACHED"
DEVICE_DETACH_REJECTED = "DEVICE_DETACH_REJECTED"
VDI_READONLY = "VDI_READONLY"
PBD_EXISTS = "PBD_EXISTS"
XENAPI_MISSING_PLUGIN = "XENAPI_MISSING_PLUGIN"
XENAPI_PLUGIN_FAILURE = "XENAPI_PLUGIN_FAILURE"
DEVICE_ALREADY_EXISTS = "DEVICE_ALREADY_EXISTS"
INVALID_DEVICE = "INVALID_DEVICE"
VDI_COPY_FAILED = "VDI_COPY_FAILED"
VDI_TOO_SMALL = "VDI_TOO_SMALL"
VDI_NOT_MANAGED = "VDI_NOT_MANAGED"
LOCATION_NOT_UNIQUE = "LOCATION_NOT_UNIQUE"
VM_BAD_POWER_STATE = "VM_BAD_POWER_STATE"
OTHER_OPERATION_IN_PROGRESS = "OTHER_OPERATION_IN_PROGRESS"
VM_IS_TEMPLATE = "VM_IS_TEMPLATE"
VM_IS_SNAPSHOT = "VM_IS_SNAPSHOT"
ONLY_PROVISION_TEMPLATE = "ONLY_PROVISION_TEMPLATE"
VM_LACKS_FEATURE = "VM_LACKS_FEATURE"
VM_MISSING_PV_DRIVERS = "VM_MISSING_PV_DRIVERS"
VM_SHUTDOWN_TIMEOUT = "VM_SHUTDOWN_TIMEOUT"
VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT = "VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT"
FAILED_TO_START_EMULATOR = "FAILED_TO_START_EMULATOR"
VBD_NOT_UNPLUGGABLE = "VBD_NOT_UNPLUGGABLE"

# The errors the toolstack raises, as XAPI's datamodel documents them
# (xen-api ocaml/idl/datamodel_errors.ml): the names of their parameters and the
# description `xe` prints instead of the code.
DOCS = {
    INTERNAL_ERROR: (["message"], "The server failed to handle your request, due to an "
                     "internal error. The given message may give details useful for "
                     "debugging the problem."),
    UUID_INVALID: (["type", "uuid"], "The uuid you supplied was invalid."),
    MAP_DUPLICATE_KEY: (["type", "param_name", "uuid", "key"], "You tried to add a "
                        "key-value pair to a map, but that key is already there."),
    XMLRPC_UNMARSHAL_FAILURE: (["expected", "received"], "The server failed to unmarshal "
                               "the XMLRPC message; it was expecting one element and "
                               "received something else."),
    MESSAGE_METHOD_UNKNOWN: (["method"], "You tried to call a method that does not exist. "
                             "The method name that you used is echoed."),
    MESSAGE_PARAMETER_COUNT_MISMATCH: (["method", "expected", "received"], "You tried to call "
                                       "a method with the incorrect number of parameters. The "
                                       "fully-qualified method name that you used, and the "
                                       "number of received and expected parameters are "
                                       "returned."),
    INVALID_VALUE: (["field", "value"], "The value given is invalid"),
    FIELD_TYPE_ERROR: (["field"], "The value specified is of the wrong type"),
    OPERATION_NOT_ALLOWED: (["reason"], "You attempted an operation that was not allowed."),
    HANDLE_INVALID: (["class", "handle"], "You gave an invalid object reference. The object "
                     "may have recently been deleted. The class parameter gives the type of "
                     "reference given, and the handle parameter echoes the bad value given."),
    SESSION_INVALID: (["handle"], "You gave an invalid session reference. It may have been "
                      "invalidated by a server restart, or timed out. You should get a new "
                      "session handle, using one of the session.login_ calls. This error does "
                      "not invalidate the current connection. The handle parameter echoes the "
                      "bad value given."),
    RBAC_PERMISSION_DENIED: (["permission", "message"], "RBAC permission denied."),
    SR_BACKEND_FAILURE: (["status", "stdout", "stderr"], "There was an SR backend failure."),
    SR_HAS_NO_PBDS: (["sr"], "The SR has no attached PBDs"),
    PBD_EXISTS: (["sr", "host", "pbd"], "A PBD already exists connecting the SR to the "
                 "server."),
    SR_HAS_PBD: (["sr"], "The SR is still connected to a host via a PBD. It cannot be "
                 "destroyed or forgotten."),
    SR_UNKNOWN_DRIVER: (["driver"], "The SR could not be connected because the driver was "
                        "not recognised."),
    VDI_READONLY: (["vdi"], "The operation required write access but this VDI is read-only"),
    VDI_TOO_SMALL: (["vdi", "minimum size"], "The VDI is too small. Please resize it to at "
                    "least the minimum size."),
    VDI_IN_USE: (["vdi", "operation"], "This operation cannot be performed because this VDI "
                 "is in use by some other operation"),
    VDI_MISSING: (["sr", "vdi"], "This operation cannot be performed because the specified "
                  "VDI could not be found on the storage substrate"),
    VDI_NOT_MANAGED: (["vdi"], "This operation cannot be performed because the system does "
                      "not manage this VDI"),
    VDI_COPY_FAILED: ([], "The VDI copy action has failed"),
    LOCATION_NOT_UNIQUE: (["SR", "location"], "A VDI with the specified location already "
                          "exists within the SR"),
    SR_OPERATION_NOT_SUPPORTED: (["sr"], "The SR backend does not support the operation "
                                 "(check the SR's allowed operations)"),
    SR_NOT_EMPTY: ([], "The SR operation cannot be performed because the SR is not empty."),
    SR_DEVICE_IN_USE: ([], "The SR operation cannot be performed because a device underlying "
                       "the SR is in use by the server."),
    DEVICE_ALREADY_ATTACHED: (["device"], "The device is already attached to a VM"),
    DEVICE_ALREADY_DETACHED: (["device"], "The device is not currently attached"),
    DEVICE_ALREADY_EXISTS: (["device"], "A device with the name given already exists on the "
                            "selected VM"),
    INVALID_DEVICE: (["device"], "The device name is invalid"),
    DEVICE_DETACH_REJECTED: (["type", "ref", "msg"], "The VM rejected the attempt to detach "
                             "the device."),
    XENAPI_MISSING_PLUGIN: (["name"], "The requested plug-in could not be found."),
    VM_BAD_POWER_STATE: (["vm", "expected", "actual"], "You attempted an operation on a VM "
                         "that was not in an appropriate power state at the time; for example, "
                         "you attempted to start a VM that was already running. The parameters "
                         "returned are the VM's handle, and the expected and actual VM state "
                         "at the time of the call."),
    OTHER_OPERATION_IN_PROGRESS: (["class", "object"], "Another operation involving the "
                                  "object is currently in progress"),
    VM_IS_TEMPLATE: (["vm", "operation"], "The operation attempted is not valid for a "
                     "template VM"),
    VM_IS_SNAPSHOT: (["vm", "operation"], "The operation attempted is not valid for a "
                     "snapshot VM"),
    ONLY_PROVISION_TEMPLATE: ([], "The provision call can only be invoked on templates, not "
                              "regular VMs."),
    VM_LACKS_FEATURE: (["vm"], "You attempted an operation on a VM which lacks the feature."),
    VM_MISSING_PV_DRIVERS: (["vm"], "You attempted an operation on a VM which requires PV "
                            "drivers to be installed but the drivers were not detected."),
    VM_SHUTDOWN_TIMEOUT: (["vm", "timeout"], "VM failed to shutdown before the timeout "
                          "expired"),
    VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT: (["vm"], "VM didn't acknowledge the need to "
                                        "shutdown."),
    FAILED_TO_START_EMULATOR: (["vm", "name", "msg"], "An emulator required to run this VM "
                               "failed to start"),
    VBD_NOT_UNPLUGGABLE: (["vbd"], "Drive could not be hot-unplugged because it is not "
                          "marked as unpluggable"),
    XENAPI_PLUGIN_FAILURE: (["status", "stdout", "stderr"], "There was a failure "
                            "communicating with the plug-in."),
}


def code_of_description(text):
    """The code whose description `xe` printed (None if it printed none of ours)."""
    for code, (_, description) in DOCS.items():
        if description == text:
            return code
    return None
