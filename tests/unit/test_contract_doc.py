import json
from pathlib import Path

from vtorque.shared.messages import contract_schema


def test_the_checked_in_contract_matches_the_code():
    """docs/contract.json is generated: `vtorque contract > docs/contract.json` after changing a message."""
    doc = Path(__file__).parents[2] / "docs" / "contract.json"
    assert json.loads(doc.read_text()) == json.loads(json.dumps(contract_schema(), sort_keys=True))
