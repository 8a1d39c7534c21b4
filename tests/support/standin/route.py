"""A mitmproxy script for tests, demos and benchmarks: send streamed requests to the stand-in API.

``--map-remote`` acts in the ``request`` hook, which mitmproxy runs only after a streamed request
body has already gone upstream. Loaded after velvet (``-s addon/velvet.py -s tests/support/standin/route.py``),
this rewrites the destination of streamed requests to ``standin_hosts`` in ``requestheaders`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from mitmproxy import ctx, http


class StandinRoute:
    def load(self, loader) -> None:
        loader.add_option("standin_url", str, "", "Send streamed requests to standin_hosts here (tests only).")
        loader.add_option("standin_hosts", Sequence[str], ["api.openai.com"], "Hosts the stand-in plays.")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        url = ctx.options.standin_url
        if url and flow.request.stream and flow.request.host in ctx.options.standin_hosts:
            u = urlsplit(url)
            flow.request.scheme, flow.request.host, flow.request.port = u.scheme, u.hostname, u.port


addons = [StandinRoute()]
