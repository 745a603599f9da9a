"""DRIVER_INFO: what a driver declares, and what sr_get_driver_info answers.

Capabilities are names with an optional "/N" version suffix ("VDI_RESET_ON_BOOT/2");
XAPI stores them as features (name -> N, default 1).
"""
# ATOMIC_PAUSE drivers are driven with activate/deactivate: XAPI must know they have them.
IMPLIED = {"ATOMIC_PAUSE": ("VDI_ACTIVATE", "VDI_DEACTIVATE")}

FIELDS = ("name", "description", "vendor", "copyright", "driver_version",
          "required_api_version", "capabilities", "configuration")
# XCP-ng's addition (SM.supported_image_formats); absent: XAPI records [] (the driver
# chooses the format).
OPTIONAL = ("supported_image_formats",)


def split_capability(capability):
    """"NAME/N" -> ("NAME", N); "NAME" -> ("NAME", 1)."""
    name, _, version = capability.partition("/")
    return name, int(version) if version else 1


def capabilities(info):
    """The advertised capability strings, implied ones added."""
    result = list(info.get("capabilities", []))
    names = {split_capability(c)[0] for c in result}
    for trigger, implied in sorted(IMPLIED.items()):
        if trigger in names:
            result.extend(c for c in implied if c not in names)
    return result


def features(info):
    """name -> version, as XAPI records them in the SM object."""
    return dict(split_capability(c) for c in capabilities(info))


def has(info, name):
    return name in features(info)


def describe(info):
    """The sr_get_driver_info struct."""
    missing = [f for f in FIELDS if f not in info]
    if missing:
        raise ValueError("DRIVER_INFO lacks %s" % ", ".join(missing))
    result = dict((f, info[f]) for f in FIELDS)
    result["capabilities"] = capabilities(info)
    result["configuration"] = [{"key": c["key"], "description": c["description"]}
                               for c in info["configuration"]]
    for f in OPTIONAL:
        if f in info:
            result[f] = list(info[f])
    return result
