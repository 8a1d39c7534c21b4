"""mitmproxy entry point of an installed velvet: ``mitmdump -s "$(velvet addon-path)"`` (``velvet proxy`` does it).

Alone in its folder on purpose: mitmproxy puts a script's folder on ``sys.path``, and no other module may be found
there.
"""

from velvet_core.addon import Velvet

addons = [Velvet()]
