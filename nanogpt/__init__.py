"""nanogpt: a kernel-centric GPT trainer (nanoGPT's features, fused Triton and C++/CUDA kernels)."""
__version__ = "0.1.0"
