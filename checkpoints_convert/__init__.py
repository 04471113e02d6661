"""Hugging Face checkpoints in and out of dpjax: `dpjax-convert` and `dpjax-export`."""
