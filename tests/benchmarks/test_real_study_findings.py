"""The real-study programs' computed findings (healing, decisive): what they say follows from the numbers."""

from __future__ import annotations

from benchmarks.real_study import healing


def _record(gains, holm, difference, ci):
  arms = {arm: {"gain": {"gain": g, "ci95": [g - 0.05, g + 0.05], "holm_p": p}}
          for arm, g, p in zip(healing.ARMS, gains, holm)}
  return {"models": {"m": {"k": 4, "arms": arms, "gain_difference": {
      "silent_minus_decisive": difference, "ci95": ci}}}}


def test_the_finding_is_computed_from_the_intervals_and_holm():
  text = healing.finding(_record((0.2, 0.02), (0.001, 0.4), 0.18, [0.05, 0.3]))
  assert "silent arm gains +0.200 (significant" in text
  assert "decisive arm gains +0.020 (not significant" in text
  assert "healing recovers the Silent-Phase removal more" in text
  text = healing.finding(_record((0.0, 0.1), (1.0, 0.01), -0.1, [-0.2, 0.01]))
  assert "the two recoveries cannot be told apart" in text
  text = healing.finding(_record((0.0, 0.1), (1.0, 0.01), -0.1, [-0.2, -0.01]))
  assert "healing recovers the Decisive-Phase removal more" in text


def test_the_decisive_finding_ranks_the_methods_by_blocks_removed():
  from benchmarks.real_study import decisive
  record = {"models": {"m": {"num_layers": 16, "methods": {
      "iterative": {"kept_blocks": list(range(11))},
      "block_influence": {"kept_blocks": list(range(13))},
      "decisive_only": {"error": "no variant within the budget"}}}}}
  text = decisive.finding(record)
  assert text == ("m: blocks removed within the budget: iterative 5, block_influence 3; "
                  "most: iterative; decisive_only found no variant within it.")
  record["models"]["m"]["methods"]["decisive_only"] = {"kept_blocks": list(range(11))}
  assert "most: iterative and decisive_only." in decisive.finding(record)
