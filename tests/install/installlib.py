"""Helpers for the install / RPM tests: make install into a tree, the upstream paths."""
import glob
import os
import subprocess
import sys
import xmlrpc.client

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(TOP, ".venv", "bin")

VPY = os.path.join(VENV_BIN, "python3")
VERSION = open(os.path.join(TOP, "VERSION")).read().strip()

# SR types of the checkout (sm/drivers/<Type>SR.py) and those the RPM ships.
ALL_SR_TYPES = sorted(os.path.basename(p)[:-len("SR.py")]
                      for p in glob.glob(os.path.join(TOP, "sm", "drivers", "*SR.py")))
RPM_SR_TYPES = ["ram"]
STOCK_SM_PLUGINS = ("ext nfs iscsi lvmoiscsi dummy file hba rawhba udev iso lvm lvmohba "
                    "lvmofcoe shm smb").split()

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
     "/usr/sbin/tapback", "/usr/bin/vhd-index", "/usr/sbin/td-util",
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


def run(cmd, env=None, check=True, **kw):
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, **kw)
    if check and out.returncode != 0:
        raise AssertionError("%s: exit %d\nstdout: %s\nstderr: %s"
                             % (cmd, out.returncode, out.stdout, out.stderr))
    return out


def make(*args, **kw):
    return run(["make", "-s", "-C", TOP] + list(args), **kw)


def make_install(destdir, target="install", python=VPY, **variables):
    extra = ["%s=%s" % kv for kv in variables.items()]
    make(target, "DESTDIR=%s" % destdir, "PYTHON=%s" % python, *extra)
    return str(destdir)


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
    value = None
    with open(str(path)) as f:
        for line in f:
            line = line.split("#", 1)[0]
            if "=" in line and line.split("=", 1)[0].strip() == "sm-plugins":
                value = line.split("=", 1)[1].split()
    return value
