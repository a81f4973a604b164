"""Installs the `syncbn` library and the `syncbn-launch` and `syncbn-build-horovod` commands.

TensorFlow is not in `install_requires`: a GPU user's `tensorflow` must not be
replaced by `tensorflow-cpu` (or the other way round), and the launcher runs
without it. Supported TensorFlow: see `syncbn/_versions.py` (2.18 to 2.21);
importing syncbn with another version warns. Horovod has no wheels for these
versions: `syncbn-build-horovod` builds it for the TensorFlow you have.
"""

import os
import runpy

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
VERSIONS = runpy.run_path(os.path.join(HERE, "syncbn", "_versions.py"))
TF_RANGE = VERSIONS["tf_range_text"]()

setup(
    name="syncbn",
    version=VERSIONS["__version__"],
    description=(
        "Exact synchronized batch normalization for TensorFlow 2 / Keras 3 "
        "over Horovod, tf.distribute or MPI, and a fail-fast multi-process launcher."
    ),
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["syncbn", "syncbn.*", "launch", "launch.*"]),
    # The MPI kernel's source is compiled on first use against the installed
    # TensorFlow; the Horovod patch is applied by syncbn-build-horovod.
    package_data={"syncbn.collectives": ["mpi_all_sum.cc"], "launch": ["patches/*.patch"]},
    install_requires=["numpy"],
    extras_require={
        # Choose one, or bring your own TensorFlow in the supported range.
        "cpu": [f"tensorflow-cpu{TF_RANGE}"],
        "gpu": [f"tensorflow[and-cuda]{TF_RANGE}"],
        "mpi": ["mpi4py"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": [
        "syncbn-launch=launch.cli:main",
        "syncbn-build-horovod=launch.build_horovod:main",
    ]},
)
