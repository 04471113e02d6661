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
      "iterative": {"kept_blocks": list(range(11)), "holds_on_heldout": False},
      "block_influence": {"kept_blocks": list(range(13)), "holds_on_heldout": True},
      "decisive_only": {"error": "no variant within the budget"}}}}}
  text = decisive.finding(record)
  assert text == ("m: blocks removed within the budget on the selection half: iterative 5, "
                  "block_influence 3; most: iterative; decisive_only found no variant within "
                  "it; on the held-out half the budget holds for block_influence.")
  record["models"]["m"]["methods"]["decisive_only"] = {"kept_blocks": list(range(11))}
  assert "most: iterative and decisive_only;" in decisive.finding(record)


def test_the_held_out_judgement_is_tangos_bound_from_the_counts():
  """One item only the unpruned model got right of 60 held out: Tango's upper bound is
  near 0.09, not the 0.05 a percentile bootstrap gave, and a 0.05 budget does not hold."""
  from benchmarks.real_study import decisive
  held = {"drop": 1 / 60, "only_unpruned_right": 1, "only_variant_right": 0}
  judged = decisive.heldout_judgement(held, 120, 0.05)
  assert judged["items"] == 60 and 0.08 < judged["upper95"] < 0.1 and not judged["holds"]
