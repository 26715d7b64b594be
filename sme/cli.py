"""Shared parts of the command-line entry points (`train.py`, `analyze.py`): one-line errors, the
multi-process flags (``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--distributed``;
`initialize_distributed`) and ``--config`` paths that work from any directory (`config_path`).

A user's mistake (a misspelled ``--config.*`` field, a missing config file, a bad
flag value, an unusable workdir, a full disk) is printed as one line naming the
flag or file, with the config library's "did you mean" suggestion when it has
one, and the process exits non-zero. ``--verbosity=1`` (or higher) shows the
traceback instead, for debugging.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from absl import flags

from sme import distributed

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's coordinator (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0..N-1 "
                                   "(process 0 writes the files).", lower_bound=0)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process runs: call jax.distributed.initialize() with the settings it auto-detects "
    "(TPU pod slice, SLURM, Open MPI); implied by --coordinator_address/--num_processes/--process_id.")


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


def config_path(arg: str) -> str:
    """``arg`` (``PATH[:variant]``) as given when PATH exists; else, for ``configs/NAME.py``, the same file of
    the installed ``configs`` package (so ``--config=configs/default.py`` works from any directory)."""
    path, sep, variant = arg.partition(":")
    if os.path.exists(path) or os.path.isabs(path):
        return arg
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 2 or parts[0] != "configs":
        return arg
    try:
        spec = importlib.util.find_spec("configs")
    except (ImportError, ValueError):
        return arg
    for location in (spec.submodule_search_locations or []) if spec else []:
        installed = os.path.join(location, *parts[1:])
        if os.path.exists(installed):
            return installed + sep + variant
    return arg


def _resolve_config_args(argv):
    """``argv`` with the ``--config`` value resolved by `config_path` (also in ``sys.argv``, which the config
    flag reads for its overrides)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + config_path(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
    if argv is sys.argv or list(argv) == sys.argv:
        sys.argv[:] = out
    return out


def show_in_help(*modules) -> None:
    """Make the flags defined in ``modules`` (and the multi-process flags here) those ``--help`` lists: absl's
    ``--help`` shows the flags of the program's main file, which for ``train.py``/``sme-train`` only imports them."""
    fv = flags.FLAGS
    for module in (*modules, sys.modules[__name__]):
        for flag in fv.get_key_flags_for_module(module):
            fv.register_key_flag_for_module(sys.argv[0], flag)


def flags_parser(argv):
    """An absl ``flags_parser`` that exits with one line (rc 2) on any parsing error."""
    try:
        return flags.FLAGS(_resolve_config_args(argv))
    except Exception as err:  # noqa: BLE001 - config files and flag parsers raise many types
        if verbosity(argv) >= 1:
            raise
        print(f"error: {describe_flag_error(err, argv)}", file=sys.stderr)
        sys.exit(2)


def initialize_distributed() -> bool:
    """Join a multi-process run when the flags or the environment ask for it (`sme.distributed`), exiting with
    one line on inconsistent settings; True when the run is multi-process. Call before any JAX computation."""
    settings = distributed.requested(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    if settings is None:
        return False
    try:
        distributed.initialize(**settings)
    except (distributed.DistributedError, ValueError, RuntimeError) as err:
        fail(err, 2)
    return True


def fail(err: BaseException, code: int = 2):
    """Exit with ``error: <first line of err>`` (the traceback with --verbosity >= 1)."""
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
        raise err
    text = str(err).strip().splitlines()
    print(f"error: {text[0] if text else type(err).__name__}", file=sys.stderr)
    sys.exit(code)
