"""Driver discovery at start-up: <Name>SR executables, the sm-plugins whitelist, SM records."""
import concurrent.futures
import logging
import os

from smtap import settings, xapiconf
from smtap.toolstack import smapi
from smtap.toolstack.errors import ApiError

log = logging.getLogger("smtap.xapi.discovery")

class Driver(object):
    def __init__(self, sr_type, path, record):
        self.type = sr_type
        self.path = path
        self.record = record            # the SM record's fields
        self.capabilities = set(record["capabilities"])


def whitelist():
    """The allowed SR types, or None when `*` allows every driver (read as XAPI does:
    smtap.xapiconf; none when nothing sets it)."""
    names = set(n.lower() for n in xapiconf.effective())
    return None if "*" in names else names


def find_drivers():
    """{type: path} of the whitelisted executables named <Name>SR in the SM dir."""
    allowed = whitelist()
    found = {}
    try:
        entries = sorted(os.listdir(settings.sm_dir()))
    except OSError:
        return found
    for name in entries:
        path = os.path.join(settings.sm_dir(), name)
        if not (name.endswith("SR") and len(name) > 2 and os.path.isfile(path)
                and os.access(path, os.X_OK)):
            continue
        sr_type = name[:-2].lower()
        if allowed is None or sr_type in allowed:
            found[sr_type] = path
        else:
            log.info("driver %s not in sm-plugins, skipped", name)
    return found


def sm_record(sr_type, path, info):
    """SM record fields from an sr_get_driver_info struct."""
    caps, features = [], {}
    for entry in info.get("capabilities", []):
        name, _, version = str(entry).partition("/")
        caps.append(name)
        features[name] = int(version) if version.isdigit() else 1
    if "ATOMIC_PAUSE" in caps:
        for extra in ("VDI_ACTIVATE", "VDI_DEACTIVATE"):
            if extra not in caps:
                caps.append(extra)
                features[extra] = 1
    config = {}
    for item in info.get("configuration", []):
        if isinstance(item, dict):
            config[str(item.get("key", ""))] = str(item.get("description", ""))
    return {"type": sr_type, "name_label": str(info.get("name", "")),
            "name_description": str(info.get("description", "")),
            "vendor": str(info.get("vendor", "")), "copyright": str(info.get("copyright", "")),
            "version": str(info.get("driver_version", "")),
            "required_api_version": str(info.get("required_api_version", "")),
            "capabilities": caps, "features": features, "configuration": config,
            "driver_filename": path,
            "supported_image_formats": [str(f) for f in info.get("supported_image_formats", [])]}


def driver_info(host_ref, sr_type, path):
    params = {"host_ref": host_ref, "command": "sr_get_driver_info", "args": [],
              "device_config": {}}
    info = smapi.invoke(path, "sr_get_driver_info", params)
    if not isinstance(info, dict):
        raise ApiError(smapi.errors.SR_BACKEND_FAILURE, "bad driver info", str(info), "")
    return Driver(sr_type, path, sm_record(sr_type, path, info))


def discover(host_ref):
    """Every usable driver, their sr_get_driver_info run in parallel."""
    paths = find_drivers()
    drivers = {}
    if not paths:
        return drivers
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        futures = {pool.submit(driver_info, host_ref, t, p): t for t, p in paths.items()}
        for future in concurrent.futures.as_completed(futures):
            try:
                driver = future.result()
            except ApiError as e:
                log.error("driver %s: sr_get_driver_info failed: %s", futures[future], e)
                continue
            drivers[driver.type] = driver
    return drivers


def sync_sm_records(store, drivers):
    """SM records mirror the drivers: kept (same uuid) or updated, added, removed."""
    with store.transaction():
        existing = {rec["type"]: ref for ref, rec in store.all("SM")}
        for sr_type, ref in existing.items():
            if sr_type not in drivers:
                store.destroy("SM", ref)
        for sr_type, driver in drivers.items():
            if sr_type in existing:
                store.update("SM", existing[sr_type], driver.record)
            else:
                store.create("SM", driver.record)
