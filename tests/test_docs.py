"""The docs stay a front door and a map: a short README, links that resolve, every flag documented."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12_000
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
# Each command's flags, and the page that must document them.
DATACLASS_CLIS = {
    "rlhf.train_rm": ("TrainRMConfig", "reward-model.md"),
    "rlhf.sft": ("SFTConfig", "policies.md"),
    "rlhf.generate": ("GenerateConfig", "policies.md"),
    "rlhf.evaluate": ("EvaluateConfig", "policies.md"),
    "rlhf.ppo": ("PPOConfig", "training.md"),
    "rlhf.dpo": ("DPOConfig", "training.md"),
    "rlhf.online_dpo": ("OnlineDPOConfig", "training.md"),
    "rlhf.rewards": ("CheckConfig", "training.md"),
    "rlhf.verdicts": ("VerdictsConfig", "reward-model.md"),
    "rlhf.prioritize": ("PrioritizeConfig", "app.md"),
}
ARGPARSE_CLIS = {"app": "app.md", "annotate.users": "app.md", "annotate.ingest": "data.md", "annotate.export": "data.md", "storyworld.__main__": "storyworld.md"}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())  # headings inside code blocks are not headings
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def links(path: Path) -> list[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return [a or b for a, b in LINK.findall(text)]


def test_slug_matches_github():
    assert slug("Accounts: `python -m annotate.users`") == "accounts-python--m-annotateusers"
    assert slug("SFT of storyworld's starting policy") == "sft-of-storyworlds-starting-policy"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text):,} characters, over {README_LIMIT:,}: move detail to docs/"
    blocks = re.findall(r"(?ms)^```bash\n(.*?)^```", text)
    assert blocks[0].strip() == 'pip install -e ".[train,dev]" && python app.py'
    assert blocks[1].strip() == "pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()  # CI installs and tests exactly as the README says
    assert 'pip install -e ".[train,dev]"' in ci and "\npytest -q\n" in ci


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: points outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_names_every_component_page():
    text = (ROOT / "README.md").read_text()
    for page in ("app.md", "data.md", "reward-model.md", "policies.md", "training.md", "storyworld.md", "DESIGN.md", "BENCHMARKS.md"):
        assert (ROOT / "docs" / page).exists() and f"docs/{page}" in text


def argparse_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= argparse_flags(sub)
        flags |= {s for s in action.option_strings if s.startswith("--") and s != "--help"}
    return flags


@pytest.mark.parametrize("module", sorted(DATACLASS_CLIS))
def test_every_training_flag_is_documented(module):
    name, page = DATACLASS_CLIS[module]
    config = getattr(importlib.import_module(module), name)
    text = (ROOT / "docs" / page).read_text()
    missing = [f"--{f.name}" for f in dataclasses.fields(config) if f.init and f"`--{f.name}`" not in text]
    assert not missing, f"docs/{page} does not document {module}'s {missing}"


@pytest.mark.parametrize("module", sorted(ARGPARSE_CLIS))
def test_every_command_flag_is_documented(module, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    parser = importlib.import_module(module).build_parser()
    text = (ROOT / "docs" / ARGPARSE_CLIS[module]).read_text()
    missing = sorted(flag for flag in argparse_flags(parser) if not re.search(rf"`{re.escape(flag)}\b", text))
    assert not missing, f"docs/{ARGPARSE_CLIS[module]} does not document {module}'s {missing}"


if __name__ == "__main__":  # print a flag table to paste into a page: python tests/test_docs.py rlhf.ppo
    name, _ = DATACLASS_CLIS[sys.argv[1]]
    sys.path.insert(0, str(ROOT))
    print("| flag | default | what it does |\n| --- | --- | --- |")
    for f in dataclasses.fields(getattr(importlib.import_module(sys.argv[1]), name)):
        if f.init:
            default = f.default if f.default is not dataclasses.MISSING else "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory()
            print(f"| `--{f.name}` | `{default}` | {f.metadata.get('help', '').replace('|', chr(92) + '|')} |")


@pytest.mark.slow
def test_the_readme_loop_runs(tmp_path):
    """The README's loop block, exactly as written, in a fresh directory (about eight CPU minutes)."""
    import subprocess

    text = (ROOT / "README.md").read_text()
    block = re.search(r"(?ms)^## The loop.*?^```bash\n(.*?)^```", text).group(1)
    assert "python -m rlhf.ppo" in block and "python -m rlhf.generate" in block
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "ppo" / "storypref_policy.json").exists()
    assert '"candidates_added": 400' in done.stdout  # 200 items x --per_item 2, back in the database
