"""Every host path the suite touches, in one place.

SMTAP_ROOT=/some/dir moves each host path P to /some/dir/P, so tests run isolated and
several simulated hosts share one machine. Read at each call: a test (or a toolstack
serving several roots) may change the environment after import.
"""
import os

ROOT_ENV = "SMTAP_ROOT"


def root():
    return os.environ.get(ROOT_ENV) or "/"


def host_path(path, under=None):
    """Map an absolute host path under the current root (or under `under`)."""
    return os.path.join(under or root(), path.lstrip("/"))


# The profile decides the engine's runtime directory and the SM locks' directory:
#   dev   the checkout and `make install`: upstream's own (blktap's /run/blktap-control,
#         sm's /var/lock/sm), so that upstream's tools and SM code run against the engine
#         on the local toolstack unchanged;
#   host  `make install-host`, the RPM: the suite's own. The host's tap-ctl lists every
#         control socket in /run/blktap-control and upstream sm raises on a listed type
#         other than aio/vhd, so a ram tapdisk there would break the host's own VDI
#         operations; and sm's lock namespaces stay sm's.
# An installed tree names its profile in a marker next to this file; the checkout has
# none. An unreadable or unknown marker means host: the profile that touches nothing of
# upstream's.
# It decides where the SM drivers log too ("sm_log"): a file under the root in dev (the
# local toolstack and the tests read it there); None in host: through syslog as sm's
# util.SMlog does (facility local2: dom0's rsyslog writes /var/log/SMlog, rotates it and
# may forward it), never appending to SMlog ourselves.
PROFILES = {
    "dev": {"runtime": "/run/blktap-control", "locks": "/var/lock/sm",
            "sm_log": "/var/log/SMlog"},
    "host": {"runtime": "/run/smtap/blktap-control", "locks": "/var/lock/smtap",
             "sm_log": None},
}
PROFILE_MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile")


def read_profile(marker=PROFILE_MARKER):
    try:
        with open(marker) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return "dev"
    except OSError:
        return "host"
    return name if name in PROFILES else "host"


PROFILE = read_profile()
RUNTIME_DIR = PROFILES[PROFILE]["runtime"]
LOCK_DIR = PROFILES[PROFILE]["locks"]


def runtime_dir(under=None):
    """tapdisk control and NBD sockets, minor markers, SM's links (smtap.names)."""
    return host_path(RUNTIME_DIR, under)


def lock_dir():
    """SM's locks: <lock_dir>/<namespace>/<name> (smtap.sm.lock)."""
    return host_path(LOCK_DIR)


def sr_mount_dir():
    return host_path("/run/sr-mount")


def xapi_socket():
    return host_path("/var/lib/xcp/xapi")


def sm_dir():
    """Where XAPI looks for <Type>SR executables."""
    return host_path("/opt/xensource/sm")


def plugins_dir():
    return host_path("/etc/xapi.d/plugins")


def syslog_socket():
    """The local syslog daemon's socket (dom0: rsyslog)."""
    return host_path("/dev/log")


def log_file():
    """The SM drivers' log file under the root, or None: through syslog_socket() (the
    profile's "sm_log")."""
    path = PROFILES[PROFILE]["sm_log"]
    return None if path is None else host_path(path)


def tapdisk_log_file():
    """Every tapdisk process logs here (rotated by /etc/logrotate.d/smtap)."""
    return host_path("/var/log/smtap/tapdisk.log")


def inventory_file():
    return host_path("/etc/xensource-inventory")


def xapi_conf():
    return host_path("/etc/xapi.conf")


def xapi_conf_d():
    return host_path("/etc/xapi.conf.d")


def testing_hooks_dir():
    """Fault-injection flags (the smtap-testing-hooks plugin); under /run: gone at reboot."""
    return host_path("/run/smtap/testing-hooks")


def state_dir():
    """The local toolstack's database and pid file."""
    return host_path("/var/lib/smtap")


def prefix():
    """The suite's private tree on a host: lib/ (Python), bin/ (engine commands)."""
    return host_path("/opt/smtap")


def guest_image_dir():
    """The local toolstack's guest kernel and initramfs (toolstack/guest/build.py)."""
    return host_path("/opt/smtap/share/guest")


def vm_runtime_dir(vm_uuid):
    """A running guest's sockets (QMP monitors, agent), pid file and fw_cfg files."""
    return os.path.join(host_path("/run/smtap/vm"), vm_uuid)


def vm_log_dir():
    """Each guest's serial console (<uuid>.console.log) and qemu's own messages
    (<uuid>.qemu.log); outside the engine log's rotation glob."""
    return host_path("/var/log/smtap/vm")
