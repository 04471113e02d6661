"""The variant pipeline: choosing within a budget, healing, the perplexity gate, export and
its verification, and evaluation with lm-evaluation-harness (`dpjax.variants.lm_eval`, the
`lm_eval --model dpjax` backend)."""
