# smtap: build, test, demo, install, rpm.
SHELL := /bin/bash
TOP := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(TOP)/.venv
VPY := $(VENV)/bin/python3
VERSION := $(shell cat $(TOP)/VERSION)

# Debian packages the build, tests, benchmarks and demo use (README "Dependencies" lists
# the same; tests/test_dependencies.py checks both, and that every tool they run is here).
# file: nbdinfo runs it for its "content" field and libnbd-bin does not depend on it.
# qemu-system-x86 runs the local toolstack's guests; busybox-static, cpio, kmod (depmod)
# make the guest's initramfs (toolstack/guest/build.py).
DEB_PACKAGES := python3-venv gcc libaio-dev binutils \
	qemu-utils qemu-system-common nbdkit nbdkit-plugin-python libnbd-bin file fio \
	fuse3 mount util-linux e2fsprogs rpm logrotate \
	qemu-system-x86 busybox-static cpio kmod

# Engine and toolstack commands: name=module.
COMMANDS := tapdisk=smtap.tapdisk.daemon tap-ctl=smtap.tapdisk.tapctl \
	smtap-xapi=smtap.toolstack.server xe=smtap.toolstack.xe \
	smtap-sm-plugins=smtap.xapiconf vhd-util=smtap.formats.vhdutil td-util=smtap.formats.tdutil \
	smtap-gc=smtap.sm.gc \
	qcow2-util=smtap.formats.qcow2util

# Install layout (make install DESTDIR=...). PYTHON: the launchers' interpreter.
PYTHON ?= /usr/bin/python3
PREFIX := /opt/smtap
LIBDIR := $(PREFIX)/lib
SMDIR := /opt/xensource/sm
PLUGINDIR := /etc/xapi.d/plugins
# What `make install` lays out (the dev tree: everything). SR types = sm/drivers/<Type>SR.py.
ALL_SR_TYPES := $(patsubst $(TOP)/sm/drivers/%SR.py,%,$(wildcard $(TOP)/sm/drivers/*SR.py))
SR_TYPES ?= $(ALL_SR_TYPES)
LIB_PACKAGES ?= formats sm tapdisk toolstack
INSTALL_COMMANDS ?= $(COMMANDS)
# The tree's profile (smtap/settings.py): dev keeps upstream's runtime and lock paths,
# host (install-host, the RPM) the suite's own.
PROFILE ?= dev
# What the RPM (`make install-host`) lays out: only SR types a stock XCP-ng host lacks,
# no dev toolstack, engine commands under /opt/smtap/bin only.
RPM_SR_TYPES := ram
RPM_LIB_PACKAGES := formats sm tapdisk
RPM_COMMAND_NAMES := tapdisk tap-ctl vhd-util td-util qcow2-util smtap-sm-plugins smtap-gc
RPMTOP ?= $(TOP)/rpmbuild
RPMBUILD_FLAGS ?= --nodeps
# The launchers' interpreter in the RPM (dom0's); the tests build a variant with the
# venv's to run the installed drivers on this machine.
RPM_PYTHON ?= /usr/bin/python3

.PHONY: build deps venv venv-owner aio commands guest test demo install install-host rpm bench clean vermin py36

build: deps venv aio commands guest

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: venv-owner $(VENV)/.stamp

# A venv copied along with its checkout (cp -a) still runs the original checkout's code:
# its scripts' #! lines name the original venv, its smtap-checkout.pth the original tree.
# Repoint both at this checkout (the #! of pip says whose venv it is).
venv-owner:
	@old=$$(sed -n '1s|^#!\(.*\)/\.venv/bin/python3*$$|\1|p' $(VENV)/bin/pip 2>/dev/null); \
	if [ -n "$$old" ] && [ "$$old" != "$(TOP)" ]; then \
		echo "venv: $(VENV) was made for $$old: repointing it to $(TOP)"; \
		grep -rlIF -- "$$old/.venv" $(VENV)/bin $(VENV)/pyvenv.cfg | xargs -r sed -i "s|$$old/\.venv|$(VENV)|g"; \
		echo $(TOP) > $$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/smtap-checkout.pth; \
	fi

$(VENV)/.stamp: requirements.txt
	test -x $(VPY) || python3 -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.txt
	echo $(TOP) > $$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/smtap-checkout.pth
	touch $@

# The libaio batch library (tapdisk/libsmtap-aio.so.1, loaded with ctypes): one object for
# every interpreter.
aio:
	@python3 tapdisk/aio_build.py --if-needed

# The local toolstack's guest (kernel + initramfs from Debian packages, nothing installed):
# made when missing or when what it is made of changed; the kernel .deb is kept in
# build/guest-cache.
GUEST_DIR := $(TOP)/build/guest
guest:
	@python3 toolstack/guest/build.py --if-needed --out $(GUEST_DIR)

commands: $(VENV)/.stamp
	@for c in $(COMMANDS); do \
		name=$${c%%=*}; mod=$${c#*=}; \
		sed -e "s|@PYTHON@|$(VPY)|" -e "s|@LIBREL@|../lib|" -e "s|@MODULE@|$$mod|" \
			bin/launcher.in > $(VENV)/bin/$$name.tmp; \
		chmod 755 $(VENV)/bin/$$name.tmp; \
		cmp -s $(VENV)/bin/$$name.tmp $(VENV)/bin/$$name && rm $(VENV)/bin/$$name.tmp || mv $(VENV)/bin/$$name.tmp $(VENV)/bin/$$name; \
	done

# py36: .venv36/ on dom0's Python 3.6 (PYTHON36, python3.6 or pyenv's) with what dom0
# has beside the standard library: XenAPI (xapi-core's); for tests/dom0 and `make rpm`.
# Beside it, not in it (.venv36 holds only what dom0 has), pytest for 3.6: the releases
# that still run on it, pinned with their dependencies, for %check's tests/unit.
VENV36 := $(TOP)/.venv36
PY36_PACKAGES := XenAPI==26.21.1
PY36_TEST_DIR := $(VENV36)/test-packages
PY36_TEST_PACKAGES := pytest==7.0.1 pytest-timeout==2.1.0 attrs==22.2.0 iniconfig==1.1.1 \
	packaging==21.3 pyparsing==3.0.9 pluggy==1.0.0 py==1.11.0 tomli==1.2.3 \
	importlib-metadata==4.8.3 zipp==3.6.0 typing-extensions==4.1.1
PY36_CANDIDATES ?= $(PYTHON36) python3.6 /root/.pyenv/versions/3.6.*/bin/python3.6
py36:
	@set -e; is36() { "$$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 6))' >/dev/null 2>&1; }; \
	py=; for c in $(PY36_CANDIDATES); do \
		if is36 "$$c"; then py=$$c; break; fi; \
	done; \
	if [ -z "$$py" ]; then echo "py36: no Python 3.6 interpreter found (set PYTHON36=...): skipped"; exit 0; fi; \
	if ! is36 $(VENV36)/bin/python || [ "$$(cat $(VENV36)/.stamp 2>/dev/null)" != "$(PY36_PACKAGES)" ]; then \
		rm -rf $(VENV36); "$$py" -m venv $(VENV36); \
		$(VENV36)/bin/python -m pip install -q --disable-pip-version-check $(PY36_PACKAGES); \
		echo "$(PY36_PACKAGES)" > $(VENV36)/.stamp; \
	fi; \
	if [ "$$(cat $(PY36_TEST_DIR)/.stamp 2>/dev/null)" != "$(PY36_TEST_PACKAGES)" ]; then \
		rm -rf $(PY36_TEST_DIR); \
		$(VENV36)/bin/python -m pip install -q --disable-pip-version-check --no-deps \
			--target $(PY36_TEST_DIR) $(PY36_TEST_PACKAGES); \
		echo "$(PY36_TEST_PACKAGES)" > $(PY36_TEST_DIR)/.stamp; \
	fi

vermin: build
	$(VENV)/bin/vermin --target=3.6- --no-tips --violations sm tapdisk plugins smtap formats

# The suite on TEST_WORKERS pytest-xdist workers (0: in one process); --dist loadgroup
# keeps an xdist_group on one worker (tests/lib/runlock.py: which tests, and why).
TEST_WORKERS ?= 2
test: build
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

# DEMO=--guest: boot a guest too (README "Demo").
demo: build
	$(VPY) -m smtap.toolstack.demo $(DEMO)

bench: build
	$(VPY) bench/engine.py
	$(VPY) bench/sm_ops.py
	$(VPY) bench/vhd.py
	$(VPY) bench/filesr.py
	$(VPY) bench/qcow2.py
	$(VPY) bench/guest.py

# --- install: the tree as on a host, relocatable --------------------------------------
# Launchers find the private library relative to themselves (bin/launcher.in), so a
# DESTDIR tree runs in place and can be moved.
install:
	@set -e; for t in $(SR_TYPES); do [ -f $(TOP)/sm/drivers/$${t}SR.py ] || { echo "install: no driver sm/drivers/$${t}SR.py" >&2; exit 1; }; done
	install -d $(DESTDIR)$(LIBDIR)/smtap $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SMDIR) \
		$(DESTDIR)$(PLUGINDIR) $(DESTDIR)/etc/xapi.conf.d $(DESTDIR)/etc/logrotate.d
	rm -f $(DESTDIR)$(LIBDIR)/smtap/*.py
	cp $(TOP)/smtap/*.py $(DESTDIR)$(LIBDIR)/smtap/
	echo $(PROFILE) > $(DESTDIR)$(LIBDIR)/smtap/profile
	@set -e; for d in formats sm tapdisk toolstack; do \
		rm -rf $(DESTDIR)$(LIBDIR)/smtap/$$d; \
		case " $(LIB_PACKAGES) " in *" $$d "*) ;; *) continue;; esac; \
		[ -d $(TOP)/$$d ] || continue; \
		tar -C $(TOP) --exclude=__pycache__ --exclude='*.pyc' --exclude=_aio_build --exclude='*.tmp' \
			--exclude=aio_build.py --exclude='*.c' --exclude='*.h' -cf - $$d | tar -C $(DESTDIR)$(LIBDIR)/smtap -xf -; \
	done
	@set -e; rm -f $(DESTDIR)$(PREFIX)/bin/*; for c in $(INSTALL_COMMANDS); do \
		name=$${c%%=*}; mod=$${c#*=}; \
		sed -e "s|@PYTHON@|$(PYTHON)|" -e "s|@LIBREL@|../lib|" -e "s|@MODULE@|$$mod|" \
			$(TOP)/bin/launcher.in > $(DESTDIR)$(PREFIX)/bin/$$name; \
		chmod 755 $(DESTDIR)$(PREFIX)/bin/$$name; \
	done
	@set -e; for t in $(SR_TYPES); do \
		sed -e "s|@PYTHON@|$(PYTHON)|" -e "s|@LIBREL@|../../smtap/lib|" -e "s|@MODULE@|smtap.sm.drivers.$${t}SR|" \
			$(TOP)/bin/launcher.in > $(DESTDIR)$(SMDIR)/$${t}SR; \
		chmod 755 $(DESTDIR)$(SMDIR)/$${t}SR; \
	done
	@set -e; for p in $(TOP)/plugins/smtap-*; do \
		[ -e "$$p" ] || continue; \
		sed -e "s|@PYTHON@|$(PYTHON)|" -e "s|@LIBREL@|../../../opt/smtap/lib|" $$p > $(DESTDIR)$(PLUGINDIR)/$$(basename $$p); \
		chmod 755 $(DESTDIR)$(PLUGINDIR)/$$(basename $$p); \
	done
	@# Development profile: the root simulates a stock 8.3 host (its xapi.conf, unless it
	@# has one) and gets the sm-plugins drop-in from the code the RPM runs (smtap.xapiconf).
	@# The host profile (the RPM) carries neither: %post computes the drop-in on the host.
	@if [ "$(PROFILE)" = dev ] && [ -n "$(DESTDIR)" ]; then \
		SMTAP_ROOT=$(DESTDIR) PYTHONPATH=$(TOP) python3 -c 'from smtap import xapiconf; xapiconf.simulate_stock_host()' && \
		SMTAP_ROOT=$(DESTDIR) PYTHONPATH=$(TOP) python3 -m smtap.xapiconf --write >/dev/null; \
	fi
	@# The dev toolstack's guest image: a link to the checkout's (it is 25 MiB).
	@if case " $(LIB_PACKAGES) " in *" toolstack "*) true;; *) false;; esac && [ -d $(GUEST_DIR) ]; then \
		install -d $(DESTDIR)$(PREFIX)/share && ln -sfn $(GUEST_DIR) $(DESTDIR)$(PREFIX)/share/guest; \
	fi
	@printf '# smtap: the tapdisk engine log (smtap.settings.tapdisk_log_file).\n/var/log/smtap/*.log {\n\tweekly\n\trotate 4\n\tcompress\n\tdelaycompress\n\tmissingok\n\tnotifempty\n}\n' > $(DESTDIR)/etc/logrotate.d/smtap

# The host profile the RPM installs: see RPM_* above.
install-host:
	@$(MAKE) --no-print-directory -f $(TOP)/Makefile install \
		SR_TYPES="$(filter $(RPM_SR_TYPES),$(ALL_SR_TYPES))" \
		LIB_PACKAGES="$(RPM_LIB_PACKAGES)" PROFILE=host \
		INSTALL_COMMANDS="$(filter $(addsuffix =%,$(RPM_COMMAND_NAMES)),$(COMMANDS))"

# --- rpm: specfile.spec built with rpmbuild (dom0: XCP-ng 8.3) ------------------------
# The source tarball is the working tree (not just git HEAD). On this Debian machine
# BuildRequires can't be met by name, hence --nodeps. Built for dom0: the byte-code by
# dom0's Python 3.6 (.venv36, `make py36`; RPM_BUILD_PYTHON), which also runs %check;
# the launchers' shebang stays /usr/bin/python3 (dom0's); %check fails on byte-code of
# another Python or an object needing a newer glibc than el7's (bin/check-dom0-build),
# and runs tests/unit with the pytest of RPM_CHECK_PYTHONPATH.
RPM_BUILD_PYTHON ?= $(VENV36)/bin/python
RPM_CHECK_PYTHONPATH ?= $(PY36_TEST_DIR)
rpm: py36
	@[ -x "$(RPM_BUILD_PYTHON)" ] || { echo "rpm: no Python 3.6 to build for dom0 ($(RPM_BUILD_PYTHON)): make py36 found none, set PYTHON36=..." >&2; exit 1; }
	@missing="$(filter-out $(ALL_SR_TYPES),$(RPM_SR_TYPES))"; [ -z "$$missing" ] || echo "rpm: warning: no driver yet for SR type(s): $$missing (left out)" >&2
	rm -rf $(RPMTOP)
	mkdir -p $(RPMTOP)/SOURCES $(RPMTOP)/BUILD $(RPMTOP)/RPMS $(RPMTOP)/SRPMS
	tar -C $(TOP) --transform 's,^\.,smtap-$(VERSION),' \
		--exclude=./.git --exclude=./.venv --exclude=./.venv36 --exclude=./rpmbuild --exclude=./build \
		--exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' --exclude='*.so.[0-9]' --exclude=_aio_build \
		--exclude=.pytest_cache --exclude='*.tmp' --exclude=./tests/install \
		--warning=no-file-changed --warning=no-file-removed \
		-czf $(RPMTOP)/SOURCES/smtap-$(VERSION).tar.gz . || [ $$? -eq 1 ]
	cp $(TOP)/VERSION $(RPMTOP)/SOURCES/VERSION
	rpmbuild -ba $(RPMBUILD_FLAGS) --define "_topdir $(RPMTOP)" --define "__python3 $(RPM_BUILD_PYTHON)" \
		--define "smtap_python $(RPM_PYTHON)" --define "smtap_check_pythonpath $(RPM_CHECK_PYTHONPATH)" \
		$(TOP)/specfile.spec
	@ls $(RPMTOP)/RPMS/*/smtap-$(VERSION)-*.rpm

clean:
	rm -rf $(VENV) build rpmbuild tapdisk/_aio_build
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f tapdisk/libsmtap-aio.so* tapdisk/_smtap_aio*.so
