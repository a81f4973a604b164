"""The TensorFlow versions syncbn supports, in one place and without imports.

`setup.py` reads this file (it cannot import syncbn, which imports
TensorFlow), `syncbn/__init__.py` warns when the installed TensorFlow is
outside the range, and `syncbn-build-horovod` uses it for the same check.
"""

__version__ = "0.2.0"

#: Oldest supported TensorFlow (inclusive), as (major, minor).
TF_MIN = (2, 18)
#: Newest supported TensorFlow (inclusive), as (major, minor).
TF_MAX = (2, 21)
#: The TensorFlow the README's commands and CI install by default.
TF_DEFAULT = "2.21.0"
#: Also tested in CI (the multi-process exactness and Horovod glue tests).
TF_ALSO_TESTED = ("2.18.1",)


def tf_range_text():
    return f">={TF_MIN[0]}.{TF_MIN[1]},<{TF_MAX[0]}.{TF_MAX[1] + 1}"


def major_minor(version):
    """`"2.21.0rc1"` -> `(2, 21)`; None when `version` does not start with two numbers."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        return None


def tf_supported(version):
    parsed = major_minor(version)
    return parsed is not None and TF_MIN <= parsed <= TF_MAX


def unsupported_message(version):
    """The warning for a TensorFlow `version` outside the range, or None inside it."""
    if tf_supported(version):
        return None
    return (f"syncbn supports TensorFlow {tf_range_text()}; this is TensorFlow {version}. "
            "It may work, but it is not tested.")
