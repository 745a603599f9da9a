"""One SMAPIv1 call as XAPI sends it: the command and its parameter struct.

The keys XAPI sends for each command (smapi-v1.md) are tabulated here so a driver can
check a request strictly (DummySR does) and so the dispatcher knows which args exist.
"""
from smtap.errtext import value_text
from smtap.sm import errors
from smtap.sm import units
from smtap.sm import xapi

ALWAYS = {"host_ref", "command", "args", "device_config"}
OPTIONAL = {"subtask_of", "local_cache_sr"}
SESSION = {"session_ref"}
SR_SCOPED = {"sr_ref", "sr_uuid"}
ON_VDI = {"vdi_ref", "vdi_location", "vdi_uuid", "vdi_on_boot", "vdi_allow_caching"}

_COMMON = ALWAYS | SESSION | SR_SCOPED
_VDI = _COMMON | ON_VDI
# command -> (required keys, optional keys beyond OPTIONAL, number of args)
COMMANDS = {
    "sr_get_driver_info": (ALWAYS, set(), 0),
    "sr_create": (_COMMON, set(), 1),
    "sr_delete": (_COMMON, set(), 0),
    "sr_attach": (_COMMON, set(), 0),
    "sr_detach": (_COMMON, set(), 0),
    "sr_scan": (_COMMON, set(), 0),
    "sr_probe": (ALWAYS | SESSION | {"sr_sm_config"}, set(), 0),
    "sr_update": (_COMMON, set(), 0),
    "sr_content_type": (_COMMON, set(), 0),
    "vdi_create": (_COMMON | {"vdi_sm_config", "vdi_type"}, {"vdi_uuid"}, 8),
    "vdi_update": (_VDI, set(), 0),
    "vdi_introduce": (_COMMON | {"vdi_location", "vdi_sm_config", "new_uuid"}, set(), 0),
    "vdi_delete": (_VDI, set(), 0),
    "vdi_attach": (_VDI, set(), 1),
    "vdi_detach": (_VDI, set(), 0),
    "vdi_activate": (_VDI, set(), 1),
    "vdi_deactivate": (_VDI, set(), 0),
    "vdi_snapshot": (_VDI | {"driver_params"}, set(), 0),
    "vdi_clone": (_VDI | {"driver_params"}, set(), 0),
    "vdi_resize": (_VDI, set(), 1),
    "vdi_resize_online": (_VDI, set(), 1),
    "vdi_generate_config": (_VDI, set(), 0),
    # Replayed from vdi_generate_config's output, possibly with XAPI down: no session.
    "vdi_attach_from_config": ({"command", "device_config", "sr_uuid", "vdi_uuid"},
                               _VDI | {"sr_sm_config"}, 0),
    "vdi_detach_from_config": ({"command", "device_config", "sr_uuid", "vdi_uuid"},
                               _VDI | {"sr_sm_config"}, 0),
    "vdi_compose": (_VDI, set(), 1),
    "vdi_epoch_begin": (_VDI, set(), 0),
    "vdi_epoch_end": (_VDI, set(), 0),
    "vdi_enable_cbt": (_VDI, set(), 0),
    "vdi_disable_cbt": (_VDI, set(), 0),
    "vdi_data_destroy": (_VDI, set(), 0),
    "vdi_list_changed_blocks": (_VDI, set(), 1),
}


def bad_request(detail):
    return errors.error("BadRequest", detail)


class Request(object):
    """The parsed call; attributes are the struct's keys (None when absent)."""

    def __init__(self, command, params):
        if not isinstance(params, dict):
            raise bad_request("%s: the parameter must be a struct" % command)
        self.command = command
        self.params = params
        self.host_ref = params.get("host_ref")
        self.session_ref = params.get("session_ref")
        args = params.get("args") or []
        if not isinstance(args, list):
            raise bad_request("%s: args must be an array, got %s" % (command, value_text(args)))
        self.args = [str(a) for a in args]
        self.device_config = _struct(params, "device_config")
        self.sr_ref = params.get("sr_ref")
        self.sr_uuid = params.get("sr_uuid")
        self.vdi_ref = params.get("vdi_ref")
        self.vdi_uuid = params.get("vdi_uuid") or None
        self.vdi_location = params.get("vdi_location")
        self.vdi_on_boot = params.get("vdi_on_boot")
        self.vdi_allow_caching = params.get("vdi_allow_caching")
        self.vdi_sm_config = _struct(params, "vdi_sm_config")
        self.vdi_type = params.get("vdi_type")
        self.new_uuid = params.get("new_uuid")
        self.driver_params = _struct(params, "driver_params")
        self.sr_sm_config = _struct(params, "sr_sm_config")
        self.subtask_of = params.get("subtask_of") or None
        self.local_cache_sr = params.get("local_cache_sr")
        self._session = None

    @property
    def session(self):
        """The XenAPI session XAPI handed us (created on first use)."""
        if self._session is None:
            if not self.session_ref:
                raise bad_request("%s: no session_ref in the request" % self.command)
            self._session = xapi.session(self.session_ref, self.subtask_of)
        return self._session

    @property
    def xenapi(self):
        return self.session.xenapi

    @property
    def is_master(self):
        return units.parse_bool(self.device_config.get("SRmaster", "false"),
                                "device_config:SRmaster")

    def check_args(self):
        """Every command gets the args its table row lists, as strings."""
        count = COMMANDS[self.command][2]
        if len(self.args) < count:
            raise bad_request("%s needs %d args, got %d: %s"
                              % (self.command, count, len(self.args), value_text(self.args)))

    def check_keys(self):
        """Strict check: exactly the keys smapi-v1.md lists for this command."""
        required, optional, count = COMMANDS[self.command]
        missing = sorted(required - set(self.params))
        unexpected = sorted(set(self.params) - required - optional - OPTIONAL)
        problems = []
        if missing:
            problems.append("missing key(s) %s" % ", ".join(missing))
        if unexpected:
            problems.append("unexpected key(s) %s" % ", ".join(unexpected))
        if "args" in self.params and len(self.args) != count:
            problems.append("expected %d args, got %d" % (count, len(self.args)))
        if self.params.get("command", self.command) != self.command:
            problems.append("key command=%s differs from the method name" % self.params["command"])
        if problems:
            raise bad_request("%s: %s" % (self.command, "; ".join(problems)))


def _struct(params, key):
    value = params.get(key) or {}
    if not isinstance(value, dict):
        raise bad_request("%s must be a struct, got %s" % (key, value_text(value)))
    return value
