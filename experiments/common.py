"""What the launchers share."""

import sys

from absl import flags


def parse_flags_or_exit_2(argv):
    """absl's flag parser, but a bad flag prints one line and exits with code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
