"""A new user, by the README: a copy of the checkout (its .venv copied along) built with
`make build`, the local toolstack started by hand with the README's own lines, and a
driver written the way upstream sm's are (tests/lib/drivers/upstream_sr.py) added as the
README says and run on it unchanged, through xe."""
import os
import shutil
import signal

import pytest

from lib.checkout import TOP
from lib.procs import run

START = "<!-- the lines below are run as they stand by tests/e2e/test_new_user.py -->"
DRIVER = "<!-- run by tests/e2e/test_new_user.py too (with MySR and my its driver's names) -->"


def readme_block(marker):
    with open(os.path.join(TOP, "README.md")) as f:
        text = f.read()
    assert marker in text, "the README lost the lines this test runs"
    return text.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def checkout(tmp_path):
    """The checkout as a user copies it: cp -a, its .venv and build outputs along."""
    copy = str(tmp_path / "checkout")
    run("cp", "-a", TOP, copy)
    shutil.rmtree(os.path.join(copy, ".pytest_cache"), ignore_errors=True)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def stop(root):
    pidfile = os.path.join(root, "var", "lib", "smtap", "smtap-xapi.pid")
    try:
        with open(pidfile) as f:
            os.kill(int(f.read()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def test_new_user(smtap_root, checkout):
    root = smtap_root
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    script = readme_block(START).replace("/tmp/myhost", root)
    exports = "".join(line + "\n" for line in script.splitlines()
                      if line.startswith("export "))

    def sh(text):
        res = run("bash", "-ec", text, check=False, cwd=checkout, env=env, timeout=600)
        assert res.returncode == 0, "%s\n%s%s" % (text, res.stdout, res.stderr)
        return res

    def xe(*args, check=True):
        res = run(["bash", "-ec", exports + 'exec xe "$@"', "xe"] + list(args), check=False,
                  cwd=checkout, env=env, timeout=120)
        assert not check or res.returncode == 0, "xe %s: %s" % (" ".join(args), res.stderr)
        return res

    try:
        out = sh(script)
        # the copied venv ran the copy's code, not the original checkout's
        assert "venv: %s/.venv was made for %s: repointing it" % (checkout, TOP) in out.stdout
        host_uuid = xe("host-list", "--minimal").stdout.strip()
        assert host_uuid and host_uuid in out.stdout
        where = sh(exports + "python3 -c 'import smtap.toolstack.xe as m; print(m.__file__)'")
        assert where.stdout.strip() == os.path.join(checkout, "toolstack", "xe.py")

        # the driver, as the host's sm would have it, then the README's lines to add it
        with open(os.path.join(TOP, "tests", "lib", "drivers", "upstream_sr.py")) as f:
            code = f.read()
        driver = os.path.join(checkout, "UpstreamSR")
        with open(driver, "w") as f:
            f.write("#!%s/.venv/bin/python3\n%s" % (checkout, code))
        shutil.copy(os.path.join(TOP, "sm", "XE_SR_ERRORCODES.xml"),
                    os.path.join(root, "opt", "xensource", "sm"))   # what sm ships there
        sh(exports + readme_block(DRIVER).replace("MySR", "UpstreamSR")
           .replace(" my\"", " upstream\"").replace("type=my", "type=upstream"))
        assert xe("sm-list", "type=upstream", "params=name-label", "--minimal").stdout \
            .strip() == "Upstream-style"

        location = os.path.join(root, "srv", "up")
        sr = xe("sr-create", "type=upstream", "name-label=up",
                "device-config:location=" + location).stdout.strip()
        vdi = xe("vdi-create", "sr-uuid=" + sr, "name-label=d1", "virtual-size=4MiB",
                 "other-config:k=v").stdout.strip()
        assert os.path.getsize(os.path.join(location, vdi)) == 4 << 20

        def get(uuid, name, cls="vdi"):
            return xe("%s-param-get" % cls, "uuid=" + uuid, "param-name=" + name).stdout.strip()
        # the driver introduces snapshots and clones bare: the toolstack finishes them
        snap = xe("vdi-snapshot", "uuid=" + vdi).stdout.strip()
        assert (get(snap, "is-a-snapshot"), get(snap, "snapshot-of"), get(snap, "name-label"),
                get(snap, "other-config")) == ("true", vdi, "d1", "k: v")
        clone = xe("vdi-clone", "uuid=" + vdi).stdout.strip()
        assert (get(clone, "is-a-snapshot"), get(clone, "name-label")) == ("false", "d1")
        # vdi_attach answers an empty params_nbd (blktap2 with no tapdisk): its file
        # is the device; the pool's restrictions allowed read caching
        dom0 = xe("vm-list", "is-control-domain=true", "--minimal").stdout.strip()
        vbd = xe("vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=0",
                 "mode=rw").stdout.strip()
        xe("vbd-plug", "uuid=" + vbd)
        assert get(vbd, "device", "vbd") == vdi
        assert "read-caching-enabled-on-%s: true" % host_uuid in get(vdi, "sm-config")
        xe("vbd-unplug", "uuid=" + vbd)
        xe("vbd-destroy", "uuid=" + vbd)
        # scan: a file the driver finds (a GC-style task reports progress), then update
        with open(os.path.join(location, "0f3b0a4e-9f5e-4d1c-8f0e-8e7c3a2b1d02"), "wb") as f:
            f.truncate(1 << 20)
        xe("sr-scan", "uuid=" + sr)
        assert get("0f3b0a4e-9f5e-4d1c-8f0e-8e7c3a2b1d02", "name-label") == "found"
        assert int(get(sr, "virtual-allocation", "sr")) == (4 << 20) * 3 + (1 << 20)
        # an error by name from the host's table: VBDListNotStable
        bad = xe("sr-create", "type=upstream", "name-label=bad",
                 "device-config:location=" + location + "2", "device-config:unstable=true")
        bad_sr = bad.stdout.strip()
        res = xe("vdi-create", "sr-uuid=" + bad_sr, "name-label=x", "virtual-size=1MiB",
                 check=False)
        assert res.returncode == 1 and res.stderr == (
            "Error code: SR_BACKEND_FAILURE_205\nError parameters: , LVHDRT: found a "
            "non-stable VBD, \n")
        # sr_delete checks (as upstream FileSR's GC does) that the PBD is plugged
        for s in (sr, bad_sr):
            for v in xe("vdi-list", "sr-uuid=" + s, "--minimal").stdout.strip().split(","):
                if v:
                    xe("vdi-destroy", "uuid=" + v)
            xe("pbd-unplug", "uuid=" + xe("pbd-list", "sr-uuid=" + s, "--minimal").stdout
               .strip())
            xe("sr-destroy", "uuid=" + s)
        assert xe("sr-list", "--minimal").stdout.strip() == ""
        assert not os.path.exists(location)
        with open(os.path.join(root, "var", "log", "SMlog")) as f:
            assert "sr_delete" in f.read()
    finally:
        stop(root)
