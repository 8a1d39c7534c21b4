"""The project's stand-in for the OpenAI API (tests, the demo and the benchmarks; not shipped).

``server.StandIn`` serves the API's object shapes locally; ``route.py`` is a mitmproxy script that sends
streamed requests to it.
"""

from support.standin.server import StandIn

__all__ = ["StandIn"]
