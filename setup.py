"""mmdiff_jax: multi-modal, multi-task diffusion models (MT-Diffusion) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="mmdiff_jax",
    version="0.1.0",
    description="Multi-modal, multi-task diffusion models (MT-Diffusion, ICLR 2024) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["mmdiff_jax", "mmdiff_jax.*", "experiments", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        # Data: TFDS builders read through tfds.data_source + grain; no TensorFlow.
        "tensorflow-datasets>=4.9.9",
        "importlib_resources",  # imported by tensorflow-datasets 4.9.10 without being declared
        "array-record>=0.8",
        "grain>=0.2.12",
        # Logging, pictures, metrics.
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "pillow>=10",
        "matplotlib>=3.8",
        "dm-pix>=0.4.4",
    ],
    extras_require={
        # ruff: the formatter (tests/test_format.py), pinned so that its output does not change under us.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "ruff==0.17.6"],
        # Benchmarks only (bench/vs_torch.py): the CPU wheel on the project machines. Never unpinned torch.
        "bench": ["torch==2.13.0"],
    },
)
