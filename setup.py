from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="metaperturb-hf",
    version="0.1.0",
    description="MetaPerturb (NeurIPS 2020), a transferable meta-learned regularizer, for the Hugging Face ecosystem",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["metaperturb_hf", "metaperturb_hf.*"]),
    package_data={"metaperturb_hf.kernels": ["*.cpp"]},  # the fused CPU kernel's source, compiled on first use
    python_requires=">=3.10",
    install_requires=[
        # 2.13 is the CPU build the project is developed on; a looser pin pulls a multi-GB CUDA build by default.
        "torch>=2.4",
        "transformers>=5.0",
        "huggingface_hub>=1.0",
        "datasets>=4.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "pillow",
        "numpy",
    ],
    extras_require={
        # ninja: torch.utils.cpp_extension builds the fused CPU kernel with it (and a C++ compiler); without it φ
        # runs its eager path.
        "kernels": ["ninja"],
        # φ's fused GPU kernels (CUDA builds of torch bring triton; CPU builds run them only through its interpreter)
        "triton": ["triton"],
        "test": ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "matplotlib>=3.7", "ninja", "ruff>=0.6"],
        "examples": ["scikit-learn>=1.3", "matplotlib>=3.7", "tensorboard", "ninja"],
    },
    entry_points={"console_scripts": ["metaperturb-convert=metaperturb_hf.convert:main"]},
)
