"""Putting the logs to work: replay logged requests (``velvet replay``), compare two runs (``velvet compare``),
export answers as fine-tuning data (``velvet export --format finetune``)."""
