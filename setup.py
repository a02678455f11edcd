"""Installs the `nanogpt` and `kernels` packages (and, in a later step, the C++/CUDA extension)."""
from setuptools import find_packages, setup

setup(
    name="nanogpt",
    version="0.1.0",
    description="A kernel-centric GPT trainer: nanoGPT with fused Triton and C++/CUDA kernels",
    packages=find_packages(include=["nanogpt", "nanogpt.*", "kernels", "kernels.*"]),
    package_data={"nanogpt": ["assets/*.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tiktoken", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers"],
        "data": ["datasets"],
        "wandb": ["wandb"],
        "dev": ["pytest", "pytest-benchmark", "transformers", "triton>=3.6", "matplotlib"],
    },
    entry_points={"console_scripts": [
        "nanogpt-prepare=nanogpt.prepare:main",
        "nanogpt-train=nanogpt.train:main",
        "nanogpt-sample=nanogpt.sample:main",
    ]},
)
