"""The real-model campaign's plan, units, ledger, predictions and time budget (no model runs:
the units are recorded by hand or by a stand-in)."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.real_study import campaign
from benchmarks.real_study import study as real_study


def test_the_plan_runs_the_claims_probes_first_and_fits_twelve_hours(tmp_path):
  units = campaign.plan(campaign.LOCAL)
  kinds = [u.kind for u in units]
  first_noise = kinds.index("noise")
  assert set(kinds[:first_noise]) == {"phase"} and len(kinds[:first_noise]) == 15
  assert [u.priority for u in units] == sorted(u.priority for u in units)
  assert {u.run.model for u in units if u.kind == "screened"} == set(campaign.MODELS)
  assert {u.run.model for u in units if u.kind == "iterative"} == {"smollm2", "gemma3"}
  rows = campaign.status(str(tmp_path), units)
  upto_two = sum(r["predicted_seconds"] for r in rows
                 if r["priority"] <= 2 and r["state"] != "not needed")
  assert upto_two <= 13 * 3600  # the priors' figure; calibration refines it as units end
  # Calibrated on the committed campaign's finished units (what `--dry_run` prints), the
  # claim's probes and the searches fit twelve hours on two cores (the one-shot
  # baselines, priority 3, run where time is left).
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "benchmarks", "real_study")
  committed = campaign.status(here, units)
  assert sum(r["predicted_seconds"] for r in committed
             if r["state"] != "not needed" and r["priority"] <= 2) <= 12 * 3600
  text = campaign.format_status(rows)
  assert "priorities 1-2:" in text and "left:" in text


def test_a_unit_runs_its_methods_with_the_runs_finished_ones():
  run = campaign.runs(campaign.LOCAL)[0]
  noise = campaign.Unit(run, "noise", 1)
  assert campaign.methods_of(noise, ["phase"]) == ("phase", "noise")
  iterative = campaign.Unit(run, "iterative", 2)
  assert campaign.methods_of(iterative, ["phase", "noise"]) == ("iterative", "phase", "noise")


def test_predictions_are_calibrated_on_finished_units(tmp_path):
  out = str(tmp_path)
  units = campaign.plan(campaign.LOCAL)
  first, second = units[0], units[3]  # smollm2 arc_easy and sciq phase units
  assert first.run.model == second.run.model == "smollm2"
  prior = campaign.calibrate(out, units)
  before, base = campaign.predict(out, first, prior)
  assert before == pytest.approx(campaign.PRIOR_FIXED["smollm2"] + base)
  # The unit took twice the prior's figure (beyond the fixed cost): the next unit of the
  # same model and kind is predicted at twice its own.
  measured = campaign.PRIOR_FIXED["smollm2"] + 2 * base
  campaign.record_unit(out, first, measured, before, base_seconds=base)
  calibration = campaign.calibrate(out, units)
  predicted, base2 = campaign.predict(out, second, calibration)
  assert predicted == pytest.approx(campaign.PRIOR_FIXED["smollm2"] + 2 * base2, rel=1e-4)
  # Below `MIN_FIT_UNITS` finished units one scale holds for every unit: another model's,
  # another kind's.
  other = next(u for u in units if u.run.model == "qwen25" and u.kind == "phase")
  predicted, base3 = campaign.predict(out, other, calibration)
  assert predicted == pytest.approx(campaign.PRIOR_FIXED["qwen25"] + 2 * base3, rel=1e-4)
  noise = next(u for u in units if u.kind == "noise")
  predicted, base4 = campaign.predict(out, noise, calibration)
  assert predicted == pytest.approx(campaign.PRIOR_FIXED[noise.run.model] + 2 * base4, rel=1e-4)
  with open(tmp_path / campaign.LEDGER_FILE) as f:
    assert json.load(f)["units"][first.name]["seconds"] == pytest.approx(measured, abs=0.1)


def _fake_run(out, run, accuracy):
  path = os.path.join(out, "runs", run.name)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"calibration_transition_block": 20,
               "full_model": {"accuracy": [0.25, accuracy], "chance": 0.25}}, f)


def test_a_run_below_the_bar_needs_no_further_unit(tmp_path):
  out = str(tmp_path)
  run = campaign.runs(campaign.LOCAL)[0]
  units = [u for u in campaign.plan(campaign.LOCAL) if u.run == run]
  campaign.record_unit(out, units[0], 100.0, 90.0, base_seconds=40.0)
  _fake_run(out, run, 0.30)  # 0.05 above chance: below the 0.1 bar
  states = {r["unit"]: r["state"] for r in campaign.status(out, units)}
  assert states[units[0].name] == "done"
  assert {states[u.name] for u in units[1:]} == {"not needed"}
  _fake_run(out, run, 0.50)
  states = {r["unit"]: r["state"] for r in campaign.status(out, units)}
  assert {states[u.name] for u in units[1:]} == {"to do"}
  # Exactly 0.1 above chance clears the bar: 60 of 100 items against chance 0.5 is 0.6 in
  # float32 results (0.59999996), and 0.5 + 0.1 in float64 is above 0.6.
  import numpy as np
  from dpjax.study.methods import clears_bar
  assert clears_bar(float(np.float32(0.6)), 0.5, 0.1)
  assert not clears_bar(float(np.float32(0.59)), 0.5, 0.1)


def test_the_time_budget_stops_before_a_unit_that_would_pass_it(tmp_path, monkeypatch):
  """Units run in priority order while their predictions fit --hours; the first that does
  not is left, with everything before it recorded."""
  out = str(tmp_path)
  ran, clock = [], [0.0]

  def stand_in(out_dir, unit, predicted, base):  # takes exactly its predicted time
    ran.append(unit.name)
    clock[0] += predicted
    campaign.record_unit(out_dir, unit, predicted, predicted, base_seconds=base)
    return {}

  monkeypatch.setattr(real_study, "run_unit", stand_in)
  monkeypatch.setattr(real_study.time, "perf_counter", lambda: clock[0])
  monkeypatch.setattr("dpjax.tasks.fetch.fetch_benchmarks", lambda *a, **k: {})
  monkeypatch.chdir(tmp_path)
  units = campaign.plan(campaign.LOCAL)
  calibration = campaign.calibrate(out, units)
  first_two = sum(campaign.predict(out, u, calibration)[0] for u in units[:2])
  hours = (first_two + 1) / 3600  # room for two units, not three
  real_study.FLAGS.unparse_flags()
  real_study.FLAGS(["real_study", f"--out_dir={out}", f"--hours={hours}"])
  try:
    real_study.main([])
  finally:
    real_study.FLAGS.unparse_flags()
  assert ran == [u.name for u in units[:2]]
  assert os.path.isfile(tmp_path / "REPORT.md")


def test_a_runs_transition_is_assumed_from_the_models_other_runs(tmp_path):
  """Before its profile a run's l* is taken at the depth fraction the model's finished runs
  measured; a run whose profile found no transition counts its phase unit as the profile
  alone and no noise unit, while its searches keep their full work."""
  out = str(tmp_path)
  units = campaign.plan(campaign.LOCAL)
  by = {u.name: u for u in units}
  arc, sciq = by["smollm2_arc_easy_cloze:phase"], by["smollm2_sciq_cloze:phase"]
  assert campaign.run_facts(out, sciq.run)["assumed_l_star"] is None
  default = campaign.predict(out, sciq, campaign.calibrate(out, units))[1]
  _fake_run(out, arc.run, 0.5)  # l* = 20 of SmolLM2's 30 blocks
  facts = campaign.run_facts(out, sciq.run)
  assert facts["assumed_l_star"] == 20 and facts["l_star"] is None
  work = campaign._work(sciq, facts)
  assert work.block_tokens == campaign.unit_work(sciq, 20, facts["tokens"]).block_tokens
  assert campaign.predict(out, sciq, campaign.calibrate(out, units))[1] != pytest.approx(default)
  # Gemma 3's profile found no transition.
  g = "gemma3_arc_easy_cloze"
  path = os.path.join(out, "runs", g)
  os.makedirs(path)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump({"calibration_transition_block": None,
               "full_model": {"accuracy": [0.25, 0.45], "chance": 0.25}}, f)
  facts = campaign.run_facts(out, by[f"{g}:phase"].run)
  profile = campaign.unit_work(by[f"{g}:phase"], None, facts["tokens"], profile_only=True)
  assert campaign._work(by[f"{g}:phase"], facts).block_tokens == profile.block_tokens > 0
  assert campaign._work(by[f"{g}:noise"], facts).block_tokens == 0
  iterative = campaign._work(by[f"{g}:iterative"], facts)
  assert iterative.block_tokens == campaign.unit_work(
      by[f"{g}:iterative"], 14, facts["tokens"]).block_tokens > profile.block_tokens


def test_longer_tasks_read_l_star_on_fewer_items():
  fields = {r.name: r.fields for r in campaign.runs(campaign.LOCAL)}
  assert fields["smollm2_arc_easy_cloze"]["transition_items"] == 128
  assert fields["smollm2_hellaswag_cloze"]["transition_items"] == 64
  assert fields["gemma3_sciq_cloze"]["num_items"] == 60
  assert fields["qwen25_sciq_cloze"]["num_items"] == 60


def test_a_unit_measured_on_a_busy_machine_is_left_out_of_the_calibration(tmp_path):
  out = str(tmp_path)
  units = campaign.plan(campaign.LOCAL)
  first, second = units[0], units[3]  # SmolLM2's ARC-Easy and SciQ phase units
  prior = campaign.calibrate(out, units)
  _, base = campaign.predict(out, first, prior)
  campaign.record_unit(out, first, campaign.PRIOR_FIXED["smollm2"] + 3 * base, 1.0,
                       base_seconds=base, load=[0.5, 9.0], load_mean=6.5)
  rec = campaign.read_ledger(out)["units"][first.name]
  assert campaign.contended(rec) and campaign.unit_load(rec) == 6.5
  assert campaign.predict(out, second, campaign.calibrate(out, units))[0] == pytest.approx(
      campaign.predict(out, second, prior)[0])
  campaign.record_unit(out, first, campaign.PRIOR_FIXED["smollm2"] + 3 * base, 1.0,
                       base_seconds=base, load=[2.0, 3.0])  # no samples: start and end
  rec = campaign.read_ledger(out)["units"][first.name]
  assert not campaign.contended(rec) and campaign.unit_load(rec) == 2.5
  # Beside a load of 3.7 a unit that kept only 1.3 cores busy had 2.4 cores of company.
  campaign.record_unit(out, first, 3703.3, 1728.9, base_seconds=base, load_mean=3.67,
                       cpu_seconds=4822.8)
  rec = campaign.read_ledger(out)["units"][first.name]
  assert campaign.other_load(rec) == pytest.approx(3.67 - 4822.8 / 3703.3)
  assert campaign.contended(rec)
  campaign.record_unit(out, first, 400.0, 1400.0, base_seconds=base, load_mean=2.2,
                       cpu_seconds=740.0)  # 1.85 cores its own: 0.35 beside it
  assert not campaign.contended(campaign.read_ledger(out)["units"][first.name])
  campaign.record_unit(out, first, campaign.PRIOR_FIXED["smollm2"] + 3 * base, 1.0,
                       base_seconds=base, load=[2.0, 3.0])
  predicted, base2 = campaign.predict(out, second, campaign.calibrate(out, units))
  assert predicted == pytest.approx(campaign.PRIOR_FIXED["smollm2"] + 3 * base2, rel=1e-4)


def test_a_busy_unit_counts_by_its_cpu_time_and_the_parts_are_fitted(tmp_path):
  """A contended unit calibrates by its CPU seconds over the cores the quiet units kept
  busy; from `MIN_FIT_UNITS` finished units on, each part of the cost (block work,
  decoding, lens reads, a sweep's compile overhead) has its own coefficient, fitted to
  every kind at once."""
  out = str(tmp_path)
  units = campaign.plan(campaign.LOCAL)
  phase = [u for u in units if u.kind == "phase"]
  prior = campaign.calibrate(out, units)
  fixed = campaign.PRIOR_FIXED
  # A quiet unit kept 1.6 cores busy: the busy one's 1600 CPU seconds are 1000 s quiet.
  campaign.record_unit(out, phase[0], 500.0, 1.0, load_mean=1.7, cpu_seconds=800.0)
  campaign.record_unit(out, phase[1], 4000.0, 1.0, load_mean=6.0, cpu_seconds=1600.0)
  ledger = campaign.read_ledger(out)["units"]
  assert campaign.quiet_cores(ledger) == pytest.approx(1.6)
  assert campaign.quiet_seconds(ledger[phase[1].name], 1.6) == pytest.approx(1000.0)
  assert campaign.quiet_seconds(ledger[phase[0].name], 1.6) == 500.0
  bases = [campaign.predict(out, u, prior)[1] for u in units]
  scale = campaign.calibrate(out, units).coefficients[0]
  spent = (500.0 - fixed[phase[0].run.model]) + (1000.0 - fixed[phase[1].run.model])
  assert scale == pytest.approx(spent / (bases[0] + bases[1]))
  # Units of every kind, each at its fixed cost plus 0.7x its block work, 9x its decoding,
  # 1.6x its lens reads, 250 s where it sweeps pruned variants and 4x a search curve's
  # lens reads: the fit finds these coefficients, and the next unit is predicted so.
  out = str(tmp_path / "fitted")
  truth = [0.7, 9.0, 1.6, 250.0, 4.0]
  shapes = campaign.SHAPES
  work = lambda u: campaign._work(u, campaign.run_facts(out, u.run)).parts(shapes[u.run.model])
  chosen = [u for u in units if u.run.model == "smollm2"]
  assert {u.kind for u in chosen} == set(campaign.UNIT_KINDS)
  assert any(u.run.format == "generate" for u in chosen)
  assert all((work(u)[4] > 0) == (u.kind in ("iterative", "screened")) for u in chosen)
  chosen.sort(key=lambda u: u.kind == "phase")  # a phase unit is the one predicted
  for unit in chosen[:-1]:
    seconds = fixed[unit.run.model] + float(work(unit) @ truth)
    campaign.record_unit(out, unit, seconds, 1.0, load_mean=1.7, cpu_seconds=1.7 * seconds)
  calibration = campaign.calibrate(out, units)
  assert calibration.units >= campaign.MIN_FIT_UNITS
  assert calibration.coefficients == pytest.approx(truth, rel=1e-3)  # 0.1 s rounding
  last = chosen[-1]
  assert campaign.predict(out, last, calibration)[0] == pytest.approx(
      fixed[last.run.model] + float(work(last) @ truth), rel=1e-3)
  # The fit keeps every coefficient non-negative, and a part no unit exercised its prior.
  x = [[1.0, 0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0], [3.0, 0.0, 3.0, 0.0, 0.0]]
  coef = campaign.fit_coefficients(x, [30.0, 20.0, 10.0])
  assert (coef >= 0).all() and coef[1] == campaign.PRIOR_COEFFICIENTS[1]
  assert coef[3] == campaign.PRIOR_COEFFICIENTS[3] and coef[4] == campaign.PRIOR_COEFFICIENTS[4]


def test_the_load_sampler_samples_through_its_block(monkeypatch):
  import itertools
  loads = itertools.count(1.0)
  monkeypatch.setattr(campaign.os, "getloadavg", lambda: (float(next(loads)), 0.0, 0.0))
  import time
  with campaign.LoadSampler(every=0.05) as sampler:
    time.sleep(0.18)
  assert len(sampler.samples) >= 4 and sampler.samples[0] == 1.0
  assert sampler.mean == pytest.approx(sum(sampler.samples) / len(sampler.samples))


def test_a_unit_resumed_after_a_killed_start_does_not_calibrate(tmp_path):
  """A start the ledger notes but no record follows (the process was killed mid-unit)
  makes the next start's time part of the unit's work: recorded with its earlier starts,
  left out of the calibration and of the predicted-against-measured comparison."""
  out = str(tmp_path)
  units = campaign.plan(campaign.LOCAL)
  first, second = units[0], units[3]
  prior = campaign.calibrate(out, units)
  assert campaign.start_unit(out, first) == 0
  assert campaign.start_unit(out, first) == 1  # the first start was killed
  campaign.record_unit(out, first, 1000.0, 1.0, earlier_starts=1)
  ledger = campaign.read_ledger(out)
  assert "started" not in ledger and campaign.resumed(ledger["units"][first.name])
  assert campaign.calibrate(out, units).units == 0
  assert campaign.predict(out, second, campaign.calibrate(out, units))[0] == pytest.approx(
      campaign.predict(out, second, prior)[0])
  assert campaign.start_unit(out, second) == 0
  campaign.record_unit(out, second, 1000.0, 1.0)
  assert not campaign.resumed(campaign.read_ledger(out)["units"][second.name])
  assert campaign.calibrate(out, units).units == 1
