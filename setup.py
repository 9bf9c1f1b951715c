"""Installs refine_jax: an image captioner that describes an image by successive refinement."""

from setuptools import find_packages, setup

setup(
    name="refine_jax",
    version="0.1.0",
    description="Image-to-text by successive refinement with a weight-shared detailer (JAX/Flax).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["refine_jax", "refine_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array_record>=0.8.6,<0.9",
        "tensorflow-datasets>=4.9.10,<5",
        "sentencepiece>=0.2.0,<0.3",
        "ml_collections>=1.1.0,<2",
        "numpy>=1.26,<3",
        # jax's dtype package. Importing 0.7.0 takes 1.3 s longer than 0.6.0 (spent registering
        # its numpy ufunc loops), and every process pays it: each command, each test subprocess.
        "ml_dtypes>=0.5,<0.7",
        "pillow>=10.0,<13",
        "absl-py>=2.1,<3",
        "etils[epath]>=1.7,<2",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            # the README's test command runs the suite in two worker processes (-n 2)
            "pytest-xdist>=3.5,<4",
            "hypothesis>=6.100,<7",
            "pycocoevalcap>=1.2,<2",
            "ruff>=0.6,<1",
            "portpicker>=1.6,<2",
            # tests/test_import_graph.py checks the layered import contracts in .importlinter
            "import-linter>=2.1,<3",
            # tests/test_colabs.py executes the notebooks in colabs/
            "nbformat>=5.10,<6",
            "nbclient>=0.10,<0.12",
            "ipykernel>=6.29,<8",
        ],
    },
)
