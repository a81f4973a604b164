"""What every `SyncBatchNormalization` does, whichever Keras it is a layer of.

`SyncBatchNormalizationBase` holds the layer's arguments, weights, call and
config; it is a mixin with no Keras base class. Each Keras gets a thin
adapter that puts it in front of that Keras's `Layer` and says how to make
a weight and an input spec: `syncbn.layers.keras3` (Keras 3, the default)
and `syncbn.layers.legacy` (tf_keras, under `TF_USE_LEGACY_KERAS=1`). The
math is not here either: `syncbn.ops` computes, `syncbn.moving` updates the
moving statistics, `syncbn.collectives` sums.
"""

import numpy as np
import tensorflow as tf

from syncbn import collectives, moving, ops, skip_monitor


def _convert(name, value, convert, what):
    """`convert(value)` as Keras converts the argument, re-raised naming it.

    The exception type is what `convert` raises (so the one Keras raises for
    the same value): ValueError for a string that does not parse, TypeError
    for None or a list.
    """
    try:
        return convert(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Argument `{name}` must be {what}. Received: {name}={value!r}") from None


def _get(name, identifier, module):
    """`module.get(identifier)` (Keras's initializers, regularizers, constraints), naming the argument."""
    try:
        return module.get(identifier)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Argument `{name}`: {error} Received: {name}={identifier!r}") from None


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _check_axis(axis):
    # Keras does int(axis); a bool, or a float with a fraction, has no meaning as an axis.
    if _is_bool(axis) or (isinstance(axis, (float, np.floating)) and not float(axis).is_integer()):
        raise ValueError(f"Argument `axis` must be an integer. Received: axis={axis!r}")
    return _convert("axis", axis, int, "an integer")


def _check_float(name, value, low, high):
    """`float(value)` as Keras converts it, in `[low, high)`; a bool or a NaN has no meaning."""
    converted = _convert(name, value, float, "a float")
    if _is_bool(value) or not low <= converted < high:
        raise ValueError(f"Argument `{name}` must be a float in [{low}, {high}). "
                         f"Received: {name}={value!r}")
    return converted


def _check_flag(name, value):
    """A bool (or 0, 1). Keras takes any value's truth; a string such as "False" has no meaning."""
    if _is_bool(value) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"Argument `{name}` must be a bool. Received: {name}={value!r}")


def _check_mask(mask, inputs):
    """Keras's mask convention: the inputs' rank minus one, broadcast against all but the LAST axis."""
    if len(mask.shape) != len(inputs.shape) - 1:
        raise ValueError(
            "The mask provided should be one dimension less than the inputs (Keras's "
            "convention: the inputs' shape without the last axis, whatever `axis` is). "
            f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
        )
    for mask_size, size in zip(mask.shape, inputs.shape[:-1]):
        if mask_size not in (None, 1) and size is not None and mask_size != size:
            raise ValueError(
                "The mask must broadcast against the inputs' shape without the last axis "
                f"(Keras's convention). Received: mask.shape={mask.shape}, "
                f"inputs.shape={inputs.shape}"
            )


RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _check_renorm_clipping(renorm_clipping):
    """Keras's validation of `renorm_clipping` (same errors), with its values made floats.

    Returns the dict Keras stores (`{}` for None) and `(rmin, rmax, dmax)`,
    floats or None.
    """
    renorm_clipping = renorm_clipping or {}
    if not isinstance(renorm_clipping, dict):
        raise TypeError("Argument `renorm_clipping` must be a dict with keys from "
                        f"{list(RENORM_CLIPPING_KEYS)}. Received: renorm_clipping={renorm_clipping!r}")
    if set(renorm_clipping) - set(RENORM_CLIPPING_KEYS):
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{renorm_clipping}. Supported values: {list(RENORM_CLIPPING_KEYS)}."
        )
    bounds = {}
    for key in RENORM_CLIPPING_KEYS:
        value = renorm_clipping.get(key)
        # Numbers only (Keras compares them: anything else is a TypeError there).
        if value is not None and (_is_bool(value) or not isinstance(value, (int, float, np.number))):
            raise TypeError(f"Argument `renorm_clipping` must map {key!r} to a float or None. "
                            f"Received: renorm_clipping={renorm_clipping!r}")
        if value is not None and np.isnan(value):
            raise ValueError(f"Argument `renorm_clipping` must map {key!r} to a number, not NaN. "
                             f"Received: renorm_clipping={renorm_clipping!r}")
        bounds[key] = None if value is None else float(value)
    rmin, rmax, dmax = bounds["rmin"], bounds["rmax"], bounds["dmax"]
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax={dmax}."
        )
    return renorm_clipping, (rmin, rmax, dmax)


def _channel_axis_and_size(input_shape, axis):
    """`(channel axis in [1, rank), its size)` for inputs of `input_shape`, or ValueError."""
    rank = len(input_shape)
    if rank < 2:
        raise ValueError(
            "SyncBatchNormalization needs inputs of rank >= 2 (batch and channel "
            f"axes). Received: input_shape={tuple(input_shape)}"
        )
    if not -rank <= axis < rank:
        raise ValueError(
            f"Argument `axis` is out of bounds for inputs of rank {rank}. "
            f"Received: axis={axis}"
        )
    channel_axis = axis % rank
    if channel_axis == 0:
        raise ValueError(
            "Argument `axis` must not be the batch axis (0): the batch axis is "
            f"what gets synchronized. Received: axis={axis}"
        )
    if input_shape[channel_axis] is None:
        raise ValueError(
            "The channel axis of the inputs must have a known size. "
            f"Received: input_shape={tuple(input_shape)}, axis={axis}"
        )
    return channel_axis, input_shape[channel_axis]


class SyncBatchNormalizationBase:
    """Batch normalization with the statistics of the global batch.

    In training, each replica computes the count, sum and centred sum of
    squares of its own batch; one all-reduce combines them (weighted by the
    counts, so uneven and empty per-replica batches are exact), the layer
    normalizes with the global mean and variance, and the moving averages are
    updated once, to the same value on every replica. The backward pass is
    exact too, with one more all-reduce. The result equals
    `keras.layers.BatchNormalization` applied to all replicas' samples
    concatenated: outputs, gradients (summed over replicas) and moving
    statistics.

    In inference (`training=False`, or `trainable=False`) and with a single
    replica nothing is communicated.

    Every replica of a synchronization group must call every synchronized
    layer, in the same order and the same number of times per step, even with
    an empty batch (a replica that skips a call hangs the others until the
    collective timeout, `SYNCBN_COLLECTIVE_TIMEOUT`, 600 s by default). Under
    MPI, a different call order is detected and raises; Horovod matches calls
    by layer name and tolerates it.

    Args:
        axis: Integer, the channel axis (e.g. `1` after a channels-first
            `Conv2D`); any axis but the batch axis.
        momentum: Momentum of the moving averages, in `[0, 1)`.
        epsilon: Small float added to the variance, `> 0`.
        center: If True, add the learned offset `beta`.
        scale: If True, multiply by the learned scale `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
            moving_variance_initializer: initializers, as in Keras.
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        communicator: `"auto"` (default), `"horovod"`, `"tf.distribute"`,
            `"mpi"`, `"local"`, or an object with `num_replicas` and
            `all_sum(tensor, name)` (see `syncbn.collectives.base`). `"auto"`
            picks, at call time, the first that applies: a tf.distribute
            replica context with more than one replica; Horovod initialized
            with more than one process; an MPI job with more than one
            process; else local. `get_config` stores strings only: a custom
            object is saved as `"auto"`.
        group_size: Synchronize within consecutive groups of this many
            replicas (`None`, the default: all replicas). With Horovod,
            initialize with `syncbn.init_horovod(group_size=k)`.
        synchronized: Accepted for compatibility with
            `keras.layers.BatchNormalization` configs and ignored: this layer
            always synchronizes.
        renorm: If True, Batch Renormalization (Ioffe, 2017), as Keras 3's
            `renorm=True`, with `r` and `d` computed from the *global* batch
            statistics; adds the non-trainable weights `moving_stddev`,
            `renorm_mean` and `renorm_stddev` (Keras's, in Keras's order).
            Inference is unchanged.
        renorm_clipping: With `renorm`, an optional dict of floats `"rmax"`,
            `"rmin"`, `"dmax"` clipping `r` to `[rmin, rmax]` and `d` to
            `[-dmax, dmax]` (a missing key: no bound), validated as Keras does.
        renorm_momentum: With `renorm`, the momentum of `renorm_mean` and
            `renorm_stddev`, in `[0, 1)`.
        moving_average: `"ema"` (default): Keras's exponential moving
            average, so the layer stays a drop-in. `"debiased"`: the
            bias-corrected average, in which the initial values have no
            weight (after the first step the moving statistics are that
            step's global batch statistics); the layer then has one more
            non-trainable weight, `moving_updates`, the number of updates
            so far (saved and restored with the others; one per channel
            when the channel axis is not last, since a mask then counts each
            channel apart). With `renorm`, `moving_mean` and `moving_stddev`
            are debiased (and `moving_variance` derived from them, as in
            Keras); `renorm_mean` and `renorm_stddev`, which shape training
            itself, stay Keras's average at `renorm_momentum`.
        nonfinite: What a step whose *global* batch statistics are not
            finite does to the moving statistics: `"skip"` (default) leaves
            them unchanged and counts the step in `skipped_steps`, with no
            branch in the step; a host thread that reads the counters logs
            one warning for the layer (logger `syncbn.layers`; see
            `syncbn.skip_monitor`). `"update"` averages them in, as Keras
            does; `"raise"` fails the step on every replica with an
            `InvalidArgumentError` naming the layer. Outputs and gradients
            are the same in all three. With `renorm` the decision covers all
            five moving weights. Under XLA (`jit_compile=True`) the
            compiler drops the assertion of `"raise"`; `"skip"` still skips,
            counts and warns.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of any rank >= 2. float16 and bfloat16 inputs
            are normalized in float32; variables are always float32.
        training: Python bool or boolean scalar tensor (for example a
            `tf.Variable` flipped between training and evaluation inside one
            `tf.function`). None means inference.
        mask: Optional boolean tensor, Keras's convention: the shape of
            `inputs` without the LAST axis (or one that broadcasts to it),
            broadcast over the last axis whatever `axis` is, as the masks of
            `Masking` and `Embedding(mask_zero=True)` are. Masked-out
            positions add nothing to the global statistics, the moving
            averages or the gradient through the statistics; they are still
            normalized. With `axis` not last the mask covers the channel
            axis and each channel has its own global count; a channel with
            none, or a global batch with none, normalizes with mean 0 and
            variance 0 (as Keras does) and leaves the moving statistics
            unchanged (where Keras averages zeros in).

    Example:

    ```python
    import keras, syncbn

    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, use_bias=False),
        syncbn.SyncBatchNormalization(),
        keras.layers.ReLU(),
    ])
    ```
    """

    #: The Keras this class is a layer of (`keras` or `tf_keras`): its
    #: initializers, regularizers, constraints and `layers.InputSpec`.
    _keras = None

    #: Whether `renorm=True` is taken: Keras 3's batch renormalization. An
    #: adapter whose Keras defines renorm otherwise sets False, and then
    #: `renorm=True` raises a ValueError.
    _supports_renorm = True

    def _add_float32_weight(self, name, shape, initializer, trainable=False,
                            regularizer=None, constraint=None):
        """Creates a float32 weight that mixed precision never casts. Set by each adapter."""
        raise NotImplementedError

    def _training_when_unset(self):
        """The mode of a call with `training=None`: inference, as in Keras 3."""
        return False

    def _moving_variance_is_unbiased(self):
        """True if the moving variance averages the Bessel-corrected batch variance.

        Keras 3 averages the biased variance; tf_keras's layer averages the
        corrected one wherever it runs fused kernels. Known once built.
        """
        return False

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        communicator="auto",
        group_size=None,
        synchronized=True,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        moving_average="ema",
        nonfinite="skip",
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Each argument converted as Keras converts it (int(axis), float(momentum), ...),
        # so a value Keras takes is taken and one it refuses raises the same type.
        self.axis = _check_axis(axis)
        self.momentum = _check_float("momentum", momentum, 0.0, 1.0)
        self.epsilon = _convert("epsilon", epsilon, float, "a float")
        if _is_bool(epsilon) or not 0.0 < self.epsilon < float("inf"):
            raise ValueError(f"Argument `epsilon` must be a float > 0. Received: epsilon={epsilon!r}")
        self.center = _check_flag("center", center)
        self.scale = _check_flag("scale", scale)
        initializers, regularizers, constraints = (
            self._keras.initializers, self._keras.regularizers, self._keras.constraints)
        self.beta_initializer = _get("beta_initializer", beta_initializer, initializers)
        self.gamma_initializer = _get("gamma_initializer", gamma_initializer, initializers)
        self.moving_mean_initializer = _get(
            "moving_mean_initializer", moving_mean_initializer, initializers)
        self.moving_variance_initializer = _get(
            "moving_variance_initializer", moving_variance_initializer, initializers)
        self.beta_regularizer = _get("beta_regularizer", beta_regularizer, regularizers)
        self.gamma_regularizer = _get("gamma_regularizer", gamma_regularizer, regularizers)
        self.beta_constraint = _get("beta_constraint", beta_constraint, constraints)
        self.gamma_constraint = _get("gamma_constraint", gamma_constraint, constraints)
        self.communicator = collectives.validate_spec(communicator)
        collectives.validate_group_size(group_size)
        self.group_size = group_size
        _check_flag("synchronized", synchronized)
        self.renorm = _check_flag("renorm", renorm)
        if self.renorm and not self._supports_renorm:
            raise ValueError(
                f"Argument `renorm` must be False: this {type(self).__name__} does not "
                f"synchronize this Keras's batch renormalization. Received: renorm={renorm!r}")
        if self.renorm:
            # As Keras: validated, and stored as `{}` for None, only with renorm.
            renorm_clipping, self._renorm_bounds = _check_renorm_clipping(renorm_clipping)
            renorm_momentum = _check_float("renorm_momentum", renorm_momentum, 0.0, 1.0)
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.moving_average = moving.check_moving_average(moving_average)
        self.nonfinite = moving.check_nonfinite(nonfinite)
        self.supports_masking = True
        # syncbn.recalibrate's hook: a callable(mean, variance, count) that
        # receives the global statistics of a training call instead of the
        # moving averages.
        self._statistics_recorder = None
        self._strategy_replicas = 1
        self.moving_updates = None
        self._skipped_steps = None
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.moving_stddev = None
        self.renorm_mean = None
        self.renorm_stddev = None

    def build(self, input_shape):
        rank = len(input_shape)
        self._channel_axis, num_channels = _channel_axis_and_size(input_shape, self.axis)
        shape = (num_channels,)
        # Whether XLA can compile the layer depends on it (`supports_jit`).
        self._strategy_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.communicator in ("auto", "tf.distribute"):
            # Before any weight: MultiWorkerMirroredStrategy broadcasts each weight's
            # initial value as it is created, and a shape mismatch there names no layer.
            from syncbn.collectives.tf_distribute import check_build_agreement

            check_build_agreement(self.name, num_channels, self.dtype)
        if self.scale:
            self.gamma = self._add_float32_weight(
                "gamma", shape, self.gamma_initializer, trainable=True,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint)
        if self.center:
            self.beta = self._add_float32_weight(
                "beta", shape, self.beta_initializer, trainable=True,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint)
        self.moving_mean = self._add_float32_weight(
            "moving_mean", shape, self.moving_mean_initializer)
        self.moving_variance = self._add_float32_weight(
            "moving_variance", shape, self.moving_variance_initializer)
        if self.renorm:
            self._build_renorm_weights(shape)
        if self.moving_average == "debiased":
            # Only then, and last: a default layer keeps Keras BN's weights. One
            # count per channel when a mask may give each channel its own count
            # (a channel axis that is not last).
            updates_shape = () if self._channel_axis == rank - 1 else shape
            self.moving_updates = self._add_float32_weight("moving_updates", updates_shape, "zeros")
        # Diagnostics, not state: a plain variable, outside `weights`, so that
        # the layer's weights stay those of Keras BN. Every replica holds the
        # same value (the decision is global), hence ONLY_FIRST_REPLICA.
        with tf.init_scope():
            self._skipped_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name=f"{self.name}_skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.input_spec = self._keras.layers.InputSpec(ndim=rank, axes={self.axis: num_channels})

    def _build_renorm_weights(self, shape):
        """Keras's three renorm weights, in its order: the standard deviations start at
        the square root of the variance initializer's values."""

        def stddev_initializer(shape, dtype=None):
            return tf.sqrt(self._fresh(self.moving_variance_initializer)(shape, dtype=dtype))

        self.moving_stddev = self._add_float32_weight("moving_stddev", shape, stddev_initializer)
        self.renorm_mean = self._add_float32_weight(
            "renorm_mean", shape, self._fresh(self.moving_mean_initializer))
        self.renorm_stddev = self._add_float32_weight("renorm_stddev", shape, stddev_initializer)

    def _fresh(self, initializer):
        """A new initializer with `initializer`'s config, as Keras makes for its renorm weights."""
        if isinstance(initializer, self._keras.initializers.Initializer):
            return initializer.__class__.from_config(initializer.get_config())
        return initializer

    @property
    def supports_jit(self):
        """False when the layer's sums cannot run under XLA: Keras then compiles without it.

        Keras's `compile(jit_compile="auto")` turns XLA on where a GPU is
        present, unless some layer says False here, and falls back from an
        explicit `jit_compile=True` with a warning. Horovod's ops and the MPI
        kernels do not compile, nor do tf.distribute's all-reduces; one
        replica does (see `syncbn.collectives.supports_xla`).
        """
        if getattr(self, "_supports_jit", True) is False:
            return False
        return collectives.supports_xla(self.communicator, self._strategy_replicas)

    @supports_jit.setter
    def supports_jit(self, value):
        # Keras's Layer sets True when it initializes; False forces XLA off.
        self._supports_jit = value

    @property
    def skipped_steps(self):
        """Training steps whose non-finite global statistics were left out (`nonfinite="skip"`).

        Reading it also logs the layer's warning, if not yet logged.
        """
        if self._skipped_steps is None:
            return 0
        count = int(self._skipped_steps.numpy())
        skip_monitor.monitor().observe(self, count)
        return count

    def compute_output_shape(self, input_shape):
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"Axis {self.axis} is out of bounds for input shape {input_shape}. "
                             f"Received: axis={self.axis}")
        return input_shape

    def _gamma_beta(self):
        gamma = None if self.gamma is None else tf.convert_to_tensor(self.gamma)
        beta = None if self.beta is None else tf.convert_to_tensor(self.beta)
        return gamma, beta

    def _call_inference(self, inputs):
        gamma, beta = self._gamma_beta()
        return ops.batch_norm_inference(
            inputs,
            self.moving_mean,
            self.moving_variance,
            gamma,
            beta,
            axis=self._channel_axis,
            epsilon=self.epsilon,
        )

    def _check_channels(self, inputs):
        # The statistics vector that every replica all-reduces has 2C + 1
        # entries: a tensor with another channel count at run time would make
        # the collective fail (or hang) with an obscure shape mismatch.
        num_channels = self.moving_mean.shape[0]
        static_shape = inputs.shape.as_list()
        static_channels = static_shape[self._channel_axis]
        if static_channels is not None and static_channels != num_channels:
            raise ValueError(
                f"SyncBatchNormalization '{self.name}' was built for {num_channels} channels "
                f"on axis {self.axis}. Received: inputs.shape={tuple(static_shape)}"
            )
        static_shape[self._channel_axis] = num_channels
        if static_channels is not None:
            # Known when tracing, so only a kernel that returns a wrongly shaped
            # tensor breaks it (TensorFlow 2.18's oneDNN CPU kernels do, for
            # empty batches): EnsureShape checks that at run time in one op.
            return tf.ensure_shape(inputs, static_shape, name=f"{self.name}_channels")
        # One Assert op on a host-side shape (assert_equal adds some 20 nodes
        # per layer to every traced step).
        check = tf.debugging.Assert(
            tf.equal(tf.shape(inputs)[self._channel_axis], num_channels),
            [
                f"SyncBatchNormalization '{self.name}' expects {num_channels} channels on "
                f"axis {self.axis} at run time. (TensorFlow 2.18's oneDNN CPU kernels "
                "return wrongly shaped tensors for empty batches, e.g. from Conv2D; "
                "set TF_ENABLE_ONEDNN_OPTS=0 when ranks can have empty batches.)"
            ],
        )
        with tf.control_dependencies([check]):
            return tf.ensure_shape(tf.identity(inputs), static_shape)

    def _call_training(self, inputs, mask):
        communicator = collectives.resolve(self.communicator, self.group_size)
        inputs = self._check_channels(inputs)
        gamma, beta = self._gamma_beta()
        # The one fallback rule: a single replica communicates nothing (and, on
        # a GPU, runs TensorFlow's fused training kernel where the layout allows).
        outputs, mean, variance, count = ops.sync_batch_norm(
            inputs,
            gamma,
            beta,
            axis=self._channel_axis,
            epsilon=self.epsilon,
            all_sum=communicator.all_sum,
            name=f"syncbn/{self.name}",
            mask=mask,
            single_replica=communicator.num_replicas == 1,
            renorm=self._renorm_inputs(),
        )
        return self._update_moving_statistics(outputs, mean, variance, count)

    def _renorm_inputs(self):
        """What the op needs for batch renormalization this call (None without renorm)."""
        if not self.renorm:
            return None
        rmin, rmax, dmax = self._renorm_bounds
        return ops.Renorm(tf.convert_to_tensor(self.renorm_mean),
                          tf.convert_to_tensor(self.renorm_stddev), rmin, rmax, dmax)

    def _moving_weights(self):
        """`{name: variable}` of the moving weights a training step updates."""
        names = moving.RENORM_STATE if self.renorm else ("moving_mean", "moving_variance")
        return {name: getattr(self, name) for name in names}

    def _assign_moving_statistics(self, mean, variance):
        """Sets the inference statistics (`syncbn.recalibrate`); with renorm, `moving_stddev` too.

        Renorm derives `moving_variance` from `moving_stddev` at every update,
        so that one is set to `sqrt(variance + epsilon)` to agree.
        """
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        if self.renorm:
            self.moving_stddev.assign(tf.sqrt(tf.convert_to_tensor(variance) + self.epsilon))

    def _update_moving_statistics(self, outputs, mean, variance, count):
        """Assigns the moving statistics after a step (syncbn/moving.py); returns `outputs`."""
        if self._moving_variance_is_unbiased():
            variance = moving.unbiased_variance(variance, count)
        if self._statistics_recorder is not None:  # syncbn.recalibrate: record, update nothing
            self._statistics_recorder(mean, variance, tf.convert_to_tensor(count, tf.float32))
            return outputs
        updates = None if self.moving_updates is None else tf.convert_to_tensor(self.moving_updates)
        variables = self._moving_weights()
        current = {name: tf.convert_to_tensor(variable) for name, variable in variables.items()}
        common = dict(momentum=self.momentum, moving_average=self.moving_average,
                      updates=updates, nonfinite=self.nonfinite)
        if self.renorm:
            new_values, new_updates, nonfinite_step = moving.next_renorm_statistics(
                current, mean, variance, count, epsilon=self.epsilon,
                renorm_momentum=self.renorm_momentum, **common)
        else:
            new_mean, new_variance, new_updates, nonfinite_step = moving.next_moving_statistics(
                current["moving_mean"], current["moving_variance"], mean, variance, count,
                **common)
            new_values = {"moving_mean": new_mean, "moving_variance": new_variance}
        checks = []
        if self.nonfinite == "raise":
            checks.append(tf.debugging.Assert(
                tf.logical_not(nonfinite_step),
                [f"SyncBatchNormalization '{self.name}': the global batch statistics "
                 "are not finite (NaN or inf) and nonfinite='raise'."],
            ))
        elif self.nonfinite == "skip":
            # Arithmetic only, no branch or host callback; the
            # warning comes from a host thread that reads the counter.
            self._skipped_steps.assign_add(tf.cast(nonfinite_step, tf.int64))
            skip_monitor.monitor().watch(self)
        with tf.control_dependencies(checks):
            for name, variable in variables.items():
                variable.assign(new_values[name])
            if new_updates is not None:
                self.moving_updates.assign(new_updates)
            # Only the assertion must run before the outputs are used; the
            # assignments run anyway (tf.function orders stateful ops).
            return tf.identity(outputs) if checks else outputs

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            _check_mask(mask, inputs)
        if training is None:
            training = self._training_when_unset()
        if not self.trainable:
            training = False
        if isinstance(training, (bool, int)) or tf.executing_eagerly():
            training = bool(training)
            outputs = (
                self._call_training(inputs, mask) if training else self._call_inference(inputs)
            )
        else:
            training = tf.cast(training, tf.bool)
            outputs = tf.cond(
                training,
                lambda: self._call_training(inputs, mask),
                lambda: self._call_inference(inputs),
            )
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        base_config = super().get_config()
        initializers, regularizers, constraints = (
            self._keras.initializers, self._keras.regularizers, self._keras.constraints)
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "communicator": self.communicator if isinstance(self.communicator, str) else "auto",
            "group_size": self.group_size,
            "synchronized": True,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "moving_average": self.moving_average,
            "nonfinite": self.nonfinite,
        }
        return {**base_config, **config}
