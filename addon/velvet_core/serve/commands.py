"""What ``velvet proxy`` and ``velvet addon-path`` do: mitmdump or mitmweb, from the same installation, with
velvet's addon loaded from the installed package, and how to point apps at it (or a systemd unit that runs it)."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from velvet_core import config
from velvet_core.redact import redact


def addon_path() -> Path:
    return Path(__file__).resolve().parent.parent / "script" / "velvet.py"


def cmd_addon_path(url: str, a: argparse.Namespace) -> int:
    if a.json:
        from velvet_core import jsonout

        jsonout.dump({"path": str(addon_path())})
    else:
        print(addon_path())
    return 0


def cmd_proxy(url: str, a: argparse.Namespace) -> int:
    extra: list[str] = list(a.passthrough_args)
    if a.service:
        sys.stdout.write(unit(a, extra))
        return 0
    port = a.port or int(os.environ.get("VELVET_PORT") or 8080)
    host = a.listen_host or os.environ.get("VELVET_HOST") or "127.0.0.1"
    if a.reverse is not None and not re.fullmatch(r"https?://[^/\s]+/?", a.reverse):
        print("velvet: --reverse takes a scheme and host, e.g. https://api.openai.com or "
              "https://myres.openai.azure.com", file=sys.stderr)
        return 2
    confdir = os.environ.get("MITMPROXY_CONFDIR") or str(Path.home() / ".mitmproxy")
    args = ["--listen-host", host, "-p", str(port), "--set", f"confdir={confdir}", "-s", str(addon_path())]
    if a.db:
        args += ["--set", f"velvet_db={a.db}"]
    db = next((x.split("=", 1)[1] for x in reversed(extra) if x.startswith("velvet_db=")), a.db or url)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    say = sys.stderr.write
    if a.reverse is not None:
        target = a.reverse.rstrip("/")
        target_host = urlsplit(target).hostname or ""
        args += ["--mode", f"reverse:{target}"]
        if target_host != "api.openai.com":  # the target is the host velvet sees: capture it too
            args += ["--set", "velvet_hosts=api.openai.com", "--set", f"velvet_hosts={target_host}"]
        if target_host.endswith(".openai.azure.com"):
            point = f"    export AZURE_OPENAI_ENDPOINT=http://{shown}:{port}     # AzureOpenAI clients"
        else:
            point = (f"    export OPENAI_BASE_URL=http://{shown}:{port}/v1        "
                     "# every official OpenAI SDK reads it")
        say(f"velvet: reverse proxy to {target} on {host}:{port}, logging into {redact(db)}\n"
            "Point your app at it (plain HTTP to the proxy: no proxy setting, no CA to trust):\n"
            f"{point}\n"
            f'    curl http://{shown}:{port}/v1/models -H "Authorization: Bearer $OPENAI_API_KEY"\n')
    else:
        ca = f"{confdir}/mitmproxy-ca-cert.pem"
        say(f"velvet: proxy on {host}:{port}, logging into {redact(db)}\n"
            "Point your app at it:\n"
            f"    export HTTPS_PROXY=http://{shown}:{port}\n"
            "and trust mitmproxy's CA (written on first start):\n"
            f"    export SSL_CERT_FILE={ca}        # Python: openai, httpx\n"
            f"    export REQUESTS_CA_BUNDLE={ca}   # requests\n"
            f"    export NODE_EXTRA_CA_CERTS={ca}  # Node.js (with undici's EnvHttpProxyAgent; see README)\n"
            "(or run  velvet proxy --reverse  and use OPENAI_BASE_URL, which needs neither)\n")
    program = "mitmdump"
    if a.web:
        program = "mitmweb"
        import argon2  # (a dependency of mitmproxy's)

        password = os.environ.get("VELVET_WEB_PASSWORD") or secrets.token_urlsafe(18)
        web_port = "8081"
        for i, x in enumerate(extra):
            if x == "--web-port" and i + 1 < len(extra):
                web_port = extra[i + 1]
            elif x.startswith("--web-port="):
                web_port = x.split("=", 1)[1]
        # mitmweb is given only an argon2 hash: the password itself never appears in the process list
        args += ["--set", f"web_password={argon2.PasswordHasher().hash(password)}"]
        for column in ("tls", "icon", "path", "method", "status", "size", "time", "comment"):
            args += ["--set", f"web_columns={column}"]
        say(f"mitmweb: http://127.0.0.1:{web_port}/?token={password}   (the token is the password, shown only "
            "here)\n")
    say("Query it with:  velvet --help      Stop with Ctrl-C.\n")
    sys.stderr.flush()
    exe = Path(sys.executable).with_name(program)
    argv = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                            f"from mitmproxy.tools.main import {program}; {program}()"]
    os.execv(argv[0], [*argv, *args, *extra])


def unit(a: argparse.Namespace, extra: list[str]) -> str:
    """A systemd unit running this ``velvet proxy`` (without ``--service``); the database URL, which may hold a
    password, goes to an environment file (mode 0600), never into the unit."""
    system = a.service == "system"
    argv = [str(Path(sys.argv[0]).resolve()) if Path(sys.argv[0]).name == "velvet" else "velvet", "proxy"]
    db = a.db
    for opt, value in (("--reverse", a.reverse), ("--port", a.port), ("--listen-host", a.listen_host)):
        if value is not None:
            argv += [opt, str(value)]
    if a.web:
        argv.append("--web")
    rest: list[str] = []
    for i, x in enumerate(extra):
        if x.startswith("velvet_db=") and i and extra[i - 1] == "--set":
            db = x.split("=", 1)[1]
            rest.pop()  # the --set before it
            continue
        rest.append(x)
    argv += rest
    env_file = "/etc/velvet/env" if system else "%h/.config/velvet/env"
    where = "/etc/systemd/system/velvet.service" if system else "~/.config/systemd/user/velvet.service"
    ctl = "systemctl" if system else "systemctl --user"
    lines = [
        f"# Save as {where}, then:  {ctl} daemon-reload && {ctl} enable --now velvet",
        f"# The database URL goes in {env_file.replace('%h', '~')} (mode 0600), never in this file:",
        f"#   VELVET_DB={redact(db) if db else config.default_db_url()}",
        "[Unit]",
        "Description=velvet: OpenAI API traffic logged by mitmproxy",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        f"ExecStart={' '.join(_systemd_quote(x) for x in argv)}",
        f"EnvironmentFile=-{env_file}",
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=5",
        # mitmproxy's flush timeout (velvet_flush_timeout, 30 s) plus a margin before SIGKILL
        "TimeoutStopSec=60",
        "KillSignal=SIGINT",
    ]
    if system:
        lines += ["User=velvet", "StateDirectory=velvet", "Environment=VELVET_HOME=/var/lib/velvet",
                  "Environment=MITMPROXY_CONFDIR=/var/lib/velvet/mitmproxy", "UMask=0077"]
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}", ""]
    return "\n".join(lines)


def _systemd_quote(word: str) -> str:
    """One word of ``ExecStart`` (systemd expands ``$`` and ``%`` in it: written doubled)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
