"""The exact-match response cache (issue 23): the canonical key, ``velvet cache what-if`` from the logs, and the
proxy's look-up."""
