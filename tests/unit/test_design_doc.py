"""docs/design.md opens with the floor plan a newcomer reads first (issue 15 item 6): the parts and what each may
import, where each message is declared, published and handled, with paths. Written by hand, so kept true here:
every path it names exists, every message type has its row, each row's publishers are the topology table's and
its handlers the services' own, and the import column says what tests/unit/test_import_rules.py enforces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vtorque.shared import messages as m
from vtorque.shared import topology

from .flow_site import Site
from .test_import_rules import may_import

ROOT = Path(__file__).resolve().parents[2]


def opening(text: str | None = None) -> str:
    """From the first section to the second: the floor plan."""
    text = (ROOT / "docs" / "design.md").read_text() if text is None else text
    first = text.index("\n## ")
    return text[first:text.index("\n## ", first + 1)]


def table(section: str, after: str) -> list[list[str]]:
    """The cells of the markdown table that follows the line starting with `after`, header and rule left out."""
    lines = section[section.index(after):].splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]


def code_words(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def paths_in(text: str) -> list[str]:
    """What a backticked word names in the tree: a folder (`x/`), a file (`x.py`, `x/y`), no placeholder."""
    found = []
    for word in code_words(text):
        for token in re.findall(r"[\w./<>*-]+", word):
            if ("/" in token or token.endswith(".py")) and not re.search(r"[<>*]|^\.\./|^vtorque\.", token):
                found.append(token)
    return found


def missing_paths(section: str, root: Path = ROOT) -> list[str]:
    """Paths the section names that are in no part of the tree: from the top, or (in the parts table) from the
    row's own folder (`torque/` in the hooks row is hooks/torque/)."""
    missing = []
    parts = table(section, "| part |")
    bases = {cell: code_words(row[1])[0].split("<")[0] for row in parts for cell in row}
    for line in section.splitlines():
        base = next((bases[c] for c in [x.strip() for x in line.strip("|").split("|")] if c in bases), "")
        for path in paths_in(line):
            if not ((root / path).exists() or (base and (root / base / path).exists())
                    or (base == "services/" and any((root / "services" / d / path).exists()
                                                    for d in ("", "node_worker", "scheduler_bridge")))):
                missing.append(path)
    return missing


def message_types() -> set[str]:
    return {name for name, obj in vars(m).items() if isinstance(obj, type) and issubclass(obj, (m.Event, m.Command))
            and obj not in (m.Event, m.Command) and not name.startswith("_")}


def message_rows(section: str) -> list[tuple[list[str], str, str]]:
    """(message types, published by, handled by) per row of the messages table."""
    return [([w for w in code_words(row[0])], row[1], row[2])
            for row in table(section, "Where each message is published and handled")]


# What the tables call each role of the topology table.
ROLE_WORDS = {"hook": ("prologue", "epilogue", "hook"), "prefetch": ("prefetch",), "bridge": ("bridge",),
              "stager": ("stager",), "node": ("node worker",), "operator": ("vtorque ", "operator")}


def test_every_path_the_opening_names_exists():
    section = opening()
    assert len(paths_in(section)) > 30
    assert missing_paths(section) == []


def test_a_path_that_is_not_there_is_caught():
    doc = ("# t\n\n## The parts\n| part | path | may import | what |\n|---|---|---|---|\n"
           "| shared | `shared/` | shared only | `bus.py`, `gone.py` |\n\nSee `services/node_worker/service.py`, "
           "`cli/nothing.py` and `services/<name>/`.\n\n## Next\n")
    assert missing_paths(opening(doc)) == ["gone.py", "cli/nothing.py"]


def test_every_message_type_has_one_row():
    named = [t for types, _, _ in message_rows(opening()) for t in types]
    assert sorted(named) == sorted(message_types())  # each once, none that is not a message


def test_each_rows_publishers_are_the_topology_tables():
    for types, published, _ in message_rows(opening()):
        for name in types:
            for role in topology.FLOWS[getattr(m, name)].publishers:
                assert any(w in published for w in ROLE_WORDS[role]), (name, role, published)


@pytest.fixture(scope="module")
def handler_names(tmp_path_factory):
    """{message type name: the name of the method a service handles it with}, from the services themselves."""
    site = Site(tmp_path_factory.mktemp("site"))
    try:
        found: dict[str, set[str]] = {}
        for service in (site.bridge, site.stager, site.workers["n1"]):
            for _, handlers in [(None, service.handlers()), *service.extra_consumers()]:
                for kind, handler in handlers.items():
                    found.setdefault(kind.__name__, set()).add(handler.__name__)
        return found
    finally:
        site.close()


def test_each_rows_handlers_are_the_services_own(handler_names):
    for types, _, handled in message_rows(opening()):
        named = set(re.findall(r"\bon_\w+", handled))
        registered = {h for t in types for h in handler_names.get(t, ())}
        assert named == registered, (types, named, registered)


def test_the_parts_table_says_what_the_import_rules_enforce():
    parts = {"shared": "shared", "a service": "services.node_worker", "hooks": "hooks", "cli": "cli"}
    others = ["shared", "services.node_worker", "services.image_stager", "hooks", "cli"]
    for row in table(opening(), "| part |"):
        importer = parts[row[0]]
        said = {w.strip() for w in re.split(r",| and ", row[2].replace(" only", "")) if w.strip()}
        said = {importer if w == "itself" else parts.get(w, w) for w in said}
        assert said == {p for p in others if may_import(importer, p)}, row
