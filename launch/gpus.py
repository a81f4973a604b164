"""`--gpus-per-host`: the GPU ids each host gives its local ranks, one per rank.

`--gpus-per-host N` uses ids 0 to N-1 on every host. `auto` asks:

- when every host is this machine (local names, simulated hosts): this
  machine's `CUDA_VISIBLE_DEVICES` if set, else the count of `nvidia-smi -L`,
  else 0;
- with other machines: each host, through the runner that starts its ranks
  (ssh), for the count of its `nvidia-smi -L`; a host without nvidia-smi has 0.
  The counts must agree, since one number applies to every host; a host that
  cannot be asked (ssh fails) stops the job before anything starts. The login
  node the launcher runs on has no say.
"""

import concurrent.futures
import os
import shutil
import subprocess

# 0 GPUs without nvidia-smi, or when it fails (no driver); a failure of the
# runner itself (ssh's 255) is the only non-zero exit.
_PROBE = "command -v nvidia-smi >/dev/null 2>&1 || exit 0; nvidia-smi -L 2>/dev/null; exit 0"
PROBE_TIMEOUT_SECONDS = 60.0


def _count_gpu_lines(text):
    return sum(1 for line in text.splitlines() if line.startswith("GPU "))


def local_gpu_ids(environ, nvidia_smi=None):
    """This machine's GPU ids: `CUDA_VISIBLE_DEVICES` if set, else `nvidia-smi -L`'s count."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1")
    nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
    if not nvidia_smi:
        return ()
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(str(i) for i in range(_count_gpu_lines(listing.stdout)))


def count_host_gpus(host, runner, timeout=PROBE_TIMEOUT_SECONDS):
    """The number of GPUs `nvidia-smi -L` lists on `host`, asked through its `runner`.

    Raises:
        RuntimeError: naming the host, when the runner cannot run the question there.
    """
    argv, env = runner.command(["sh", "-c", _PROBE], {}, "/")
    try:
        answer = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as error:
        answer = subprocess.CompletedProcess(argv, None, "", str(error))
    if answer.returncode != 0:
        raise RuntimeError(
            f"`--gpus-per-host auto` cannot ask host {host!r} for its GPUs ({argv[0]} "
            f"exited with {answer.returncode}: {answer.stderr.strip()[-500:] or 'no message'}); "
            "make the host reachable, or give `--gpus-per-host N`")
    return _count_gpu_lines(answer.stdout)


def agreed_gpu_ids(counts):
    """The GPU ids every host uses, from `{host: GPU count}`. Pure.

    Raises:
        ValueError: naming the hosts, when their counts differ.

    Example:
        >>> agreed_gpu_ids({"node1": 2, "node2": 2})
        ('0', '1')
    """
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{host}: {count}" for host, count in counts.items())
        raise ValueError(
            f"Argument `--gpus-per-host auto` needs the same number of GPUs on every host, but "
            f"`nvidia-smi -L` counts {listing}. Received: --gpus-per-host auto; give "
            "`--gpus-per-host N` to use N GPUs of each host (0: CPUs only)")
    return tuple(str(i) for i in range(next(iter(counts.values()), 0)))


def gpu_ids(config, site, environ=None):
    """The GPU ids of every host of `site` (a `launch.placement.Site`) for
    `config.gpus_per_host`; see the module docstring."""
    if config.gpus_per_host != "auto":
        return tuple(str(i) for i in range(config.gpus_per_host))
    if site.shared_machine or all(runner.is_local for runner in site.runners.values()):
        return local_gpu_ids(os.environ if environ is None else environ)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(site.runners))) as pool:
        futures = {host: pool.submit(count_host_gpus, host, runner)
                   for host, runner in site.runners.items()}
        return agreed_gpu_ids({host: future.result() for host, future in futures.items()})
