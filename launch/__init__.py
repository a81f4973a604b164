"""`syncbn-launch`: a fail-fast multi-process launcher for Horovod, tf.distribute and MPI jobs.

The package never imports TensorFlow (nor Horovod at import time), so it starts
fast and can supervise any program. Layout, one module per concern:

- `config`: the options, their `SYNCBN_LAUNCH_*` fallbacks, and the frozen `LaunchConfig`.
- `hosts`: parse `-H host:slots,...` and assign ranks to slots (pure).
- `placement`: where the ranks run and how they are reached (hosts, runners, addresses).
- `gpus`: `--gpus-per-host`, the GPU ids of every host.
- `environment`: build each rank's environment (pure).
- `hostexec`: "run this command on host H" -- local, ssh or network namespace.
- `netns`: `--simulate-hosts N`, N hosts as Linux network namespaces on a bridge.
- `backends`: what each backend (horovod, tf, mpi) adds to a rank and how it starts.
- `supervisor`: starts the processes, prefixes their output, stops all on the first failure.
- `failures`: which rank failed first: the ranks' error files, else their output.
- `cli`: the front end (`syncbn-launch`, `python -m launch`): config, then `run`.

Example:

    $ syncbn-launch -np 2 --backend tf -- python -c "import os; print(os.environ['RANK'])"
    [0] 0
    [1] 1
"""
