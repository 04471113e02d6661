"""Readouts of the residual stream: the logit lens, tuned lenses, and lens training."""
