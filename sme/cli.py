"""One-line errors for the command-line entry points (`train.py`, `analyze.py`).

A user's mistake (a misspelled ``--config.*`` field, a missing config file, a bad
flag value, an unusable workdir, a full disk) is printed as one line naming the
flag or file, with the config library's "did you mean" suggestion when it has
one, and the process exits non-zero. ``--verbosity=1`` (or higher) shows the
traceback instead, for debugging.
"""

from __future__ import annotations

import re
import sys

from absl import flags


def verbosity(argv) -> int:
    """The ``--verbosity``/``-v`` value in ``argv`` (0 when absent), read before flags are parsed."""
    level = 0
    for i, arg in enumerate(argv[1:], 1):
        match = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
        if match:
            value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "0")
            try:
                level = int(value)
            except ValueError:
                pass
    return level


def _flag_value(argv, name: str) -> str | None:
    for arg in argv[1:]:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def describe_flag_error(err: BaseException, argv) -> str:
    """One line for an error raised while parsing the flags of ``argv``."""
    text = str(err)
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    suggestion = re.search(r"Did you mean \"([^\"]+)\" instead of \"([^\"]+)\"", text.replace("\\'", "'").replace(
        '\\"', '"'))
    if suggestion:
        right, wrong = suggestion.groups()
        given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and
                 a.split("=", 1)[0].rsplit(".", 1)[-1] == wrong]
        flag = given[0] if given else f"--config.*.{wrong}"
        return f"flag {flag}: unknown config field {wrong!r}; did you mean {right!r}?"
    if isinstance(err, (KeyError, AttributeError)):
        key = text.strip("'\"").split("\\n")[0].strip("'\"")
        given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and key in a]
        return f"flag {given[0] if given else '--config.*'}: unknown config field {key!r} (see configs/base.py)"
    if any(isinstance(e, OSError) for e in chain) and _flag_value(argv, "config"):
        errno_text = re.findall(r"\[Errno \d+\] ([^:\n]+)", "\n".join(str(e) for e in chain))
        detail = errno_text[-1] if errno_text else text.splitlines()[0]
        return f"flag --config={_flag_value(argv, 'config')}: cannot load the config file ({detail})"
    if isinstance(err, flags.Error):
        return text.splitlines()[0]
    first = text.splitlines()[0] if text else type(err).__name__
    return f"bad flags: {type(err).__name__}: {first}"


def flags_parser(argv):
    """An absl ``flags_parser`` that exits with one line (rc 2) on any parsing error."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - config files and flag parsers raise many types
        if verbosity(argv) >= 1:
            raise
        print(f"error: {describe_flag_error(err, argv)}", file=sys.stderr)
        sys.exit(2)


def fail(err: BaseException, code: int = 2):
    """Exit with ``error: <first line of err>`` (the traceback with --verbosity >= 1)."""
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
        raise err
    text = str(err).strip().splitlines()
    print(f"error: {text[0] if text else type(err).__name__}", file=sys.stderr)
    sys.exit(code)
