from setuptools import setup

setup(
    name="peer-kernels",
    version="0.1.0",
    description="Triton kernels for PEER layers (Mixture of A Million Experts): retrieval and fused experts",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["peer_kernels", "peer_kernels.csrc_triton"],
    package_dir={"peer_kernels": "peer_kernels", "peer_kernels.csrc_triton": "csrc_triton"},
    install_requires=["torch>=2.6", "triton>=3.6", "numpy", "packaging"],
    extras_require={
        "test": ["pytest", "peer-pytorch==0.2.2", "einops>=0.8", "einx>=0.3"],
        "bench": ["matplotlib", "peer-pytorch==0.2.2", "einops>=0.8", "einx>=0.3"],
    },
)
