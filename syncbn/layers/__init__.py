"""`SyncBatchNormalization` for the Keras that `tf.keras` is.

As TensorFlow decides `tf.keras`, `TF_USE_LEGACY_KERAS` (`1`, `true` or
`True`, read when syncbn is imported) picks the legacy tf_keras layer
(`syncbn.layers.legacy`, which needs the `tf_keras` package); otherwise the
Keras 3 layer (`syncbn.layers.keras3`). Both share
`SyncBatchNormalizationBase`, and either can be imported by its module name
whatever the variable says.
"""

import os

#: True when `tf.keras` is tf_keras (Keras 2), by TensorFlow's own rule.
LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1")

from syncbn.layers.base import SyncBatchNormalizationBase  # noqa: E402

if LEGACY_KERAS:
    #: The Keras module that `tf.keras` is: `tf_keras` or `keras`.
    import tf_keras as KERAS  # noqa: E402

    from syncbn.layers.legacy import SyncBatchNormalization  # noqa: E402
else:
    import keras as KERAS  # noqa: E402

    from syncbn.layers.keras3 import SyncBatchNormalization  # noqa: E402

__all__ = ["KERAS", "LEGACY_KERAS", "SyncBatchNormalization", "SyncBatchNormalizationBase"]
