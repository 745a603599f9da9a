#!/usr/bin/env python3
"""A/B of this tree's engine against another tree's (e.g. main's), with
qemu-storage-daemon on the same raw file for the ratio to a peer.

bench/engine.py's machinery: fio's nbd engine on the unix socket, the servers
alternating within each job (order reversed every other round), medians. The other
tree's engine runs through its own tap-ctl (its .venv/bin first on PATH): build it
first (`make build` there).

    .venv/bin/python3 bench/ab.py /work/main [--groups aio,aio-D] [--runtime 5]
        [--rounds 3] [--jobs '4k randread QD1,...'] [--size-mib 1024]
"""
import argparse
import os
import shutil
import sys
import tempfile

import engine as E


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", help="the other tree (its .venv built)")
    E.common_arguments(parser)
    parser.add_argument("--groups", default="aio,aio-D", help="aio (O_DIRECT), aio-D")
    parser.add_argument("--jobs", default="4k randread QD1,4k randread QD32,"
                        "4k randwrite QD1,4k randwrite QD32",
                        help="bench/engine.py's job labels, comma separated")
    args = E.parse(parser)
    jobs = [j for j in E.JOBS if j[0] in args.jobs.split(",")]
    size = args.size_mib << 20
    tmp = tempfile.mkdtemp(prefix="smtap-ab-", dir="/var/tmp")
    new, base = E.Servers(os.path.join(tmp, "new")), E.Servers(os.path.join(tmp, "base"))
    base.env["PATH"] = os.path.join(os.path.abspath(args.base), ".venv", "bin") + os.pathsep \
        + base.env["PATH"]
    rows = []
    try:
        data = E.make_raw(os.path.join(tmp, "disk.raw"), size)
        for group in args.groups.split(","):
            flags, warm = (("-D",), data) if group == "aio-D" else ((), None)
            members = [base.engine("base", "aio:" + data, *flags, warm=warm),
                       new.engine("new", "aio:" + data, *flags, warm=warm),
                       new.qsd("qsd", data, "raw", not flags)]
            try:
                for label, r in E.run_group(group, members, jobs, args, size).items():
                    rows.append((group, label, r["base"][0], r["new"][0], r["qsd"][0]))
            finally:
                for m in members:
                    m.stop()
    finally:
        new.close()
        base.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("| group | job | base IOPS | new IOPS | qsd IOPS | new/base | new/qsd |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for group, label, b, n, q in rows:
        print("| %s | %s | %.0f | %.0f | %.0f | %.2fx | %.2fx |" % (group, label, b, n, q,
                                                                  n / b, n / q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
