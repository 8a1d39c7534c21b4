"""velvet: capture OpenAI API traffic (live calls and Batch API jobs) into SQLite or PostgreSQL."""

__version__ = "0.1.0"
SCHEMA = 19  # the last step of storage/migrations.py, which checks it (here for a fast `velvet --version`)
