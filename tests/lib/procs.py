"""Running commands (text output, undecodable bytes replaced, never an exception),
waiting for a condition, and what /proc says of a process."""
import os
import subprocess
import time


def run(*cmd, check=True, timeout=120, input=None, env=None, cwd=None, text=True):
    """Run a command: its CompletedProcess. cmd: the argv as arguments, or one list.
    check: a non-zero exit fails the test with both outputs. text=False: bytes."""
    if len(cmd) == 1 and isinstance(cmd[0], (list, tuple)):
        cmd = cmd[0]
    argv = [str(c) for c in cmd]
    decode = {"encoding": "utf-8", "errors": "replace"} if text else {}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, input=input,
                          env=env, cwd=cwd, timeout=timeout, **decode)
    if check and proc.returncode:
        raise AssertionError("%s failed (exit %d)\nstdout: %s\nstderr: %s" % (
            " ".join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc


def sh(*cmd, **kw):
    """run(...)'s stdout."""
    return run(*cmd, **kw).stdout


def wait_for(predicate, timeout=10.0, interval=0.02):
    """True as soon as predicate() is; after timeout seconds, its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def memory_of(pid):
    """{"VmRSS": bytes, "RssAnon": ..., "RssFile": ..., "RssShmem": ...} of a process
    (/proc/<pid>/status)."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def fd_flags_of(pid, path):
    """The open flags of every fd of process pid on path (/proc/<pid>/fdinfo)."""
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) != str(path):
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                out.append(int(f.read().split("flags:")[1].split()[0], 8))
        except OSError:
            pass
    return out
