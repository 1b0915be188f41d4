"""Native kernels, JIT-built on first use with a PyTorch fallback: cpu_moe (the fused CPU MoE step); handoff (the
thread that runs a streamed layer's CPU job when the CUDA stream asks, falling back to a host function)."""
