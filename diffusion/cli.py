"""Command-line tools on absl: each tool's flags in a registry of its own, run by absl.app.

Every tool (`python -m diffusion.evaluation.fid`, `python -m experiments.throughput.run`,
...) defines its flags in its own `flags.FlagValues()` rather than in absl's global
`flags.FLAGS`, so that importing a tool (a test, another tool) defines no flags, two tools
may share a flag name (`--out`, `--seed`), and `main(argv)` can run in-process more than
once. The shape of a tool:

    FLAGS = flags.FlagValues()
    flags.DEFINE_string("out", "", "Output file.", flag_values=FLAGS)

    def main(argv: Sequence[str]) -> None:   # argv as absl.app gives it: program first
        paths = cli.parse(FLAGS, argv)[1:]
        ...

    if __name__ == "__main__":
        cli.run(main, FLAGS)
"""
from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """Sets `flag_values` from `argv` (program name first, flags anywhere); returns the
    positional arguments, program name first. Every flag starts from its default, so a
    second in-process call does not inherit the first one's values. A bad or missing
    flag raises app.UsageError naming it."""
    if flag_values.is_parsed():
        flag_values.unparse_flags()
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise app.UsageError(str(e)) from e


def run(main: Callable[[list[str]], Any], flag_values: flags.FlagValues) -> NoReturn:
    """absl.app.run(main) for a tool whose flags live in `flag_values`.

    absl's own flags (--verbosity, --logtostderr, ...) are taken out of argv here; the
    tool's stay in it for `main` to parse. --help prints the tool's docstring and flags.
    An int that main returns is the exit status; any other result (a dict of results,
    None) means success."""
    def absl_flags(argv: list[str]) -> list[str]:
        if any(arg in _HELP for arg in argv[1:]):
            print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
            print(flag_values.get_help(include_special_flags=False))
            sys.exit(0)
        return flags.FLAGS(argv, known_only=True)

    def absl_main(argv: list[str]) -> int | None:
        status = main(argv)
        return status if isinstance(status, int) else None

    app.run(absl_main, flags_parser=absl_flags)
    raise AssertionError("app.run returned")  # it always exits
