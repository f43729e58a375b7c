"""Write docs/cli.md: the --help text of `halfv-export` and of every command, rendered from the Click commands
themselves (halfv_export.cli.main:cli), so the reference cannot drift from the code.

    python tools/gen_cli_docs.py            # rewrite docs/cli.md
    python tools/gen_cli_docs.py --check    # exit 1 if docs/cli.md is not what the commands say now

The width is fixed (WIDTH columns), so the text does not depend on the terminal that runs this.
tests/test_docs.py compares docs/cli.md with render().
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
WIDTH = 110  # the group's own max_content_width

HEADER = """# CLI reference

Generated from the Click commands in `halfv_export/cli/main.py` by `python tools/gen_cli_docs.py`; do not edit
by hand (`tests/test_docs.py` fails when this page and the commands disagree: run the script again). The same text
is what `halfv-export COMMAND --help` prints.

Back to the [README](../README.md). Exit codes and the one-line error messages: [errors.md](errors.md).
"""


def _help(command: click.Command, name: str, parent: click.Context | None) -> tuple[str, click.Context]:
    settings = {"max_content_width": WIDTH, **command.context_settings, "terminal_width": WIDTH}
    ctx = click.Context(command, info_name=name, parent=parent, **settings)
    return command.get_help(ctx), ctx


def render() -> str:
    """docs/cli.md as the commands describe themselves now."""
    sys.path.insert(0, str(ROOT))
    from halfv_export.cli.main import cli

    top, ctx = _help(cli, "halfv-export", None)
    names = sorted(cli.list_commands(ctx))
    parts = [HEADER, "Commands: " + ", ".join(f"[`{n}`](#halfv-export-{n})" for n in names) + ".", "",
             "## halfv-export", "", "```text", top.rstrip(), "```", ""]
    for name in names:
        text, _ = _help(cli.get_command(ctx, name), name, ctx)
        parts += [f"## halfv-export {name}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(line.rstrip() for line in "\n".join(parts).splitlines()) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
