"""What the README states about the code's layout holds: the sm/ modules it names are the
ones there are, SM reaches the engine only through the modules it says, and each
profile's runtime and lock directories are settings'."""
import ast
import glob
import os
import re

from lib.checkout import TOP
from smtap import names, settings


def readme():
    with open(os.path.join(TOP, "README.md"), encoding="utf-8") as f:
        return f.read()


def table_row(text, first_cell):
    (row,) = [line for line in text.splitlines() if line.startswith("| %s |" % first_cell)]
    return row


def test_the_sm_row_names_every_module_of_sm_and_no_other():
    named = set(re.findall(r"`(\w+)\.py`", table_row(readme(), "`sm/`")))
    there = set(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(TOP, "sm", "*.py")))
    assert named == there - {"__init__"}


def engine_imports(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smtap.tapdisk"):
            found.add(node.module)
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("smtap.tapdisk"))
    return found


def test_sm_reaches_the_engine_only_where_the_readme_says():
    text = readme()
    assert "all of it in `sm/tapvbd.py` and\n`sm/disktypes.py`" in text
    files = glob.glob(os.path.join(TOP, "sm", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(TOP, "plugins", "smtap-*"))
    importers = sorted(os.path.relpath(p, TOP) for p in files if engine_imports(p))
    assert importers == ["sm/disktypes.py", "sm/tapvbd.py"]


def test_profile_table_is_settings():
    text = readme()
    for profile, paths in settings.PROFILES.items():
        row = table_row(text, profile)
        assert "`%s`" % paths["runtime"] in row and "`%s/<ns>/<name>`" % paths["locks"] in row
    for name in (names.ctl_name(0)[:-1], names.LINKS, names.MINORS + "/" + names.MARKER):
        assert "`%s" % name in text


def smtap_imports(path):
    """The smtap packages a file imports (smtap.sm, smtap.tapdisk, ...)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names_ = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names_ = [node.module] + ["%s.%s" % (node.module, a.name) for a in node.names]
        else:
            continue
        found.update(".".join(n.split(".")[:2]) for n in names_ if n.startswith("smtap."))
    return found


def test_the_layers_import_one_way():
    """formats <- tapdisk <- sm (README "Layout"): a format imports neither the engine
    nor SM nor the toolstack; the engine knows nothing of SM or the toolstack."""
    below = {"formats": {"smtap.tapdisk", "smtap.sm", "smtap.toolstack"},
             "tapdisk": {"smtap.sm", "smtap.toolstack"}}
    for layer, banned in below.items():
        files = glob.glob(os.path.join(TOP, layer, "**", "*.py"), recursive=True)
        assert files
        wrong = sorted((os.path.relpath(p, TOP), sorted(smtap_imports(p) & banned))
                       for p in files if smtap_imports(p) & banned)
        assert wrong == []
