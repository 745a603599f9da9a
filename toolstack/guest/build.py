"""Build the tiny guest the local toolstack boots: a kernel and an initramfs, from Debian
packages, cached under build/guest (never committed).

    python3 toolstack/guest/build.py [--out DIR] [--if-needed]

- the kernel: linux-image-cloud-amd64's kernel package, fetched with `apt-get download`
  (into DIR/../guest-cache, kept) and unpacked with `dpkg-deb -x`: nothing is installed
  on this machine. The modules the guest needs (virtio_blk, virtio_pci, qemu_fw_cfg, the
  ACPI button, evdev, pvpanic) are taken from the same package with their dependencies
  (`depmod` on the unpacked tree), in load order;
- the initramfs: busybox-static, fio, mke2fs/e2fsck and the shared libraries they need
  (as `ldd` lists them), the modules, and `init` (toolstack/guest/init), packed by cpio.

--if-needed: nothing is done when DIR holds an image made by this builder from the same
init, the same builder and the same host packages (busybox-static, fio, e2fsprogs).
Output: DIR/vmlinuz, DIR/initrd.img, DIR/manifest.json.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
INIT = os.path.join(HERE, "init")
KERNEL_META = "linux-image-cloud-amd64"
# What the guest loads; their dependencies come from modules.dep.
MODULES = ["virtio_pci", "virtio_blk", "qemu_fw_cfg", "button", "evdev", "pvpanic_pci"]
# Host binaries copied with their libraries: fio, and mkfs/fsck for ext4.
BINARIES = ["/usr/bin/fio", "/usr/sbin/mke2fs", "/usr/sbin/e2fsck"]
LINKS = {"/usr/sbin/mkfs.ext4": "mke2fs", "/usr/sbin/fsck.ext4": "e2fsck"}
BUSYBOX = "/bin/busybox"
ETC_FILES = ["/etc/mke2fs.conf"]
PACKAGES = ["busybox-static", "fio", "e2fsprogs"]
# fio's libraries for engines the guest never runs (Gluster, Ceph, RDMA, PMEM, NBD): 80
# MiB with what they load, and seconds of loading for each fio under TCG. The guest gets
# stubs instead: the same sonames and symbol versions, functions that trap.
STUBBED = ["libgfapi.so.0", "librados.so.2", "librbd.so.1", "libibverbs.so.1",
           "librdmacm.so.1", "libpmemblk.so.1", "libpmem.so.1", "libnbd.so.0"]


def log(msg):
    sys.stdout.write("guest: %s\n" % msg)
    sys.stdout.flush()


def run(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, universal_newlines=True,
                          **kw).stdout


def host_versions():
    out = run(["dpkg-query", "-W", "-f", "${Package}=${Version}\n"] + PACKAGES)
    return sorted(out.split())


def stamp():
    """What the image is made of: a new one is built when any of it changes."""
    h = hashlib.sha256()
    for path in (INIT, os.path.abspath(__file__)):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update("\n".join(host_versions()).encode())
    return h.hexdigest()


def up_to_date(out):
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("stamp") == stamp() and all(
        os.path.exists(os.path.join(out, n)) for n in ("vmlinuz", "initrd.img"))


# --- the kernel package ------------------------------------------------------------------
def candidate(package):
    """The version apt would fetch of package, or None (no list names it)."""
    out = run(["apt-cache", "policy", package])
    m = re.search(r"^\s*Candidate: (\S+)", out, re.M)
    return m.group(1) if m and m.group(1) != "(none)" else None


def download(cache, package):
    """The .deb of `package` in the cache, fetched by apt-get download if missing."""
    os.makedirs(cache, exist_ok=True)
    version = candidate(package)
    if not version:
        # a fresh container ships no package lists: fetch them once
        log("apt knows no %s: apt-get update" % package)
        subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
        version = candidate(package)
    if not version:
        raise SystemExit("guest: apt knows no package %s (its sources?)" % package)
    name = "%s_%s_amd64.deb" % (package, version.replace(":", "%3a"))
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        log("apt-get download %s=%s" % (package, version))
        # as root the download would be run unsandboxed anyway: say so, quietly
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                        "%s=%s" % (package, version)], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    return path


def kernel_package(cache):
    """The versioned kernel package the metapackage depends on."""
    meta = download(cache, KERNEL_META)
    depends = run(["dpkg-deb", "-f", meta, "Depends"])
    m = re.search(r"(linux-image-[0-9][^\s,(]*)", depends)
    if not m:
        raise SystemExit("guest: %s depends on no kernel package: %s" % (KERNEL_META, depends))
    return m.group(1)


def unpack_kernel(deb, where):
    run(["dpkg-deb", "-x", deb, where])
    versions = os.listdir(os.path.join(where, "lib", "modules"))
    if len(versions) != 1:
        raise SystemExit("guest: expected one kernel in %s, found %s" % (deb, versions))
    version = versions[0]
    run(["depmod", "-b", where, version])
    return version


def module_order(moddir, wanted):
    """Module files (relative to moddir) in load order: dependencies first."""
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
    by_name = dict((os.path.basename(p)[:-len(".ko")].replace("-", "_"), p) for p in deps)
    order = []

    def visit(path):
        # modules.dep lists every dependency, indirect ones too, deepest last
        for dep in reversed(deps[path]):
            if dep not in order:
                visit(dep)
        if path not in order:
            order.append(path)
    for name in wanted:
        if name not in by_name:
            raise SystemExit("guest: the kernel has no module %s" % name)
        visit(by_name[name])
    return order


# --- the initramfs -----------------------------------------------------------------------
def libraries(binary, env=None):
    """The shared objects a binary loads, as the dynamic linker resolves them."""
    found = []
    for line in run(["ldd", binary], env=env).splitlines():
        m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            found.append(m.group(1))
    return found


def imports(binary):
    """{symbol: version or None} of the functions a binary imports."""
    found = {}
    for line in run(["readelf", "--dyn-syms", "-W", binary]).splitlines():
        f = line.split()
        if len(f) >= 8 and f[3] == "FUNC" and f[6] == "UND":
            name, _, version = f[7].partition("@")
            found[name] = version.split(" ")[0] or None
    return found


def exports(library):
    """The names of the dynamic symbols a library defines."""
    return set(line.split()[0].split("@")[0] for line in
               run(["nm", "-D", "--defined-only", "--format=posix", library]).splitlines()
               if line.strip())


def make_stubs(binary, where):
    """Stub libraries for the binary's STUBBED ones: {real path: stub path}."""
    real = dict((os.path.basename(p), p) for p in libraries(binary))
    wanted = imports(binary)
    stubs = {}
    for soname in STUBBED:
        if soname not in real:
            continue
        mine = sorted(n for n in exports(real[soname]) if n in wanted)
        versions = {}
        for name in mine:
            versions.setdefault(wanted[name], []).append(name)
        src, script = os.path.join(where, soname + ".c"), os.path.join(where, soname + ".map")
        stub = os.path.join(where, soname)
        with open(src, "w") as f:
            f.write("".join("void %s(void) { __builtin_trap(); }\n" % n for n in mine))
        nodes = "".join("%s { global: %s; };\n" % (v, "; ".join(names))
                        for v, names in sorted(versions.items()) if v)
        with open(script, "w") as f:
            f.write(nodes)
        run(["gcc", "-shared", "-fPIC", "-nostdlib", "-O2", "-Wl,-soname," + soname,
             "-o", stub, src] + (["-Wl,--version-script=" + script] if nodes else []))
        stubs[real[soname]] = stub
    return stubs


def copy(src, root, dest=None):
    """src (its target, if a link) at the same path (or dest) under root."""
    target = os.path.join(root, (dest or src).lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.realpath(src), target)


def make_root(root, kernel_tree, version):
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "mnt", "etc",
              "run"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    copy(BUSYBOX, root)
    for applet in run([BUSYBOX, "--list"]).split():
        link = os.path.join(root, "bin", applet)
        if applet != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    shutil.copy2(INIT, os.path.join(root, "init"))
    os.chmod(os.path.join(root, "init"), 0o755)
    stub_dir = os.path.join(os.path.dirname(root), "stubs")
    os.makedirs(stub_dir, exist_ok=True)
    for binary in BINARIES:
        copy(binary, root)
        stubs = make_stubs(binary, stub_dir)
        # what the binary loads with the stubs in place of the real ones: none of theirs
        env = dict(os.environ, LD_LIBRARY_PATH=stub_dir)
        by_name = dict((os.path.basename(real), real) for real in stubs)
        for lib in libraries(binary, env):
            if lib.startswith(stub_dir + "/"):
                copy(lib, root, by_name[os.path.basename(lib)])
            else:
                copy(lib, root)
    for link, target in LINKS.items():
        os.symlink(target, os.path.join(root, link.lstrip("/")))
    for path in ETC_FILES:
        if os.path.exists(path):
            copy(path, root)
    moddir = os.path.join(kernel_tree, "lib", "modules", version)
    order = module_order(moddir, MODULES)
    for rel in order:
        copy(os.path.join(moddir, rel), root, "/lib/modules/%s/%s" % (version, rel))
    with open(os.path.join(root, "etc", "modules"), "w") as f:
        f.write("".join("/lib/modules/%s/%s\n" % (version, rel) for rel in order))
    return order


def pack(root, out):
    """An uncompressed newc cpio: the kernel unpacks it faster than it would inflate one."""
    names = run(["find", ".", "-mindepth", "1"], cwd=root).split("\n")
    listing = "\n".join(sorted(n for n in names if n)) + "\n"
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible",
                        "--owner=0:0"], input=listing.encode(), cwd=root, stdout=f,
                       check=True)


def build(out):
    cache = os.path.join(os.path.dirname(out), "guest-cache")
    package = kernel_package(cache)
    deb = download(cache, package)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="guest-", dir=os.path.dirname(out))
    try:
        tree, root = os.path.join(work, "kernel"), os.path.join(work, "root")
        version = unpack_kernel(deb, tree)
        modules = make_root(root, tree, version)
        pack(root, os.path.join(work, "initrd.img"))
        shutil.copy2(os.path.join(tree, "boot", "vmlinuz-" + version),
                     os.path.join(work, "vmlinuz"))
        manifest = {"stamp": stamp(), "kernel_package": package, "kernel": version,
                    "modules": [os.path.basename(m) for m in modules],
                    "packages": host_versions(),
                    "binaries": [os.path.basename(b) for b in BINARIES]}
        for name in ("vmlinuz", "initrd.img"):
            os.rename(os.path.join(work, name), os.path.join(out, name))
        with open(os.path.join(out, "manifest.json.tmp"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.rename(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = os.path.getsize(os.path.join(out, "initrd.img"))
    log("built %s: kernel %s, initramfs %.1f MiB" % (out, version, size / 2.0 ** 20))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="guest-build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(TOP, "build", "guest"))
    parser.add_argument("--if-needed", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.if_needed and up_to_date(out):
        return 0
    build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
