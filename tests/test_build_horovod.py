"""syncbn-build-horovod's decisions, in one process: which TensorFlow needs the
patch, what the build environment holds on CPU and GPU machines, the supported
range's warning, and that the patch applies to the file it is for.

The build itself runs in every bootstrap (.ci/bootstrap.sh calls the command),
and `test_installed_horovod_was_built_for_this_tensorflow` checks its product.
"""

import os
import shutil
import subprocess
import sys

import pytest

from launch import build_horovod
from syncbn import _versions

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("version, expected", [
    ("2.18.1", False), ("2.18.0rc2", False), ("2.19.0", True), ("2.21.0", True), ("3.0.0", True),
])
def test_patch_only_from_tf_2_19(version, expected):
    assert build_horovod.needs_patch(version) is expected


def test_unparseable_version_is_an_error_naming_it():
    with pytest.raises(build_horovod.BuildError, match="tf_version='nightly'"):
        build_horovod.needs_patch("nightly")


@pytest.mark.parametrize("version, supported", [
    ("2.17.1", False), ("2.18.1", True), ("2.19.0", True), ("2.21.0", True), ("2.22.0", False),
])
def test_supported_range_and_its_warning(version, supported):
    message = _versions.unsupported_message(version)
    assert (message is None) is supported
    if not supported:
        assert version in message and ">=2.18,<2.22" in message


def _fake_cuda(tmp_path, with_nccl):
    cuda = tmp_path / "cuda"
    (cuda / "include").mkdir(parents=True)
    (cuda / "include" / "cuda.h").write_text("")
    if with_nccl:
        (cuda / "include" / "nccl.h").write_text("")
    return str(cuda)


def test_cpu_build_environment_has_gloo_and_mpi_and_no_gpu_ops():
    env, flavour = build_horovod.build_environment({"PATH": ""}, "auto", jobs=3)
    assert flavour == "cpu"
    for variable in ("HOROVOD_WITH_TENSORFLOW", "HOROVOD_WITH_GLOO", "HOROVOD_WITH_MPI"):
        assert env[variable] == "1"
    assert env["MAKEFLAGS"] == "-j3" and "HOROVOD_GPU_OPERATIONS" not in env


def test_gpu_build_uses_nccl_when_cuda_and_nccl_are_found(tmp_path):
    cuda = _fake_cuda(tmp_path, with_nccl=True)
    env, flavour = build_horovod.build_environment({"PATH": "", "CUDA_HOME": cuda}, "auto", jobs=2)
    assert flavour == "nccl"
    assert env["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert env["HOROVOD_CUDA_HOME"] == cuda and env["HOROVOD_NCCL_HOME"] == cuda
    env, flavour = build_horovod.build_environment({"PATH": "", "CUDA_HOME": cuda}, "no", jobs=2)
    assert flavour == "cpu" and "HOROVOD_GPU_OPERATIONS" not in env


def test_gpu_yes_without_nccl_fails_saying_what_is_missing(tmp_path):
    cuda = _fake_cuda(tmp_path, with_nccl=False)
    with pytest.raises(build_horovod.BuildError, match="nccl=None"):
        build_horovod.build_environment({"PATH": "", "CUDA_HOME": cuda}, "yes", jobs=2)
    with pytest.raises(ValueError, match="gpu='sometimes'"):
        build_horovod.build_environment({}, "sometimes", jobs=2)


def test_wheel_dir_is_keyed_by_tensorflow_version_and_flavour(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNCBN_CACHE_DIR", str(tmp_path))
    assert build_horovod.default_wheel_dir("2.21.0", "cpu") == str(tmp_path / "wheels" / "tf-2.21.0")
    assert build_horovod.default_wheel_dir("2.18.1", "nccl").endswith("tf-2.18.1-nccl")


@pytest.mark.parametrize("version,expected", [
    ("2.18.1", ["horovod-0.28.1-gloo-stall-check.patch",
                "horovod-0.28.1-legacy-keras-backend.patch"]),
    ("2.21.0", ["horovod-0.28.1-gloo-stall-check.patch",
                "horovod-0.28.1-legacy-keras-backend.patch", "horovod-0.28.1-tf2.19-xla.patch"]),
])
def test_every_build_gets_the_gloo_and_keras_fixes_and_tf_2_19_on_the_xla_patch(version, expected):
    patches = build_horovod.patches_for(version)
    assert [os.path.basename(p) for p in patches] == expected
    assert all(os.path.exists(p) for p in patches)


def test_cached_wheel_is_reused_only_when_built_with_the_same_patches(monkeypatch, tmp_path):
    wheel = tmp_path / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    fingerprint = build_horovod.build_fingerprint("2.21.0", "cpu")
    # A wheel from before fingerprints (built without the Gloo fix) is not reused.
    assert build_horovod.cached_wheel(str(tmp_path), fingerprint) is None
    (tmp_path / build_horovod.FINGERPRINT_FILE).write_text(fingerprint + "\n")
    assert build_horovod.cached_wheel(str(tmp_path), fingerprint) == str(wheel)
    assert build_horovod.cached_wheel(str(tmp_path), build_horovod.build_fingerprint("2.18.1", "cpu")) is None
    assert fingerprint != build_horovod.build_fingerprint("2.21.0", "nccl")
    # Editing a patch changes the fingerprint, so the wheel is rebuilt.
    edited = tmp_path / "edited.patch"
    edited.write_text(open(build_horovod.GLOO_STALL_PATCH).read() + "\n")
    monkeypatch.setattr(build_horovod, "GLOO_STALL_PATCH", str(edited))
    assert build_horovod.build_fingerprint("2.21.0", "cpu") != fingerprint
    assert build_horovod.cached_wheel(str(tmp_path), build_horovod.build_fingerprint("2.21.0", "cpu")) is None


def _patched(root, patch, stand_ins):
    """Writes `{path: lines}` under `root`, applies `patch` there; returns `{path: patched text}`."""
    for path, lines in stand_ins.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("\n".join(lines) + "\n")
    subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", patch],
                   cwd=root, check=True, capture_output=True)
    return {path: (root / path).read_text() for path in stand_ins}


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_gloo_patch_sizes_the_global_rank_list(tmp_path):
    # A stand-in with the patched line where Horovod 0.28.1 has it (line 92).
    context = ["  if (gloo_context_.cross_ctx != nullptr) {",
               "    cross_rank_ = gloo_context_.cross_ctx->rank;",
               "    cross_size_ = gloo_context_.cross_ctx->size;",
               "  }",
               "",
               "  global_ranks_.reserve(size_);",
               "  {",
               "    auto this_global_rank = gloo_context_.global_ctx->rank;",
               "    gloo::AllgatherOptions opts(gloo_context_.ctx);",
               "    opts.setInput(&this_global_rank, 1);"]
    lines = ["// line"] * 86 + context + ["// more"] * 20
    path = "horovod/common/gloo/gloo_controller.cc"
    patched = _patched(tmp_path, build_horovod.GLOO_STALL_PATCH, {path: lines})[path].splitlines()
    assert patched[91] == "  global_ranks_.resize(size_);"
    assert not any("reserve" in line for line in patched)
    assert len(patched) == len(lines)


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_legacy_keras_patch_gives_horovods_keras_helpers_tf_keras_backend(tmp_path):
    # Stand-ins with the patched lines where Horovod 0.28.1 has them.
    choice = ['if is_version_greater_equal_than(tf.__version__, "2.6.0"):',
              "    from keras import backend as K",
              "else:",
              "    from tensorflow.python.keras import backend as K",
              ""]
    folder = "horovod/tensorflow/keras/"
    stand_ins = {folder + "__init__.py": ["# line"] * 25 + ["", ""] + choice + ["# more"] * 5,
                 folder + "callbacks.py": ["# line"] * 19
                 + ["from horovod.common.util  import is_version_greater_equal_than", ""]
                 + choice + ["# more"] * 5}
    for path, text in _patched(tmp_path, build_horovod.LEGACY_KERAS_PATCH, stand_ins).items():
        assert "from keras import backend" not in text, path
        assert "    K = keras.backend  # tf.keras's" in text, path


PATCHED_FILE_HEAD = """\
#include <memory>
#include <queue>
#include <thread>
#include <unordered_map>


#if TENSORFLOW_VERSION >= 2006000000

#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
"""


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` tool")
def test_patch_limits_the_xla_block_to_tf_before_2_19(tmp_path):
    # A stand-in with the patched regions at the lines Horovod 0.28.1 has them.
    body = ["// line"] * (612 - 1 - PATCHED_FILE_HEAD.count("\n") - 13)
    text = ("// 16 lines of licence\n" * 13 + PATCHED_FILE_HEAD + "\n".join(body)
            + "\n} // namespace horovod\n\n#endif // HAVE_GPU\n#endif // TENSORFLOW_VERSION >= 2006000000\n")
    target = tmp_path / "horovod" / "tensorflow" / "xla_mpi_ops.cc"
    target.parent.mkdir(parents=True)
    target.write_text(text)
    subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", build_horovod.PATCH],
                   cwd=tmp_path, check=True, capture_output=True)
    patched = target.read_text()
    assert patched.count("TENSORFLOW_VERSION < 2019000000") == 2
    assert "#if TENSORFLOW_VERSION >= 2006000000 && TENSORFLOW_VERSION < 2019000000\n" in patched


def test_installed_horovod_was_built_for_this_tensorflow():
    # The bootstrap installs Horovod through syncbn-build-horovod; a Horovod built
    # for another TensorFlow fails to load its op library here.
    probe = ("import tensorflow as tf, horovod.tensorflow as hvd; "
             "print(tf.__version__, hvd.mpi_built(), hvd.gloo_built())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    version, mpi, gloo = result.stdout.split()
    assert (mpi, gloo) == ("True", "True")
    assert _versions.tf_supported(version)


def test_dry_run_reports_the_plan(capsys, caplog):
    caplog.set_level("INFO", logger="syncbn-build-horovod")
    assert build_horovod.main(["--dry-run", "--gpu", "no"]) == 0
    plan = caplog.text
    assert "Horovod 0.28.1 with TensorFlow, Gloo, MPI;" in plan
    import tensorflow as tf
    assert f"TensorFlow {tf.__version__}" in plan
    assert "patches: horovod-0.28.1-gloo-stall-check.patch" in plan
    assert ("horovod-0.28.1-tf2.19-xla.patch" in plan) is build_horovod.needs_patch(tf.__version__)


@pytest.mark.parametrize("value, expected", [("no", "no"), ("yes", "yes"), ("", "auto")])
def test_gpu_default_comes_from_syncbn_build_gpu(monkeypatch, value, expected):
    monkeypatch.setenv("SYNCBN_BUILD_GPU", value)
    assert build_horovod.build_parser().parse_args([]).gpu == expected
    assert build_horovod.build_parser().parse_args(["--gpu", "auto"]).gpu == "auto"


def test_a_bad_syncbn_build_gpu_is_an_error_naming_the_variable_and_value(monkeypatch):
    monkeypatch.setenv("SYNCBN_BUILD_GPU", "maybe")
    with pytest.raises(SystemExit, match=r"SYNCBN_BUILD_GPU='maybe'"):
        build_horovod.main(["--dry-run"])
