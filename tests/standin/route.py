"""A mitmproxy script for tests, demos and benchmarks: send streamed requests to the stand-in API.

``--map-remote`` acts in the ``request`` hook, which mitmproxy runs only after a streamed request
body has already gone upstream. Loaded after velvet (``-s addon/velvet.py -s tests/standin/route.py``),
this rewrites the destination of streamed requests in ``requestheaders`` instead.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import ctx, http


class StandinRoute:
    def load(self, loader) -> None:
        loader.add_option("standin_url", str, "", "Send streamed api.openai.com requests here (tests only).")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        url = ctx.options.standin_url
        if url and flow.request.stream and flow.request.host == "api.openai.com":
            u = urlsplit(url)
            flow.request.scheme, flow.request.host, flow.request.port = u.scheme, u.hostname, u.port


addons = [StandinRoute()]
