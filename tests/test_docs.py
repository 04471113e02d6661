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


def _code_blocks(page: str, language: str) -> list[str]:
  with open(page) as f:
    return re.findall(rf"^ *```{language}\n(.*?)^ *```", f.read(), re.S | re.M)


def test_every_python_example_runs_as_written(tmp_path):
  """Each page's Python examples, run in order as one script from an empty directory
  with only the default install importable (torch hidden): they run, and what they
  compute has the shapes and types their comments say."""
  import json
  import subprocess
  import sys

  from tests.support import default_install
  report = (
      "\nimport json as _json, numpy as _np\n"
      "_facts = {k: list(_np.shape(v)) for k, v in dict(globals()).items()\n"
      "          if k in ('logits', 'pruned', 'hidden', 'tokens', 'next_logits')}\n"
      "if 'results' in globals():\n"
      "  _facts['transition_block'] = results.full_model.transition_block\n"
      "  _facts['collapse'] = results.methods['iterative_accuracy'].collapse_point\n"
      "if 'pruned' in globals():\n"
      "  _facts['pruned_differs'] = bool(_np.abs(_np.asarray(pruned) - _np.asarray(logits))"
      ".max() > 0)\n"
      "print('FACTS ' + _json.dumps(_facts))\n")
  pages = [p for p in _pages() if _code_blocks(p, "python")]
  assert {os.path.basename(p) for p in pages} == {"README.md", "checkpoints.md", "study.md"}
  cwd = tmp_path / "user"  # one directory: docs/study.md's study resumes the README's
  cwd.mkdir()
  for page in pages:
    script = tmp_path / (os.path.basename(page) + ".py")
    script.write_text("\n".join(_code_blocks(page, "python")) + report)
    result = default_install.run([str(script)], str(tmp_path), cwd=str(cwd), timeout=900)
    assert result.returncode == 0, f"{page}:\n{result.stderr[-3000:]}"
    facts = json.loads(result.stdout.split("FACTS ")[-1])
    if "logits" in facts:
      batch, length, vocab = facts["logits"]
      assert (batch, length) == (1, 5) and vocab > 100
      assert facts["pruned"] == facts["logits"] and facts["pruned_differs"]
      assert facts["hidden"][:3] == [17, 1, 5]  # [L+1, B, T, d] for the 16-block model
    if "tokens" in facts:
      assert facts["tokens"] == [1, 32] and facts["next_logits"] == [1, vocab]
    if "transition_block" in facts:
      assert facts["transition_block"] is None or 1 <= facts["transition_block"] <= 16
      assert facts["collapse"] is None or 1 <= facts["collapse"] <= 16


# The programs the docs' shell examples call, as a user runs them.
PROGRAMS = {"dpjax": "dpjax.cli.study", "dpjax-convert": "checkpoints_convert.convert_cli",
            "dpjax-export": "checkpoints_convert.export_cli", "dpjax-data": "dpjax.cli.data",
            "dpjax-train-lens": "dpjax.cli.train_lens", "dpjax-throughput": "dpjax.cli.throughput",
            "dpjax-plan": "dpjax.cli.plan", "dpjax-prune": "dpjax.cli.prune",
            "dpjax-lm-eval": "dpjax.cli.lm_eval",
            "python -m benchmarks": "benchmarks",
            "python -m benchmarks.real_study": "benchmarks.real_study"}


# How each program lists every flag (argparse programs have no --helpfull).
HELP = {"python -m benchmarks": ["-h"], "dpjax-lm-eval": ["run", "--help"]}


def test_every_shell_example_names_a_program_and_its_flags():
  """Each shell example in the README and docs/ calls a program this package installs,
  with flags that program defines (a renamed or removed flag fails here, not for a
  reader). The examples name hub models and accelerators this test cannot reach, so
  their flags are checked against each program's help rather than run."""
  import subprocess
  import sys
  with open(os.path.join(ROOT, "setup.cfg")) as f:
    scripts = dict(re.findall(r"^\s+(dpjax[\w-]*) = ([\w.]+):run", f.read(), re.M))
  assert {k: v for k, v in PROGRAMS.items() if k.startswith("dpjax")} == scripts
  calls: dict[str, set[str]] = {}
  for page in _pages():
    for block in _code_blocks(page, "bash"):
      for line in block.splitlines():
        command = line.split("#")[0].strip()
        for part in re.split(r"&&|;(?=\s)", command):
          part = part.strip()
          program = next((p for p in sorted(PROGRAMS, key=len, reverse=True)
                          if part == p or part.startswith(p + " ")), None)
          if program is None:
            continue
          flags = set(re.findall(r"(?:^|\s)--?([A-Za-z_]+)", part[len(program):]))
          calls.setdefault(program, set()).update(flags)
  assert {"dpjax", "dpjax-prune", "dpjax-export", "python -m benchmarks"} <= set(calls)
  unknown = []
  helps = {program: subprocess.Popen(  # all at once: each is mostly imports
      [sys.executable, "-m", PROGRAMS[program],
       *HELP.get(program, ["--helpfull"])],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
      for program in calls}
  for program, used in sorted(calls.items()):
    out, err = helps[program].communicate(timeout=600)
    defined = set(re.findall(r"--(?:\[no\])?([A-Za-z_]+)", out + err))
    defined |= {"h", "help", "helpfull"}
    assert len(defined) > 5, f"{program}: {err[-1000:]}"
    for flag in used:
      if flag not in defined and not (flag.startswith("no") and flag[2:] in defined):
        unknown.append(f"{program} --{flag}")
  assert unknown == []
