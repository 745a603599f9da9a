"""The VDI base class a driver subclasses (upstream VDI.VDI, without the baggage).

A VDI object carries the fields XAPI keeps in its VDI record; the db_* helpers write
them through the XenAPI session (VDI.db_introduce and the privileged setters that
XAPI grants the driver's session). Methods that make or change a VDI return the VDI
(or its get_params() struct); the dispatcher sends {uuid, location} back to XAPI.
"""
import time

from smtap.sm import errors
from smtap.sm import wire

EPOCH = "19700101T00:00:00Z"
NULL_REF = "OpaqueRef:NULL"
DATAPATH_KEYS = ("paused", "activating", "relinking")


def timestamp(seconds=None):
    """XAPI's datetime format, UTC."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime(seconds))


class VDI(object):
    def __init__(self, sr, uuid=None):
        self.sr = sr
        if not uuid:
            import uuid as uuidlib  # here: uuid imports platform; most calls name their VDI
            uuid = str(uuidlib.uuid4())
        self.uuid = uuid
        self._ref = None  # looked up by uuid when first needed
        self.location = self.uuid
        self.label = ""
        self.description = ""
        self.vdi_type = "user"
        self.size = 0  # virtual size, bytes
        self.utilisation = 0  # physical utilisation, bytes
        self.read_only = False
        self.sharable = False
        self.managed = True
        self.sm_config = {}
        self.other_config = {}
        self.xenstore_data = {}
        self.metadata_of_pool = ""
        self.is_a_snapshot = False
        self.snapshot_time = EPOCH
        self.snapshot_of = ""  # the parent's ref (or uuid); "" when not a snapshot
        self.cbt_enabled = False

    # --- what a driver overrides ---------------------------------------------------
    def load(self, vdi_uuid):
        """Read an existing VDI's state (from storage, or load_db_record())."""

    def create(self, size):
        """Make the VDI on storage (fields such as label are already set), call
        db_introduce(), return self."""
        self.unimplemented("vdi_create")

    def delete(self):
        """Remove the VDI from storage and call db_forget()."""
        self.unimplemented("vdi_delete")

    def introduce(self):
        """Adopt a VDI already on storage at self.location: db_introduce(), return self."""
        self.unimplemented("vdi_introduce")

    def update(self):
        """Push XAPI's record to the driver's own metadata; XAPI calls it after
        snapshot and clone."""

    def attach(self, writable):
        """Prepare the datapath; return {"params_nbd": "nbd:unix:<socket>:exportname=<name>"}
        plus optional params, o_direct, o_direct_reason, xenstore_data."""
        self.unimplemented("vdi_attach")

    def detach(self):
        self.unimplemented("vdi_detach")

    def activate(self, writable):
        """Start serving I/O (after attach); see db_set_host_mode()."""
        self.unimplemented("vdi_activate")

    def deactivate(self):
        self.unimplemented("vdi_deactivate")

    def snapshot(self, driver_params):
        """A new point-in-time VDI (is_a_snapshot, snapshot_of, snapshot_time set); return it."""
        self.unimplemented("vdi_snapshot")

    def clone(self, driver_params):
        """A new writable copy-on-write VDI; return it."""
        self.unimplemented("vdi_clone")

    def resize(self, size):
        """Grow the VDI to `size` bytes while detached; update XAPI; return self."""
        self.unimplemented("vdi_resize")

    def resize_online(self, size):
        self.unimplemented("vdi_resize_online")

    def generate_config(self):
        """A vdi_attach_from_config call that re-attaches this VDI without XAPI."""
        params = {"command": "vdi_attach_from_config", "device_config": self.sr.dconf,
                  "sr_uuid": self.sr.uuid, "vdi_uuid": self.uuid,
                  "vdi_location": self.location}
        return wire.encode_call("vdi_attach_from_config", params)

    def attach_from_config(self):
        """Attach with only generate_config()'s parameters (no session); return as attach."""
        self.unimplemented("vdi_attach_from_config")

    def detach_from_config(self):
        self.unimplemented("vdi_detach_from_config")

    def compose(self, parent_uuid):
        """Make the VDI a child of parent_uuid's VDI."""
        self.unimplemented("vdi_compose")

    def epoch_begin(self):
        """on-boot=reset: start from a clean copy. Nothing to do by default."""

    def epoch_end(self):
        """on-boot=reset: drop what the epoch wrote. Nothing to do by default."""

    def enable_cbt(self):
        self.unimplemented("vdi_enable_cbt")

    def disable_cbt(self):
        self.unimplemented("vdi_disable_cbt")

    def data_destroy(self):
        self.unimplemented("vdi_data_destroy")

    def list_changed_blocks(self, other_uuid):
        """A base64 bitmap of the blocks that differ from other_uuid's VDI."""
        self.unimplemented("vdi_list_changed_blocks")

    # --- helpers --------------------------------------------------------------------
    def unimplemented(self, what):
        errors.raise_error("Unimplemented", what)

    @property
    def xenapi(self):
        return self.sr.xenapi

    @property
    def ref(self):
        if not self._ref:
            self._ref = self.xenapi.VDI.get_by_uuid(self.uuid)
        return self._ref

    @ref.setter
    def ref(self, value):
        self._ref = value

    def get_params(self):
        """What XAPI gets back for a new or changed VDI."""
        return {"uuid": self.uuid, "location": self.location}

    def copy_fields(self, other):
        """Take other's descriptive fields (for snapshot and clone), minus the
        sm_config keys that describe other's datapath state on a host."""
        for name in ("label", "description", "vdi_type", "size", "utilisation", "read_only",
                     "sharable", "metadata_of_pool"):
            setattr(self, name, getattr(other, name))
        for name in ("other_config", "xenstore_data"):
            setattr(self, name, dict(getattr(other, name)))
        self.sm_config = dict((k, v) for k, v in other.sm_config.items()
                              if not k.startswith("host_") and k not in DATAPATH_KEYS)

    def mark_snapshot_of(self, source):
        """This new VDI is a snapshot of `source`, taken now."""
        self.is_a_snapshot = True
        self.snapshot_of = source.ref
        self.snapshot_time = timestamp()

    def load_db_record(self, record=None):
        """Fill the fields from XAPI's record of this VDI."""
        if record is None:
            record = self.xenapi.VDI.get_record(self.ref)
        self.uuid = record["uuid"]
        self.location = record["location"]
        self.label = record["name_label"]
        self.description = record["name_description"]
        self.vdi_type = record["type"]
        self.size = int(record["virtual_size"])
        self.utilisation = int(record["physical_utilisation"])
        self.read_only = bool(record["read_only"])
        self.sharable = bool(record["sharable"])
        self.managed = bool(record["managed"])
        self.sm_config = dict(record["sm_config"])
        self.other_config = dict(record["other_config"])
        self.xenstore_data = dict(record.get("xenstore_data") or {})
        self.metadata_of_pool = record.get("metadata_of_pool", "")
        self.is_a_snapshot = bool(record["is_a_snapshot"])
        self.snapshot_time = str(record.get("snapshot_time") or EPOCH)
        self.snapshot_of = record.get("snapshot_of", "")
        if self.snapshot_of == NULL_REF:
            self.snapshot_of = ""
        self.cbt_enabled = bool(record.get("cbt_enabled", False))

    def _snapshot_of_ref(self):
        if not self.snapshot_of:
            return NULL_REF
        if self.snapshot_of.startswith("OpaqueRef:"):
            return self.snapshot_of
        return self.xenapi.VDI.get_by_uuid(self.snapshot_of)

    def db_introduce(self):
        """Create XAPI's record of this VDI (XAPI looks new VDIs up by uuid)."""
        self.ref = self.xenapi.VDI.db_introduce(
            self.uuid, self.label, self.description, self.sr.ref, self.vdi_type,
            self.sharable, self.read_only, self.other_config, self.location,
            self.xenstore_data, self.sm_config, self.managed,
            str(int(self.size)), str(int(self.utilisation)), self.metadata_of_pool,
            self.is_a_snapshot, self.snapshot_time, self._snapshot_of_ref(),
            self.cbt_enabled)
        return self.ref

    def db_update(self, record=None):
        """Write the fields that differ from XAPI's record: sizes, read_only, sm_config.
        The storage knows its own sm_config keys only: XAPI's others (host_ tags,
        paused...) are kept, not wiped."""
        ref = self.ref
        if record is None:
            record = self.xenapi.VDI.get_record(ref)
        merged = dict(record["sm_config"])
        merged.update(self.sm_config)
        self.sm_config = merged
        if int(record["virtual_size"]) != int(self.size):
            self.xenapi.VDI.set_virtual_size(ref, str(int(self.size)))
        if int(record["physical_utilisation"]) != int(self.utilisation):
            self.xenapi.VDI.set_physical_utilisation(ref, str(int(self.utilisation)))
        if bool(record["read_only"]) != bool(self.read_only):
            self.xenapi.VDI.set_read_only(ref, bool(self.read_only))
        if dict(record["sm_config"]) != self.sm_config:
            self.xenapi.VDI.set_sm_config(ref, self.sm_config)

    def db_forget(self):
        """Drop XAPI's record of this VDI."""
        self.xenapi.VDI.db_forget(self.ref)
        self.ref = None

    def db_set_host_mode(self, writable):
        """sm_config host_<host ref> = RW|RO: this host has the VDI active (activate)."""
        key = "host_%s" % self.sr.host_ref
        ref = self.ref
        self.xenapi.VDI.remove_from_sm_config(ref, key)
        self.xenapi.VDI.add_to_sm_config(ref, key, "RW" if writable else "RO")
        self.sm_config[key] = "RW" if writable else "RO"

    def db_clear_host_mode(self):
        """Undo db_set_host_mode (deactivate)."""
        key = "host_%s" % self.sr.host_ref
        self.xenapi.VDI.remove_from_sm_config(self.ref, key)
        self.sm_config.pop(key, None)
