"""The `lmforge` command: optimize, run, inspect, bench, eval, export.

Each command lives in its own module under `lmforge/cli/commands/`; this one holds the group, its `--debug`
flag, and `main`, which turns errors into one line. Errors the user can fix print one line on stderr and exit
1 (2 for bad flags); `--debug` adds the traceback. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import click

from lmforge.cli.commands.bench import bench
from lmforge.cli.commands.evaluate import evaluate
from lmforge.cli.commands.export import export
from lmforge.cli.commands.inspect import inspect
from lmforge.cli.commands.optimize import optimize
from lmforge.cli.commands.run import run
from lmforge.errors import LmforgeError
from lmforge.runtime.launch import rank_error, rank_prefix


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks, and verify the graph after every pass.")
@click.version_option(package_name="lmforge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """lmforge: optimize Hugging Face language models and run them fast.

    \b
    Examples:
      lmforge optimize                          # the embedded demo model -> ./lmforge-demo
      lmforge run lmforge-demo --prompt "The for statement"
      lmforge optimize ./my-hf-model -o out --dtype bfloat16
      lmforge inspect out --json
      lmforge bench out --batch 4
      lmforge optimize -o demo-int4 --quant int4 && lmforge eval demo-int4
      lmforge export out --format hf -o out-hf    # for transformers, vLLM, SGLang
    """
    ctx.ensure_object(dict)["debug"] = debug


for command in (optimize, run, inspect, bench, evaluate, export):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run `lmforge ARGV` (default: this process's arguments) and return its exit code. The command line
    travels in `ctx.obj["argv"]`, for `run`, `bench` and `eval` to hand to the ranks they start."""
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    if not debug:  # deprecation notices from torch and transformers internals are not the user's business
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cli.main(args=argv, prog_name="lmforge", standalone_mode=False, obj={"argv": args})
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        if not rank_prefix():
            click.echo("interrupted", err=True)
        return 130
    except click.exceptions.ClickException as e:  # bad flags and arguments
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except LmforgeError as e:
        if debug:
            traceback.print_exc()
        _report(f"error: {e}")
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        detail = str(e).splitlines()[0] if str(e) else ""
        _report(f"internal error: {type(e).__name__}: {detail} (run with --debug for the traceback)")
        return 2
    return 0


def _report(line: str) -> None:
    """Print an error line, unless another rank of this job prints it (see `runtime/launch.py`)."""
    text = rank_error(line)
    if text is not None:
        click.echo(text, err=True)


if __name__ == "__main__":
    sys.exit(main())
