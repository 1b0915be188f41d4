"""Checkpoint formats other than Hugging Face folders (cadenza.checkpoint): GGUF files (`gguf`, `gguf_arch`)."""
