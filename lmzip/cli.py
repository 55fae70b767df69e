"""The `lmzip` command: a thin click layer over the lmzip library.

It parses arguments (xz-style short forms are rewritten into commands by
cli_argv), calls the library and turns its exceptions into one-line messages at
one boundary (`_attempt`). Exit codes: 0 success, 1 bad data, failed I/O or
verification, or an internal error; 2 usage (an OptionError too); 130 interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import click
from click.core import ParameterSource

import lmzip
from lmzip import cli_argv, export as memory_export, inspection
from lmzip.atomic import atomic_output, is_special, names_a_folder, spooled
from lmzip.fit_config import FitConfig
from lmzip.kinds import METHODS
from lmzip.progress_line import ProgressLine

SUFFIX = ".lmz"
EXPORT_SUFFIX = ".safetensors"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for gzip or zstd there
CONTEXT = {"help_option_names": ["-h", "--help"]}
_DEFAULTS = FitConfig()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


@contextlib.contextmanager
def _progress(obj: dict, label: str, unit: str):
    """A progress callback for the library (None when no one watches); erased at the end."""
    line = ProgressLine(label, sys.stderr, unit) if obj["progress"] else None
    try:
        yield line
    finally:
        if line is not None:
            line.close()


def _codec(obj: dict):
    """The command's Codec, made on first use: it brings torch, which the commands that read only
    an archive's table (info, test --no-model) and --help do without."""
    if obj["codec"] is None:
        obj["codec"] = lmzip.Codec()
    return obj["codec"]


def _say(ctx_obj: dict, message: str) -> None:
    if not ctx_obj["quiet"]:
        click.echo(message, err=True)


def _read_with_stat(name: str) -> tuple[bytes, os.stat_result | None]:
    """The input's bytes, and its status from before reading (None for standard input)."""
    if name == "-":
        return sys.stdin.buffer.read(), None
    path = Path(name)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", name)
    status = path.stat()  # before reading changes the access time
    return path.read_bytes(), status


def _read_input(name: str) -> bytes:
    return _read_with_stat(name)[0]


def _error_text(e: BaseException, name: str) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, FileExistsError):
        if e.filename in (None, name):
            return e.strerror  # the file name already leads the line
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _attempt(obj: dict, name: str, work) -> bool:
    """Run work(); say what failed in one line on stderr and return False, or raise a usage error.

    The library raises LmzError for everything a user can cause (OptionError: a usage
    error, exit 2); OSError is I/O. Anything else is a bug in lmzip: one line, and the
    traceback under -v. KeyboardInterrupt passes (the group exits 130).
    """
    try:
        work()
        return True
    except (click.ClickException, click.exceptions.Exit):
        raise
    except lmzip.OptionError as e:
        raise click.UsageError(str(e), click.get_current_context(silent=True)) from None
    except (lmzip.LmzError, OSError) as e:
        click.echo(f"lmzip: {name}: {_error_text(e, name)}", err=True)
    except Exception as e:  # noqa: BLE001 - the one place that reports bugs
        hint = " (rerun with -v for the traceback)"
        if obj["verbose"]:
            click.echo(traceback.format_exc().rstrip(), err=True)
            hint = ""
        message = " ".join(str(e).split())  # one line
        click.echo(f"lmzip: {name}: internal error: {type(e).__name__}: {message}{hint}", err=True)
    return False


def _each_file(obj: dict, files, work) -> None:
    """Run work(name) on each file; report failures one line each; exit 1 if any failed."""
    failed = [name for name in files if not _attempt(obj, name, lambda: work(name))]
    if failed:
        sys.exit(EXIT_FAILURE)


def _stdout():
    """Standard output, as a binary stream; an I/O error if the shell closed it."""
    if sys.stdout is None:
        raise OSError(errno.EBADF, "standard output is closed")
    return sys.stdout.buffer


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush finds no broken pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _refuse_terminal(force: bool) -> None:
    if _stdout().isatty() and not force:
        raise click.UsageError("will not write binary data to a terminal (use -o, or -f to force)")


def _write(name: str, output: str | None, to_stdout: bool, force: bool, produce,
           like: os.stat_result | None = None) -> None:
    """Send what produce(stream) writes to stdout or, atomically, to `output` (with the
    mode and times of `like`, the input's, as gzip, xz and zstd do)."""
    if to_stdout:
        try:
            with spooled(_stdout()) as buffer:  # nothing reaches stdout unless the whole result checks out
                produce(buffer)
        except BrokenPipeError:  # the reader stopped (| head): as gzip and zstd, end quietly
            _quiet_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None
        return
    if name != "-" and os.path.exists(output) and os.path.samefile(name, output):
        raise lmzip.InputError(f"the output {output} is the input file")
    with atomic_output(output, force=force, like=like) as f:
        produce(f)


def _check_output_name(option: str, path: str | None) -> None:
    """A usage error now for an output that cannot be written later: a folder, or in a missing one."""
    if path is None:
        return
    if names_a_folder(path) or os.path.isdir(path):
        raise click.BadParameter(f"{path} names a folder, not a file", param_hint=option)
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise click.BadParameter(f"{os.path.dirname(path)}: no such folder", param_hint=option)


def _check_output_args(files, output, to_stdout, one_per_stream: bool = False) -> tuple[str | None, bool]:
    """(output, to_stdout), with `-o -` meaning standard output, as in zstd.

    `one_per_stream`: what the command writes holds one file, so -c takes one input
    (archives written one after another are not one archive)."""
    if output and len(files) > 1:
        raise click.UsageError("-o takes one input file")
    if output and to_stdout:
        raise click.UsageError("-o and -c exclude each other")
    if output == "-":
        output, to_stdout = None, True
    if one_per_stream and to_stdout and len(files) > 1:
        raise click.UsageError("-c takes one input file (one output holds one file)")
    return output, to_stdout


class _Command(click.Command):
    """A command that takes -q and -v (before its name too: the group moves them after it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["-q", "--quiet"], is_flag=True, help="Print nothing but errors."),
            click.Option(["-v", "--verbose"], is_flag=True,
                         help="Print a summary per file, and the traceback of an internal error."),
        ]

    def invoke(self, ctx):
        quiet, verbose = ctx.params.pop("quiet"), ctx.params.pop("verbose")
        ctx.obj.update(quiet=quiet, verbose=verbose and not quiet,
                       progress=not quiet and _stderr_is_terminal())
        return super().invoke(ctx)


class _Lmzip(click.Group):
    """Reads xz-style command lines too (cli_argv); Ctrl-C anywhere in a command exits 130."""

    command_class = _Command

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, cli_argv.rewrite(args, self.commands))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # outputs in progress have removed themselves (atomic_output)
            click.echo("lmzip: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Lmzip, context_settings=CONTEXT)
@click.version_option(lmzip.__version__, prog_name="lmzip")
@click.pass_context
def main(ctx):
    """Lossless text compression into LLM memory vectors (.lmz).

    \b
    Short forms, as in xz and zstd:
      lmzip FILE...           compress (lmzip compress FILE...)
      lmzip -d FILE.lmz...    decompress; -t test, -l list (info), -z compress
      lmzip -dc FILE.lmz      short flags combine
    -q, -v, -f, -k, -c and -o work before or after the command.

    Exit status: 0 success; 1 bad data, failed verification, an I/O error or
    an internal error; 2 usage error; 130 interrupted.
    """
    ctx.obj = {"quiet": False, "verbose": False, "progress": False, "codec": None}


def _output_flags(f):
    f = click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file.")(f)
    f = click.option("-c", "--stdout", "to_stdout", is_flag=True, help="Write to standard output.")(f)
    f = click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")(f)
    # one option, so that the last of --rm and -k given wins, as in zstd (an alias may carry either)
    f = click.option("--rm/--keep", " /-k", "remove", default=False,
                     help="Delete the input file after success, or keep it (the default); the last given wins.")(f)
    return f


FIT_OPTIONS = ("vectors", "max_vectors", "max_steps", "start_tokens", "grow_tokens", "max_tokens", "margin",
               "batch_size", "lr", "bf16", "hinge")


def _fit_flags(f):
    """The fitting options, shared by compress and bench; they arrive as FitConfig fields."""
    options = [
        click.option("--vectors", type=click.IntRange(1, 1024), default=_DEFAULTS.vectors, show_default=True,
                     help="Memory vectors a segment starts with."),
        click.option("--max-vectors", type=click.IntRange(1, 1024), default=_DEFAULTS.max_vectors,
                     show_default=True, help="With --tokens: a segment out of steps retries with twice "
                     "the vectors, up to this many, before it goes to zstd."),
        click.option("--max-steps", type=click.IntRange(0), default=_DEFAULTS.max_steps, show_default=True,
                     help="Steps without verifying a longer length before a growing segment closes "
                     "(with --tokens: steps per attempt)."),
        click.option("--start-tokens", type=click.IntRange(1), default=_DEFAULTS.start_tokens,
                     show_default=True, help="Length a growing segment first tries."),
        click.option("--grow-tokens", type=click.IntRange(1), default=_DEFAULTS.grow_tokens,
                     show_default=True, help="Tokens a growing segment adds after each verified length."),
        click.option("--max-tokens", type=click.IntRange(1), default=_DEFAULTS.max_tokens,
                     show_default=True, help="Longest a growing segment may become."),
        click.option("--margin", type=click.FloatRange(0), default=_DEFAULTS.margin, show_default=True,
                     help="Required top-1 minus top-2 logit gap at every decoded token."),
        click.option("--batch-size", type=click.IntRange(1), default=_DEFAULTS.batch_size, show_default=True,
                     help="Segments fitted together."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=_DEFAULTS.lr, show_default=True,
                     help="Peak learning rate."),
        click.option("--bf16/--no-bf16", default=None,
                     help="Fit under bfloat16 autocast [default: where the hardware has native bf16; "
                     "elsewhere it is emulated, about 30 times slower]; verification is float32 either way."),
        click.option("--hinge", type=click.FloatRange(0), default=_DEFAULTS.hinge, show_default=True,
                     help="Weight of the margin hinge added to cross-entropy."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _fit_config(params: dict) -> FitConfig:
    return FitConfig(**{name: params.pop(name) for name in FIT_OPTIONS})


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True)
@_output_flags
@click.option("--model", envvar="LMZIP_MODEL", help="Model: hub ID or local directory "
              "[env LMZIP_MODEL; default: the embedded SmolLM2-135M-Instruct].")
@click.option("--method", type=click.Choice(METHODS), default="memory", show_default=True,
              help="memory: fit memory vectors (zstd for what fails); lm: range-code each token under the "
                   "model's prediction (small archives, slow; README); zstd: no model.")
@click.option("--tokens", "tokens_per_segment", type=click.IntRange(1), default=None,
              help="Cut text every N tokens [default: segments grow while their vectors hold them; "
                   "--method lm: 2047, at most 8191 (8191: about 3% smaller, 4 times slower to decode)].")
@click.option("--head", "lm_head", type=click.IntRange(0, 8191), default=None, metavar="N",
              help="--method lm: code each chunk of a segment after the first N tokens of its first chunk "
                   "[default: 128; 512: about 0.6% smaller, a quarter more decoding steps; 0: none (with "
                   "--keep-lines, segment kind 6, for lmzip before kind 7)].")
@click.option("--keep-lines", is_flag=True, default=False,
              help="--method lm: code CRLF line ends and hard-wrapped lines as they are (segment kind 7, for "
                   "lmzip before kind 8) [default: as LF, and wrapped lines joined, where that pays: "
                   "6%% smaller on alice29.txt].")
@_fit_flags
@click.option("--level", type=click.IntRange(1, 22), default=19, show_default=True,
              help="zstd level for segments stored as zstd.")
@click.option("--workers", default="auto", show_default=True, metavar="N|auto",
              help="Fitting processes: auto is one one-thread process per core, or one per GPU.")
@click.option("--ray", "ray_address", metavar="auto|local|HOST:PORT", default=None,
              help="Fit on a Ray cluster (pip install 'lmzip[ray]'): HOST:PORT of its head node, 'auto' for the "
              "cluster this machine belongs to (or RAY_ADDRESS), 'local' to start one here. Every node needs "
              "lmzip and the model in its cache.")
@click.option("--journal/--no-journal", default=True, show_default=True,
              help="Keep finished segments (memory) or chunks (lm) in OUTPUT.journal, so that rerunning the "
              "same command after a crash does only what is missing (removed on success).")
@click.pass_obj
def compress(obj, files, output, to_stdout, force, remove, model, method, tokens_per_segment, lm_head,
             keep_lines, level, workers, ray_address, journal, **fit_params):
    """Compress FILES (or - for standard input) to FILE.lmz."""
    output, to_stdout = _check_output_args(files, output, to_stdout, one_per_stream=True)
    if ray_address and workers != "auto":
        raise click.UsageError("--ray and --workers exclude each other (the cluster has its own workers)")
    if lm_head is not None and method != "lm":
        raise click.UsageError("--head is for --method lm")
    if keep_lines and method != "lm":
        raise click.UsageError("--keep-lines is for --method lm")
    if method != "memory":
        _refuse_fitting_options(method)
    options = dict(method=method, model=model, tokens_per_segment=tokens_per_segment,
                   fit=_fit_config(fit_params), zstd_level=level,
                   workers=1 if ray_address or method != "memory" else _workers(workers), cluster=ray_address)
    if lm_head is not None:
        options["lm_head"] = lm_head
    if keep_lines:
        options["lm_lines"] = False

    def work(name):
        if name.endswith(SUFFIX) and not force:  # as xz and zstd: most likely a slip
            raise lmzip.InputError(f"already has the {SUFFIX} suffix; skipped "
                                   "(-d decompresses it; -f compresses it again)")
        stdout = to_stdout or (name == "-" and not output)
        if stdout:
            _refuse_terminal(force)
        data, status = _read_with_stat(name)
        reports = []
        target = output or f"{name}{SUFFIX}"
        book = f"{target}.journal" if journal and not stdout and method != "zstd" else None

        def produce(f):
            with _progress(obj, name, "bytes") as bar:  # erased before the output is written out
                reports.append(_codec(obj).encode_to(data, f, progress=bar, journal=book, **options))

        _write(name, target, stdout, force, produce, status)
        if book:
            shutil.rmtree(book, ignore_errors=True)  # the archive is safely written: the journal is done
        r = reports[0]
        if obj["verbose"]:
            is_lm = method == "lm"
            vectors = "" if is_lm else f" in {r.memory_vectors} vectors"
            resumed = f"; {_counted(r.resumed, 'chunk' if is_lm else 'segment')} from the journal" if r.resumed else ""
            # runs of pieces that failed share a zstd segment
            _say(obj, f"{name}: {r.original_size} -> {r.archive_size} bytes; "
                      f"{_counted(r.memory_segments, 'lm segment' if is_lm else 'memory segment')} "
                      f"({r.memory_tokens} tokens{vectors}), "
                      f"{_counted(r.segments - r.memory_segments, 'zstd segment')}{resumed}")
        if remove and name != "-" and not stdout and not is_special(target):  # as gzip: -c never deletes the input
            os.unlink(name)

    _each_file(obj, files, work)


def _refuse_fitting_options(method: str) -> None:
    """--workers and --ray spread the fitting of memory segments; under another method they
    would do nothing, so saying them is a slip."""
    ctx = click.get_current_context()
    named = [flag for flag, name in (("--workers", "workers"), ("--ray", "ray_address"))
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if named:
        runs = ("uses this machine's cores (OMP_NUM_THREADS limits them)" if method == "lm"
                else "has nothing to fit")
        verb = "fit" if len(named) > 1 else "fits"
        raise click.UsageError(f"{' and '.join(named)} {verb} memory segments; --method {method} {runs}")


def _workers(value: str) -> int:
    if value == "auto":
        from lmzip.workers import default_workers

        return default_workers()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r} is not a number of workers (or auto)", param_hint="--workers")


def _decode_flags(f):
    """How far decoding may go: downloads and work."""
    f = click.option("--allow-download", is_flag=True, default=None,
                     help="Let a hub model the archive names be downloaded [env LMZIP_ALLOW_DOWNLOAD=1].")(f)
    f = click.option("--work-limit", type=click.IntRange(0), default=None, metavar="TOKENS",
                     help="Refuse archives that need more model steps than this "
                     "[env LMZIP_WORK_LIMIT; default 2^26].")(f)
    return f


def _counted(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


def _segment_count(blob) -> str:
    kinds = [s["kind"] for s in lmzip.inspect(blob)["segments"]]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
    return _counted(len(kinds), "segment") + (f" ({counts})" if kinds else "")


def _decompressed_name(name: str) -> str:
    if not name.endswith(SUFFIX) or name == SUFFIX:
        raise lmzip.InputError(f"unknown suffix (expected {SUFFIX}); name the output with -o")
    return name[: -len(SUFFIX)]


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True)
@_output_flags
@click.option("--model", help="Where to find the archive's model (hub ID or local directory), "
              "if not where the archive says.")
@_decode_flags
@click.pass_obj
def decompress(obj, files, output, to_stdout, force, remove, model, allow_download, work_limit):
    """Decompress FILE.lmz to FILE (or - for standard input, to standard output)."""
    output, to_stdout = _check_output_args(files, output, to_stdout)

    def work(name):
        stdout = to_stdout or (name == "-" and not output)
        target = output or (None if stdout else _decompressed_name(name))
        blob, status = _read_with_stat(name)
        written = []

        def produce(f):
            with _progress(obj, name, "segments") as bar:  # erased before the text reaches a terminal
                _codec(obj).decode_to(blob, f, model=model, progress=bar, work_limit=work_limit,
                                      allow_download=allow_download)
            written.append(f.tell())

        _write(name, target, stdout, force, produce, status)
        if obj["verbose"]:
            _say(obj, f"{name}: {len(blob)} -> {written[0]} bytes, {_segment_count(blob)} -> {target or 'stdout'}")
        if remove and name != "-" and not stdout and not is_special(target):  # /dev/null keeps nothing
            os.unlink(name)

    _each_file(obj, files, work)


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True)
@click.option("--model", help="Where to find the archive's model, if not where the archive says.")
@click.option("--no-model", is_flag=True, help="Check structure, every stored payload's CRC-32 (format 3) "
              "and that memory vectors are finite, without loading a model or decoding.")
@_decode_flags
@click.pass_obj
def test(obj, files, model, no_model, allow_download, work_limit):
    """Decode FILES and verify every checksum, writing nothing."""

    class Sink(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            return len(b)

    def work(name):
        blob = _read_input(name)
        if no_model:
            archive = inspection.check(blob)
            unchecked = (" (format 1/2 has no payload CRC: vectors checked finite only)"
                         if archive.header.version < 3 else "")
            _say(obj, f"{name}: OK, payloads intact{unchecked}; content not decoded")
            return
        with _progress(obj, name, "segments") as bar:
            _codec(obj).decode_to(blob, Sink(), model=model, progress=bar, work_limit=work_limit,
                                  allow_download=allow_download)
        _say(obj, f"{name}: OK" + (f", {_segment_count(blob)} decoded and checked" if obj["verbose"] else ""))

    _each_file(obj, files, work)


def _info_table(name: str, info: dict) -> str:
    lines = [f"{name}: lmz format v{info['format_version']}, {info['original_size']} bytes "
             f"in {info['archive_size']}, {len(info['segments'])} segments, "
             f"{info['decode_work']} model steps to decode",
             f"  content sha256 {info['content_sha256']}"]
    if info["model_id"]:
        prefix = " ".join(map(str, info["prefix_tokens"])) or "none"
        revision = f" at {info['model_revision']}" if info.get("model_revision") else ""
        lines.append(f"  model {info['model_id']} ({info['model_source']}{revision}; hidden size "
                     f"{info['hidden_size']}, {info['compute_dtype']}, margin {info['margin']:g}, "
                     f"prefix tokens {prefix})")
        lines.append(f"  weights sha256 {info['weights_sha256']}")
        lines.append(f"  tokenizer sha256 {info['tokenizer_sha256']}")
    lines.append(f"  {'#':>5} {'kind':<9} {'bytes':>8} {'payload':>8} {'tokens':>7} {'vectors':>7} crc32")
    for s in info["segments"]:
        lines.append(f"  {s['index']:>5} {s['kind']:<9} {s['original_length']:>8} {s['payload_length']:>8} "
                     f"{s['token_count']:>7} {s['vector_count']:>7} {s['crc32']}")
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one object per file.")
@click.pass_obj
def info(obj, files, as_json):
    """Describe archives (header and segments) without decoding them."""

    def work(name):
        _stdout()  # click.echo writes nothing, silently, where the shell closed it
        described = lmzip.inspect(_read_input(name))
        if as_json:
            click.echo(json.dumps({"file": name, **described}))
        else:
            click.echo(_info_table(name, described))

    _each_file(obj, files, work)


@main.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True)
@click.option("--chunk-chars", type=click.IntRange(1), default=100, show_default=True,
              help="Cut text files into chunks of this many characters.")
@click.option("--limit", type=click.IntRange(0), default=20, show_default=True,
              help="Benchmark the first N chunks (0: all).")
@click.option("--skip", type=click.IntRange(0), default=0, show_default=True,
              help="Start after the first N chunks (to split a long benchmark across processes).")
@click.option("--model", envvar="LMZIP_MODEL", help="Model: hub ID or local directory [env LMZIP_MODEL].")
@click.option("--tokens", "tokens_per_segment", type=click.IntRange(1), default=None,
              help="Cut each chunk into memory segments of about this many tokens "
              "[default: segments grow within each chunk, as compress does].")
@click.option("--whole", is_flag=True, help="Fit each chunk whole, as one segment (the paper's setting).")
@click.option("--method", "bench_method", type=click.Choice(["memory", "lm"]), default="memory", show_default=True,
              help="memory: the paper's table on chunks; lm: bits per byte of the lm kind on the whole files "
              "(--tokens sets its chunk length, --bytes how much to take).")
@click.option("--bytes", "max_bytes", type=click.IntRange(0), default=0, help="With --method lm: the first N bytes "
              "(0: all).")
@_fit_flags
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write every row and the summary here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), help="Write a PNG plot here (needs matplotlib).")
@click.option("--archive", "archive_out", type=click.Path(dir_okay=False),
              help="Keep the benchmark's archive here (to decode it elsewhere, say on another device).")
@click.pass_obj
def bench(obj, paths, chunk_chars, limit, skip, model, tokens_per_segment, whole, bench_method, max_bytes, json_out,
          plot_out, archive_out, **fit_params):
    """Measure lmzip on text files or CSVs (column 'chunk'): the paper's table, speed, bytes."""
    from lmzip import bench as benchmark

    fit = _fit_config(fit_params)
    result = {}
    for option, path in (("--json", json_out), ("--plot", plot_out), ("--archive", archive_out)):
        _check_output_name(option, path)  # before a run of hours, not after

    def measure():
        with _progress(obj, "bench", "bytes") as bar:
            if bench_method == "lm":
                from lmzip import bench_lm

                result.update(bench_lm.run(_codec(obj), list(paths), model=model, chunk_tokens=tokens_per_segment,
                                           max_bytes=max_bytes or None, progress=bar))
                return
            try:
                result.update(benchmark.run(_codec(obj), list(paths), chunk_chars=chunk_chars,
                                            limit=limit or None, skip=skip, model=model, fit=fit,
                                            tokens_per_segment=tokens_per_segment, whole=whole,
                                            progress=bar))
            except UnicodeDecodeError as e:  # bench.load_chunks reads the files as UTF-8
                raise lmzip.InputError(f"not UTF-8 text: {e}") from None

    def save():
        if json_out:
            with atomic_output(json_out, force=True) as f:
                f.write(json.dumps({k: v for k, v in result.items() if k != "archive"}, indent=2).encode())
        if plot_out:
            benchmark.plot(result, plot_out)
        if archive_out:
            with atomic_output(archive_out, force=True) as f:
                f.write(result["archive"])

    if not _attempt(obj, "bench", measure):
        sys.exit(EXIT_FAILURE)
    if bench_method == "lm":
        from lmzip import bench_lm

        click.echo(bench_lm.format_table(result))
    else:
        click.echo(benchmark.format_table(result))
    if not _attempt(obj, "bench", save):
        sys.exit(EXIT_FAILURE)


def _export_name(name: str) -> str:
    return (name[: -len(SUFFIX)] if name.endswith(SUFFIX) and name != SUFFIX else name) + EXPORT_SUFFIX


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file.")
@click.option("-c", "--stdout", "to_stdout", is_flag=True, help="Write to standard output.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing output files.")
@click.pass_obj
def export(obj, files, output, to_stdout, force):
    """Write the memory vectors of FILE.lmz to FILE.safetensors, to feed to the model.

    One float16 tensor segment.N.vectors (K, H) per memory segment; as metadata,
    each one's prefix token ids, token count and byte span, and the model's id
    and fingerprints. The model regenerates segment N by greedy decoding from the
    prefix tokens' embeddings and the vectors as inputs_embeds (README).
    """
    output, to_stdout = _check_output_args(files, output, to_stdout, one_per_stream=True)

    def work(name):
        stdout = to_stdout or (name == "-" and not output)
        if stdout:
            _refuse_terminal(force)
        blob = _read_input(name)
        target = output or (None if stdout else _export_name(name))
        exported, count = memory_export.safetensors_and_count(blob)
        _write(name, target, stdout, force, lambda f: f.write(exported))
        if obj["verbose"] or not count:
            _say(obj, f"{name}: {count} memory segments -> {target or 'stdout'}"
                      + ("" if count else " (nothing to export: the archive holds no memory segment)"))

    _each_file(obj, files, work)


if __name__ == "__main__":
    main(prog_name="lmzip")
