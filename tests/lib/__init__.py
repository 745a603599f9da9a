"""The tests' helper package: `from lib.engine import tap_ctl` (pytest.ini puts tests/ on
sys.path). One implementation of each helper; conftests only hold fixtures that call
these. Import a name from the module that defines it:

| module | holds |
|---|---|
| lib.checkout | TOP, VENV_BIN, VENV_PYTHON, VENV36, PY36, VERSION: this checkout's paths |
| lib.sizes | KiB, MiB, GiB, TiB |
| lib.procs | run (every command: text output, bad bytes replaced, argv as arguments or one list, check, timeout=120), sh (its stdout), wait_for, memory_of (/proc/<pid>/status) |
| lib.hosts | host_root (the smtap_root fixtures' root: made, then everything left under it removed), tapdisks_under, nbdfuse_mounts |
| lib.engine | tap_ctl, tap_list, tap_state, image_file, Tap, Served, nbd_uri, linked_tapdisk, qemu_io, nbd_size, nbd_map, Raw (+ NBDMAGIC, IHAVEOPT, REPLY_MAGIC) |
| lib.fs | tmpfs, used, make_fs, write_files, read_files, check_fs, crc32c, check_fio_blocks |
| lib.vdis | a VDI through XenAPI (x, vdi ref): link_path, nbd_uri, qemu_io, write, holds, tapdisk_of, minor_allocated, host_tags, vdi_call |
| lib.toolstack | failure, XeError, Host (installed root + smtap-xapi + XenAPI session + xe), DriverHost, E2EHost, traces, new_sr, new_vdi, dom0_vbd, raw_post, raw_call |
| lib.sm | the SM harness: xapi_value, xapi_call, params_for, vdi_create_args, install_driver, Reply, run_driver, Driver, FakeXapi, fake_xapi_server, dummy_driver, log_lines, helper_driver |
| lib.install | make, make_install, install_dev_tree (a host's tree, copied from one make install per process), build_rpm, the stock 8.3 host's files and upstream paths, host_env, driver_info, read_sm_plugins, dropin, confd, stock_host, py36_prefix, rpm_root, fake_rpm, rpm_query_list, rpm_install |
| lib.vhd | tool, vhd_util, td_util, sha, fingerprint, Model, random_writes, seeded; the engine tests' VHDs: vhd_chain, vhd_disk, vhd_check, VHD_DISKS, check_vhds |
| lib.filesr | the file SR on VHD: vhd_write (offline guest writes), chain_sha, vhd_tree, hidden_images, all_valid, leftovers, sr_location, retry_depth, fill_fs (a full file system), the GC: wait_gc, park, park_and_kill |
| lib.qcow2 | qcow2_util, qemu_view (what qemu reads of an image); the engine tests' qcow2 images: qcow2_chain, QCOW2_DISKS, qcow2_check, check_images (VHDs and qcow2 under a root) |
| lib.demo | run_demo (`make demo`'s module as a user runs it: its process and root), steps, STEP |
| lib.runlock | the run's lock under make test's workers (held, lock_path: a test marked `alone` runs with nothing beside it), the xdist groups GUEST_BOOTS and PY36_BUILDS |
| lib.guests | GuestHost (the e2e host with VMs of the built-in template: new_vm, set_script, console, results, wait_console, wait_state, wait_agent, run_to_halt, qemus, leftovers), why_not |
| lib/drivers/ | SR drivers run as programs: testsr.py, listing_driver.py, noisy_driver.py, upstream_sr.py |

Where the helpers were (for a branch written before): each old module's names still
import from its new module, but for these:
| was | now |
|---|---|
| `from enginelib import X` | `from lib.engine import X` (the VHD helpers are lib.vhd's); qemu_io returns the CompletedProcess (what it returned is its `.output`); tapdisks_under gives (pid, command line) pairs |
| `from drivers_helpers import X` | `from lib.vdis import X`; failure: lib.toolstack; run_driver: folded into vdi_call |
| `from e2e_helpers import X` | `from lib.fs import X`; traces: lib.toolstack |
| `from installlib import X` | `from lib.install import X`; run is lib.procs.run (timeout 120 by default) |
| `from sm_harness import X` | `from lib.sm import X`; the xapi and dummy fixtures are tests/sm/conftest.py's |
| `from toolstack_util import X` | `from lib.toolstack import X` |
| `from vhdlib import X` | `from lib.vhd import X`; run: lib.vhd.tool; qemu: lib.procs.run |
| `from test_api import new_sr, ...` | `from lib.toolstack import new_sr, ...` |
| Host (tests/toolstack/conftest.py), DriverHost (tests/drivers/conftest.py), E2EHost, XeError (tests/e2e/conftest.py) | lib.toolstack; start_session() starts and logs in (x, session_obj), cleanup() logs out, stops, removes what is left |
| tests/sm/*_driver.py, tests/toolstack/testsr.py, tests/e2e/upstream_sr.py | tests/lib/drivers/ |
| `MiB = 1 << 20` in a test | `from lib.sizes import MiB` |
| a local vhd_util, sha, new_sr, NBD URI string | lib.vhd.vhd_util (check=<status>, .text), lib.vhd.sha, lib.toolstack.new_sr(x, name, sr_type), lib.engine.nbd_uri |
"""
