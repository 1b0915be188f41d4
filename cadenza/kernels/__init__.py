"""Native kernels, JIT-built on first use with a PyTorch fallback: cpu_moe (the fused CPU MoE step)."""
