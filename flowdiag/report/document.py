"""A report as a list of blocks, rendered once to Markdown and once to self-contained HTML.

Both renderings come from the same blocks so they cannot disagree; the HTML embeds every PNG as
base64 so that the file alone can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    """A heading; level 2 for sections."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Code:
    """A block of code (the command that made the report)."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list."""

    items: list[str]


@dataclass(frozen=True)
class Table:
    """A table: a header row and rows of text cells."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    """A figure and its caption."""

    file: str  # a PNG beside the report, by name
    caption: str


@dataclass
class Document:
    """A report: its title and its blocks, in order."""

    title: str
    blocks: list[Heading | Paragraph | Code | Bullets | Table | Image] = field(default_factory=list)

    def add(self, *blocks: Heading | Paragraph | Code | Bullets | Table | Image) -> None:
        self.blocks.extend(blocks)


# --- Markdown -----------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Heading | Paragraph | Code | Bullets | Table | Image) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |"]
        lines.append("|" + "---|" * len(block.header))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    return f"![{block.caption}]({block.file})\n\n*{block.caption}*"


def to_markdown(document: Document) -> str:
    """The document as Markdown; images are linked by file name."""
    return "\n\n".join([f"# {document.title}", *(_md_block(b) for b in document.blocks)]) + "\n"


# --- HTML ---------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-style: italic; color: #555; }
"""


def _html_block(block: Heading | Paragraph | Code | Bullets | Table | Image, image_dir: Path) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Code):
        return f"<pre><code>{e(block.text)}</code></pre>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode((image_dir / block.file).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{e(block.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{e(block.caption)}</figcaption></figure>"
    )


def to_html(document: Document, image_dir: Path) -> str:
    """Self-contained HTML; the PNGs named by Image blocks are read from `image_dir` and embedded."""
    body = "\n".join(_html_block(b, image_dir) for b in document.blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(document.title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{html.escape(document.title)}</h1>\n{body}\n</body></html>\n"
    )
