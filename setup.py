"""Packaging for fusedrl: the `kernels` and `engine` packages and the `fusedrl` command.

torch is deliberately not a build requirement: pip's isolated build environment would otherwise
download a multi-gigabyte CUDA build just to run this file. Install torch first (see README.md).
"""
from setuptools import setup

setup(
    name="fusedrl",
    version="0.1.0",
    description="Kernel-optimized single-node RLHF: fused Triton kernels and a lean hybrid engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kernels", "engine"],
    install_requires=[
        "torch>=2.5",
        # Triton ships Linux wheels only; elsewhere the PyTorch backend is used.
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        # engine/: config reading (AutoConfig) and tokenizers; checkpoints; the progress bar.
        "transformers>=4.45",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm",
        # engine/ training stages: YAML configs, `fusedrl plot`.
        "pyyaml>=6",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4"],
        "bench": ["pytest-benchmark>=4"],
        # train.tensorboard=true (torch.utils.tensorboard writes the events).
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["fusedrl=engine.cli:main"]},
)
