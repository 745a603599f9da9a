"""The SR base class a driver subclasses (upstream SR.SR, without the baggage).

The dispatcher builds one SR object per call: SR(request) reads the request and calls
load(sr_uuid); then it calls the command's method. Override what the driver's
capabilities promise; the defaults answer Unimplemented (or do nothing where XAPI
calls unconditionally: update, scan of an SR that keeps no VDI list).
"""
from smtap.sm import errors
from smtap.sm import log


class SR(object):
    VDI_CLASS = None  # the driver's VDI subclass
    CONTENT_TYPE = "user"

    def __init__(self, request):
        self.request = request
        self.uuid = request.sr_uuid
        self.dconf = request.device_config
        self.host_ref = request.host_ref
        self._ref = request.sr_ref
        self.load(self.uuid)

    # --- what a driver overrides ---------------------------------------------------
    def load(self, sr_uuid):
        """Read the SR's configuration (self.dconf); sr_uuid is None for sr_probe."""

    def create(self, size):
        """Make a new, empty SR of `size` bytes (0: use what the device offers)."""
        self.unimplemented("sr_create")

    def delete(self):
        """Destroy the SR's storage; raise SRNotEmpty while VDIs remain."""
        self.unimplemented("sr_delete")

    def attach(self):
        """Make the SR usable on this host (mount, connect...)."""
        self.unimplemented("sr_attach")

    def detach(self):
        self.unimplemented("sr_detach")

    def scan(self):
        """Bring XAPI's VDI records in line with the storage (see list_vdis)."""
        self.reconcile(self.list_vdis())

    def list_vdis(self):
        """The VDIs on the storage, as VDI objects with uuid, location and sizes set."""
        self.unimplemented("sr_scan")

    def probe(self):
        """An XML document describing the SRs found with self.dconf (a string)."""
        self.unimplemented("sr_probe")

    def update(self):
        """Refresh XAPI's SR record (sizes...); XAPI calls it after every scan."""

    def content_type(self):
        return self.CONTENT_TYPE

    # --- helpers --------------------------------------------------------------------
    def unimplemented(self, what):
        errors.raise_error("Unimplemented", what)

    @property
    def xenapi(self):
        return self.request.xenapi

    @property
    def ref(self):
        if not self._ref:
            self._ref = self.xenapi.SR.get_by_uuid(self.uuid)
        return self._ref

    @property
    def is_master(self):
        return self.request.is_master

    def require_config(self, *keys):
        """Fail with ConfigParamsMissing unless device_config has every key."""
        missing = [k for k in keys if not self.dconf.get(k)]
        if missing:
            errors.raise_error("ConfigParamsMissing",
                               "device-config needs %s" % ", ".join(missing))

    def new_vdi(self, uuid=None):
        """A VDI object not yet on storage nor in XAPI (uuid generated if None)."""
        return self.VDI_CLASS(self, uuid)

    def vdi(self, uuid):
        """An existing VDI, loaded."""
        vdi = self.VDI_CLASS(self, uuid)
        if uuid == self.request.vdi_uuid:  # the call's own VDI: XAPI told us where it is
            vdi.ref = self.request.vdi_ref
            if self.request.vdi_location:
                vdi.location = self.request.vdi_location
        vdi.load(uuid)
        return vdi

    def db_vdis(self):
        """XAPI's VDI records in this SR: {ref: record}."""
        return self.xenapi.VDI.get_all_records_where('field "SR" = "%s"' % self.ref)

    def reconcile(self, found):
        """Match XAPI's records to `found` (VDI objects) by location: introduce the
        new, forget the gone, update the changed."""
        known = dict((record["location"], (ref, record))
                     for ref, record in self.db_vdis().items())
        for vdi in found:
            entry = known.pop(vdi.location, None)
            if entry is None:
                log.info("scan: new VDI %s at %s", vdi.uuid, vdi.location)
                vdi.db_introduce()
            else:
                vdi.ref = entry[0]
                vdi.uuid = entry[1]["uuid"]
                vdi.db_update(entry[1])
        for location, (ref, record) in known.items():
            log.info("scan: VDI %s at %s is gone", record["uuid"], location)
            self.xenapi.VDI.db_forget(ref)

    def db_set_sizes(self, physical_size=None, physical_utilisation=None,
                     virtual_allocation=None):
        """Record the SR's sizes in XAPI (int64 as decimal strings); None leaves one."""
        if physical_size is not None:
            self.xenapi.SR.set_physical_size(self.ref, str(int(physical_size)))
        if physical_utilisation is not None:
            self.xenapi.SR.set_physical_utilisation(self.ref, str(int(physical_utilisation)))
        if virtual_allocation is not None:
            self.xenapi.SR.set_virtual_allocation(self.ref, str(int(virtual_allocation)))
