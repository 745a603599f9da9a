"""The install and RPM tests' helpers: make install into a tree, what a stock XCP-ng 8.3
host has (its xapi.conf, drop-ins, the paths its own packages own), running installed
launchers, `make rpm`, `rpm --root` with the scriptlets run on a dom0-like Python 3.6."""
import atexit
import glob
import os
import shlex
import shutil
import tempfile
import xmlrpc.client

import pytest

from lib.checkout import PY36, TOP, VENV_BIN, VERSION  # noqa: F401  (installlib's names)
from lib.checkout import VENV_PYTHON as VPY
from lib.procs import run

# SR types of the checkout (sm/drivers/<Type>SR.py) and those the RPM ships.
ALL_SR_TYPES = sorted(os.path.basename(p)[:-len("SR.py")]
                      for p in glob.glob(os.path.join(TOP, "sm", "drivers", "*SR.py")))
RPM_SR_TYPES = ["ram"]
# XCP-ng 8.3 as shipped (test data, independent of smtap.xapiconf): xapi-core's
# /etc/xapi.conf (xcp-ng-rpms/xapi, "configure xapi.conf to meet our needs") and
# xcp-ng-linstor's drop-in, which repeats the whole list and adds linstor.
STOCK_SM_PLUGINS = ("ext nfs iscsi lvmoiscsi dummy file hba rawhba udev iso lvm lvmohba "
                    "lvmofcoe shm smb cephfs glusterfs xfs zfs largeblock").split()
XAPI_CONF_83 = """\
# WARNING: any changes made to this file may be overwritten by future
# updates of the xapi-core RPM.
# You may want to create a file in the /etc/xapi.conf.d/ directory instead

# The xapi config file has 3 sections: a global policy section;
# a section for paths to helper utilities; and a timeout tweak section.
allow-custom-uefi-certs = true
# sm-dir =  @OPTDIR@/sm

# Whitelist of SM plugins
sm-plugins=%s

# The command to query current xen livepatch list
xen_livepatch_list = "/usr/sbin/xen-livepatch list"
kpatch_list = "/usr/sbin/kpatch list"
website-https-only = false
""" % " ".join(STOCK_SM_PLUGINS)
LINSTOR_DROPIN = ("99-enable-sm-driver-linstor.conf",
                  "# DO NOT MODIFY: Add sm linstor plugin.\nsm-plugins=%s linstor\n"
                  % " ".join(STOCK_SM_PLUGINS))
# xapi-core's own drop-ins (no sm-plugins).
XAPI_CORE_DROPINS = [("tracing.conf", "# tracing\n"), ("ssh-auto-mode.conf", "ssh-auto-mode=false\n")]

# Paths owned by the host's own packages (XCP-ng 8.3 sm 3.x and blktap 3.x).
UPSTREAM_SM_DRIVERS = """EXTSR FileSR NFSSR ISCSISR LVHDSR LVMSR LVHDoISCSISR LVHDoHBASR
    LVHDoFCoESR HBASR RawHBASR DummySR ISOSR SHMSR SMBSR udevSR CephFSSR GlusterFSSR
    MooseFSSR XFSSR ZFSSR LinstorSR LargeBlockSR LVMoISCSISR LVMoHBASR LVMoFCoESR
    OCFSSR OCFSoISCSISR OCFSoHBASR""".split()
UPSTREAM_SM_MODULES = """SR.py VDI.py SRCommand.py util.py blktap2.py lock.py cleanup.py
    lvutil.py vhdutil.py xs_errors.py XE_SR_ERRORCODES.xml cbtutil.py journaler.py
    fjournaler.py lvhdutil.py lvmcache.py lvmanager.py refcounter.py resetvdis.py
    scsiutil.py devscan.py iscsilib.py mpathutil.py mpath_dmp.py nfs.py ipc.py
    flock.py sysdevice.py trim_util.py cifutils.py constants.py metadata.py
    srmetadata.py xmlrpc_ext.py kernel.py fcoelib.py wwid_conf.py""".split()
UPSTREAM_PLUGINS = """tapdisk-pause on-slave testing-hooks coalesce-leaf lvhd-thin
    nfs-on-slave intellicache-clean trim keymanagerutil linstor-manager multipath
    vss_control""".split()
UPSTREAM_PATHS = (
    ["/opt/xensource/sm/" + n for n in UPSTREAM_SM_DRIVERS + UPSTREAM_SM_MODULES] +
    ["/etc/xapi.d/plugins/" + n for n in UPSTREAM_PLUGINS] +
    ["/usr/sbin/tap-ctl", "/usr/bin/vhd-util", "/usr/libexec/tapdisk", "/usr/bin/tapdisk",
     "/usr/sbin/tapback", "/usr/bin/vhd-index", "/usr/sbin/td-util", "/usr/bin/qemu-img",
     "/etc/logrotate.d/SMlog", "/etc/logrotate.d/blktap", "/var/log/SMlog",
     "/usr/lib/python3.6/site-packages/sm", "/usr/lib64/python3.6/site-packages/sm"])
# Directories other packages own: we may put files in them, never own them.
SHARED_DIRS = ["/", "/opt", "/opt/xensource", "/opt/xensource/sm", "/etc", "/etc/xapi.d",
               "/etc/xapi.d/plugins", "/etc/xapi.conf.d", "/etc/logrotate.d", "/var",
               "/var/log", "/usr", "/usr/bin", "/usr/sbin", "/usr/libexec"]

# sr_get_driver_info exactly as XAPI sends it (no <string> tags, no prolog).
DRIVER_INFO_CALL = (
    "<methodCall><methodName>sr_get_driver_info</methodName><params><param><value><struct>"
    "<member><name>host_ref</name><value>OpaqueRef:NULL</value></member>"
    "<member><name>command</name><value>sr_get_driver_info</value></member>"
    "<member><name>args</name><value><array><data/></array></value></member>"
    "<member><name>device_config</name><value><struct/></value></member>"
    "</struct></value></param></params></methodCall>")


def make(*args, **kw):
    """make -s -C <checkout> args...: procs.run's CompletedProcess."""
    return run(["make", "-s", "-C", TOP] + list(args), **kw)


def make_install(destdir, target="install", python=VPY, **variables):
    """`make <target> DESTDIR=destdir PYTHON=python VAR=value...`: the tree (a str)."""
    extra = ["%s=%s" % kv for kv in variables.items()]
    make(target, "DESTDIR=%s" % destdir, "PYTHON=%s" % python, *extra)
    return str(destdir)


_dev_tree = []          # this test process's `make install` tree, made on first use


def install_dev_tree(destdir):
    """What `make install DESTDIR=destdir` lays out (the venv's python), copied from one
    tree made once per test process: the dev tree is relocatable and holds no path of
    its root (checked once), so a copy is the same tree; it saves a make per host test.
    The install tests run make install itself."""
    if not _dev_tree:
        template = tempfile.mkdtemp(prefix="smtap-dev-tree-")
        os.chmod(template, 0o755)         # cp -a gives the root its mode
        atexit.register(shutil.rmtree, template, True)
        make_install(template)
        held = run("grep", "-rlF", template, template, check=False)
        assert held.returncode == 1, "the installed tree names its root: " + held.stdout
        _dev_tree.append(template)
    run("cp", "-a", _dev_tree[0] + "/.", str(destdir))
    return str(destdir)


def build_rpm(topdir, *variables):
    """`make rpm` into its own rpmbuild top dir (VAR=value...: the Makefile's): the binary
    RPM's path; what make printed is in <topdir>/make-rpm.log. The package is built for
    dom0's Python 3.6: the test skips where `make py36` finds none (a stock Debian 12)."""
    make("py36")
    if not os.access(PY36, os.X_OK):
        pytest.skip("no Python 3.6 to build the dom0 RPM with (make py36 found none)")
    out = make("rpm", "RPMTOP=%s" % topdir, *variables, timeout=120)
    with open(os.path.join(str(topdir), "make-rpm.log"), "w") as f:
        f.write(out.stdout + out.stderr)
    rpms = glob.glob(os.path.join(str(topdir), "RPMS", "*", "smtap-%s-*.rpm" % VERSION))
    assert len(rpms) == 1, out.stdout + out.stderr
    return rpms[0]


def tree(root):
    """Every path under root, as absolute host paths, directories with a trailing /."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(str(root)):
        rel = "/" + os.path.relpath(dirpath, str(root)).lstrip(".")
        rel = "/" if rel == "/" else rel.rstrip("/")
        for d in dirnames:
            out.add(os.path.join(rel, d) + "/")
        for f in filenames:
            out.add(os.path.join(rel, f))
    return out


def host_env(root, **extra):
    env = dict(os.environ)
    env["SMTAP_ROOT"] = str(root)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def driver_info(launcher, root, python=VPY, env=None):
    """Run an installed <Type>SR launcher with sr_get_driver_info; the decoded struct."""
    out = run([python, str(launcher), DRIVER_INFO_CALL], env=env or host_env(root))
    (info,), method = xmlrpc.client.loads(out.stdout)
    return info


def read_sm_plugins(path):
    """The sm-plugins of one file we wrote (plain `key = a b c` lines)."""
    value = None
    with open(str(path)) as f:
        for line in f:
            line = line.split("#", 1)[0]
            if "=" in line and line.split("=", 1)[0].strip() == "sm-plugins":
                value = line.split("=", 1)[1].split()
    return value


DROPIN = "/etc/xapi.conf.d/smtap.conf"


def dropin(root):
    """The sm-plugins of root's smtap drop-in (None: there is none)."""
    path = os.path.join(str(root), DROPIN.lstrip("/"))
    return read_sm_plugins(path) if os.path.exists(path) else None


def confd(root):
    """The entries of root's /etc/xapi.conf.d, sorted."""
    return sorted(os.listdir(os.path.join(str(root), "etc/xapi.conf.d")))


def stock_host(root, linstor=True):
    """root's /etc as on a stock XCP-ng 8.3 host (optionally with LINSTOR's drop-in)."""
    confd = os.path.join(str(root), "etc", "xapi.conf.d")
    os.makedirs(confd, exist_ok=True)
    with open(os.path.join(str(root), "etc", "xapi.conf"), "w") as f:
        f.write(XAPI_CONF_83)
    for name, text in XAPI_CORE_DROPINS + ([LINSTOR_DROPIN] if linstor else []):
        with open(os.path.join(confd, name), "w") as f:
            f.write(text)


# --- rpm --root <dir> with the scriptlets run ------------------------------------------
def py36_prefix():
    """The prefix of dom0's interpreter here (.venv36's base, else pyenv's 3.6), or None."""
    for py in (PY36,) + tuple(sorted(glob.glob("/root/.pyenv/versions/3.6.*/bin/python3.6"))):
        if os.access(py, os.X_OK):
            out = run(py, "-c", "import sys; print(sys.version_info[:2] == (3, 6) "
                      "and sys.base_prefix or '')", check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    return None


# rpm runs scriptlets chrooted into --root: give the empty root what dom0 has for them,
# in a private mount namespace (gone with the command): this machine's programs and
# libraries read-only (sh, grep, sed), /dev, and Python 3.6 as /usr/bin/python3, like
# dom0's. The rest of the root (/usr/share included) is the package's to fill.
RPM_IN_ROOT = r"""
set -e
R=$1 PREFIX=$2; shift 2
for d in bin sbin lib lib64; do [ -e "$R/$d" ] || ln -s usr/$d "$R/$d"; done
for d in bin sbin lib lib64; do
    mkdir -p "$R/usr/$d"; mount --bind /usr/$d "$R/usr/$d"; mount -o remount,bind,ro "$R/usr/$d"
done
mkdir -p "$R/dev" "$R$PREFIX"
mount --bind /dev "$R/dev"
mount --bind "$PREFIX" "$R$PREFIX"; mount -o remount,bind,ro "$R$PREFIX"
mount --bind "$PREFIX/bin/python3.6" "$R$(readlink -f /usr/bin/python3)"
exec rpm --root "$R" --dbpath /var/lib/rpm "$@"
"""


def rpm_root(root, *args, check=True):
    """`rpm --root root <args>` with scriptlets running on dom0-like Python 3.6."""
    prefix = py36_prefix()
    assert prefix, "no Python 3.6 here (make py36)"
    os.makedirs(str(root), exist_ok=True)
    return run(["unshare", "--mount", "--propagation", "private", "sh", "-c", RPM_IN_ROOT,
                "rpm-in-root", str(root), prefix] + list(args), check=check)


FAKE_SPEC = """\
Name: %(name)s
Version: %(version)s
Release: 1
Summary: test stand-in for %(name)s (its sm-plugins configuration only)
License: none
BuildArch: noarch
%%description
Test stand-in.
%%install
%(install)s
%%files
%(files)s
"""


def fake_rpm(topdir, name, version, files):
    """Build a tiny noarch RPM `name-version` carrying {path: text}; its path."""
    install, listed = [], []
    for path, text in sorted(files.items()):
        install.append("mkdir -p %%{buildroot}%s && printf '%%s' %s > %%{buildroot}%s"
                       % (os.path.dirname(path), shlex.quote(text), path))
        listed.append(path)
    spec = os.path.join(str(topdir), "%s-%s.spec" % (name, version))
    with open(spec, "w") as f:
        f.write(FAKE_SPEC % {"name": name, "version": version,
                             "install": "\n".join(install).replace("%", "%%").replace(
                                 "%%{buildroot}", "%{buildroot}"),
                             "files": "\n".join(listed)})
    run(["rpmbuild", "-bb", "--quiet", "--define", "_topdir %s" % topdir, spec])
    (rpm,) = glob.glob(os.path.join(str(topdir), "RPMS", "noarch", "%s-%s-1.*.rpm"
                                    % (name, version)))
    return rpm


def rpm_query_list(rpm_file):
    """The paths an RPM file carries (rpm -qpl)."""
    return run(["rpm", "-qpl", rpm_file]).stdout.split()


def rpm_install(rpm_file, root):
    """rpm --root <empty dir> -i --nodeps --noscripts, its database under that root."""
    os.makedirs(str(root), exist_ok=True)
    run(["rpm", "--root", str(root), "--dbpath", "/var/lib/rpm", "-i", "--nodeps",
         "--noscripts", rpm_file])
    return str(root)
