"""Install profiles (smtap/settings.py). A host-profile tree (`make install-host`, what
the RPM installs) keeps the engine's runtime files and SM's locks in the suite's own
directories: the host's tap-ctl lists every control socket in /run/blktap-control and
upstream sm raises on a type but aio/vhd there, and /var/lock/sm is sm's. A dev tree
(`make install`, the checkout) keeps upstream's paths, so upstream code runs against it."""
import os
import xmlrpc.client

import pytest

from smtap import names, settings

from lib.install import host_env, make_install
from lib.procs import run

SR = "5e6b0a1c-0000-4000-8000-00000000005e"
VDI = "7d1c2b3a-0000-4000-8000-0000000000d1"


def profile_of(dest):
    with open(os.path.join(str(dest), "opt/smtap/lib/smtap/profile")) as f:
        return f.read().strip()


def call_plugin(dest, env, plugin, fn, args):
    """Run an installed host plugin as XAPI's host.call_plugin does; its Value."""
    call = xmlrpc.client.dumps(("OpaqueRef:no-session-needed", args), fn)
    out = run([os.path.join(str(dest), "etc/xapi.d/plugins", plugin), call], env=env)
    result = xmlrpc.client.loads(out.stdout)[0][0]
    assert result["Status"] == "Success", result
    return result["Value"]


def test_host_tree_keeps_its_tapdisks_and_locks_out_of_upstreams_paths(tmp_path, smtap_root):
    dest = make_install(tmp_path / "host", target="install-host")
    assert profile_of(dest) == "host"
    root, env = str(smtap_root), host_env(smtap_root)
    tap_ctl = os.path.join(dest, "opt/smtap/bin/tap-ctl")
    own = os.path.join(root, "run/smtap/blktap-control")

    params = "ram:%s?size=1M&budget=1M" % os.path.join(root, "disk.img")
    device = run([tap_ctl, "create", "-a", params], env=env).stdout.strip()
    assert device == os.path.join(own, names.MINORS, names.MARKER + "0")
    (line,) = run([tap_ctl, "list"], env=env).stdout.splitlines()
    pid = int(line.split()[0][len("pid="):])
    assert line == "pid=%d minor=0 state=0 args=ram:%s/disk.img" % (pid, root)
    assert sorted(os.listdir(own)) == [names.ctl_name(pid), names.nbd_name(pid, 0),
                                       names.MINORS]

    # SM's side, through the installed pause plugin: its link and its VDI lock.
    link = os.path.join(own, names.LINKS, SR, VDI)
    os.makedirs(os.path.dirname(link))
    os.symlink(os.path.join(own, names.nbd_name(pid, 0)), link)
    args = {"sr_uuid": SR, "vdi_uuid": VDI}
    assert call_plugin(dest, env, "smtap-tapdisk-pause", "pause", args) == "True"
    assert "state=0x2a" in run([tap_ctl, "list"], env=env).stdout
    assert call_plugin(dest, env, "smtap-tapdisk-pause", "unpause", args) == "True"
    assert os.path.isfile(os.path.join(root, "var/lock/smtap", VDI, "vdi"))

    run([tap_ctl, "destroy", "-p", str(pid), "-m", "0"], env=env)
    assert not os.path.exists(os.path.join(root, "run/blktap-control"))
    assert not os.path.exists(os.path.join(root, "var/lock/sm"))


def test_dev_tree_keeps_upstreams_paths(tmp_path, smtap_root):
    dest = make_install(tmp_path / "dev")
    assert profile_of(dest) == "dev" and settings.PROFILE == "dev"    # the checkout too
    env = host_env(smtap_root)
    tap_ctl = os.path.join(dest, "opt/smtap/bin/tap-ctl")
    device = run([tap_ctl, "allocate"], env=env).stdout.strip()
    assert device == os.path.join(str(smtap_root), "run/blktap-control", names.MINORS,
                                  names.MARKER + "0")
    run([tap_ctl, "free", "-m", "0"], env=env)


@pytest.mark.parametrize("content, profile", [
    (None, "dev"), ("host\n", "host"), ("dev\n", "dev"), ("hots\n", "host"), ("", "host")])
def test_the_marker_names_the_profile_and_anything_unclear_is_host(tmp_path, content, profile):
    marker = str(tmp_path / "profile")
    if content is not None:
        with open(marker, "w") as f:
            f.write(content)
    assert settings.read_profile(marker) == profile
    os.makedirs(str(tmp_path / "unreadable" / "profile"))
    assert settings.read_profile(str(tmp_path / "unreadable" / "profile")) == "host"
