"""What a fault says, in one process: the messages that name the layer and both sides.

The faults themselves run on real processes in tests/test_faults.py.
"""

import numpy as np
import pytest

from syncbn.collectives.tf_distribute import build_mismatch_message

pytestmark = pytest.mark.unit


def test_build_mismatch_message_names_the_layer_and_both_sides():
    # The error every worker raises at build time under MultiWorkerMirroredStrategy
    # (tests/test_faults.py's cells tf-grpc-shape and tf-mpi-shape run it for real).
    same = np.array([[7, 8, 1], [7, 8, 1]])
    assert build_mismatch_message("bn_a", [7, 8, 1], same, 0) is None
    channels = build_mismatch_message("bn_a", [7, 8, 1], np.array([[7, 8, 1], [7, 4, 1]]), 0)
    assert channels.startswith("syncbn: workers disagree when building SyncBatchNormalization "
                               "layer 'bn_a': this worker (rank 0) has 8 channels of float32; "
                               "rank 1 has 4 channels of float32.")
    dtype = build_mismatch_message("bn_a", [7, 8, 1], np.array([[7, 8, 1], [7, 8, 2]]), 0)
    assert "rank 1 has 8 channels of float64" in dtype
    # Two local replicas per worker: rows 2 and 3 are worker 1, named once.
    layer = build_mismatch_message("bn_a", [7, 8, 1], np.array([[7, 8, 1]] * 2 + [[9, 8, 1]] * 2),
                                   0, local_replicas=2)
    assert layer.count("rank 1 ") == 1
    assert "rank 1 has 8 channels of float32 at another layer (name fingerprint 00000009" in layer
