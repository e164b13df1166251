"""Answering people rather than benches: one loaded model behind a batching queue (``engine``),
the terminal chat (``terminal``), and the OpenAI-compatible server with its web page (``app``)."""
