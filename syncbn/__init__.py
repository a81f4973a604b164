"""syncbn: exact synchronized batch normalization for TensorFlow 2 / Keras 3.

    import syncbn
    layer = syncbn.SyncBatchNormalization()      # drop-in for BatchNormalization

Like `tf.keras`, it follows `TF_USE_LEGACY_KERAS`: set to 1 when syncbn is
imported, `SyncBatchNormalization` and `PreciseBN` are tf_keras (Keras 2)
classes, for scripts that use Horovod's Keras helpers (docs/legacy-tf-keras.md).
`convert` takes a model of either Keras.

See README.md for the communicators (Horovod, tf.distribute, MPI, local) and
the rule that picks one.
"""

import warnings

from syncbn import error_file as _error_file  # noqa: F401  (its hook, under syncbn-launch)

import tensorflow as _tf

from syncbn import _versions

if _versions.unsupported_message(_tf.__version__):
    warnings.warn(_versions.unsupported_message(_tf.__version__), RuntimeWarning, stacklevel=2)

from syncbn.collectives import Communicator, LocalCommunicator, detect  # noqa: E402
from syncbn.collectives.horovod import init_horovod  # noqa: E402
from syncbn.convert import convert  # noqa: E402
from syncbn.layers import SyncBatchNormalization  # noqa: E402
from syncbn.recalibration import PreciseBN, recalibrate  # noqa: E402
from syncbn.consistency import InconsistentReplicasError, check_consistency  # noqa: E402
from syncbn import horovod_keras  # noqa: E402

__version__ = _versions.__version__

__all__ = [
    "Communicator",
    "InconsistentReplicasError",
    "LocalCommunicator",
    "PreciseBN",
    "SyncBatchNormalization",
    "check_consistency",
    "convert",
    "detect",
    "horovod_keras",
    "init_horovod",
    "recalibrate",
]
