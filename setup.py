"""Installs modeconn_fast; the top-level folder kernels/ becomes the sub-package modeconn_fast.kernels."""
from setuptools import find_packages, setup

setup(
    name="modeconn_fast",
    version="0.1.0",
    description="Fast mode connectivity for any PyTorch nn.Module: paths, barriers, curves, Re-Basin, landscapes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["modeconn_fast", "modeconn_fast.*"]) + ["modeconn_fast.kernels"],
    package_dir={"modeconn_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "numba",
        "scipy",
        "matplotlib",
        "plotly>=5",
        "tqdm",
        "scikit-learn",
    ],
    extras_require={
        "triton": ["triton; platform_system == 'Linux'"],
        "safetensors": ["safetensors"],
        "dev": ["pytest", "pytest-benchmark", "safetensors", "triton; platform_system == 'Linux'"],
        "bench": ["pytest-benchmark", "loss-landscapes"],
    },
    entry_points={"console_scripts": ["modeconn = modeconn_fast.cli:main"]},
)
