"""Latency of one BN statistics all-reduce, per communicator path, on 2+ ranks.

Run it under the launcher, one backend at a time:

    python -m launch -np 2 --backend mpi -- python bench/latency.py
    python -m launch -np 2 --backend horovod -- python bench/latency.py
    python -m launch -np 2 --backend horovod --horovod-controller gloo -- python bench/latency.py
    python -m launch -np 2 --backend tf -- python bench/latency.py
    python -m launch -np 2 --backend tf --tf-mpi no -- python bench/latency.py

One `tf.function` runs a chain of `--chain` all-sums of a float64 vector of
`2C + 1` values (C = `--channels`, the forward payload of a BN layer), each
sum feeding the next, so they run strictly one after another as sync BN's do
and no compute sits between them: the time per sum is the path's own latency,
with nothing for ranks to wait on each other for. Paths, each where it exists:

* mpi: the compiled kernel and the `tf.numpy_function` kernel;
* horovod over MPI: the direct MPI path syncbn uses and `hvd.allreduce`;
* horovod over Gloo: `hvd.allreduce`;
* tf: `ReplicaContext.all_reduce` under MultiWorkerMirroredStrategy, and
  the direct MPI path syncbn uses when the workers run under mpirun.

Paths alternate round-robin, every rank in the same order; rank 0 prints the
median over `--rounds` of microseconds per all-sum, and the ratio of each
path to the first.
"""

import argparse
import os
import sys
import time

import sync_step
from tables import median_and_ratio_table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["auto", "horovod", "mpi", "tf"], default="auto",
                        help="auto (default): from the launcher's environment")
    parser.add_argument("--chain", type=int, default=100, help="all-sums per call (default 100)")
    parser.add_argument("--channels", type=int, default=64,
                        help="BN channels C; the payload is 2C + 1 float64 (default 64)")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds (default 15)")
    return parser.parse_args(argv)


def communicators(backend):
    """Path name -> communicator object, the path syncbn uses by default first."""
    if backend.name == "mpi":
        from syncbn.collectives import mpi_op
        from syncbn.collectives.mpi import MPICommunicator

        paths = {}
        ops = mpi_op.load()
        if ops is not None:
            paths["compiled"] = MPICommunicator(backend.comm, ops)
        paths["numpy_function"] = MPICommunicator(backend.comm)
        return paths
    if backend.name == "horovod":
        from syncbn.collectives.horovod import HorovodCommunicator, horovod_communicator

        default = horovod_communicator()
        paths = {default.kernel: default}
        paths.setdefault("hvd.allreduce", HorovodCommunicator(backend.hvd))
        return paths
    from syncbn.collectives.tf_distribute import TFDistributeCommunicator

    # Built inside the replica function, where the replica context exists. Under
    # mpirun syncbn sums over MPI by default (checked against the label below).
    paths = {}
    if os.environ.get("OMPI_COMM_WORLD_SIZE"):
        paths["mpi-direct"] = TFDistributeCommunicator
    paths["tf.distribute"] = lambda: TFDistributeCommunicator(direct_mpi=False)
    return paths


def chain_function(backend, path, communicator, length, payload):
    import tensorflow as tf

    def replica_chain():
        # Random, not a constant: Grappler would fold a chain of sums of a
        # constant through ops it does not know to be stateful (hvd.allreduce).
        x = tf.random.uniform([payload], dtype=tf.float64)
        comm = communicator() if callable(communicator) else communicator
        if comm.kernel != path:
            raise RuntimeError(f"path {path!r} runs on {comm.kernel!r}")
        for index in range(length):
            x = comm.all_sum(x, f"latency/{index}") * (1.0 / comm.num_replicas)
        return x

    if backend.strategy is None:
        function = tf.function(autograph=False)(replica_chain)
        return lambda: function().numpy()
    function = tf.function(autograph=False)(lambda: backend.strategy.run(replica_chain))
    return lambda: backend.strategy.experimental_local_results(function())[0].numpy()


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    name = sync_step.detect_backend() if args.backend == "auto" else args.backend
    backend = sync_step.BACKENDS[name]()
    if backend.size < 2:
        raise ValueError(f"bench/latency.py needs 2 or more ranks. Received: {backend.size} rank")
    payload = 2 * args.channels + 1
    with backend.scope():
        functions = {path: chain_function(backend, path, comm, args.chain, payload)
                     for path, comm in communicators(backend).items()}
    for function in functions.values():
        function()  # trace and warm up
    samples = {path: [] for path in functions}
    paths = list(functions)
    for round_index in range(args.rounds):
        shift = round_index % len(paths)
        for path in paths[shift:] + paths[:shift]:
            backend.barrier()
            start = time.perf_counter()
            functions[path]()
            samples[path].append((time.perf_counter() - start) / args.chain * 1e6)
    if backend.rank != 0:
        return 0
    print("command: " + sync_step.launch_command(backend))
    print(f"{backend.size} ranks, {os.cpu_count()} CPU cores; chains of {args.chain} all-sums "
          f"of {payload} float64; medians over {args.rounds} rounds")
    for key, value in backend.settings().items():
        print(f"{key}: {value}")
    print()
    header = ("path", "us per all-sum", f"/ {paths[0]}")
    print("\n".join(median_and_ratio_table(samples, paths, header, digits=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
