"""What the launchers share."""

import contextlib
import math
import os
import re
import signal
import sys
import tempfile

from absl import flags


def flag_validator(check):
    """An absl validator from ``check(value)``, which raises ValueError on bad input:
    the error's text becomes the flag's one-line message."""

    def ok(value):
        try:
            check(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return ok


def as_flag(name: str, value) -> str:
    """``--name=value`` as written on a command line: a list comma-joined, a bool
    lower-case (what absl parses back to the same value)."""
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"--{name}={value}"


_HELP = re.compile(r"--?(\?|help|helpshort|helpfull|helpxml)(=.*)?")


def parse_flags_or_exit_2(argv):
    """absl's flag parser, but a bad flag or a positional argument prints one line and
    exits with code 2, and a help flag (``--help``, ``--helpshort``, ``--helpfull``,
    ``--helpxml``, ``-?``) prints its help and exits with 0, not absl's 1."""
    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:  # absl's help flags print, then exit 1 inside the parser
        if e.code == 1 and any(_HELP.fullmatch(a) for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = str(e)
        # a multi-flag validator's message starts with every flag it read
        # ("flags a=1, b=[...]: --b: ..."); one that names its flag needs none of them
        head, sep, tail = message.partition(": --")
        if sep and head.startswith("flags "):
            message = "--" + tail
        # absl's own wording for a flagfile it cannot open ("ERROR:: Unable to open
        # flagfile: [Errno 2] No such file or directory: 'x'") names no flag
        unopened = re.fullmatch(
            r"ERROR:: Unable to open flagfile: \[Errno \d+\] (.*?): ('(.*)'|\"(.*)\")", message
        )  # (Python quotes a path holding an apostrophe with double quotes)
        if unopened:
            path = unopened[3] if unopened[3] is not None else unopened[4]
            message = f"--flagfile: cannot open {path}: {unopened[1]}"
        print(f"error: {message.removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        sys.exit(2)
    return rest


CPU_DEVICES_HELP = (
    "CPU devices JAX presents (the same cores; with data parallelism every device runs "
    "its share of the batch at once, measured up to 1.4x per step on 2 cores): auto = "
    "one per core (the largest count up to that which divides --batch_size), or 1 for "
    "steps too small to gain (rnn_jax.parallel.cpu_device_count); N = N devices. Only "
    "the CPU backend; a count forced in XLA_FLAGS wins."
)


def parse_cpu_devices(value: str) -> int | None:
    """``--cpu_devices``: ``"auto"`` -> None, else an int >= 1 (ValueError otherwise)."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"expected auto or an integer >= 1, got {value!r}")
    return n


def define_cpu_devices_flag(name: str = "cpu_devices", default: str = "auto", help_text=None):
    flags.DEFINE_string(name, default, help_text or CPU_DEVICES_HELP)
    flags.register_validator(name, flag_validator(parse_cpu_devices))


def resolve_cpu_devices(
    value: str,
    batch_size: int,
    split: bool,
    flag: str = "cpu_devices",
    macs: int | None = None,
    switch_off: str = "--data_parallel=false",
):
    """How many CPU devices to ask for: ``value`` (``--cpu_devices``), ``auto`` ->
    :func:`rnn_jax.parallel.cpu_device_count` of the batch and the step's recurrent
    work ``macs`` when ``split`` (data parallelism on, one process), else 1.
    ValueError naming the flag when a given count does not divide a valid
    ``batch_size`` (and, when ``switch_off``, the launcher's flag that turns the split
    off)."""
    from rnn_jax import parallel

    n = parse_cpu_devices(value)
    valid_batch = isinstance(batch_size, int) and batch_size >= 1
    if n is None:
        return parallel.cpu_device_count(batch_size, macs) if split and valid_batch else 1
    if split and valid_batch and batch_size % n:
        raise ValueError(
            f"--{flag}: {n} devices do not split --batch_size {batch_size}; use a divisor "
            f"of it or auto" + (f", or {switch_off}" if switch_off else "")
        )
    return n


def output_path_ok(value: str) -> bool:
    """absl validator of an output file flag: empty (none), or a path that is not a
    directory and whose directory exists, checked before any work (the results of a
    long run were lost at the end to a missing folder)."""
    if value and os.path.isdir(value):
        raise flags.ValidationError(f"{value} is a directory; expected a file path")
    parent = os.path.dirname(os.path.abspath(value)) if value else ""
    if value and not os.path.isdir(parent):
        raise flags.ValidationError(f"{value}: its directory {parent} does not exist")
    if value:
        _writable(value, parent)
    return True


def _writable(value: str, folder: str) -> None:
    """A file made in ``folder`` and removed at once (ValidationError naming ``value``
    otherwise): results are written through a temporary file beside their path."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise flags.ValidationError(
            f"{value}: cannot write in {folder} ({e.strerror or e}); expected a writable folder"
        ) from None


def finite_seconds_ok(value: float) -> bool:
    """absl validator: a finite number of seconds (NaN and inf refused)."""
    if not math.isfinite(value):
        raise flags.ValidationError(f"expected a finite number of seconds, got {value}")
    return True


def new_file_ok(value: str) -> bool:
    """absl validator of an output file flag whose folder the launcher makes when
    missing: a path, not a folder, in a folder :func:`outdir_ok` accepts."""
    if not value or os.path.isdir(value):
        raise flags.ValidationError(f"{value!r}: expected a file path, not a folder")
    return outdir_ok(os.path.dirname(os.path.abspath(value)))


def outdir_ok(value: str) -> bool:
    """absl validator of an output folder flag (created when missing): refused up
    front when it names a file, or a folder under a file, so a finished computation
    is never lost at the write."""
    path = os.path.abspath(value or ".")
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise flags.ValidationError(f"{value}: {path} is a file; expected a folder")
    _writable(value, path)
    return True


# deferred_sigint's message where nothing has been written yet
STARTING = "interrupted (SIGINT) while starting; nothing was written"


def exit_at_once(code: int):
    """Flushes stdout and stderr and ends the process with ``code`` without the
    interpreter's shutdown: after a Ctrl-C while XLA's threads were busy (compiling,
    restoring), that shutdown crashed with SIGSEGV (generate: 5 of 24 probes; train:
    8 of 20 SIGINTs of a fuzzer). Call it only with nothing left to write."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def deferred_sigint(message: str = STARTING):
    """Ctrl-C inside the block is noted, not raised; after the block a noted Ctrl-C
    prints ``message`` and exits 130.

    For a launcher's imports: a KeyboardInterrupt raised while JAX imports is
    swallowed by JAX's gc callback (the run then goes on as if nothing happened) or
    turned into an ImportError by jaxlib. Only where Ctrl-C raises KeyboardInterrupt
    (the main thread, Python's default handler); elsewhere the block runs as it is.
    """
    noted = []
    try:
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            raise ValueError("not Python's default SIGINT handler")
        signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    except ValueError:  # not the main thread, or SIGINT handled or ignored already
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if noted:
        print(message, file=sys.stderr)
        sys.exit(130)
