"""A driver whose 'storage' is a JSON file listing VDIs by location: exercises the base
class's scan reconciliation (list_vdis -> reconcile) and SR size updates."""
import json
import sys

from smtap import settings
from smtap.sm import command, sr, vdi
from smtap.sm.drivers import DummySR


def storage_file(sr_uuid):
    return settings.host_path("/var/lib/listing/%s.json" % sr_uuid)


class ListingSR(sr.SR):
    def list_vdis(self):
        with open(storage_file(self.uuid)) as f:
            found = json.load(f)
        vdis = []
        for location, fields in sorted(found.items()):
            v = self.new_vdi(fields.get("uuid"))
            v.location = location
            v.label = location
            v.size, v.utilisation = fields["size"], fields["utilisation"]
            v.read_only = fields.get("read_only", False)
            v.sm_config = fields.get("sm_config", {})
            vdis.append(v)
        return vdis

    def update(self):
        self.db_set_sizes(physical_size=1 << 40, physical_utilisation=12345)


ListingSR.VDI_CLASS = vdi.VDI

if __name__ == "__main__":
    sys.exit(command.run(ListingSR, DummySR.DRIVER_INFO))
