r"""Trains a language model on the bundled Time Machine text (or any UTF-8 file).

    python -m experiments.train                       # LSTM, about 15 s on a 2-core CPU
    python -m experiments.train --flagfile=experiments/configs/gru.flags
    python -m experiments.train --cell=gru --hidden_size=256 --workdir=runs/gru

Rerunning a command with the same --workdir resumes from its latest checkpoint.
SIGTERM / Ctrl-C save the current step and exit (143 / 130). Bad flags: one line on
stderr and exit code 2, before anything is compiled or written.
"""

import dataclasses
import sys

from experiments.common import deferred_sigint, exit_at_once

with deferred_sigint():
    from absl import app, flags  # (importing JAX below takes a second or two)
    from absl import logging as absl_logging

    from experiments.common import (
        define_cpu_devices_flag,
        parse_flags_or_exit_2,
        resolve_cpu_devices,
    )
    from rnn_jax.config import TrainConfig

_D = TrainConfig()
FLAGS = flags.FLAGS

# data
flags.DEFINE_string(
    "data", _D.data, "UTF-8 text file to train on; empty: the bundled Time Machine."
)
flags.DEFINE_enum(
    "tokens",
    _D.tokens,
    ["char", "raw_char", "word"],
    "char: the book's lower-case letters and space; raw_char: every character; word: words.",
)
flags.DEFINE_integer("min_freq", _D.min_freq, "Tokens rarer than this become <unk>.")
flags.DEFINE_integer("num_steps", _D.num_steps, "Time steps T per training window.")
flags.DEFINE_integer("num_train", _D.num_train, "Training windows (book: 10,000).")
flags.DEFINE_integer("num_val", _D.num_val, "Validation windows (book: 5,000).")
flags.DEFINE_enum(
    "partition",
    _D.partition,
    ["windows", "sequential"],
    "windows: shuffled overlapping windows; sequential: consecutive batches "
    "continue each other and the state carries over (truncated BPTT).",
)
# model
flags.DEFINE_enum("cell", _D.cell, ["rnn", "gru", "lstm"], "Recurrent cell of every layer.")
flags.DEFINE_integer("hidden_size", _D.hidden_size, "Hidden units H per layer and direction.")
flags.DEFINE_integer("num_layers", _D.num_layers, "Stacked recurrent layers.")
flags.DEFINE_bool("bidirectional", _D.bidirectional, "Add a backward direction to every layer.")
flags.DEFINE_bool(
    "reset_after",
    _D.reset_after,
    "GRU only: reset gate after the recurrent matmul (PyTorch/cuDNN form).",
)
flags.DEFINE_enum(
    "init",
    _D.init,
    ["default", "uniform"],
    "default: LeCun-normal input, orthogonal recurrent weights, zero biases; uniform: "
    "PyTorch's U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias (the LSTM's "
    "--forget_bias is added to b_f under both; 0 for PyTorch's exact init).",
)
flags.DEFINE_float("forget_bias", _D.forget_bias, "LSTM forget-gate bias at initialisation.")
flags.DEFINE_float(
    "pin_reset", None, "GRU only: fix the reset gate R_t to this value (ablation); unset: learned."
)
flags.DEFINE_float(
    "pin_update",
    None,
    "GRU only: fix the update gate Z_t to this value (ablation); unset: learned.",
)
flags.DEFINE_enum("activation", _D.activation, ["tanh", "relu"], "Plain RNN nonlinearity.")
flags.DEFINE_integer(
    "embed_dim", _D.embed_dim, "0: one-hot input (the book); >0: learned embedding size."
)
flags.DEFINE_float(
    "dropout", _D.dropout, "Dropout rate between layers and before the output layer."
)
flags.DEFINE_integer(
    "unroll",
    _D.unroll,
    "Time steps per loop iteration (lax.scan unroll); 0: the backend's measured default "
    "(1 on CPU, 8 on GPU).",
)
flags.DEFINE_bool("remat", _D.remat, "Gradient checkpointing of the recurrent step.")
flags.DEFINE_enum(
    "implementation",
    _D.implementation,
    ["auto", "fused", "scan", "wavefront", "pallas", "native"],
    "Recurrent layers: fused (hand-written backward pass), scan (autodiff), wavefront "
    "(all layers of a unidirectional network in one loop), pallas (each loop one GPU "
    "kernel; interpreted, slowly, elsewhere), native (LSTM on a CPU: each loop one C++ "
    "function, built on first use) or auto (picked per backend and shape).",
)
flags.DEFINE_enum(
    "matmul_dtype",
    _D.matmul_dtype,
    ["float32", "bfloat16"],
    "Operand type of the recurrent layers' matmuls (float32 accumulation, carries and "
    "gradients either way); bfloat16 needs a fused or wavefront implementation.",
)
flags.DEFINE_enum(
    "directions",
    _D.directions,
    ["auto", "vmap", "separate"],
    "Bidirectional fused layers: both directions in one call vmapped over a direction "
    "axis, or two separate calls (same values either way); auto: the measured rule "
    "(rnn_jax.networks.separate_directions), --autotune times both.",
)
# optimisation
flags.DEFINE_enum("optimizer", _D.optimizer, ["sgd", "adam", "adamw"], "Optimizer (the book: sgd).")
flags.DEFINE_float("lr", _D.lr, "Peak learning rate.")
flags.DEFINE_enum(
    "schedule",
    _D.schedule,
    ["constant", "cosine", "linear"],
    "Learning-rate schedule after --warmup_steps of linear warm-up.",
)
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warm-up steps (cosine, linear).")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum (0 = plain SGD).")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay.")
flags.DEFINE_float("grad_clip", _D.grad_clip, "Clip gradients to this global norm; 0 = off.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Windows per batch.")
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the training windows.")
flags.DEFINE_integer("seed", _D.seed, "Seed of initialisation, shuffling and dropout.")
flags.DEFINE_bool(
    "data_parallel",
    _D.data_parallel,
    "Split every batch over all devices (of all processes) when there are several.",
)
define_cpu_devices_flag()
flags.DEFINE_bool(
    "tune_malloc",
    True,
    "Linux/glibc: one malloc arena, no mmap, no trimming, so XLA:CPU reuses memory "
    "instead of page-faulting on every step (rnn_jax.allocator; up to 2x on CPU).",
)
# autotune (rnn_jax.autotune)
flags.DEFINE_bool(
    "autotune",
    _D.autotune,
    "Before training, time the candidate implementations, unrolls and (bidirectional) "
    "direction layouts of this run's training step (compiled once each) and train with "
    "the fastest; cached per device, jax version, model and shape. --implementation / "
    "--unroll / --directions, when given, stay fixed.",
)
flags.DEFINE_string(
    "autotune_cache",
    "",
    "The autotune cache (JSON); empty: $RNN_JAX_AUTOTUNE_CACHE or ~/.cache/rnn_jax/autotune.json.",
)
flags.DEFINE_bool("autotune_refresh", False, "Time again even if the cache has this shape.")
# multi-host (see BUILD.md)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Processes of a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
# bookkeeping
flags.DEFINE_string("workdir", _D.workdir, "Run directory: flags, metrics, checkpoints, plot.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate every N steps; 0 = once per epoch.")
flags.DEFINE_integer(
    "checkpoint_every", _D.checkpoint_every, "Checkpoint every N steps; 0 = at the end only."
)
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints kept (the newest N).")
flags.DEFINE_float("log_every_s", _D.log_every_s, "Progress line at least this often (seconds).")
flags.DEFINE_string("sample_prefix", _D.sample_prefix, "Prefix of the sample generated at the end.")
flags.DEFINE_integer("sample_chars", _D.sample_chars, "Tokens generated at the end.")


def config_from_flags() -> TrainConfig:
    return TrainConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(TrainConfig)})


def autotune_cache() -> str | None:
    """--autotune_cache, checked (ConfigError naming it) before anything runs."""
    from rnn_jax import autotune
    from rnn_jax.config import ConfigError

    if not FLAGS.autotune_cache:
        return None
    problem = autotune.check_cache_path(FLAGS.autotune_cache)
    if problem:
        raise ConfigError("autotune_cache", problem)
    return FLAGS.autotune_cache


def init_distributed() -> None:
    """``jax.distributed.initialize`` when --coordinator_address is given."""
    if FLAGS.coordinator_address:
        import jax

        try:
            jax.distributed.initialize(
                FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
            )
        except ValueError as e:  # e.g. no process count given and no cluster to detect it
            print(
                f"error: --coordinator_address={FLAGS.coordinator_address}: "
                f"jax.distributed.initialize refused it ({e}); pass --num_processes and "
                f"--process_id unless a cluster manager (SLURM, ...) provides them",
                file=sys.stderr,
            )
            sys.exit(2)


def _recurrent_macs() -> int:
    """The run's recurrent work per step (0 for bad flags: run() reports those)."""
    from rnn_jax import parallel

    try:
        return parallel.recurrent_macs(
            FLAGS.cell,
            FLAGS.hidden_size,
            FLAGS.batch_size,
            FLAGS.num_steps,
            FLAGS.num_layers,
            FLAGS.bidirectional,
        )
    except (KeyError, TypeError):
        return 0


def main(argv):
    try:
        _main(argv)
    except KeyboardInterrupt:  # outside train.run (which notes signals), or a second one
        print(
            "interrupted (SIGINT) outside the training loop; the run directory keeps its "
            "last checkpoint",
            file=sys.stderr,
        )
        exit_at_once(130)  # (train.run has closed its checkpoints and lock by now)


def _main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    absl_logging.set_verbosity(absl_logging.WARNING)
    from rnn_jax import memory, parallel  # (rnn_jax.config, above, has imported jax already)

    if problem := parallel.distributed_problem(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    ):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        memory.budget()  # set by a sweep; anyone's typo exits here, not after a compile
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.tune_malloc:  # before JAX starts its thread pools
        from rnn_jax import allocator

        allocator.tune_malloc()
    if FLAGS.autotune and FLAGS.coordinator_address:
        from rnn_jax.config import AUTOTUNE_MULTIHOST

        print(
            f"error: --autotune: not with --coordinator_address: {AUTOTUNE_MULTIHOST}",
            file=sys.stderr,
        )
        sys.exit(2)
    try:  # before JAX's first computation; auto: one device per core (rnn_jax.parallel)
        cpu_devices = resolve_cpu_devices(
            FLAGS.cpu_devices,
            FLAGS.batch_size,
            FLAGS.data_parallel and not FLAGS.coordinator_address,
            macs=_recurrent_macs(),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    parallel.split_cpu(cpu_devices)
    init_distributed()
    from rnn_jax import train
    from rnn_jax.config import ConfigError

    try:  # run() validates every flag before it compiles or writes anything
        result = train.run(
            config_from_flags(),
            echo=lambda s: print(s, flush=True),
            autotune_cache=autotune_cache(),
            autotune_refresh=FLAGS.autotune_refresh,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(result.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit_2)
