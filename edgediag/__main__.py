"""`python -m edgediag`: list the verbs."""

import sys

from edgediag import VERBS, __version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lines = [f"edgediag {__version__}: train -> compress -> export -> benchmark -> deploy/monitor", "",
             "usage: python -m edgediag.<verb> [--help]", "", "verbs:"]
    lines += [f"  {verb:<9} {text}" for verb, text in VERBS.items()]
    print("\n".join(lines))
    if argv and argv[0] not in ("-h", "--help"):
        print(f"\nerror: unknown verb {argv[0]!r}; run python -m edgediag.<verb>", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
