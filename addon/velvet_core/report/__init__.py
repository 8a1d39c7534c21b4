"""The report: one self-contained HTML page (SVG charts, no script needed) of a period's traffic."""
