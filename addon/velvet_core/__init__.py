"""velvet: capture OpenAI API traffic (live calls and Batch API jobs) into SQLite or PostgreSQL."""

__version__ = "0.1.0"
