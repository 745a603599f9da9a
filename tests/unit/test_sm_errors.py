"""The error table, the error API and DRIVER_INFO helpers."""
import os
import re

import pytest

from smtap.sm import driverinfo, errors
from smtap.version import VERSION
from lib.checkout import TOP

# smapi-v1.md's selection of upstream codes: same names, same numbers.
UPSTREAM = {
    "InvalidArg": 1, "SRInUse": 16, "VDIInUse": 24, "LockErr": 37, "Unimplemented": 38,
    "SRNotEmpty": 39, "SRScan": 40, "SRExists": 42, "VDIExists": 43, "SRNoSpace": 44,
    "VDIUnavailable": 46, "SRUnavailable": 47, "SRUnknownType": 48, "SRBadXML": 49,
    "VDILoad": 65, "VDIType": 66, "VDICreate": 78, "VDISize": 79, "VDIDelete": 80,
    "VDIClone": 81, "VDISnapshot": 82, "ConfigDeviceMissing": 90, "ConfigLocationMissing": 94,
    "SnapshotChainTooLong": 109, "VDIResize": 110, "ConfigParamsMissing": 115,
    "BadRequest": 143, "VDIMissing": 144, "APIProtocolError": 154, "EIO": 200,
    "SMGeneral": 202, "XMLParse": 413, "TapdiskAlreadyRunning": 445, "IllegalXMLChar": 447,
    "TapdiskFailed": 453, "GenericException": 1200,
}


def test_table_has_the_upstream_codes():
    table = errors.table()
    for name, code in UPSTREAM.items():
        assert table[name][0] == code, name
    codes = [code for code, _ in table.values()]
    assert len(codes) == len(set(codes))


# The shared reference notes sit beside the checkout (as CI has them): ../shared/reference.
REFERENCE = os.path.join(os.path.dirname(TOP), "shared", "reference", "smapi-v1.md")


@pytest.mark.skipif(not os.path.exists(REFERENCE),
                    reason="no ../shared/reference beside this checkout")
def test_reference_lists_no_code_we_lack():
    with open(REFERENCE, encoding="utf-8") as f:
        text = f.read()
    section = text.split("Selected upstream codes", 1)[1].split("Command-specific", 1)[0]
    for code, name in re.findall(r"(\d+) ([A-Z][A-Za-z]+)", section):
        assert errors.table()[name][0] == int(code)


def test_error_api():
    e = errors.error("SRNoSpace", "need 5 GiB")
    assert (e.code, str(e)) == (44, "There is insufficient space [opterr=need 5 GiB]")
    with pytest.raises(errors.SROSError) as info:
        errors.raise_error("VDIMissing")
    assert (info.value.code, info.value.message) == (144, "VDI could not be found")
    assert str(errors.SROSError(38, "vdi_compose")).endswith("[opterr=vdi_compose]")
    bogus = errors.error("NoSuchName", "x")
    assert bogus.code == 202 and "NoSuchName" in bogus.message


def test_no_error_message_is_a_python_repr():
    import XenAPI
    from smtap.sm import errors
    assert errors.describe(XenAPI.Failure(["INVALID_VALUE", "uuid", "x"])) == \
        "INVALID_VALUE uuid x"
    assert errors.describe(FileNotFoundError(2, "No such file or directory", "/a")) == \
        "No such file or directory: /a"
    assert errors.describe(KeyError("location")) == "missing location"
    assert errors.describe(ValueError()) == "unexpected error without a message"


def test_capabilities_and_features():
    info = {"capabilities": ["ATOMIC_PAUSE", "VDI_RESET_ON_BOOT/2", "VDI_ACTIVATE"]}
    caps = driverinfo.capabilities(info)
    assert caps.count("VDI_ACTIVATE") == 1 and "VDI_DEACTIVATE" in caps
    assert driverinfo.features(info)["VDI_RESET_ON_BOOT"] == 2
    assert driverinfo.features(info)["ATOMIC_PAUSE"] == 1
    assert driverinfo.has(info, "VDI_DEACTIVATE") and not driverinfo.has(info, "VDI_CLONE")


def test_version_matches_the_version_file():
    with open(os.path.join(TOP, "VERSION")) as f:
        assert VERSION == f.read().strip()


def test_table_is_upstreams_current_one():
    """Every code of upstream sm's current XE_SR_ERRORCODES.xml, with its current text."""
    table = errors.table()
    assert len(table) == 173
    assert table["VBDListNotStable"] == (205, "LVHDRT: found a non-stable VBD")
    assert table["LeafGCSkip"] == (
        204, "Gave up on leaf coalesce after leaf grew bigger than before snapshot taken")
    assert table["ISOInvalidXeMountOptions"] == (
        228, 'Require "-o" along with xe-mount-iso-sr')
    assert table["WipefsFailure"][0] == 462 and table["NoRootDev"][0] == 118
    assert table["SRScan"][1] == "The SR scan failed"       # upstream's trailing space, stripped
