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



def test_requirements_keep_an_installed_cuda_torch_while_ci_pins_the_tested_one(repo):
    from packaging.requirements import Requirement
    reqs = [Requirement(line) for line in (repo / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    torch_req = next(r for r in reqs if r.name == "torch")
    # a GPU box's CUDA builds and this machine's CPU build all satisfy it, so `pip install -r` replaces none of them
    for kept in ["2.11.0+cu130", "2.11.0", "2.13.0+cpu"]:
        assert torch_req.specifier.contains(kept), kept
    assert not torch_req.specifier.contains("2.10.0")
    pin = re.search(r"pip install -q torch==(\S+) -r requirements.txt", (repo / ".ci" / "run").read_text()).group(1)
    assert pin == "2.13.0" and torch_req.specifier.contains(pin)
    ensure_deps = (repo / "run.sh").read_text().split("ensure_deps() {")[1].split("\n}")[0]
    assert f"pin=(torch=={pin})" in ensure_deps
    assert f"torch=={pin}" in (repo / "docs" / "gpu-box.md").read_text()


def test_readme_is_short_and_every_relative_link_resolves(repo):
    """README.md is for a competitor in a hurry (the long explanations live in docs/), and no link in it or in
    docs/ points at a file that is not there."""
    assert len(readme(repo).splitlines()) < 350
    files = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    assert len(files) > 5
    for f in files:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read_text()):
            if "://" not in target:
                assert (f.parent / target).exists(), f"{f.relative_to(repo)}: link to {target} resolves to nothing"
