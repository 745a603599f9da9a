"""The built-in template: the tiny guest `make build` makes (toolstack/guest/build.py),
offered at every start-up as XAPI offers its default templates.

`xe vm-install template=smtap-guest new-name-label=vm1` makes a VM of it; its disks are
VBDs you add (userdevice 0 is /dev/xvda in the guest), and what it runs is the script
in its xenstore-data:vm-data/script (toolstack/guest/init).
"""
import json
import logging
import os
import uuid as uuidlib

from smtap import settings

log = logging.getLogger("smtap.xapi.templates")

NAME = "smtap-guest"
KEY = "smtap_template"          # other-config key naming the built-in template
UUID = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "smtap:template:" + NAME))
MEMORY = 256 << 20      # the kernel, the initramfs (9 MiB, unpacked beside itself), fio


def image():
    """(kernel, initramfs, manifest) of the installed guest image, or None."""
    base = settings.guest_image_dir()
    try:
        with open(os.path.join(base, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    kernel, initrd = os.path.join(base, "vmlinuz"), os.path.join(base, "initrd.img")
    if not (os.path.exists(kernel) and os.path.exists(initrd)):
        return None
    return os.path.realpath(kernel), os.path.realpath(initrd), manifest


def ensure(ts):
    """Create or refresh the template (its image may have been rebuilt or moved)."""
    found = image()
    if found is None:
        log.info("no guest image in %s: no %s template", settings.guest_image_dir(), NAME)
        return None
    kernel, initrd, manifest = found
    store = ts.store
    fields = {
        "name_label": NAME,
        "name_description": "Tiny Linux guest (kernel %s, busybox, fio, e2fsprogs): runs the "
                            "script in xenstore-data:vm-data/script, reports on its serial "
                            "console, then powers off" % manifest.get("kernel", "?"),
        "is_a_template": True, "is_default_template": True,
        "other_config": {"default_template": "true", KEY: "guest",
                         "guest-kernel": manifest.get("kernel", "")},
        "PV_kernel": kernel, "PV_ramdisk": initrd, "PV_args": "",
        "memory_static_max": MEMORY, "memory_dynamic_max": MEMORY,
        "memory_dynamic_min": MEMORY, "memory_static_min": MEMORY,
        "VCPUs_max": 1, "VCPUs_at_startup": 1, "domain_type": "hvm",
        "actions_after_shutdown": "destroy", "actions_after_reboot": "restart",
        # a guest that panics stays down (a reboot loop would hide the panic)
        "actions_after_crash": "destroy",
    }
    with store.transaction():
        existing = [ref for ref, rec in store.all("VM")
                    if (rec.get("other_config") or {}).get(KEY) == "guest"
                    and rec.get("is_default_template")]
        if existing:
            store.update("VM", existing[0], fields)
            return existing[0]
        return store.create("VM", dict(fields, uuid=UUID))
