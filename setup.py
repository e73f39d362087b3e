"""Packaging for fusedrl: the import packages `fusedrl.kernels` (folder kernels/),
`fusedrl.engine` (folder engine/) and `fusedrl.bench` (folder bench/: `fusedrl bench`), the
`fusedrl` command, and the optional CUDA extension `fusedrl.kernels._C` (csrc/). `fusedrl` itself
is a namespace package: it has no folder of its own.

torch is deliberately not a build requirement: pip's isolated build environment would otherwise
download a multi-gigabyte CUDA build just to run this file. Install torch first (see README.md).

The extension is built only where it can be: torch importable at build time with CUDA support,
and nvcc found (CUDA_HOME, else PATH), for the archs in TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
Anywhere else one line says why it is skipped, and the pure-Python package installs as usual (the
Triton and PyTorch backends need no build). Overrides: FUSEDRL_SKIP_CUDA_BUILD=1 never builds it,
FUSEDRL_FORCE_CUDA_BUILD=1 always tries (e.g. torch reports CUDA but detection missed nvcc). In
pip's isolated build torch is not importable: build the extension with
`FUSEDRL_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e .` or
`FUSEDRL_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace`.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Mapping, Optional

from setuptools import find_packages, setup

EXTENSION = "fusedrl.kernels._C"
# Import name -> folder in this repository (the folders keep their short names).
PACKAGE_ROOTS = {"fusedrl.kernels": "kernels", "fusedrl.engine": "engine", "fusedrl.bench": "bench"}
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def plan_cuda_build(environ: Mapping[str, str], *, torch_found: bool, torch_cuda: Optional[str],
                    nvcc: Optional[str]) -> tuple[bool, str]:
    """(build the extension?, why): the env overrides first, then what was detected.

    torch_found: torch is importable here; torch_cuda: its CUDA version (None for a CPU build);
    nvcc: the compiler's path (None if not found).
    """
    skip = environ.get("FUSEDRL_SKIP_CUDA_BUILD", "0") == "1"
    force = environ.get("FUSEDRL_FORCE_CUDA_BUILD", "0") == "1"
    if skip and force:
        raise ValueError("FUSEDRL_SKIP_CUDA_BUILD=1 and FUSEDRL_FORCE_CUDA_BUILD=1 contradict each other")
    if skip:
        return False, "FUSEDRL_SKIP_CUDA_BUILD=1"
    if force:
        if not torch_found:
            raise RuntimeError("FUSEDRL_FORCE_CUDA_BUILD=1 but torch is not importable in this build "
                               "environment; use `pip install --no-build-isolation` or "
                               "`python setup.py build_ext --inplace`")
        return True, "FUSEDRL_FORCE_CUDA_BUILD=1"
    if not torch_found:
        return False, "torch is not importable in this build environment, e.g. pip's isolated build"
    if torch_cuda is None:
        return False, "torch is a CPU-only build"
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch with CUDA {torch_cuda} and {nvcc}"


def detect_cuda() -> dict:
    """The facts plan_cuda_build decides on, read from this environment."""
    try:
        import torch
    except ImportError:
        return {"torch_found": False, "torch_cuda": None, "nvcc": None}
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) if cuda_home else shutil.which("nvcc")
    return {"torch_found": True, "torch_cuda": torch.version.cuda, "nvcc": nvcc}


def toolkit_root(nvcc: str) -> str:
    """The CUDA toolkit nvcc belongs to, as nvcc reports it. torch guesses CUDA_HOME as the parent
    of nvcc's directory, which is wrong for a wrapper script on PATH (e.g. /usr/local/bin/nvcc)."""
    dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True,
                             text=True).stderr
    top = re.search(r"^#\$ TOP=(.*)$", dry_run, re.M)
    return os.path.normpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(nvcc))


def cuda_build_options() -> dict:
    """setup() arguments for fusedrl.kernels._C, or none (after one line saying why) when not built."""
    detected = detect_cuda()
    build, reason = plan_cuda_build(os.environ, **detected)
    if not build:
        print(f"fusedrl: skipping the CUDA extension {EXTENSION} ({reason}); the Triton and PyTorch "
              f"backends need no build. FUSEDRL_FORCE_CUDA_BUILD=1 builds it anyway.")
        return {}
    if detected["nvcc"]:  # torch reads CUDA_HOME when cpp_extension is imported
        os.environ.setdefault("CUDA_HOME", toolkit_root(detected["nvcc"]))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"fusedrl: building the CUDA extension {EXTENSION} ({reason}) for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    # The C++ standard is left to torch: its headers need C++17 or C++20 depending on the version.
    extension = CUDAExtension(
        EXTENSION, sorted(glob.glob("csrc/*.cu")) + ["csrc/binding.cpp"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def packages() -> list[str]:
    """Every package under PACKAGE_ROOTS, by import name (fusedrl.engine.model, ...)."""
    names = []
    for name, folder in PACKAGE_ROOTS.items():
        names.append(name)
        names += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return names


def main() -> None:
    setup(
        name="fusedrl",
        version="0.1.0",
        description="Kernel-optimized single-node RLHF: fused Triton kernels and a lean hybrid engine",
        long_description=open("README.md", encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=packages(),
        package_dir=PACKAGE_ROOTS,
        # The YAML starting points of `fusedrl sft|rm|ppo --config`, shipped in wheels too.
        # ... and the Triton launches `fusedrl demo` compiles ahead (engine/demos/sorting.py).
        package_data={"fusedrl.engine.config": ["presets/*.yaml"],
                      "fusedrl.engine.demos": ["demo_launches.json"]},
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
            # engine/ stages: YAML configs, `fusedrl plot`; data files and Datasets (TRL's).
            "pyyaml>=6",
            "datasets>=2.14",
            "matplotlib>=3.7",
        ],
        extras_require={
            # trl: the peer of bench/bench_ppo.py (its last release with a PPO trainer); the test
            # suite runs that comparison on a tiny model. requests: trl's GRPOTrainer imports it
            # (bench_ppo.py --algo grpo) without declaring it. peft: the LoRA files are tested against it.
            # pytest-xdist: the test command runs the suite on both cores of a CI machine (-n 2).
            # setuptools and wheel: the wheel's test builds it without build isolation.
            "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "tensorboard>=2.14", "trl==0.29.1",
                     "requests", "peft>=0.17", "setuptools>=64", "wheel"],
            "bench": ["pytest-benchmark>=4", "trl==0.29.1", "requests", "peft>=0.17"],
            # train.report_to=tensorboard (torch.utils.tensorboard writes the events), wandb,
            # mlflow: each tracker through its own library (docs/runs.md).
            "tensorboard": ["tensorboard>=2.14"],
            # fusedrl.kernels.integrations.trl.FusedGRPOTrainer: TRL 1.x's GRPOTrainer, on our
            # head and loss (docs/integrations.md). Not with the test extra's trl 0.29.1.
            "trl": ["trl>=1.16,<2"],
            "wandb": ["wandb>=0.17"],
            "mlflow": ["mlflow>=2.10"],
        },
        entry_points={"console_scripts": ["fusedrl=fusedrl.engine.cli:main"]},
        **cuda_build_options(),
    )


# pip and `python setup.py` run this file as __main__; tests import it for plan_cuda_build.
if __name__ == "__main__":
    main()
