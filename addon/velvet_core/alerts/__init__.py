"""Alerts: rules read from TOML, evaluated against the database, notified by webhook or command.

``rules`` parses and checks the file; ``evaluate`` measures each rule's kind with read-only SQL;
``state`` turns measurements into ok / warning / firing transitions; ``notify`` sends them;
``history`` keeps them in the ``alerts`` table; ``runner`` is the addon's thread and the one-shot check.
"""
