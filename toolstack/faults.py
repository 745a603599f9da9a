"""Crash points for tests: with SMTAP_XAPI_CRASH_AT=<point> in its environment,
smtap-xapi kills itself (SIGKILL) when it reaches that point, exactly as a kill -9 at
that moment would. Unset (always, outside tests) a point costs one dictionary lookup."""
import os
import signal

ENV = "SMTAP_XAPI_CRASH_AT"
POINTS = (
    "plug-attached",        # vdi_attach done
    "plug-activated",       # vdi_activate done
    "plug-mounted",         # nbdfuse serves the export, no loop device yet
    "plug-device",          # loop device made, nothing recorded yet
    "unplug-device-gone",   # dom0 device removed, vdi_deactivate not run
    "unplug-deactivated",   # vdi_deactivate done, vdi_detach not run
)


def point(name):
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
