"""The README's promise: its first lines are exactly two set-up commands, and CI runs the second."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)\n```$", text, flags=re.S | re.M)


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    head = text[: text.index("\n## ")]  # everything before the first section
    blocks = bash_blocks(head)
    assert len(blocks) == 2 and all("\n" not in block for block in blocks)
    install_and_run, run_tests = blocks
    assert "pip install torch==2.13.0" in install_and_run and install_and_run.endswith("compress rpq -o out/")
    assert "pytest" in run_tests and "pip install torch==2.13.0" in run_tests


def test_ci_runs_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    extracted = subprocess.run(
        ["awk", r'/^```bash$/{n++; next} /^```$/{if (n==2) exit; next} n==2{print}', str(ROOT / "README.md")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == bash_blocks((ROOT / "README.md").read_text())[1]
    assert "awk '/^```bash$/{n++; next} /^```$/{if (n==2) exit; next} n==2{print}' README.md" in script.read_text()


def test_readme_lists_the_tested_families_as_the_matrix_tests_them():
    from .families import EXPECTED_DENSE, FAMILIES, FFF_REFUSED, KNOWN_FAILURES, REFUSED

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Tested model families") :]
    section = section[: section.index("\n## ", 1)]
    row = r"^\| ([^|`]+?) \| `[^`]+` \| \w+ \| (.+?) \| (.+?) \|$"
    listed = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(row, section, flags=re.M)}
    listed.pop("family", None)  # the header row
    assert set(listed) == set(FAMILIES)
    for family, (rpq, fff) in listed.items():
        assert rpq.startswith("fails") == (family in KNOWN_FAILURES), family
        for status, refused, works in ((rpq, REFUSED, "converts"), (fff, FFF_REFUSED, "distils")):
            assert status.startswith("refused") == (family in refused), family
            assert status.startswith(works) == (family not in refused and family not in KNOWN_FAILURES), family
            if family in refused:
                assert refused[family] in status, family
        for name, why in EXPECTED_DENSE.get(family, {}).items():
            assert f"`{name}` stays dense: {why}" in rpq, family