"""Build and install romer_kernels with its C++ extension romer_kernels._C.

Build without isolation so the extension compiles against the pinned CPU torch already installed (an
isolated build would download another, CUDA, torch):

    pip install --no-build-isolation -e .

The torch-free C++ core and its unit tests are built separately with CMake (see CMakeLists.txt).
"""
from pathlib import Path

from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def extension_sources() -> list[str]:
    """Every .cpp under csrc/ except the standalone C++ tests (they have their own main())."""
    sources = [p for p in CSRC.rglob("*.cpp") if "tests" not in p.relative_to(CSRC).parts]
    return sorted(str(p.relative_to(ROOT)) for p in sources)


# -march=x86-64-v3: AVX2 + FMA (no AVX-512). -ffp-contract=off: no implicit fma contraction, which the
# stream's bit-exactness relies on. -fno-math-errno only lets GCC vectorise sqrt (values unchanged).
# -g0 drops the debug info that Python's default CFLAGS would add.
CXX_FLAGS = ["-O3", "-march=x86-64-v3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-g0"]

setup(
    name="romer_kernels",
    version="0.1.0",
    description="Fast analog in-memory-computing simulation for Mixture-of-Experts language models",
    # namespace discovery: the asset folders (data, no __init__.py) are packages too, so setuptools ships
    # them without its "package would be ignored" warning
    packages=find_namespace_packages(include=["romer_kernels", "romer_kernels.*"]),
    package_data={"romer_kernels": ["assets/corpus/*", "assets/models/*/*", "assets/configs/*.json",
                                    "assets/tasks/*/*"]},
    include_package_data=True,
    entry_points={"console_scripts": ["romer = romer_kernels.cli.main:main"]},
    python_requires=">=3.10",
    install_requires=[
        # The lowest torch transformers 5 supports (its own floor); the APIs used here (untyped_storage,
        # aminmax, the C++ extension API) are older. Tested with 2.13.0, which requirements.txt pins for
        # `make` (an unpinned torch pulls a multi-GB CUDA build on this CPU machine).
        "torch>=2.6",
        "numpy",
        "transformers>=5,<6",
        "safetensors",
        "tqdm",
        "rich",
        "matplotlib",
        "scipy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "triton==3.9.0", "ray>=2.40",
                 "lm_eval>=0.4.9", "accelerate>=0.26"],
        # downstream task accuracy (romer demo|eval|compare --tasks); tested with lm_eval 0.4.13
        "lm_eval": ["lm_eval>=0.4.9", "accelerate>=0.26"],
        # distributed Monte Carlo (romer demo|eval|compare --executor ray); tested with 2.60.0
        "ray": ["ray>=2.40"],
    },
    ext_modules=[
        CppExtension(
            name="romer_kernels._C",
            sources=extension_sources(),
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
