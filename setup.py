"""Build the pybind11 C++ parts. Needs no torch: CUDA kernels are JIT-built on first use (megagpt/model/softmax.py)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "megagpt.data._builder_cpp",
        ["csrc/indexed_dataset.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "megagpt.data._helpers_cpp",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="megagpt",
    version="0.1.0",
    description="Megatron-style 3D-parallel (tensor, pipeline, ZeRO data) GPT training on PyTorch",
    packages=find_packages(include=["megagpt", "megagpt.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
)
