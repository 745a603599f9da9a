"""The garbage collector of VHD and qcow2 SRs (upstream sm's cleanup.py, for the file
SR; a qcow2 chain is coalesced as a VHD one, by commit into its backing file): one
process per SR, started in the background by the driver (kick) after snapshot, clone,
delete, attach and scan; `smtap-gc` is its command line.

Each round: scan the SR's files, then
  1. delete hidden VHDs nothing hangs from (garbage);
  2. coalesce: a hidden VHD X with children, the only child of its hidden parent P, is
     merged into P (journal coalesce_<X>), its children relinked onto P (journal
     relink_<X>: modify -p, then their tapdisks refreshed on every host using them), X
     deleted;
  3. leaf-coalesce: a VDI's leaf L, the only child of a hidden base P, is merged into P
     while its tapdisks are paused (journal leaf_<L>: L -> OLD_<L>, P -> L), once L is
     small enough to copy within the pause bound; until then snapshot-coalesce shrinks it.
until nothing is left. Upstream's names and limits: journals in the SR directory, the
gc_active lock (one GC per SR), the running lock (held while it works), at most 20
snapshot-coalesce rounds, 3 without progress, growth at most 1.2x the smallest size;
live leaf-coalesce only under 20 MiB (or what the measured speed copies in 5 s) and
within 10 s, unless other-config:leaf-coalesce=force (false: never).

It yields to SR operations (it waits while one holds the SR lock, mid-copy too), takes
the SR lock itself only for its short metadata steps, and stops within a second when
aborted (sr_detach, sr_delete: gcctl.abort()). A crash at any point is replayed at the next
start (replay()): interrupted coalesces are repaired and redone, relinks finished,
leaf-coalesces undone or finished. What it does and how much is left: the log, the SR's
other-config:gc-status and `smtap-gc -u <sr> -s`. How it is started, stopped and watched
from outside: sm/gcctl.py.
"""
import argparse
import errno
import os
import sys
import time

from smtap import settings
from smtap import units
from smtap.sm import errors
from smtap.sm import gcctl
from smtap.sm import journal as journallib
from smtap.sm import lock
from smtap.sm import log
from smtap.sm import poolpause
from smtap.sm import testhooks
from smtap.sm import vhdchain

LOCK_RUNNING = "running"
JRN_COALESCE = "coalesce"
JRN_RELINK = "relink"
JRN_LEAF = "leaf"
STATUS_KEY = "gc-status"               # SR other-config
LEAF_COALESCE_KEY = "leaf-coalesce"    # VDI other-config: force | false
FORCE, NEVER = "force", "never"
LIVE_LEAF_COALESCE_MAX_SIZE = 20 << 20
LIVE_LEAF_COALESCE_TIMEOUT = 10        # seconds a paused leaf may take
TIMEOUT_SAFETY_MARGIN = 0.5
MAX_ITERATIONS = 20
MAX_ITERATIONS_NO_PROGRESS = 3
MAX_INCREASE_FROM_MINIMUM = 1.2
POLL = gcctl.POLL
STATUS_EVERY = 1.0                     # seconds between status file updates mid-copy
XAPI_STATUS_EVERY = 5.0                # ... and other-config ones
LINGER = 1.0                           # seconds an idle GC waits for the next kick: a
                                       # burst of operations shares one process
PARK = "gc-park"                       # testing hook: stop at that phase until cleared
MiB = 1 << 20


class Aborted(Exception):
    pass


class Skip(Exception):
    """This candidate cannot be worked on now (changed meanwhile, paused elsewhere...)."""


# -- one candidate's bookkeeping ------------------------------------------------------------
class CoalesceTracker(object):
    """upstream's limits on snapshot-coalesce rounds of one leaf."""

    def __init__(self):
        self.iterations = self.no_progress = 0
        self.minimum = None
        self.reason = None

    def abort(self, before, after):
        self.iterations += 1
        if after >= before:
            self.no_progress += 1
        self.minimum = after if self.minimum is None else min(self.minimum, after)
        if self.iterations > MAX_ITERATIONS:
            self.reason = "%d iterations" % MAX_ITERATIONS
        elif self.no_progress > MAX_ITERATIONS_NO_PROGRESS:
            self.reason = "%d iterations without progress" % MAX_ITERATIONS_NO_PROGRESS
        elif self.minimum and after > MAX_INCREASE_FROM_MINIMUM * self.minimum:
            self.reason = "size %d grew past %.1fx its minimum %d" % (
                after, MAX_INCREASE_FROM_MINIMUM, self.minimum)
        return self.reason is not None


class GC(object):
    def __init__(self, sr):
        self.sr = sr
        self.uuid = sr.uuid
        self.path = sr.path
        self.journal = journallib.Journal(self.path)
        self.sr_lock = lock.Lock("sr", self.uuid)
        self.skip = set()               # candidates that failed this run
        self.speeds = gcctl.speeds(self.uuid)   # bytes/s of the last coalesces
        self.doing = "starting"
        self.pending = {}
        self.progress = None
        self.last_status = self.last_xapi = 0
        self.xapi_text = None
        self.seen_kick = None           # the last kick a round with no work followed

    # -- plumbing ---------------------------------------------------------------------------
    def check_abort(self):
        if gcctl.abort_requested(self.uuid):
            raise Aborted("abort requested")

    def park(self, phase):
        """Testing hook: stay at `phase` until the hook is cleared (or kill -9)."""
        if testhooks.value(PARK) != phase:
            return
        self.say("parked at %s" % phase)
        while testhooks.value(PARK) == phase:
            self.check_abort()          # an abort there is one mid-phase
            time.sleep(POLL)

    def say(self, doing, progress=None, force=True):
        self.doing, self.progress = doing, progress
        now = time.time()
        if not force and now - self.last_status < STATUS_EVERY:
            return
        self.last_status = now
        state = {"pid": os.getpid(), "state": "idle" if doing == "idle" else "running",
                 "doing": doing, "progress": progress, "pending": self.pending,
                 "kick": self.seen_kick, "updated": now}
        gcctl.write_status(self.uuid, state)
        text = doing
        if progress:
            text += " (%s)" % progress
        if self.pending and doing != "idle":
            text += "; left: " + describe_pending(self.pending)
        if force:
            log.info("GC: %s", text)
        if text == self.xapi_text or (not force and now - self.last_xapi < XAPI_STATUS_EVERY):
            return
        self.last_xapi, self.xapi_text = now, text
        try:
            x = self.sr.xenapi
            x.SR.remove_from_other_config(self.sr.ref, STATUS_KEY)
            x.SR.add_to_other_config(self.sr.ref, STATUS_KEY, text)
        except Exception as e:          # visibility is best effort: never stop the work
            log.debug("gc-status: %s", errors.describe(e))

    def wait_sr_free(self, what):
        """Yield to an SR operation in progress: wait until nobody else holds the lock,
        saying so (what: the work it holds up). True if it waited."""
        if self.sr_lock.acquire_noblock():
            self.sr_lock.release()
            return False
        self.say("waiting for an SR operation", what)
        while not self.sr_lock.acquire_noblock():
            self.check_abort()
            time.sleep(POLL)
        self.sr_lock.release()
        return True

    def locked(self):
        gc = self

        class _Locked(object):
            def __enter__(self):
                while not gc.sr_lock.acquire_noblock():
                    gc.check_abort()
                    time.sleep(POLL)

            def __exit__(self, *exc):
                gc.sr_lock.release()
        return _Locked()

    def vdi(self, uuid):
        return self.sr.VDI_CLASS(self.sr, uuid)

    def scan(self):
        for attempt in range(5):       # a file mid-write: read it again shortly
            images = vhdchain.scan(self.path)
            if not [i for i in images.values() if i.error]:
                return images
            time.sleep(0.2)
        return images

    def sync(self):
        self.sr.sync_records()

    # -- the loop ---------------------------------------------------------------------------
    def run(self):
        active = lock.Lock(gcctl.LOCK_GC_ACTIVE, self.uuid)
        while gcctl.take(active, gcctl.STARTUP_WAIT, self.uuid):
            if gcctl.dealt_with(self.uuid):     # a GC (or an abort) saw the kicks since
                active.release()
                return 0
            try:
                kicked = self.work()
            finally:
                active.release()
            # A kick that came as we were leaving found the lock still held: take it back
            # (unless a new GC got it first).
            if kicked is None or gcctl.kick_token(self.uuid) == kicked:
                return 0
        log.info("GC: another instance holds SR %s", self.uuid)
        return 0

    def work(self):
        """Rounds until there is nothing to do; the last kick seen (None: stop for good)."""
        kicked = None
        try:
            self.check_abort()
            if not self.wait_plugged():
                log.info("GC: SR %s is not plugged here: exiting", self.uuid)
                return None
            with self.locked():
                self.replay()
            while True:
                kicked = gcctl.kick_token(self.uuid)
                if self.round() or gcctl.kick_token(self.uuid) != kicked:
                    continue
                self.seen_kick = kicked
                if not self.linger(kicked):
                    return kicked
        except Aborted:
            log.info("GC: aborted")
            return None
        finally:
            if kicked is None or self.seen_kick != kicked:
                self.seen_kick = gcctl.kick_token(self.uuid)    # stopped: nothing pending
            self.pending = {}
            self.say("idle")

    def linger(self, kicked):
        """Idle: wait a little for the next kick (True: it came)."""
        self.pending = {}
        self.say("idle")
        deadline = time.time() + LINGER
        while time.time() < deadline:
            self.check_abort()
            if gcctl.kick_token(self.uuid) != kicked:
                return True
            time.sleep(POLL * 2)
        return False

    def wait_plugged(self, wait=10):
        """Attach kicks the GC before XAPI marks the PBD attached: wait a little."""
        x = self.sr.xenapi
        deadline = time.time() + wait
        while True:
            try:
                pbds = [x.PBD.get_record(p) for p in x.SR.get_PBDs(self.sr.ref)]
            except Exception:
                return False
            if [p for p in pbds if p["currently_attached"]
                    and (not self.sr.host_ref or p["host"] == self.sr.host_ref)]:
                return True
            if time.time() > deadline:
                return False
            self.check_abort()
            time.sleep(0.2)

    def enabled(self):
        """other-config:gc=false on the SR turns the collector off (upstream's switch)."""
        try:
            value = self.sr.xenapi.SR.get_other_config(self.sr.ref).get("gc")
        except Exception:
            return True
        return flag(value, "SR other-config:gc", True)

    def round(self):
        """One pass: garbage, then one coalesce or one leaf-coalesce. False: no work."""
        self.check_abort()
        if not self.enabled():
            log.info("GC: disabled on SR %s (other-config:gc=false)", self.uuid)
            return False
        images = self.scan()
        garbage, coalesce, leaves = plan(images, self.skip, self.leaf_policy)
        self.pending = pending(garbage, coalesce, leaves)
        if not (garbage or coalesce or leaves):
            return False
        running_lock = lock.Lock(LOCK_RUNNING, self.uuid)
        if not running_lock.acquire_noblock():
            log.info("GC: the running lock of SR %s is held elsewhere", self.uuid)
            raise Aborted("another collector works on this SR")
        try:
            if garbage:
                self.collect_garbage()
            elif coalesce:
                self.attempt(coalesce[0], self.coalesce)
            else:
                self.attempt(leaves[0], self.leaf_coalesce)
        finally:
            running_lock.release()
        return True

    def attempt(self, uuid, action):
        try:
            action(uuid)
        except (Aborted, KeyboardInterrupt):
            raise
        except Skip as e:
            log.info("GC: %s skipped: %s", uuid, e)
            self.skip.add(uuid)
        except Exception as e:
            log.exception("GC: %s of %s failed", action.__name__, uuid)
            self.say("%s of %s failed: %s" % (action.__name__, uuid, errors.describe(e)))
            self.skip.add(uuid)

    def leaf_policy(self, uuid):
        """other-config:leaf-coalesce of the VDI: FORCE (no pause bound), NEVER (false) or
        None (the default, also without a record)."""
        try:
            x = self.sr.xenapi
            value = x.VDI.get_other_config(x.VDI.get_by_uuid(uuid)).get(LEAF_COALESCE_KEY)
        except Exception:
            return None
        if value is not None and value.strip().lower() == FORCE:
            return FORCE
        return None if flag(value, "VDI %s other-config:%s" % (uuid, LEAF_COALESCE_KEY),
                            True) else NEVER

    # -- 1. garbage -------------------------------------------------------------------------
    def collect_garbage(self):
        with self.locked():
            images = vhdchain.scan(self.path)
            garbage, _, _ = plan(images, set(), None)
            for uuid in garbage:
                self.say("deleting %s (hidden, no children)" % uuid)
                os.unlink(images[uuid].path)
            journallib.sync_dir(self.path)
            self.sync()

    # -- 2. coalesce ------------------------------------------------------------------------
    def coalesce(self, uuid):
        """Merge hidden X (uuid) into its parent, relink X's children, delete X."""
        if self.journal.get(JRN_RELINK, uuid):
            return self.relink(uuid)
        images = self.scan()
        x = images.get(uuid)
        if x is None or coalesceable(x) is None:
            raise Skip("no longer coalesceable")
        parent = x.parent_image
        self.journal.create(JRN_COALESCE, uuid, "1")
        self.copy(x, parent, "coalescing %s into %s" % (uuid, parent.uuid), park="coalesce")
        self.journal.remove(JRN_COALESCE, uuid)
        self.park("coalesced")
        self.journal.create(JRN_RELINK, uuid, "1")
        self.relink(uuid)

    def copy(self, child, parent, what, park=None, deadline=None):
        """check, grow, coalesce child into parent, check again; parent repaired if the
        copy failed midway. Checks for abort between blocks; without a deadline (the
        child is not paused) also yields to SR operations there."""
        for image, fast in ((child, False), (parent, True)):
            why = vhdchain.check(image.path, fast=fast)
            if why:
                raise Skip("%s is not valid: %s" % (image.path, why))
        if child.virtual > parent.virtual:
            self.grow(parent, child.virtual, paused=deadline is not None)
        total = vhdchain.allocated(child.path)
        stats = {"start": time.time(), "waited": 0.0, "parked": False}

        def progress(done, blocks):
            # once, half way (qcow2 reports its progress in bigger steps than VHD)
            if park and blocks and done >= max(1, blocks // 2) and not stats["parked"]:
                stats["parked"] = True
                self.park(park)
            self.check_abort()
            if deadline is not None and time.time() > deadline:
                raise Skip("leaf-coalesce past its %ds bound" % LIVE_LEAF_COALESCE_TIMEOUT)
            where = "%d of %d blocks, %.1f of %.1f MiB" % (
                done, blocks, done * vhdchain.BLOCK / MiB, total / MiB)
            waited = False
            if deadline is None:        # a paused leaf does not wait: the pause is bounded
                t0 = time.time()
                waited = self.wait_sr_free("%s, %s" % (what, where))
                stats["waited"] += time.time() - t0
            self.say(what, where, force=done == 0 or waited)

        try:
            sectors = vhdchain.coalesce(child.path, progress)
        except BaseException:
            if vhdchain.check(parent.path, fast=True):
                log.warning("GC: repairing %s after an interrupted coalesce", parent.path)
                vhdchain.repair(parent.path)
            raise
        why = vhdchain.check(parent.path, fast=True)
        if why:
            raise RuntimeError("%s invalid after coalesce: %s" % (parent.path, why))
        elapsed = max(time.time() - stats["start"] - stats["waited"], 1e-3)
        if total:
            self.speeds = (self.speeds + [total / elapsed])[-10:]
            gcctl.save_speeds(self.uuid, self.speeds)
        log.info("GC: %s: %d sectors in %.2f s (%.1f MiB/s)", what, sectors, elapsed,
                 total / elapsed / MiB)

    def grow(self, image, size, paused=False):
        """The parent's virtual size up to the child's: fast when the BAT has room, else
        journalled with the tapdisks of its subtree paused (data blocks may move)."""
        journal = os.path.join(self.path, image.uuid)       # upstream: <sr>/<uuid>
        if vhdchain.grows_in_place(image.path, size) or paused:
            vhdchain.grow(image.path, size, journal)
            return
        with self.locked():
            paused = [poolpause.Paused(self.vdi(leaf.uuid)) for leaf in image.leaves()
                      if not leaf.hidden]
            entered = []
            try:
                for p in paused:
                    p.__enter__()
                    entered.append(p)
                vhdchain.grow(image.path, size, journal)
            finally:
                for p in reversed(entered):
                    p.__exit__(None, None, None)
        image.virtual = size

    def relink(self, uuid):
        """X's children onto X's parent (journal relink_<X>), their tapdisks refreshed,
        X deleted."""
        with self.locked():
            images = vhdchain.scan(self.path)
            x = images.get(uuid)
            if x is None:
                self.journal.remove(JRN_RELINK, uuid)
                return
            parent = x.parent_image
            if parent is None:
                raise RuntimeError("relink of %s: its parent %s is gone" % (uuid, x.parent))
            self.say("relinking the children of %s onto %s" % (uuid, parent.uuid))
            leaves = [leaf for leaf in parent.leaves() if leaf is not x and not leaf.hidden]
            tagged = self.tag_relinking(leaves)
            try:
                for i, child in enumerate(x.children):
                    vhdchain.set_parent(child.path, parent.path)
                    log.info("GC: relinked %s from %s to %s", child.uuid, uuid, parent.uuid)
                    if i == 0:
                        self.park("relink")
                for leaf in leaves:
                    self.refresh(leaf.uuid)
            finally:
                self.untag_relinking(tagged)
            self.journal.remove(JRN_RELINK, uuid)
            os.unlink(x.path)
            journallib.sync_dir(self.path)
            log.info("GC: deleted %s (coalesced into %s)", uuid, parent.uuid)
            self.sync()

    def tag_relinking(self, leaves):
        """sm-config relinking on each leaf once it is not activating (upstream's dance
        with FileVDI.mark_activating): [VDI refs tagged]."""
        x = self.sr.xenapi
        tagged = []
        for leaf in leaves:
            try:
                ref = x.VDI.get_by_uuid(leaf.uuid)
            except Exception:
                continue                # no record (yet): nothing can activate it
            for _ in range(60):
                x.VDI.remove_from_sm_config(ref, "relinking")
                x.VDI.add_to_sm_config(ref, "relinking", "True")
                if "activating" not in x.VDI.get_sm_config(ref):
                    tagged.append(ref)
                    break
                x.VDI.remove_from_sm_config(ref, "relinking")
                self.check_abort()
                time.sleep(0.5)
            else:
                raise Skip("VDI %s stays activating" % leaf.uuid)
        return tagged

    def untag_relinking(self, refs):
        for ref in refs:
            try:
                self.sr.xenapi.VDI.remove_from_sm_config(ref, "relinking")
            except Exception as e:
                log.warning("GC: untag %s: %s", ref, errors.describe(e))

    def refresh(self, uuid):
        """Reload the chain of a VDI's tapdisks (pause/unpause) on every host using it."""
        try:
            hosts = poolpause.refresh(self.vdi(uuid))
        except Exception as e:
            log.warning("GC: refresh of %s: %s", uuid, errors.describe(e))
            return
        if hosts:
            log.info("GC: refreshed %s on %s", uuid, ", ".join(hosts))

    # -- 3. leaf-coalesce -------------------------------------------------------------------
    def can_live_coalesce(self, uuid, size):
        if self.leaf_policy(uuid) == FORCE:
            return True
        if self.speeds:
            speed = sum(self.speeds) / len(self.speeds)
            return size / speed < TIMEOUT_SAFETY_MARGIN * LIVE_LEAF_COALESCE_TIMEOUT
        return size < LIVE_LEAF_COALESCE_MAX_SIZE

    def leaf_coalesce(self, uuid):
        tracker = CoalesceTracker()
        while True:
            self.check_abort()
            leaf = self.scan().get(uuid)
            if leaf is None or leaf_coalesceable(leaf) is None:
                raise Skip("no longer leaf-coalesceable")
            size = vhdchain.allocated(leaf.path)
            if self.can_live_coalesce(uuid, size):
                break
            self.snapshot_coalesce(uuid)
            after = vhdchain.allocated(leaf.path)
            if tracker.abort(size, after):
                raise Skip("snapshot-coalesce gave up: %s" % tracker.reason)
        self.live_leaf_coalesce(uuid)

    def snapshot_coalesce(self, uuid):
        """Shrink a live leaf: an internal snapshot (its data to a new base), then that
        base coalesced into the old one while the VDI keeps running."""
        self.say("snapshot-coalescing %s" % uuid)
        with self.locked():
            v = self.sr.vdi(uuid)
            made = v.snapshot({"type": "internal"})
        base = made.get_params()["uuid"] if made is not v else None
        if base is None or base == uuid:
            raise Skip("the internal snapshot of %s made no base" % uuid)
        self.coalesce(base)

    def live_leaf_coalesce(self, uuid):
        with self.locked():
            images = vhdchain.scan(self.path)
            leaf = images.get(uuid)
            if leaf is None or leaf_coalesceable(leaf) is None:
                raise Skip("changed meanwhile")
            parent = leaf.parent_image
            v = self.vdi(uuid)
            tagged = self.tag_relinking([leaf])     # no activation meanwhile
            try:
                pause = poolpause.Paused(v)
                pause.__enter__()
            except Exception as e:
                self.untag_relinking(tagged)
                raise Skip("cannot pause: %s" % errors.describe(e))
            try:
                self.journal.create(JRN_LEAF, uuid, parent.uuid)
                try:
                    self.leaf_into_parent(leaf, parent)
                except BaseException:
                    log.warning("GC: leaf-coalesce of %s interrupted: undoing", uuid)
                    undo_leaf(self.path, uuid, parent.uuid)
                    self.journal.remove(JRN_LEAF, uuid)
                    raise
                self.journal.remove(JRN_LEAF, uuid)
                self.sync()
            finally:
                try:
                    pause.__exit__(None, None, None)
                finally:
                    self.untag_relinking(tagged)
            os.unlink(vhdchain.renamed(leaf.path, vhdchain.TMP_RENAME_PREFIX + uuid))
            journallib.sync_dir(self.path)
            log.info("GC: leaf-coalesced %s into %s", uuid, parent.uuid)
            self.sync()

    def leaf_into_parent(self, leaf, parent):
        """While the leaf is paused: its data into the parent, which takes its name."""
        if vhdchain.check(leaf.path, fast=True):
            # The tapdisk died with the leaf open (strict mode left its footer poisoned).
            log.warning("GC: repairing the footer of %s", leaf.path)
            vhdchain.repair(leaf.path)
        vhdchain.set_hidden(parent.path, False)
        force = self.leaf_policy(leaf.uuid) == FORCE
        deadline = None if force else time.time() + LIVE_LEAF_COALESCE_TIMEOUT
        self.copy(leaf, parent, "leaf-coalescing %s into %s" % (leaf.uuid, parent.uuid),
                  park="leaf-coalesce", deadline=deadline or float("inf"))   # inf: forced
        old = vhdchain.renamed(leaf.path, vhdchain.TMP_RENAME_PREFIX + leaf.uuid)
        os.rename(leaf.path, old)
        journallib.sync_dir(self.path)
        self.park("leaf-renamed")
        os.rename(parent.path, leaf.path)
        journallib.sync_dir(self.path)
        vhdchain.set_hidden(old, True)

    # -- replay -----------------------------------------------------------------------------
    def replay(self):
        """Finish or undo what a crashed GC (or snapshot) left; the SR lock is held."""
        if self.sr.replay():    # the files: interrupted snapshots and leaf-coalesces
            self.sync()
        images = vhdchain.scan(self.path)
        for uuid in sorted(self.journal.get_all(JRN_COALESCE)):
            x = images.get(uuid)
            parent = x.parent_image if x is not None else None
            if parent is not None and vhdchain.check(parent.path, fast=True):
                log.warning("GC: repairing %s (coalesce of %s interrupted)", parent.path, uuid)
                vhdchain.repair(parent.path)
            log.info("GC: the interrupted coalesce of %s will be redone", uuid)
            self.journal.remove(JRN_COALESCE, uuid)
        for uuid in sorted(self.journal.get_all(JRN_RELINK)):
            log.warning("GC: finishing the interrupted relink of %s", uuid)
            self.relink(uuid)
        for uuid, image in sorted(images.items()):   # a crash mid-refresh left it paused
            if not image.children and not image.hidden:
                self.ensure_unpaused(uuid, only_marked=True)

    def ensure_unpaused(self, uuid, only_marked=False):
        try:
            v = self.vdi(uuid)
            if only_marked and poolpause.PAUSED_KEY not in v.xenapi.VDI.get_sm_config(v.ref):
                return
            poolpause.unpause_all(v)
        except Exception as e:
            log.warning("GC: unpause of %s: %s", uuid, errors.describe(e))


def flag(value, what, default):
    """A yes/no switch of other-config (XAPI's words); absent or unreadable: default."""
    if value is None:
        return default
    try:
        return units.parse_bool(value, what, units.XAPI_BOOL)
    except ValueError as e:
        log.warning("GC: %s; taken as %s", e, default)
        return default


# -- interrupted leaf-coalesces: the files (what an SR scan must not see half done) ------------
def replay_leaf_journals(directory):
    """upstream _handleInterruptedCoalesceLeaf: each leaf_<uuid> journal undone while the
    parent or OLD_<uuid> is still there, else the coalesce was complete. The SR lock is
    held (nobody is leaf-coalescing). Returns the leaves' uuids (their VDIs may be left
    paused: unpause them)."""
    jrn = journallib.Journal(directory)
    done = []
    for uuid, parent_uuid in sorted(jrn.get_all(JRN_LEAF).items()):
        names = os.listdir(directory)
        ext = vhdchain.find_ext(directory, uuid, parent_uuid, vhdchain.TMP_RENAME_PREFIX + uuid)
        old = vhdchain.file_name(vhdchain.TMP_RENAME_PREFIX + uuid, ext)
        if vhdchain.file_name(parent_uuid, ext) in names or old in names:
            log.warning("GC: undoing the interrupted leaf-coalesce of %s", uuid)
            undo_leaf(directory, uuid, parent_uuid)
        else:
            log.warning("GC: the interrupted leaf-coalesce of %s was complete", uuid)
        jrn.remove(JRN_LEAF, uuid)
        done.append(uuid)
    return done


def undo_leaf(directory, uuid, parent_uuid):
    """upstream _undoInterruptedCoalesceLeaf: both files back under their names, the
    parent hidden again. The parent may hold some of the leaf's data: the same data the
    leaf still has on top of it."""
    ext = vhdchain.find_ext(directory, uuid, parent_uuid, vhdchain.TMP_RENAME_PREFIX + uuid)
    leaf = os.path.join(directory, vhdchain.file_name(uuid, ext))
    old = os.path.join(directory, vhdchain.file_name(vhdchain.TMP_RENAME_PREFIX + uuid, ext))
    parent = os.path.join(directory, vhdchain.file_name(parent_uuid, ext))
    if not os.path.exists(parent):
        if not os.path.exists(leaf):
            raise RuntimeError("neither %s nor %s is there" % (parent, leaf))
        os.rename(leaf, parent)
    if not os.path.exists(leaf):
        if not os.path.exists(old):
            raise RuntimeError("neither %s nor %s is there" % (leaf, old))
        os.rename(old, leaf)
    journallib.sync_dir(directory)
    if vhdchain.check(parent, fast=True):
        vhdchain.repair(parent)
    vhdchain.set_hidden(leaf, False)
    vhdchain.set_hidden(parent, True)
    log.info("GC: leaf-coalesce of %s undone", uuid)


# -- what there is to do ----------------------------------------------------------------------
def coalesceable(image):
    """The parent a hidden image with children merges into, or None."""
    p = image.parent_image
    if (image.error or not image.hidden or not image.children or image.raw or p is None
            or p.error or p.raw or not p.hidden or len(p.children) != 1):
        return None                     # (a visible parent's data is its VDI's: kept)
    return p


def leaf_coalesceable(image):
    """The hidden single-child base a visible leaf merges into, or None."""
    p = image.parent_image
    if (image.error or image.hidden or image.children or image.raw or p is None or p.error
            or p.raw or not p.hidden or len(p.children) != 1
            or image.uuid.startswith(vhdchain.TMP_RENAME_PREFIX)):
        return None
    return p


def plan(images, skip, leaf_policy):
    """(garbage, coalesce candidates, leaf-coalesce candidates), deepest chains first."""
    garbage = sorted(u for u, i in images.items()
                     if i.hidden and not i.children and not i.error)
    coalesce = [u for u, i in images.items() if u not in skip and coalesceable(i)]
    coalesce.sort(key=lambda u: (-max(leaf.depth() for leaf in images[u].leaves()), u))
    leaves = [u for u, i in images.items() if u not in skip and leaf_coalesceable(i)]
    if leaf_policy is not None:
        leaves = [u for u in leaves if leaf_policy(u) != NEVER]
    leaves.sort()
    return garbage, coalesce, leaves


def pending(garbage, coalesce, leaves):
    return {"garbage": len(garbage), "coalesce": len(coalesce), "leaf-coalesce": len(leaves)}


def describe_pending(p):
    return ", ".join("%d %s" % (p[k], k) for k in ("garbage", "coalesce", "leaf-coalesce"))


# -- the command -----------------------------------------------------------------------------
def load_sr(sr_uuid, session_ref, host_ref):
    """The SR's driver object, as a driver call would build it, on the SR's SM session."""
    import importlib
    from smtap.sm import request as requestlib
    from smtap.sm import xapi
    x = xapi.session(session_ref).xenapi
    sr_ref = x.SR.get_by_uuid(sr_uuid)
    record = x.SR.get_record(sr_ref)
    pbds = [x.PBD.get_record(p) for p in record["PBDs"]]
    mine = [p for p in pbds if not host_ref or p["host"] == host_ref] or pbds
    if not mine:
        raise RuntimeError("SR %s has no PBD" % sr_uuid)
    drivers = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drivers")
    names = [n[:-3] for n in os.listdir(drivers)
             if n.lower() == record["type"].lower() + "sr.py"]
    if not names:
        raise RuntimeError("no driver for SR type %s" % record["type"])
    module = importlib.import_module("smtap.sm.drivers." + names[0])
    from smtap.sm.sr import SR
    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, SR)
               and c.__module__ == module.__name__ and c.VDI_CLASS is not None]
    params = {"command": "sr_scan", "host_ref": host_ref or mine[0]["host"], "args": [],
              "device_config": dict(mine[0]["device_config"], SRmaster="true"),
              "session_ref": session_ref, "sr_ref": sr_ref, "sr_uuid": sr_uuid}
    return classes[0](requestlib.Request("sr_scan", params))


def print_status(sr_uuid, out):
    state = gcctl.status(sr_uuid)
    if not state:
        out.write("never ran\n")
        return
    doing = state.get("doing") or ""
    out.write("%s%s%s\n" % (state["state"], "" if doing == state["state"] else ": " + doing,
                            " (%s)" % state["progress"] if state.get("progress") else ""))
    if any((state.get("pending") or {}).values()):
        out.write("left: %s\n" % describe_pending(state["pending"]))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="smtap-gc", description="garbage collector of VHD SRs (upstream cleanup.py)")
    parser.add_argument("-u", "--uuid", required=True, help="the SR")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("-g", "--gc", action="store_true",
                      help="collect now, in the foreground (with the SR's SM session in "
                           "$%s; without it, an SR scan starts it and this waits)" % gcctl.SESSION_ENV)
    what.add_argument("-a", "--abort", action="store_true", help="stop a running collector")
    what.add_argument("-q", "--query", action="store_true", help="is one running?")
    what.add_argument("-s", "--status", action="store_true",
                      help="what it is doing and how much is left")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else errno.EINVAL
    log.setup()
    log.set_context("gc", args.uuid)
    try:
        if args.query:
            print("Currently running: %s" % gcctl.running(args.uuid))
            return 0
        if args.status:
            print_status(args.uuid, sys.stdout)
            return 0
        if args.abort:
            gcctl.abort(args.uuid)
            return 0
        session = os.environ.get(gcctl.SESSION_ENV)
        if session:
            return GC(load_sr(args.uuid, session, os.environ.get(gcctl.HOST_ENV))).run()
        return scan_and_wait(args.uuid)
    except gcctl.AbortTimeout as e:
        sys.stderr.write("smtap-gc: %s\n" % e)
        return errno.ETIMEDOUT
    except Exception as e:
        log.exception("smtap-gc failed")
        sys.stderr.write("smtap-gc: %s\n" % errors.describe(e))
        return 1


def scan_and_wait(sr_uuid):
    """By hand: an SR scan through the toolstack starts the GC on the SR's SM session;
    follow it until it is idle."""
    from smtap.sm import xapi
    import XenAPI
    s = XenAPI.Session("http://localhost/", transport=xapi.UnixTransport(settings.xapi_socket()))
    s.xenapi.login_with_password("root", "", "1.0", "smtap-gc")
    try:
        s.xenapi.SR.scan(s.xenapi.SR.get_by_uuid(sr_uuid))
    finally:
        s.xenapi.session.logout()

    def watch(state):
        sys.stdout.write("%s%s\n" % (state.get("doing", ""), " (%s)" % state["progress"]
                                     if state.get("progress") else ""))
        sys.stdout.flush()
    gcctl.wait_idle(sr_uuid, timeout=3600, watch=watch)
    print_status(sr_uuid, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
