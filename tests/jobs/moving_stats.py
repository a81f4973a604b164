"""Cross-process checks of the moving statistics, one copy per rank.

Every rank builds the same global data from a seed and takes its own rows
(uneven, some ranks empty at some steps), then checks, printing one line per
check (`moving rank=R/W check=NAME ok|FAIL ...`) and exiting 1 on a failure:

* `debiased`: after every step, `moving_average="debiased"` statistics equal
  a float64 NumPy bias-corrected average of the global batch statistics; the
  model is saved to `.keras` and reloaded half-way, and goes on exactly;
* `skip`: a NaN in one sample of the last rank at one step leaves the moving
  statistics finite, counts the step, and equals the run without that step;
* `recalibrate`: a model of two BN layers with a Dense between them,
  recalibrated on uneven and empty batches with ranks holding different
  numbers of batches, equals the float64 computation on the concatenated
  global batches in one process;
* `consistency`: `check_consistency` finds nothing, then flags the moving
  mean that the last rank alters by hand, on every rank, and raises with
  `strict=True` on every rank.

With `--out DIR` each rank saves its final statistics to `DIR/rank<R>.npz`.

    syncbn-launch -np 3 --backend mpi -- python tests/jobs/moving_stats.py --backend mpi
"""

import argparse
import math
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import open_world, say  # noqa: E402
from syncbn.check.reference import relative_error  # noqa: E402

MOMENTUM = 0.8
CHANNELS = 3
FEATURES = 4
TOLERANCE = 1e-5
CHECKS = ("debiased", "skip", "recalibrate", "consistency")  # in the order they run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["horovod", "mpi", "tf"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def step_counts(world_size, steps, seed):
    """Per step, per rank, the number of rows: 0 to 6, some steps empty on some ranks."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 7, size=(steps, world_size))
    counts[:, 0] = np.maximum(counts[:, 0], 1)  # never an empty global batch
    if world_size > 1:
        counts[1, 1] = 0
    return counts


def rank_rows(x, counts, rank):
    start = int(counts[:rank].sum())
    return x[start:start + int(counts[rank])]


class Job:
    """The four checks on this rank of `world` (a `syncbn.world` World)."""

    def __init__(self, world, steps=6):
        self.steps = steps
        self.rank, self.world = world.process_rank, world.num_processes
        self.communicator = world.name  # a World's name is a communicator's
        self.strategy = world.strategy
        self.scope = world.scope
        self.records = []
        self.saved = {}

    @property
    def failures(self):
        return sum(not record["ok"] for record in self.records)

    def report(self, check, errors, extra=""):
        worst = max(errors.values()) if errors else 0.0
        ok = worst <= TOLERANCE  # NaN fails
        summary = " ".join(f"{k}={v:.2e}" for k, v in errors.items())
        line = (f"moving rank={self.rank}/{self.world} check={check} "
                f"{'ok' if ok else 'FAIL'} {summary} {extra}")
        say(line)
        self.records.append({"line": line, "check": check, "errors": errors, "ok": ok})

    def train_function(self, model):
        import tensorflow as tf

        def step(x):
            model(x, training=True)
            return tf.constant(0.0)

        if self.strategy is None:
            return tf.function(step, reduce_retracing=True)
        return tf.function(lambda x: self.strategy.run(step, args=(x,)), reduce_retracing=True)

    def sync_model(self, **layer_kwargs):
        import keras

        import syncbn

        with self.scope():
            return keras.Sequential([
                keras.Input((CHANNELS,)),
                syncbn.SyncBatchNormalization(momentum=MOMENTUM, communicator=self.communicator,
                                              name="bn", **layer_kwargs),
            ])

    # -- debiased ----------------------------------------------------------------------------

    def check_debiased(self):
        import keras

        steps = self.steps
        counts = step_counts(self.world, steps, seed=1)
        rng = np.random.default_rng(2)
        global_batches = [rng.normal(5.0, 2.0, (int(c.sum()), CHANNELS)).astype(np.float32)
                          for c in counts]
        model = self.sync_model(moving_average="debiased")
        train = self.train_function(model)
        weights, sums_mean, sums_var = 0.0, 0.0, 0.0
        errors = {"mean": 0.0, "variance": 0.0}
        for step, (x, c) in enumerate(zip(global_batches, counts)):
            if step == steps // 2:  # save and reload mid-run
                path = os.path.join(tempfile.mkdtemp(), f"rank{self.rank}.keras")
                model.save(path)
                with self.scope():
                    model = keras.saving.load_model(path)
                train = self.train_function(model)
            train(rank_rows(x, c, self.rank))
            x64 = x.astype(np.float64)
            # The bias-corrected average in float64: weights momentum**(t - i) (1 - momentum).
            weights = MOMENTUM * weights + (1 - MOMENTUM)
            sums_mean = MOMENTUM * sums_mean + (1 - MOMENTUM) * x64.mean(0)
            sums_var = MOMENTUM * sums_var + (1 - MOMENTUM) * x64.var(0)
            layer = model.layers[0]
            errors["mean"] = max(errors["mean"], relative_error(layer.moving_mean.numpy(), sums_mean / weights))
            errors["variance"] = max(errors["variance"],
                                     relative_error(layer.moving_variance.numpy(), sums_var / weights))
        updates = float(model.layers[0].moving_updates.numpy())
        errors["updates"] = abs(updates - steps)
        self.report("debiased", errors, f"steps={steps} saved_at={steps // 2}")
        self.saved["debiased_mean"] = model.layers[0].moving_mean.numpy()

    # -- skip --------------------------------------------------------------------------------

    def check_skip(self):
        steps = self.steps
        counts = step_counts(self.world, steps, seed=3)
        counts[2, -1] = max(counts[2, -1], 1)
        rng = np.random.default_rng(4)
        global_batches = [rng.normal(1.0, 3.0, (int(c.sum()), CHANNELS)).astype(np.float32)
                          for c in counts]
        poisoned = [x.copy() for x in global_batches]
        # One NaN, in one sample of the last rank, at step 2.
        poisoned[2][int(counts[2].sum()) - 1, 1] = np.nan
        results = {}
        for name, batches in [("poisoned", poisoned), ("clean", global_batches)]:
            model = self.sync_model(nonfinite="skip")
            train = self.train_function(model)
            for step, (x, c) in enumerate(zip(batches, counts)):
                if name == "clean" and step == 2:
                    continue  # what skipping should amount to
                train(rank_rows(x, c, self.rank))
            results[name] = model.layers[0]
        layer = results["poisoned"]
        finite = bool(np.all(np.isfinite(layer.moving_mean.numpy()))
                      and np.all(np.isfinite(layer.moving_variance.numpy())))
        errors = {
            "mean_vs_without_step": relative_error(layer.moving_mean.numpy(),
                                                   results["clean"].moving_mean.numpy().astype(np.float64)),
            "variance_vs_without_step": relative_error(
                layer.moving_variance.numpy(), results["clean"].moving_variance.numpy().astype(np.float64)),
            "not_finite": 0.0 if finite else 1.0,
            "skipped_steps_off": abs(layer.skipped_steps - 1),
        }
        self.report("skip", errors, f"skipped_steps={layer.skipped_steps}")
        self.saved["skip_mean"] = layer.moving_mean.numpy()
        self.saved["skip_variance"] = layer.moving_variance.numpy()

    # -- recalibrate -------------------------------------------------------------------------

    def two_bn_model(self, communicator):
        import keras

        import syncbn

        keras.utils.set_random_seed(0)  # the same weights on every rank and in the reference
        return keras.Sequential([
            keras.Input((FEATURES,)),
            keras.layers.Dense(6),
            syncbn.SyncBatchNormalization(communicator=communicator, name="bn1"),
            keras.layers.Dense(5, activation="tanh"),
            syncbn.SyncBatchNormalization(communicator=communicator, name="bn2"),
        ])

    def check_recalibrate(self):
        import syncbn

        steps = self.steps
        counts = step_counts(self.world, steps, seed=5)
        # Rank r has steps - r batches: the others run out first and go on with empty ones.
        for rank in range(self.world):
            counts[steps - rank:, rank] = 0
        rng = np.random.default_rng(6)
        global_batches = [rng.normal(2.0, 3.0, (int(c.sum()), FEATURES)).astype(np.float32)
                          for c in counts]
        mine = [(rank_rows(x, c, self.rank), np.zeros(int(c[self.rank])))
                for x, c in zip(global_batches, counts)][: steps - self.rank]
        with self.scope():
            model = self.two_bn_model(self.communicator)
        ran = syncbn.recalibrate(model, mine, verbose="auto")
        reference = self.two_bn_model("local")
        sums = {}
        for x in global_batches:
            h = x
            for layer in reference.layers:
                if isinstance(layer, syncbn.SyncBatchNormalization) and len(h):
                    values = np.asarray(h, np.float64)
                    total = sums.setdefault(layer.name, [0.0, 0.0, 0.0])
                    total[0] += len(values)
                    total[1] = total[1] + len(values) * values.mean(0)
                    total[2] = total[2] + len(values) * values.var(0)
                h = layer(h, training=True)
        errors = {}
        for name, (n, sum_mean, sum_var) in sums.items():
            layer = model.get_layer(name)
            errors[f"{name}_mean"] = relative_error(layer.moving_mean.numpy(), sum_mean / n)
            errors[f"{name}_variance"] = relative_error(layer.moving_variance.numpy(), sum_var / n)
        errors["steps_off"] = abs(ran - steps)
        self.report("recalibrate", errors, f"batches={len(mine)} steps_run={ran} "
                    f"rows={[int(c[self.rank]) for c in counts]}")
        for name in sums:
            self.saved[f"recalibrated_{name}_mean"] = model.get_layer(name).moving_mean.numpy()
            self.saved[f"recalibrated_{name}_variance"] = model.get_layer(name).moving_variance.numpy()
        return model

    # -- check_consistency -------------------------------------------------------------------

    def check_consistency(self, model):
        import syncbn

        before = syncbn.check_consistency(model)
        if self.rank == self.world - 1:
            layer = model.get_layer("bn2")
            altered = layer.moving_mean.numpy()
            altered[0] += 0.25
            layer.moving_mean.assign(altered)
        after = syncbn.check_consistency(model)
        try:
            syncbn.check_consistency(model, strict=True)
            raised = ""
        except syncbn.InconsistentReplicasError as error:
            raised = str(error)
        flagged = [(d["layer"], d["weight"]) for d in after]
        if self.world > 1:
            errors = {
                "found_before": float(len(before)),
                "not_flagged": 0.0 if flagged == [("bn2", "moving_mean")] else 1.0,
                # Twice the standard deviation across replicas of the altered entry: one of
                # N replicas off by 0.25 gives 0.5 sqrt(N - 1) / N (0.25 itself with two).
                "difference_off": abs(after[0]["difference"] - 0.5 * math.sqrt(self.world - 1)
                                      / self.world) if after else 1.0,
                "strict_silent": 0.0 if "'bn2'" in raised else 1.0,
            }
        else:  # one replica: nothing to compare, whatever the values
            errors = {"found": float(len(before) + len(after)), "strict_raised": float(bool(raised))}
        self.report("consistency", errors, f"flagged={flagged}")


def run_checks(world, steps=6, out=None):
    """Runs the four checks on this rank of `world`; returns their records.

    Each record holds the printed line, the check's errors and `ok`. With
    `out`, this rank's final statistics go to `out/rank<R>.npz`.
    """
    job = Job(world, steps)
    job.check_debiased()
    job.check_skip()
    model = job.check_recalibrate()
    job.check_consistency(model)
    if out:
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, f"rank{job.rank}.npz"), **job.saved)
    return job.records


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    world = open_world(args.backend)
    records = run_checks(world, args.steps, args.out)
    world.barrier()  # nobody shuts its backend down while another rank still sums
    return 0 if all(record["ok"] for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
