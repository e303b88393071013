"""The project around train_gpt.py: the README's settings table, its commands and CI."""
import re

import train_gpt as tg


def readme(repo):
    return (repo / "README.md").read_text()


def test_readme_lists_every_setting_with_its_default(repo):
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| (.+?) \|", readme(repo), flags=re.M))
    for name, default, _, _ in tg.SETTINGS:
        assert name in rows, f"{name} missing from the README settings table"
        shown = ",".join(map(str, default)) if isinstance(default, list) else int(default) if isinstance(
            default, bool) else default
        assert rows[name] == (f"`{shown}`" if shown != "" else "(empty)"), f"{name}: README says {rows[name]}"
    assert set(rows) == {n for n, *_ in tg.SETTINGS}, "README lists settings the script does not have"


def test_readme_quickstart_and_ci_use_the_same_test_command(repo):
    quick = readme(repo).split("## Quickstart")[1].split("##")[0]
    commands = re.findall(r"^(bash run\.sh \w+)", quick, flags=re.M)
    assert commands == ["bash run.sh smoke", "bash run.sh test"]
    assert "bash run.sh test" in (repo / ".ci" / "run").read_text()

