"""What every `SyncBatchNormalization` does, whichever Keras it is a layer of.

`SyncBatchNormalizationBase` holds the layer's arguments, weights, call and
config; it is a mixin with no Keras base class. Each Keras gets a thin
adapter that puts it in front of that Keras's `Layer` and says how to make
a weight and an input spec: `syncbn.layers.keras3` (Keras 3, the default)
and `syncbn.layers.legacy` (tf_keras, under `TF_USE_LEGACY_KERAS=1`). The
math is not here either: `syncbn.ops` computes, `syncbn.moving` updates the
moving statistics, `syncbn.collectives` sums.
"""

import tensorflow as tf

from syncbn import collectives, moving, ops, skip_monitor


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"Argument `{name}` must be a bool. Received: {name}={value!r}")
    return value


def _check_float(name, value, low, high, high_open):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Argument `{name}` must be a float. Received: {name}={value!r}")
    value = float(value)
    above = value >= high if high_open else value > high
    if not low <= value or above:
        bracket = ")" if high_open else "]"
        raise ValueError(
            f"Argument `{name}` must be in [{low}, {high}{bracket}. Received: {name}={value!r}"
        )
    return value


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
            `Conv2D`).
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
        renorm: Must be False; batch renormalization is not supported.
        moving_average: `"ema"` (default): Keras's exponential moving
            average, so the layer stays a drop-in. `"debiased"`: the
            bias-corrected average, in which the initial values have no
            weight (after the first step the moving statistics are that
            step's global batch statistics); the layer then has one more
            non-trainable weight, `moving_updates`, the number of updates
            so far (saved and restored with the others).
        nonfinite: What a step whose *global* batch statistics are not
            finite does to the moving statistics: `"skip"` (default) leaves
            them unchanged and counts the step in `skipped_steps`, with no
            branch in the step; a host thread that reads the counters logs
            one warning for the layer (logger `syncbn.layers`; see
            `syncbn.skip_monitor`). `"update"` averages them in, as Keras
            does; `"raise"` fails the step on every replica with an
            `InvalidArgumentError` naming the layer. Outputs and gradients
            are the same in all three. Under XLA (`jit_compile=True`) the
            compiler drops the assertion of `"raise"`; `"skip"` still skips,
            counts and warns.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of any rank >= 2. float16 and bfloat16 inputs
            are normalized in float32; variables are always float32.
        training: Python bool or boolean scalar tensor (for example a
            `tf.Variable` flipped between training and evaluation inside one
            `tf.function`). None means inference.
        mask: Optional boolean tensor shaped like `inputs` without the
            channel axis. Masked-out positions are left out of the global
            statistics (they are still normalized).

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
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"Argument `axis` must be an integer. Received: axis={axis!r}")
        self.axis = axis
        self.momentum = _check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.epsilon = _check_float("epsilon", epsilon, 0.0, float("inf"), high_open=False)
        if self.epsilon <= 0:
            raise ValueError(f"Argument `epsilon` must be > 0. Received: epsilon={epsilon!r}")
        self.center = _check_bool("center", center)
        self.scale = _check_bool("scale", scale)
        initializers, regularizers, constraints = (
            self._keras.initializers, self._keras.regularizers, self._keras.constraints)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.communicator = collectives.validate_spec(communicator)
        collectives.validate_group_size(group_size)
        self.group_size = group_size
        _check_bool("synchronized", synchronized)
        if renorm:
            raise ValueError(
                "Argument `renorm` must be False: SyncBatchNormalization does not "
                f"support batch renormalization. Received: renorm={renorm!r}"
            )
        # Kept only so that configs round-trip like BatchNormalization's.
        self.renorm = False
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

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                "SyncBatchNormalization needs inputs of rank >= 2 (batch and channel "
                f"axes). Received: input_shape={tuple(input_shape)}"
            )
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"Argument `axis` is out of bounds for inputs of rank {rank}. "
                f"Received: axis={self.axis}"
            )
        self._channel_axis = self.axis % rank
        if self._channel_axis == 0:
            raise ValueError(
                "Argument `axis` must not be the batch axis (0): the batch axis is "
                f"what gets synchronized. Received: axis={self.axis}"
            )
        num_channels = input_shape[self._channel_axis]
        if num_channels is None:
            raise ValueError(
                "The channel axis of the inputs must have a known size. "
                f"Received: input_shape={tuple(input_shape)}, axis={self.axis}"
            )
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
        if self.moving_average == "debiased":
            # Only then: a default layer keeps Keras BN's four weights.
            self.moving_updates = self._add_float32_weight("moving_updates", (), "zeros")
        # Diagnostics, not state: a plain variable, outside `weights`, so that
        # the layer's weights stay those of Keras BN. Every replica holds the
        # same value (the decision is global), hence ONLY_FIRST_REPLICA.
        with tf.init_scope():
            self._skipped_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name=f"{self.name}_skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.input_spec = self._keras.layers.InputSpec(ndim=rank, axes={self.axis: num_channels})

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
        )
        return self._update_moving_statistics(outputs, mean, variance, count)

    def _update_moving_statistics(self, outputs, mean, variance, count):
        """Assigns the moving statistics after a step (syncbn/moving.py); returns `outputs`."""
        if self._moving_variance_is_unbiased():
            variance = moving.unbiased_variance(variance, count)
        if self._statistics_recorder is not None:  # syncbn.recalibrate: record, update nothing
            self._statistics_recorder(mean, variance, tf.convert_to_tensor(count, tf.float32))
            return outputs
        updates = None if self.moving_updates is None else tf.convert_to_tensor(self.moving_updates)
        new_mean, new_variance, new_updates, nonfinite_step = moving.next_moving_statistics(
            tf.convert_to_tensor(self.moving_mean), tf.convert_to_tensor(self.moving_variance),
            mean, variance, count, momentum=self.momentum,
            moving_average=self.moving_average, updates=updates, nonfinite=self.nonfinite,
        )
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
            self.moving_mean.assign(new_mean)
            self.moving_variance.assign(new_variance)
            if new_updates is not None:
                self.moving_updates.assign(new_updates)
            # Only the assertion must run before the outputs are used; the
            # assignments run anyway (tf.function orders stateful ops).
            return tf.identity(outputs) if checks else outputs

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have the shape of the inputs without the channel "
                f"axis. Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
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
