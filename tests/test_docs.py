"""The README and docs/ stay true to the tree: every relative link resolves, the README is
short, and its two set-up commands come first."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages():
  yield os.path.join(ROOT, "README.md")
  for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
    if name.endswith(".md"):
      yield os.path.join(ROOT, "docs", name)


def test_every_relative_link_resolves():
  broken = []
  for page in _pages():
    with open(page) as f:
      text = f.read()
    for target in LINK.findall(text):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
      if not os.path.exists(path):
        broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
  assert broken == []


def test_the_readme_is_short_and_starts_with_both_set_up_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    lines = f.read().splitlines()
  assert len(lines) <= 150
  head = "\n".join(lines[:40])
  assert "pip install -e . && dpjax" in head
  assert "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q" in head


def test_the_ci_runs_the_readmes_test_command():
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  assert "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q" in ci
