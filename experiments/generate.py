r"""Generates text from the latest checkpoint of a training run.

    python -m experiments.generate --workdir=runs/default --prefix="time traveller " \
        --num_chars=100 --temperature=0

Temperature 0 is greedy decoding (the book); > 0 samples from softmax(logits / T).
Generation is one compiled scan (see rnn_jax.generate).
"""

import math
import sys
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from experiments.common import deferred_sigint, exit_at_once, parse_flags_or_exit_2

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.", required=True)
flags.DEFINE_string("prefix", "time traveller ", "Text to continue (preprocessed like the corpus).")
flags.DEFINE_integer("num_chars", 100, "Tokens to generate (characters for char models).")
flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample from softmax(logits / temperature).")
flags.DEFINE_integer("seed", 0, "Sampling seed (temperature > 0).")
flags.DEFINE_integer("num_samples", 1, "Samples to draw, each with seed + i.")


# rnn_jax.generate's MAX_TOKENS and MAX_TOKENS_BIDIRECTIONAL (why: there), written
# out so that a bad flag exits before JAX is imported (a test keeps them equal)
MAX_CHARS = 10_000_000
MAX_CHARS_BIDIRECTIONAL = 10_000
MAX_TEMPERATURE = 3.4028234663852886e38  # float32's largest number


def fail(flag: str, message: str) -> None:
    print(f"error: --{flag}: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    try:
        _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while the checkpoint was being restored made the interpreter's
        # shutdown crash (SIGSEGV in 5 of 24 probes at 1.5-1.8 s after start); generation
        # writes nothing, so the process ends without that shutdown
        print("interrupted (SIGINT)", file=sys.stderr)
        exit_at_once(130)


def _main(argv):
    del argv  # positional arguments are refused by parse_flags_or_exit_2
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.num_chars < 1:
        fail("num_chars", f"expected >= 1, got {FLAGS.num_chars}")
    if FLAGS.num_chars > MAX_CHARS:
        fail("num_chars", f"expected <= {MAX_CHARS:,} (one compiled scan holds them all)")
    if not 0 <= FLAGS.temperature < math.inf:  # NaN too
        fail("temperature", f"expected a finite number >= 0, got {FLAGS.temperature}")
    if FLAGS.temperature > MAX_TEMPERATURE:
        fail(
            "temperature",
            f"expected at most {MAX_TEMPERATURE:.4g} (float32), got {FLAGS.temperature:g}",
        )
    if FLAGS.num_samples < 1:
        fail("num_samples", f"expected >= 1, got {FLAGS.num_samples}")
    if not FLAGS.workdir.strip():
        fail("workdir", "expected the run directory experiments.train wrote, got ''")
    with deferred_sigint("interrupted (SIGINT) while starting"):
        from rnn_jax import runs  # (imports JAX)

    try:
        bidirectional = runs.load_config(Path(FLAGS.workdir)).bidirectional
    except ValueError as e:
        fail("workdir", str(e))
    if bidirectional and FLAGS.num_chars > MAX_CHARS_BIDIRECTIONAL:  # before the restore
        fail(
            "num_chars",
            f"expected <= {MAX_CHARS_BIDIRECTIONAL:,} for this bidirectional model, got "
            f"{FLAGS.num_chars:,}: it reruns the network over the whole text for every "
            f"character, so time grows with the square of the length",
        )
    try:
        run = runs.load(Path(FLAGS.workdir))
    except (ValueError, RuntimeError) as e:  # RuntimeError: no checkpoint fits config.json
        fail("workdir", str(e))
    from rnn_jax import generate, text

    if run.skipped:
        print(
            f"note: generating from step {run.step}: the newer step(s) "
            f"{', '.join(map(str, run.skipped))} could not be used (the warnings above "
            f"say why)",
            file=sys.stderr,
        )
    clean = text.preprocess(FLAGS.prefix, run.vocab.mode)
    if clean != FLAGS.prefix and clean != FLAGS.prefix.lower():
        print(
            f"note: --prefix is read as {clean!r} (the corpus' preprocessing, "
            f"tokens mode {run.vocab.mode!r})",
            file=sys.stderr,
        )
    unknown = run.vocab.unknown(FLAGS.prefix)
    if unknown:
        print(
            f"note: --prefix has {len(unknown)} token(s) outside the run's vocabulary "
            f"({text.some(unknown)}): the model reads each as {text.UNK!r}",
            file=sys.stderr,
        )
    for i in range(FLAGS.num_samples):
        try:
            sample = generate.generate_text(
                run.model,
                run.params,
                run.vocab,
                FLAGS.prefix,
                FLAGS.num_chars,
                FLAGS.temperature,
                FLAGS.seed + i,
            )
        except ValueError as e:  # ("prefix: expected at least one token ...")
            fail("prefix", str(e).removeprefix("prefix: "))
        print(sample)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit_2)
