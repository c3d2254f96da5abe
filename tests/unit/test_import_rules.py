"""The floor plan, enforced: parts talk only through messages (docs/design.md, "The parts, and what may import what").

- shared/ imports nothing of vtorque but shared/ (it knows no service, no hook, no command);
- a service (services/<name>/) imports shared/ and itself, never another service, a hook or the cli;
- a hook imports shared/ and hooks/, never a service;
- the cli imports shared/, hooks/ and cli/; it names a service only in cli/main.py's table, to run it (by its
  dotted path, so no static import of a service appears in cli/ at all).
Every import counts, at module level or inside a function, absolute or relative; so does a service's module
named in a string (an importlib or `python -m` of it) by a part that may not import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"shared": "vtorque.shared", "services": "vtorque.services", "hooks": "vtorque.hooks", "cli": "vtorque.cli"}


def module_of(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PARTS[parts[0]], *parts[1:]])


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every vtorque import in the file."""
    module = module_of(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import mod` imports pkg.mod when mod is a module: count the deeper name as well.
            found += [(node.lineno, target)] + [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("vtorque.")]


def part_of(module: str) -> str:
    """'shared', 'hooks', 'cli', or 'services.<name>'."""
    bits = module.split(".")
    return ".".join(bits[1:3]) if bits[1] == "services" and len(bits) > 2 else bits[1]


ALSO_ALLOWED = {"hooks": {"hooks"}, "cli": {"cli", "hooks"}}  # beyond shared/ and the part itself


def may_import(importer: str, imported: str) -> bool:
    return imported in ("shared", importer) or imported in ALSO_ALLOWED.get(importer, set())


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(p for top in PARTS for p in (root / top).rglob("*.py")):
        importer = part_of(module_of(path, root))
        for line, name in imports_of(path, root):
            imported = part_of(name)
            if imported == "services" and name == "vtorque.services":
                continue  # the namespace package itself
            line_says = f"{path.relative_to(root)}:{line} ({importer}) imports"
            if not may_import(importer, imported) and not any(f.startswith(line_says) for f in found):
                found.append(f"{line_says} {name} ({imported})")
    return found


def test_no_part_imports_what_it_may_not():
    assert violations() == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The rules catch each kind of crossing, relative and in-function imports included."""
    cases = {
        "services/node_worker/x.py": ("from vtorque.services.image_stager import store\n", "services.image_stager"),
        "services/scheduler_bridge/y.py": ("def f():\n    from vtorque.hooks.slurm import refusal\n", "hooks"),
        "hooks/z.py": ("import vtorque.services.node_worker.service\n", "services.node_worker"),
        "shared/w.py": ("from ..cli import main\n", "cli"),
        "cli/v.py": ("from vtorque.services.node_worker.hypervisor import Hypervisor\n", "services.node_worker"),
    }
    for rel, (text, _) in cases.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "cli" / "ok.py").write_text("from vtorque.hooks.torque.deadline import prologue_deadline\n"
                                            "from vtorque.shared import messages\n")
    found = violations(tmp_path)
    assert len(found) == len(cases), found
    for rel, (_, imported) in cases.items():
        assert any(f.startswith(rel) and f.endswith(f"({imported})") for f in found), (rel, found)


@pytest.mark.parametrize("importer, imported, allowed", [
    ("services.node_worker", "services.node_worker", True), ("services.node_worker", "shared", True),
    ("services.node_worker", "services.image_stager", False), ("services.scheduler_bridge", "hooks", False),
    ("hooks", "services.node_worker", False), ("hooks", "shared", True), ("shared", "hooks", False),
    ("cli", "hooks", True), ("cli", "services.node_worker", False), ("shared", "services.node_worker", False),
])
def test_the_rules(importer, imported, allowed):
    assert may_import(importer, imported) is allowed


def service_names_in_strings(root: Path = ROOT) -> list[str]:
    """Files whose string constants name a service's module they may not import (a run by name, an importlib or
    `python -m` of it, which no import statement shows): a service may name its own modules only, shared/ and
    the hooks none, the cli only in cli/main.py's table."""
    found = []
    for path in sorted(p for top in PARTS for p in (root / top).rglob("*.py")):
        if path.relative_to(root) == Path("cli/main.py"):
            continue
        importer = part_of(module_of(path, root))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith("vtorque.services."):
                named = part_of(node.value.split(":")[0])
                if named != importer:
                    found.append(f"{path.relative_to(root)}:{node.lineno} names {node.value}")
    return found


def test_a_service_module_is_named_only_where_it_may_be_imported(tmp_path):
    import importlib.util

    from vtorque.cli import main

    assert service_names_in_strings() == []
    for path in [*main.SERVICE_CLASSES.values(), main.PREFETCHER, *main.SERVICE_PROGRAMS.values()]:
        assert importlib.util.find_spec(path.split(":")[0]) is not None, path
    files = {
        "cli/main.py": 'T = {"x": "vtorque.services.node_worker.warm"}\n',  # the table: allowed
        "cli/images.py": 'import subprocess\nsubprocess.run(["python", "-m", "vtorque.services.node_worker.warm"])\n',
        "services/node_worker/link.py": 'ARGV = ["-m", "vtorque.services.node_worker.guest_link"]\n',  # its own
        "services/scheduler_bridge/run.py": 'ARGV = ["-m", "vtorque.services.image_stager.service"]\n',
        "hooks/torque/spawn.py": 'X = "vtorque.services.node_worker.reconcile:Reconciler"\n',
        "shared/any.py": '\n\nX = "vtorque.services.scheduler_bridge"\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert service_names_in_strings(tmp_path) == [
        "cli/images.py:2 names vtorque.services.node_worker.warm",
        "hooks/torque/spawn.py:1 names vtorque.services.node_worker.reconcile:Reconciler",
        "services/scheduler_bridge/run.py:1 names vtorque.services.image_stager.service",
        "shared/any.py:3 names vtorque.services.scheduler_bridge"]
