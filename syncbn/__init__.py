"""syncbn: exact synchronized batch normalization for TensorFlow 2 / Keras 3.

    import syncbn
    layer = syncbn.SyncBatchNormalization()      # drop-in for BatchNormalization

See README.md for the communicators (Horovod, tf.distribute, MPI, local) and
the rule that picks one.
"""

from syncbn.collectives import Communicator, LocalCommunicator, detect
from syncbn.collectives.horovod import init_horovod
from syncbn.convert import convert
from syncbn.layers import SyncBatchNormalization
from syncbn import horovod_keras

__version__ = "0.1.0"

__all__ = [
    "Communicator",
    "LocalCommunicator",
    "SyncBatchNormalization",
    "convert",
    "detect",
    "horovod_keras",
    "init_horovod",
]
