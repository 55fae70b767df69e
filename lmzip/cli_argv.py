"""xz- and zstd-style command lines, rewritten into click's `lmzip COMMAND [ARGS]` form.

`lmzip FILE` compresses; `-z`, `-d`, `-t` and `-l` (or `--compress`, `--decompress`,
`--test`, `--list`) name the command wherever they stand; short flags combine
(`-dc` is `-d -c`); options before a command name go after it, so that
`lmzip -q compress doc.txt` is `lmzip compress -q doc.txt`.
"""

from __future__ import annotations

import os

import click

MODES = {"-z": "compress", "--compress": "compress", "-d": "decompress", "--decompress": "decompress",
         "-t": "test", "--test": "test", "-l": "info", "--list": "info"}
DEFAULT_COMMAND = "compress"
GROUP_OPTIONS = {"-h", "--help", "--version"}  # alone, they are the group's own


def valued_options(commands: dict[str, click.Command]) -> set[str]:
    """Option names that take a value in the commands the mode flags name (so that a
    value is not taken for a file or a command name)."""
    names = set()
    for name in set(MODES.values()):
        for p in commands[name].params:
            if isinstance(p, click.Option) and not p.is_flag:
                names.update(p.opts + p.secondary_opts)
    return names


def _short_cluster(token: str, args: list[str], i: int, valued: set[str], out: list[str],
                   modes: list[str]) -> int:
    """Split `-dcf` into its flags (a value option takes the rest, or the next argument);
    return the index of the next argument."""
    for j in range(1, len(token)):
        flag = "-" + token[j]
        if flag in MODES:
            modes.append(flag)
        elif flag in valued:
            if j + 1 < len(token):
                out += [flag, token[j + 1 :]]
            elif i < len(args):
                out += [flag, args[i]]
                i += 1
            else:
                out.append(flag)  # click says that it needs a value
            break
        else:
            out.append(flag)
    return i


def rewrite(args: list[str], commands: dict[str, click.Command]) -> list[str]:
    """The click form of an xz-style command line; click.UsageError where it is ambiguous."""
    valued = valued_options(commands)
    out: list[str] = []
    modes: list[str] = []
    first: str | None = None  # the first positional argument
    checked = False           # whether `first` is surely a file (it came after --)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            if first is None and i < len(args):
                first, checked = args[i], True
            out += args[i - 1 :]
            break
        if token in MODES:
            modes.append(token)
        elif token.startswith("--"):
            out.append(token)
            if token in valued and i < len(args):
                out.append(args[i])
                i += 1
        elif token.startswith("-") and token != "-":
            i = _short_cluster(token, args, i, valued, out, modes)
        elif first is None and token in commands:
            if modes:
                raise click.UsageError(f"{modes[0]} and the command name '{token}' exclude each other "
                                       f"(for a file named {token}, put -- before it)")
            return [token, *out, *args[i:]]
        else:
            first = token if first is None else first
            out.append(token)
    named = sorted({MODES[m] for m in modes})
    if len(named) > 1:
        other = next(m for m in modes if MODES[m] != MODES[modes[0]])
        raise click.UsageError(f"{modes[0]} and {other} exclude each other")
    if named:
        return [named[0], *out]
    if first is None:
        return args if set(out) <= GROUP_OPTIONS else [DEFAULT_COMMAND, *out]
    if not checked and first != "-" and not os.path.lexists(first):
        raise click.UsageError(f"no command or file named '{first}' (commands: {', '.join(commands)})")
    return [DEFAULT_COMMAND, *out]
