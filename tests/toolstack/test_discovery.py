"""Driver discovery: <Name>SR executables, the sm-plugins whitelist and its drop-ins,
SM records from sr_get_driver_info, start-up speed."""
import os
import time

from smtap import settings, xapiconf


STOCK = set(xapiconf.STOCK)


def sm_types(h):
    x = h.session().xenapi
    return sorted(rec["type"] for rec in x.SM.get_all_records().values())


def installed_types():
    """The types `make install` put in this root (the suite's drivers)."""
    return {name[:-2].lower() for name in os.listdir(settings.sm_dir()) if name.endswith("SR")}


def test_stock_whitelist_without_config(host):
    os.unlink(settings.host_path("/etc/xapi.conf.d/smtap.conf"))
    installed = installed_types()
    host.add_driver("TestSR")
    host.add_driver("ExtSR")      # "ext" is on the stock list
    host.start()
    assert sm_types(host) == sorted((installed | {"ext"}) & STOCK)
    assert "dummy" in sm_types(host)


def test_star_and_drop_ins_in_name_order(host):
    os.unlink(settings.host_path("/etc/xapi.conf.d/smtap.conf"))
    installed = installed_types()
    host.add_driver("TestSR")
    host.add_driver("OtherSR")
    host.write("/opt/xensource/sm/LazySR", "#!/bin/sh\n", 0o644)      # not executable
    host.write("/opt/xensource/sm/helper", "#!/bin/sh\n", 0o755)      # not <Name>SR
    host.conf(None, "# main config\nsm-plugins=*\n")
    host.start()
    assert sm_types(host) == sorted(installed | {"other", "test"})
    # Later drop-ins override earlier ones, whatever the main file says; XAPI reads
    # every entry in byte order, whatever its name ("60-b.conf~" after "60-b.conf").
    host.conf("50-a.conf", "sm-plugins = dummy other\n")
    host.conf("60-b.conf", "sm-plugins = dummy\n")
    host.conf("60-b.conf~", "sm-plugins = test other   # a comment\n")
    host.restart()
    assert sm_types(host) == ["other", "test"]
    x = host.session().xenapi
    host_ref = x.host.get_all()[0]
    details = None
    try:
        x.SR.create(host_ref, {}, "0", "x", "", "dummy", "", False, {})
    except Exception as e:
        details = e.details
    assert details == ["SR_UNKNOWN_DRIVER", "dummy"]


def test_sm_record_fields(host):
    host.add_driver("TestSR", caps=["VDI_CREATE", "ATOMIC_PAUSE", "VDI_RESET_ON_BOOT/2"])
    host.conf("zz.conf", "sm-plugins = test\n")
    host.start()
    x = host.session().xenapi
    (ref,) = x.SM.get_all()
    sm = x.SM.get_record(ref)
    assert sm["type"] == "test" and sm["name_label"] == "Test"
    assert sm["name_description"] == "test driver" and sm["vendor"] == "tests"
    assert sm["copyright"] == "none" and sm["version"] == "1.2"
    assert sm["required_api_version"] == "1.0"
    assert sm["capabilities"] == ["VDI_CREATE", "ATOMIC_PAUSE", "VDI_RESET_ON_BOOT",
                                  "VDI_ACTIVATE", "VDI_DEACTIVATE"]
    assert sm["features"] == {"VDI_CREATE": "1", "ATOMIC_PAUSE": "1", "VDI_RESET_ON_BOOT": "2",
                              "VDI_ACTIVATE": "1", "VDI_DEACTIVATE": "1"}
    assert sm["configuration"] == {"path": "where it lives"}
    assert sm["supported_image_formats"] == []   # not declared: the driver chooses
    assert sm["driver_filename"] == settings.host_path("/opt/xensource/sm/TestSR")
    uuid = sm["uuid"]
    host.restart()                       # same driver, same record
    assert host.session().xenapi.SM.get_by_uuid(uuid) == ref


def test_broken_driver_is_skipped_and_startup_is_parallel(host):
    names = ["SlowaSR", "SlowbSR", "SlowcSR", "SlowdSR"]
    for name in names:
        host.add_driver(name, sleep={"sr_get_driver_info": 2.0})
    host.add_driver("BrokenSR", exit={"sr_get_driver_info": 1})
    host.conf("zz.conf", "sm-plugins = dummy slowa slowb slowc slowd broken\n")
    start = time.time()
    host.start()
    assert time.time() - start < 1.5        # serving before the drivers answered
    assert sm_types(host) == ["dummy", "slowa", "slowb", "slowc", "slowd"]
    assert time.time() - start < 5.0        # four 2 s drivers asked at once, not in turn
    assert "driver broken: sr_get_driver_info failed" in host.output()
