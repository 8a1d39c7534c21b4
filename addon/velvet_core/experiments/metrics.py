"""The names of ``velvet compare``'s metrics and the judge's default model: what the parser offers without
importing the comparison itself."""

from __future__ import annotations

# per side: a value for each line of A and of B; pairwise: one value per pair (a and b stay null)
SIDE_METRICS = ("cost_usd", "input_tokens", "output_tokens", "latency", "turnaround", "json_valid",
                "finish_reason", "contains", "regex", "judge")
PAIR_METRICS = ("exact_match", "json_fields", "similarity")
METRICS = ("cost_usd", "input_tokens", "output_tokens", "latency", "turnaround", "exact_match", "contains",
           "regex", "json_valid", "json_fields", "finish_reason", "similarity", "judge")
DEFAULT_METRICS = ("cost_usd", "input_tokens", "output_tokens", "latency", "turnaround", "exact_match",
                   "json_valid", "json_fields", "finish_reason", "similarity")
JUDGE_MODEL = "gpt-4o-mini"  # the judge metric's grading model
