"""Running velvet without a checkout: ``velvet proxy`` (mitmdump or mitmweb with the installed addon),
``velvet addon-path`` and a systemd unit."""
