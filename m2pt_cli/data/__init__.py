"""Training data: sources (LLaVA JSON, Hugging Face datasets, the demo's digits), encoding, batching."""
