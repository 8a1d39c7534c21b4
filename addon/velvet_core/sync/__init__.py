"""Batches the proxy never saw: ``velvet sync`` pulls them from the API, the proxy's refresh keeps open ones
current, ``velvet reconcile`` checks the logs against OpenAI's Usage API."""
