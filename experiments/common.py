"""What the launchers share."""

import sys

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


def parse_flags_or_exit_2(argv):
    """absl's flag parser, but a bad flag or a positional argument prints one line and
    exits with code 2."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        sys.exit(2)
    return rest
