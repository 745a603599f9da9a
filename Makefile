# smtap: build, test, demo, install, rpm.
SHELL := /bin/bash
TOP := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(TOP)/.venv
VPY := $(VENV)/bin/python3
VERSION := $(shell cat $(TOP)/VERSION)

# Debian packages the build, tests and benchmarks use.
DEB_PACKAGES := python3-venv qemu-utils nbdkit nbdkit-plugin-python libnbd-bin fio \
	fuse3 libaio-dev libffi-dev rpm e2fsprogs util-linux gcc python3-dev

# Engine and toolstack commands: name=module.
COMMANDS := tapdisk=smtap.tapdisk.daemon tap-ctl=smtap.tapdisk.tapctl \
	vhd-util=smtap.tapdisk.vhdutil smtap-xapi=smtap.toolstack.server xe=smtap.toolstack.xe

# Install layout (make install DESTDIR=...).
PYTHON ?= /usr/bin/python3
PREFIX := /opt/smtap
LIBDIR := $(PREFIX)/lib
SMDIR := /opt/xensource/sm
PLUGINDIR := /etc/xapi.d/plugins
# SR types installed; the RPM narrows this to the types a stock host does not have.
SR_TYPES ?= $(patsubst sm/drivers/%SR.py,%,$(wildcard sm/drivers/*SR.py))

.PHONY: build deps venv cffi commands test demo install rpm bench clean vermin

build: deps venv cffi commands

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements.txt
	test -x $(VPY) || python3 -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.txt
	echo $(TOP) > $$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/smtap-checkout.pth
	touch $@

cffi: $(VENV)/.stamp
	@$(VPY) tapdisk/aio_build.py --if-needed

commands: $(VENV)/.stamp
	@for c in $(COMMANDS); do \
		name=$${c%%=*}; mod=$${c#*=}; \
		sed -e "s|@PYTHON@|$(VPY)|" -e "s|@LIBREL@|../lib|" -e "s|@MODULE@|$$mod|" \
			bin/launcher.in > $(VENV)/bin/$$name.tmp; \
		chmod 755 $(VENV)/bin/$$name.tmp; \
		cmp -s $(VENV)/bin/$$name.tmp $(VENV)/bin/$$name && rm $(VENV)/bin/$$name.tmp || mv $(VENV)/bin/$$name.tmp $(VENV)/bin/$$name; \
	done

vermin: build
	$(VENV)/bin/vermin --target=3.6- --no-tips --violations sm tapdisk plugins smtap

test: build
	$(VENV)/bin/pytest -q tests

demo: build
	$(VPY) -m smtap.toolstack.demo

bench: build
	$(VPY) bench/engine.py

# --- install: the tree as on a host, relocatable --------------------------------------
install:
	install -d $(DESTDIR)$(LIBDIR)/smtap $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SMDIR) \
		$(DESTDIR)$(PLUGINDIR) $(DESTDIR)/etc/xapi.conf.d $(DESTDIR)/etc/logrotate.d
	cp smtap/*.py $(DESTDIR)$(LIBDIR)/smtap/
	for d in sm tapdisk toolstack; do \
		rm -rf $(DESTDIR)$(LIBDIR)/smtap/$$d; \
		tar -C $(TOP) --exclude=__pycache__ --exclude='*.pyc' --exclude=_aio_build -cf - $$d | tar -C $(DESTDIR)$(LIBDIR)/smtap -xf -; \
	done
	for c in $(COMMANDS); do \
		name=$${c%%=*}; mod=$${c#*=}; \
		sed -e "s|@PYTHON@|$(PYTHON)|" -e "s|@LIBREL@|../lib|" -e "s|@MODULE@|$$mod|" \
			bin/launcher.in > $(DESTDIR)$(PREFIX)/bin/$$name; \
		chmod 755 $(DESTDIR)$(PREFIX)/bin/$$name; \
	done
	for t in $(SR_TYPES); do \
		sed -e "s|@PYTHON@|$(PYTHON)|" -e "s|@LIBREL@|../../smtap/lib|" -e "s|@MODULE@|smtap.sm.drivers.$${t}SR|" \
			bin/launcher.in > $(DESTDIR)$(SMDIR)/$${t}SR; \
		chmod 755 $(DESTDIR)$(SMDIR)/$${t}SR; \
	done
	for p in plugins/smtap-*; do \
		[ -e "$$p" ] || continue; \
		sed -e "s|@PYTHON@|$(PYTHON)|" -e "s|@LIBREL@|../../../opt/smtap/lib|" $$p > $(DESTDIR)$(PLUGINDIR)/$$(basename $$p); \
		chmod 755 $(DESTDIR)$(PLUGINDIR)/$$(basename $$p); \
	done
	echo "sm-plugins = $$(echo $(SR_TYPES) | tr 'A-Z' 'a-z')" > $(DESTDIR)/etc/xapi.conf.d/smtap.conf
	printf '/var/log/smtap/*.log {\n\tweekly\n\trotate 4\n\tcompress\n\tmissingok\n\tnotifempty\n}\n' > $(DESTDIR)/etc/logrotate.d/smtap

clean:
	rm -rf $(VENV) build rpmbuild tapdisk/_aio_build
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f tapdisk/_smtap_aio*.so
