"""The arguments of ``velvet proxy`` and ``velvet addon-path`` (what they do:
:mod:`velvet_core.serve.commands`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

RUN = "velvet_core.serve.commands:"
OPENAI = "https://api.openai.com"


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("proxy", RUN + "cmd_proxy", "run mitmdump (or mitmweb) with velvet's addon from this "
                                            "installation; arguments it does not know go to mitmproxy "
                                            "(--set velvet_db=URL, ...)", json=False)
    p.add_argument("--reverse", nargs="?", const=OPENAI, metavar="URL",
                   help=f"a reverse proxy to URL (default {OPENAI}): apps set OPENAI_BASE_URL, no proxy and no CA")
    p.add_argument("--web", action="store_true", help="mitmweb instead of mitmdump: the flow list with velvet's "
                                                      "comment column, behind a generated password printed once")
    p.add_argument("--port", type=int, help="listen on this port (default $VELVET_PORT, else 8080)")
    p.add_argument("--listen-host", metavar="HOST",
                   help="listen on HOST (default $VELVET_HOST, else 127.0.0.1: an open proxy lets anyone spend)")
    p.add_argument("--service", nargs="?", const="user", choices=("user", "system"),
                   help="print a systemd unit that runs this command (user: ~/.config/systemd/user; system: "
                        "/etc/systemd/system), then exit")
    p.set_defaults(opens="none", passthrough=True)
    p = command("addon-path", RUN + "cmd_addon_path", "print the path of the installed addon script, for "
                                                     "mitmdump -s \"$(velvet addon-path)\"")
    p.set_defaults(opens="none")
