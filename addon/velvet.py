"""mitmproxy entry point: ``mitmdump -s addon/velvet.py``.

The code lives in the ``velvet_core`` package beside this file (or installed with pip).
"""

from velvet_core.addon import Velvet

addons = [Velvet()]
