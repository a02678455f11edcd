"""Errors that the command-line tools print as one line (no traceback) and exit 2 on."""
import sys

from nanogpt_kernels.registry import KernelError


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and the fix."""


def run_cli(main, argv=None):
    """Run `main(argv)`, turning a UserError (or a KernelError) into `error: ...` on stderr and exit code 2."""
    try:
        return main(argv)
    except (UserError, KernelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
