"""The one rule for a batch's model, tokens and cost, used by every command and the report.

Model: the API's ``model``, else the model most of its input lines ask for (a tie: the first by name), for
older batches and compatible servers whose batch object has none. Tokens and cost: summed from the logged
result lines when there are any, else the API's ``usage``.
"""

from __future__ import annotations

from typing import Any


def model_sql(b: str = "b") -> str:
    """SQL of the rule's model for the batch row aliased `b`. COALESCE evaluates the subquery only for a
    batch without an API model (an index range on batch_requests (batch_id, …)), so listings stay as fast."""
    return (f"COALESCE({b}.model, (SELECT r.model FROM batch_requests r WHERE r.batch_id = {b}.id "
            "AND r.model IS NOT NULL GROUP BY r.model ORDER BY count(*) DESC, r.model LIMIT 1))")


def columns_sql(b: str = "b", counts: str = "bc") -> str:
    """The columns :func:`figures` reads, from the batch `b` and its ``batch_counts`` row `counts`."""
    return (f"{model_sql(b)} AS rule_model, {counts}.input_tokens AS line_input_tokens, "
            f"{counts}.output_tokens AS line_output_tokens, {counts}.cost_usd AS line_cost_usd")


def figures(r: dict[str, Any]) -> dict[str, Any]:
    """A batch's model, tokens and cost by the rule, from a row with the batch's columns and columns_sql()."""
    def pick(lines: Any, api: Any) -> Any:
        return lines if lines is not None else api

    return {"model": r.get("rule_model"),
            "input_tokens": pick(r.get("line_input_tokens"), r.get("input_tokens")),
            "output_tokens": pick(r.get("line_output_tokens"), r.get("output_tokens")),
            "cost_usd": pick(r.get("line_cost_usd"), r.get("usage_cost_usd"))}
