"""The tests' own layout (README "Tests"): conftests hold fixtures only, helpers live in
tests/lib once, no test module is imported as a library."""
import ast
import glob
import os

from lib.checkout import TOP

TESTS = os.path.join(TOP, "tests")
LIB = os.path.join(TESTS, "lib")


def modules(pattern):
    return sorted(glob.glob(os.path.join(TESTS, "**", pattern), recursive=True))


def parsed(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def string_of(node):
    """A string literal's value (ast.Constant from 3.8, ast.Str on dom0's 3.6), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return node.s if type(node).__name__ == "Str" else None


def is_fixture(decorator):
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture"


def test_conftests_hold_fixtures_and_hooks_only():
    found = []
    for path in modules("conftest.py"):
        for node in parsed(path).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and string_of(node.value) is not None:
                continue                                    # the docstring
            if isinstance(node, ast.FunctionDef) and (
                    node.name.startswith("pytest_") or any(map(is_fixture, node.decorator_list))):
                continue
            found.append("%s:%d" % (os.path.relpath(path, TOP), node.lineno))
    assert found == [], "helpers go to tests/lib: " + ", ".join(found)


def lib_names():
    names = {}
    for path in glob.glob(os.path.join(LIB, "*.py")):
        for node in parsed(path).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.setdefault(node.name, os.path.relpath(path, TESTS))
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and not t.id.startswith("_"):
                        names.setdefault(t.id, os.path.relpath(path, TESTS))
    return names


def test_no_test_module_defines_a_helper_of_tests_lib_again():
    names = lib_names()
    assert "run" in names and "MiB" in names and "tap_ctl" in names
    found = []
    for path in modules("test_*.py") + modules("conftest.py"):
        if path.startswith(LIB + os.sep):
            continue
        for node in parsed(path).body:
            defined = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            found += ["%s:%d %s (%s has it)" % (os.path.relpath(path, TOP), node.lineno, n,
                                                names[n]) for n in defined if n in names]
    assert found == []


def test_no_test_module_or_conftest_is_imported_as_a_library():
    """Neither by name (test modules and conftests are not libraries: each directory has
    a conftest, whichever pytest loaded last would win) nor by path."""
    found = []
    for path in modules("*.py"):
        for node in ast.walk(parsed(path)):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += ["%s:%d %s" % (os.path.relpath(path, TOP), node.lineno, m) for m in imported
                      if m.split(".")[-1] == "conftest" or m.split(".")[-1].startswith("test_")]
            func = getattr(node, "func", None)
            if getattr(func, "attr", getattr(func, "id", None)) == "spec_from_file_location":
                found.append("%s:%d loads a module by path" % (os.path.relpath(path, TOP),
                                                                node.lineno))
    assert found == []
