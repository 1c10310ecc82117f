"""The README's option table is the one the configs generate (tests/readme_tables.py)."""

from __future__ import annotations

import readme_tables


def test_readme_option_table_matches_the_configs():
    assert readme_tables.current() == readme_tables.options_table(), (
        "README's option table differs from the configs: run python tests/readme_tables.py --write"
    )
