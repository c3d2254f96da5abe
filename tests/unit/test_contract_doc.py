import json
from pathlib import Path

from vtorque.shared.topology import contract_document


def test_the_checked_in_contract_matches_the_code():
    """docs/contract.json is generated: `vtorque contract > docs/contract.json` after changing a message or the
    topology table."""
    doc = Path(__file__).parents[2] / "docs" / "contract.json"
    assert json.loads(doc.read_text()) == json.loads(json.dumps(contract_document(), sort_keys=True))


def test_the_contract_names_every_messages_channel():
    doc = contract_document()
    assert set(doc["x-vtorque-channels"]) == {name for name in doc["$defs"] if name in doc["x-vtorque-channels"]}
    boot = doc["x-vtorque-channels"]["BootGuests"]
    assert boot == {"publishers": ["bridge"], "exchange": "vtorque.commands", "routing_key": "node.{node}",
                    "consumers": ["vtorque.node.{node}"],
                    "sender_selected": "one publish, the routing key of every node in `nodes` in its BCC header"}


def test_descriptions_do_not_depend_on_how_docstrings_are_formatted():
    """msgspec 0.18 kept a docstring's indentation, later releases strip it: both must give the same document."""
    from vtorque.shared.messages import _normalise_descriptions

    raw = {"$defs": {"A": {"description": "First line.\n\n    Indented second\n    line.", "title": "A"}}}
    clean = {"$defs": {"A": {"description": "First line.\n\nIndented second\nline.", "title": "A"}}}
    assert _normalise_descriptions(raw) == _normalise_descriptions(clean)
    assert _normalise_descriptions(raw)["$defs"]["A"]["description"] == "First line. Indented second line."
