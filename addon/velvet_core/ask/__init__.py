"""``velvet ask``: a question in words → read-only SQL over the logs, healed with the database's errors, and
``--eval``: its execution accuracy on a question set."""
