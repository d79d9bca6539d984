"""`python -m edgediag` and the `edgediag` console script: `edgediag <verb> ...` runs
`python -m edgediag.<verb> ...`; without a verb, lists them."""

import importlib
import sys

from edgediag import VERBS, __version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in VERBS:
        from edgediag import cli

        verb = importlib.import_module(f"edgediag.{argv[0]}")
        return cli.run(verb.main, argv[1:])
    if argv and argv[0] == "--version":
        print(f"edgediag {__version__}")
        return 0
    lines = [f"edgediag {__version__}: train -> compress -> export -> benchmark -> deploy/monitor", "",
             "usage: edgediag <verb> [--help]   (or python -m edgediag.<verb>)", "", "verbs:"]
    lines += [f"  {verb:<10} {text}" for verb, text in VERBS.items()]
    print("\n".join(lines))
    if argv and argv[0] not in ("-h", "--help"):
        print(f"\nerror: unknown verb {argv[0]!r}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
