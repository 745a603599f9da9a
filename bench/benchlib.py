"""What the SM benchmarks share: a temporary root with the suite installed and the local
toolstack running in it, removed with everything it holds afterwards."""
import contextlib
import os
import shutil

from smtap import settings
from smtap.toolstack import client, demo, hostroot


@contextlib.contextmanager
def local_toolstack(name, prefix="/tmp/b"):
    """(demo.Demo of the root, a logged-in XenAPI proxy); on the way out the toolstack
    stops and the root goes (what could not be removed is printed)."""
    root = hostroot.short_root(prefix)
    os.environ[settings.ROOT_ENV] = root
    d = demo.Demo(root, out=open(os.devnull, "w"))
    ok = False
    try:
        d.install()
        d.start()
        session = client.login(settings.xapi_socket(), originator="bench")
        yield d, session.xenapi
        session.xenapi.session.logout()
        d.stop()
        ok = True
    finally:
        if not ok:
            d.undo()
        left = hostroot.cleanup(root)
        if left:
            print("%s: left behind: %s" % (name, "; ".join(left)))
        if not hostroot.mounts_under(root):
            shutil.rmtree(root, ignore_errors=True)
