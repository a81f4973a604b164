"""`--gpus-per-host`: the GPU ids each host gives its local ranks, one per rank."""

import os
import shutil
import subprocess


def local_gpu_ids(environ, nvidia_smi=None):
    """This machine's GPU ids: `CUDA_VISIBLE_DEVICES` if set, else `nvidia-smi -L`'s count."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1")
    return tuple(str(i) for i in range(count_nvidia_gpus(nvidia_smi)))


def count_nvidia_gpus(nvidia_smi=None):
    """GPUs that `nvidia-smi -L` lists on this machine; 0 without nvidia-smi."""
    nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
    if not nvidia_smi:
        return 0
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def gpu_ids(config, site, environ=None):
    """The GPU ids of every host of `site` for `config.gpus_per_host` (an int or 'auto')."""
    if config.gpus_per_host != "auto":
        return tuple(str(i) for i in range(config.gpus_per_host))
    return local_gpu_ids(os.environ if environ is None else environ)
