"""An entry point in an unknown ``detkit.*`` group is reported, not silently ignored."""

from __future__ import annotations

from typer.testing import CliRunner

from detkit.cli import app
from detkit.plugins import unknown_groups
from detkit.registry import REGISTRIES

GOOD = """
from pydantic import BaseModel

class Adamish:
    class Params(BaseModel):
        pass
"""


def test_unknown_detkit_group_names_the_distribution(fake_site):
    fake_site("fake-typo", "0.2", {"detkit.optimiser": {"adamish": "fake_typo:Adamish"},
                                   "detkit.optimizer": {"adamish": "fake_typo:Adamish"},
                                   "console_scripts": {"x": "fake_typo:main"}},
              {"fake_typo.py": GOOD})
    found = unknown_groups(REGISTRIES)
    assert [(u.distribution, u.version, u.group, u.names) for u in found] == [
        ("fake-typo", "0.2", "detkit.optimiser", ("adamish",))
    ]
    message = found[0].message(REGISTRIES)
    assert "fake-typo 0.2" in message and "'detkit.optimiser'" in message and "detkit.optimizer" in message

    result = CliRunner().invoke(app, ["list-plugins"])
    assert result.exit_code == 0, result.output
    assert "unknown group 'detkit.optimiser'" in result.output and "fake-typo" in result.output


def test_known_groups_raise_no_warning():
    assert unknown_groups(REGISTRIES) == []
