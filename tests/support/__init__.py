"""What the tests, the benchmarks and the fault suite share: the stand-in OpenAI API (``standin``), the proxy rig
(``rig``: a real mitmdump with velvet), the fault kit, the webhook receiver, report and privacy fixtures, the
test databases (``pg``) and small helpers (``helpers``). Importable as ``support`` with ``tests/`` on the path
(pytest's ``pythonpath``; the scripts' wrappers set ``PYTHONPATH``)."""
