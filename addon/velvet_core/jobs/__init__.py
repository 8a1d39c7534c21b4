"""The proxy's background process: answer checks and judges (velvet_evals), open batches kept current
(velvet_refresh), off mitmproxy's process and at the lowest priority."""
