"""Installs the `syncbn` library and the `syncbn-launch` command.

TensorFlow and Horovod are not listed in `install_requires`: TensorFlow is
pinned together with the Horovod build it must match (see `.ci/bootstrap.sh`),
and the launcher must install and run without either of them.
"""

from setuptools import find_packages, setup

setup(
    name="syncbn",
    version="0.1.0",
    description=(
        "Exact synchronized batch normalization for TensorFlow 2 / Keras 3 "
        "over Horovod, tf.distribute or MPI, and a fail-fast multi-process launcher."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["syncbn", "syncbn.*", "launch", "launch.*"]),
    # The MPI kernel's source; it is compiled on first use against the installed TensorFlow.
    package_data={"syncbn.collectives": ["mpi_all_sum.cc"]},
    install_requires=["numpy"],
    extras_require={
        "tf": ["tensorflow-cpu==2.18.1"],
        "mpi": ["mpi4py"],
        "test": ["pytest", "scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["syncbn-launch=launch.cli:main"]},
)
