"""`python -m syncbn.check`: proof, on your own hardware, that sync BN is exact and what it costs.

Run one copy per rank under the launcher you train with:

    syncbn-launch -np 4 -- python -m syncbn.check
    horovodrun -np 4 python -m syncbn.check --communicator horovod   # over MPI it sets no HOROVOD_*
    mpirun -np 4 python -m syncbn.check
    srun -n 4 python -m syncbn.check --communicator mpi
    TF_CONFIG=... python -m syncbn.check --communicator tf.distribute   # on every worker

The chief prints one table: the environment (versions, Horovod's build
flags, MPI, devices, hosts, the communicator and its kernel, the collective
timeout), the exactness checks (syncbn on uneven per-replica batches, one of
them empty, against Keras BN and float64 NumPy on the gathered global batch)
and two figures (one sum's latency, one layer's training step against Keras
BN). It exits 0 only if every check passed on every rank; `--json PATH`
also writes the results. Everything runs on TensorFlow's default device: a
GPU when there is one, so the check exercises the kernels and collectives
(cuDNN, NCCL) that training uses.

Modules: `world` (processes, replicas and the check's own sums), `reference`
(float64 NumPy batch norm), `exactness`, `timing`, `environment`, `cli`.
"""
