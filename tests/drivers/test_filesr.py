"""FileSR driven through the local toolstack: raw sparse files (sm-config:type=raw)
served by aio tapdisks; the VHD side is test_filesr_vhd.py."""
import os

from lib.sizes import MiB
from lib.toolstack import failure
from lib.vdis import holds, host_tags, link_path, tapdisk_of, write


def test_config_errors(dhost, tmp_path):
    err = failure(dhost.sr_create, "file", {})
    assert err[0] == "SR_BACKEND_FAILURE_94"
    err = failure(dhost.sr_create, "file", {"location": "relative/dir"})
    assert err[0] == "SR_BACKEND_FAILURE_1" and "absolute" in err[2]
    (tmp_path / "plain").write_text("x")
    err = failure(dhost.sr_create, "file", {"location": str(tmp_path / "plain")})
    assert err[0] == "SR_BACKEND_FAILURE_1"
    assert dhost.x.SR.get_all() == []


def test_file_sr_lifecycle(dhost, tmp_path):
    x = dhost.x
    location = tmp_path / "vdis"
    sr = dhost.sr_create("file", {"location": str(location)})      # sr_create makes it
    assert location.is_dir()
    vdi = dhost.vdi_create(sr, 10 * MiB + 1, {"type": "raw"})
    uuid = x.VDI.get_uuid(vdi)
    path = location / (uuid + ".raw")
    assert path.stat().st_size == 10 * MiB + 512                   # rounded to sectors
    assert path.stat().st_blocks == 0                              # sparse
    assert x.VDI.get_virtual_size(vdi) == str(10 * MiB + 512)
    assert x.SR.get_virtual_allocation(sr) == str(10 * MiB + 512)  # kept up to date

    vbd = dhost.plug(vdi)
    pid, _ = tapdisk_of(x, vdi)
    assert os.path.islink(link_path(x, vdi)) and host_tags(x, vdi)
    write(x, vdi, 0x61, MiB, MiB)
    err = failure(x.VDI.resize, vdi, str(20 * MiB))
    assert err[0] == "VDI_IN_USE"
    dhost.unplug(vbd)
    with open(path, "rb") as f:
        f.seek(MiB)
        assert f.read(MiB) == b"\x61" * MiB
    assert not os.path.lexists(link_path(x, vdi)) and host_tags(x, vdi) == []

    x.VDI.resize(vdi, str(20 * MiB))
    assert path.stat().st_size == 20 * MiB and x.VDI.get_virtual_size(vdi) == str(20 * MiB)
    assert x.SR.get_virtual_allocation(sr) == str(20 * MiB)
    assert x.SR.get_physical_utilisation(sr) == str(MiB)             # what was written
    err = failure(x.VDI.resize, vdi, str(MiB))
    assert err[0] == "SR_BACKEND_FAILURE_79"
    vbd = dhost.plug(vdi, mode="RO")
    assert x.VDI.get_sm_config(vdi)["host_" + dhost.host_ref] == "RO"
    assert holds(x, vdi, 0x61, MiB, MiB) and holds(x, vdi, 0, 2 * MiB, 18 * MiB)
    dhost.unplug(vbd)

    # Snapshot and clone are VHD's: "not supported" (fault 38) for raw, nothing made.
    assert failure(x.VDI.snapshot, vdi, {})[0] == "SR_OPERATION_NOT_SUPPORTED"
    assert failure(x.VDI.clone, vdi, {})[0] == "SR_OPERATION_NOT_SUPPORTED"
    assert sorted(os.listdir(location)) == [uuid + ".raw"]

    # Scan reconciles files and records.
    with open(location / "extra.raw", "wb") as f:
        f.truncate(3 * MiB)
    (location / "notes.txt").write_text("not a VDI")
    x.SR.scan(sr)
    (found,) = [v for v in x.SR.get_VDIs(sr) if x.VDI.get_location(v) == "extra"]
    assert x.VDI.get_virtual_size(found) == str(3 * MiB)
    rec = x.SR.get_record(sr)
    assert rec["virtual_allocation"] == str(23 * MiB)
    assert int(rec["physical_utilisation"]) >= MiB and int(rec["physical_size"]) > 0
    os.unlink(location / "extra.raw")
    x.SR.scan(sr)
    assert x.SR.get_VDIs(sr) == [vdi]

    # Introduce adopts a file already there.
    with open(location / "adopted.raw", "wb") as f:
        f.truncate(MiB)
    ref = x.VDI.introduce("", "adopted", "", sr, "user", False, False, {}, "adopted", {}, {},
                          True, "0", "0", "", False, "19700101T00:00:00Z", "")
    assert x.VDI.get_virtual_size(ref) == str(MiB) and x.VDI.get_location(ref) == "adopted"
    err = failure(x.VDI.introduce, "", "again", "", sr, "user", False, False, {}, "adopted",
                  {}, {}, True, "0", "0", "", False, "19700101T00:00:00Z", "")
    assert err[0] == "SR_BACKEND_FAILURE_43"
    err = failure(x.VDI.introduce, "", "ghost", "", sr, "user", False, False, {}, "ghost",
                  {}, {}, True, "0", "0", "", False, "19700101T00:00:00Z", "")
    assert err[0] == "VDI_MISSING"

    pbd = dhost.pbd(sr)
    x.PBD.unplug(pbd)
    err = failure(x.SR.destroy, sr)                                  # VDIs left
    assert err[0] == "SR_NOT_EMPTY"
    x.PBD.plug(pbd)
    x.VDI.destroy(vdi)
    x.VDI.destroy(ref)
    assert sorted(os.listdir(location)) == ["notes.txt"]
    x.PBD.unplug(pbd)
    x.SR.destroy(sr)
    assert location.is_dir()                                          # the user's directory


def test_a_directory_another_sr_uses_is_refused(dhost, tmp_path):
    """Failed before: the second sr-create succeeded, and its scan failed with a Python
    list (a XenAPI failure's repr) as its message."""
    x = dhost.x
    location = tmp_path / "shared"
    first = dhost.sr_create("file", {"location": str(location)}, name="first")
    vdi = dhost.vdi_create(first, MiB, {"type": "raw"})
    os.symlink(str(location), str(tmp_path / "alias"))
    for path in (str(location), str(location) + "/./", str(tmp_path / "alias")):
        err = failure(dhost.sr_create, "file", {"location": path}, "second")
        assert err[0] == "SR_BACKEND_FAILURE_42", err              # SRExists
        assert "is the directory of SR %s (first)" % x.SR.get_uuid(first) in err[2], err
    assert x.SR.get_all() == [first]
    # introduced behind sr_create's back, its attach refuses too, readably
    second = x.SR.introduce("f1d1b2c3-0000-4000-8000-000000000002", "second", "", "file",
                            "user", False, {})
    pbd = x.PBD.create({"host": dhost.host_ref, "SR": second,
                        "device_config": {"location": str(tmp_path / "alias")}})
    err = failure(x.PBD.plug, pbd)
    assert err[0] == "SR_BACKEND_FAILURE_47" and "is the directory of SR" in err[2], err
    assert x.PBD.get_currently_attached(pbd) is False
    x.PBD.destroy(pbd)
    x.SR.forget(second)
    x.SR.scan(first)                                # the first SR is untouched
    assert x.SR.get_VDIs(first) == [vdi]
    x.VDI.destroy(vdi)
