"""The documentation stays usable: a short README whose set-up block CI runs, links that resolve, a CLI reference
that matches the commands, no number in the README without its command or a link beside it, and no section of a
docs page with numbers but no command (or test, tool or result file) that produced them.

The number check (test_readme_numbers_have_a_command_or_a_link) is a heuristic, kept simple on purpose:

- The README is cut into paragraphs: runs of non-blank lines. Fenced code blocks are skipped; they are commands
  and their inputs, not claims.
- A line makes a claim when it holds a measured-looking number: a number followed by a unit of time (`ms`, `s`,
  `min`), size (`GB`, `MB`, `GiB`, `MiB`, `KiB`), a percentage, a ratio (`2.08×`, `3x`; not an image size such as
  `448x448` or `2×1`), or a decimal fraction such as an accuracy (`0.930`, `0.50`).
- The claim is sourced when its paragraph holds a command in backticks (`halfv-export ...`, `python ...` or
  `bash ...`) or a relative link to a file in this repository. A table row must carry its own command or link: a
  table is one paragraph, and one link under the header would otherwise source every row.

It cannot tell a measured number from a setting (`keep 0.25` counts as a claim); the README writes settings beside
the command that takes them anyway. The negative cases at the bottom show what it catches.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

SETUP = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '
    '".[export,bench,serve,test]" && halfv-export build --backbone qwen2.5-vl --out build/',
    "python -m pytest -q -n 2 --dist loadfile",
]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```")


def markdown_files() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept), so links and numbers in code are not read."""
    out, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
            out.append("")
        else:
            out.append("" if in_code else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, underscores included, spaces
    and hyphens kept), spaces to hyphens: "Time to first token: vision + prefill" -> time-to-first-token-vision--prefill."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if re.match(r"#{1,6} ", line)}


# ------------------------------------------------------------------------------------------------ (1) and (2)

def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/ (limit 300)"


def test_first_bash_block_is_the_two_setup_commands():
    """CI (.ci/run) and new users run exactly these two lines; they must stay byte-identical."""
    found = re.search(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    assert found, "README.md has no ```bash block"
    assert found.group(1).splitlines() == SETUP


# ------------------------------------------------------------------------------------------------ (3)

def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    """Relative links of `path` that name no file, or a #fragment that names no heading of the Markdown file."""
    broken = []
    for target in relative_links(path):
        file, _, fragment = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """Every relative link names a file that exists; a #fragment into a Markdown file names one of its headings."""
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](page.md#a-title) [gone](nowhere.md) [bad anchor](page.md#nope)\n"
                    "```bash\n[in code](ignored.md)\n```\n[web](https://example.com) [here](#a-title)\n")
    assert relative_links(page) == ["page.md#a-title", "nowhere.md", "page.md#nope", "#a-title"]
    assert broken_links(page) == ["nowhere.md (no such file)", "page.md#nope (no heading #nope in page.md)"]
    assert slug("Python API: `halfv_export.load`") == "python-api-halfv_exportload"
    assert slug("Time to first token: vision + prefill (analytic)") == "time-to-first-token-vision--prefill-analytic"


# ------------------------------------------------------------------------------------------------ (4)

def test_cli_reference_is_current():
    """docs/cli.md is what tools/gen_cli_docs.py renders from the Click commands now; if a command's help changed,
    run `python tools/gen_cli_docs.py`."""
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text() == module.render(), \
        "docs/cli.md is out of date: run python tools/gen_cli_docs.py"


# ------------------------------------------------------------------------------------------------ (5)

CLAIM = re.compile(
    r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|min|GB|MB|GiB|MiB|KiB)\b"  # a time or a size
    r"|(?<![\w.])\d[\d,]*(?:\.\d+)?\s?%"                               # a percentage
    r"|(?<![\w.])\d+(?:\.\d+)?\s?[×x](?![\w\d])"                       # a ratio, not 448x448 or 2×1
    r"|(?<![\w.])0\.\d{2,}(?![\d])"                                     # a fraction: accuracy, retention, ...
)
SOURCE = re.compile(r"`(?:halfv-export|python|bash) [^`]+`|\]\((?![a-z][a-z0-9+.-]*:)(?!#)[^)\s]+\)")


def unsourced_claims(text: str) -> list[str]:
    """Lines holding a measured-looking number with no command or relative link in their paragraph (table rows:
    in the row itself). See the module docstring."""
    bad = []
    for paragraph in re.split(r"\n\s*\n", prose(text)):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        sourced = any(SOURCE.search(line) for line in lines if not line.lstrip().startswith("|"))
        for line in lines:
            if not CLAIM.search(line):
                continue
            ok = SOURCE.search(line) if line.lstrip().startswith("|") else sourced
            if not ok:
                bad.append(line.strip())
    return bad


def test_readme_numbers_have_a_command_or_a_link():
    bad = unsourced_claims(README.read_text())
    assert not bad, "README lines with a number but no command or link in their paragraph:\n" + "\n".join(bad)


@pytest.mark.parametrize("text", [
    "The HalfV prefill took 612 ms on the box.",
    "HalfV keeps 0.931 of the answers.",
    "It is 3.5× faster than the unpruned graphs,\nas a second line of the same paragraph says.",
    "Export wrote 5.1 GB of weights.",
    "The selection is 4.7% of the prefill.",
    "| setting | accuracy |\n|---|---|\n| calibrated | 0.925 → 0.465 |\n| other | [0.5](docs/accuracy.md) |",
    "A link elsewhere does not count: [docs](docs/accuracy.md).\n\nThe build took 93 s.",
    "A web link is no source: 0.930 ([paper](https://example.com)).",
])
def test_number_check_flags_a_bare_number(text):
    assert unsourced_claims(text), text


@pytest.mark.parametrize("text", [
    "The HalfV prefill took 612 ms (`halfv-export bench --out bench/`).",
    "HalfV keeps 0.931 of the answers\n([docs/accuracy.md](docs/accuracy.md)).",
    "| setting | accuracy |\n|---|---|\n| calibrated | 0.925 → 0.465 [accuracy](docs/accuracy.md) |",
    "Buckets 448x448 and 336x504, a 2×1 grid, 8 layers: no claim.",
    "```bash\nhalfv-export validate --fail-under accuracy.retention=0.95\n```",
])
def test_number_check_accepts_a_sourced_number(text):
    assert not unsourced_claims(text), text


COMMAND = re.compile(r"halfv-export |python3? |bash |pytest |`(?:tests|tools)/[\w/]+\.py")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every section of a markdown page; headings inside code blocks do not split."""
    found, body, title, in_code = [], [], "(top)", False
    for line in text.splitlines():
        in_code = in_code != bool(FENCE.match(line.strip()))
        if not in_code and re.match(r"#{1,6} ", line):
            found.append((title, "\n".join(body)))
            body, title = [], line
        else:
            body.append(line)
    return found + [(title, "\n".join(body))]


def sections_without_a_source(text: str) -> list[str]:
    """Headings of the sections that hold a measured-looking number (CLAIM) but no command, in prose or in a code
    block, no `tests/...` or `tools/...` file and no relative link: on a docs page the command may sit in the code
    block under the paragraph, so the unit is the section, not the paragraph."""
    return [title for title, body in sections(text)
            if CLAIM.search(prose(body)) and not (COMMAND.search(body) or SOURCE.search(prose(body)))]


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_sections_with_numbers_name_their_source(path):
    bad = sections_without_a_source(path.read_text())
    assert not bad, f"{path.name}: sections with numbers and no command, test, tool or link: {bad}"


def test_section_check_sees_an_unsourced_section():
    page = ("# Page\n\n## Measured\n\nThe prefill took 612 ms.\n\n## Sourced\n\nIt took 5.1 s:\n\n"
            "```bash\nhalfv-export bench --out b/\n```\n")
    assert sections_without_a_source(page) == ["## Measured"]
