"""A custom `tf.function` training loop under horovodrun with syncbn.horovod_keras.

Each step is ONE `tf.function` that flips a `tf.Variable` training flag:
a training pass on the rank's own batch (SyncBatchNormalization in training
mode, gradients averaged with `allreduce_gradients`, Adam applied), then an
evaluation pass with the flag off. Weights and Adam state are broadcast from
rank 0 at the start (ranks seed them differently).

Every rank checks itself and exits 1 on failure: evaluation must leave the
moving statistics exactly as training left them, and training must have
moved them. It saves `OUT/rank<R>.npz` (final weights, optimizer variables,
and step 0's local and averaged gradients) for the test to compare across
ranks.

    horovodrun -np 2 --gloo python tests/jobs/hvd_custom_loop.py --out /tmp/o
"""

import argparse
import os
import sys

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank<R>.npz")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    import keras
    import tensorflow as tf

    import syncbn
    from syncbn import horovod_keras as hk

    syncbn.init_horovod()
    rank = hk.rank()
    keras.utils.set_random_seed(100 + rank)
    norm = syncbn.SyncBatchNormalization(momentum=0.5)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, use_bias=False),
        norm,
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
    optimizer = keras.optimizers.Adam(learning_rate=0.05)
    optimizer.build(model.trainable_variables)
    hk.broadcast_variables(model.weights + optimizer.variables, root_rank=0)

    training = tf.Variable(False, trainable=False, name="training")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    moving = [norm.moving_mean, norm.moving_variance]

    @tf.function
    def train_then_evaluate(x, y, x_eval, y_eval):
        moving_before = [tf.identity(v.value) for v in moving]
        training.assign(True)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=training))
        local_grads = tape.gradient(loss, model.trainable_variables)
        grads = hk.allreduce_gradients(local_grads)
        optimizer.apply(grads, model.trainable_variables)
        moving_after_train = [tf.identity(v.value) for v in moving]
        training.assign(False)
        eval_loss = loss_fn(y_eval, model(x_eval, training=training))
        moving_after_eval = [tf.identity(v.value) for v in moving]
        return (loss, eval_loss, local_grads, grads,
                moving_before, moving_after_train, moving_after_eval)

    rng = np.random.default_rng(300 + rank)
    failures = []
    saved = {}
    for step in range(args.steps):
        x, x_eval = (rng.normal(1.0, 2.0, (args.batch_size, 6, 6, 2)).astype(np.float32)
                     for _ in range(2))
        y, y_eval = (rng.integers(0, 2, args.batch_size) for _ in range(2))
        (loss, eval_loss, local_grads, grads,
         before, after_train, after_eval) = train_then_evaluate(x, y, x_eval, y_eval)
        names = ("moving_mean", "moving_variance")
        for name, b, t, e in zip(names, before, after_train, after_eval):
            if not np.array_equal(t.numpy(), e.numpy()):
                failures.append(f"step {step}: evaluation changed {name}")
            if np.array_equal(b.numpy(), t.numpy()):
                failures.append(f"step {step}: training did not update {name}")
        if step == 0:
            saved.update({f"local_grad_{i:03d}": g.numpy() for i, g in enumerate(local_grads)})
            saved.update({f"averaged_grad_{i:03d}": g.numpy() for i, g in enumerate(grads)})
        print(f"hvd_custom_loop rank={rank} step={step} loss={float(loss):.4f} "
              f"eval_loss={float(eval_loss):.4f}", flush=True)

    if bool(training.numpy()):
        failures.append("the training flag is still on after evaluation")
    saved.update({f"model_{i:03d}": w.numpy() for i, w in enumerate(model.weights)})
    saved.update({f"optimizer_{i:03d}": v.numpy() for i, v in enumerate(optimizer.variables)})
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), **saved)
    status = "FAIL " + "; ".join(failures) if failures else "ok"
    print(f"hvd_custom_loop rank={rank}/{hk.size()} {status}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
