"""The host inventory (/etc/xensource-inventory): KEY='value' lines naming this host."""
import os
import uuid

from smtap import settings


def read(path=None):
    values = {}
    try:
        with open(path or settings.inventory_file()) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key and not key.startswith("#"):
                    values[key.strip()] = value.strip().strip("'\"")
    except FileNotFoundError:
        pass
    return values


def ensure():
    """(INSTALLATION_UUID, CONTROL_DOMAIN_UUID), added with fresh uuids when missing."""
    path = settings.inventory_file()
    values = read(path)
    missing = [k for k in ("INSTALLATION_UUID", "CONTROL_DOMAIN_UUID") if not values.get(k)]
    if missing:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            for key in missing:
                values[key] = str(uuid.uuid4())
                f.write("%s='%s'\n" % (key, values[key]))
    return values["INSTALLATION_UUID"], values["CONTROL_DOMAIN_UUID"]
