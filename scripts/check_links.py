"""Check the links of every Markdown file in the repository, offline.

Usage: ``python scripts/check_links.py [ROOT]`` (ROOT defaults to the repository root).

- Relative links and images must point to a file or folder that exists inside ROOT.
- ``#anchors`` into Markdown files (or within the same file) must match a heading, using
  GitHub's slug rules: lowercase, punctuation dropped except hyphens and underscores, spaces
  become hyphens, repeated headings get ``-1``, ``-2``... HTML ``id``/``name`` anchors count too.
- ``http(s)`` links are not fetched (no network); they must be well-formed URLs.

Links inside fenced code blocks and inline code are ignored. Prints ``file:line: message`` for
each broken link and a one-line summary; exits 1 when any link is broken.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

EXCLUDED_DIRS = frozenset(
    {
        ".git",
        "node_modules",
        ".pytest_cache",
        ".ruff_cache",
        ".mypy_cache",
        ".benchmarks",
        "htmlcov",
        "__pycache__",
        "build",
        "dist",
    }
)
"""Folders never searched (besides every ``.venv*``): VCS data, dependencies and caches."""

MARKDOWN_SUFFIXES = (".md", ".markdown")
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$")
_SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[([^\]^][^\]]*)\]:\s*(<[^>]*>|\S+)")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]*)>", re.IGNORECASE)
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
_HTML_ANCHOR = re.compile(r"<[a-z][^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_INLINE_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_HTML_TAG = re.compile(r"<[^>]+>")
_SLUG_DROP = re.compile(r"[^\w\- ]", re.UNICODE)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_URL_FORBIDDEN = re.compile(r"[\s<>\"{}|\\^`]")
_ALLOWED_SCHEMES = frozenset({"mailto", "tel"})


@dataclass(frozen=True, slots=True)
class Link:
    """One link target found in a Markdown file."""

    line: int
    target: str


@dataclass(frozen=True, slots=True)
class Problem:
    """A broken link, reported as ``file:line: message``."""

    path: Path
    line: int
    message: str

    def render(self, root: Path) -> str:
        """``file:line: message`` with the file relative to ``root`` where possible."""
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.message}"


def markdown_files(root: Path) -> list[Path]:
    """Every Markdown file under ``root``, skipping ``.venv*`` and the excluded folders."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        # Pruned in place, so that os.walk never descends into them (.venv is large).
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".venv")]
        found.extend(
            Path(folder) / name for name in files if Path(name).suffix.lower() in MARKDOWN_SUFFIXES
        )
    return sorted(found)


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """Numbered lines that are not inside a fenced code block (nor its fence lines)."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
            else:
                lines.append((number, line))
        elif match and match.group(1).startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
    return lines


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """Numbered lines outside fenced code blocks, with inline code blanked out."""
    return [
        (number, _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line))
        for number, line in _outside_fences(text)
    ]


def _destination(line: str, start: int) -> str | None:
    """The link destination that begins at ``line[start]`` (just after ``](``)."""
    index = start
    while index < len(line) and line[index] in " \t":
        index += 1
    if index < len(line) and line[index] == "<":
        end = line.find(">", index)
        return None if end < 0 else line[index + 1 : end]
    depth = 0
    begin = index
    while index < len(line):
        char = line[index]
        if char == "\\":
            index += 2
            continue
        if char in " \t":
            break
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        index += 1
    if index >= len(line) and depth:
        return None
    rest = line[index:].lstrip(" \t")
    if rest and rest[0] not in ")\"'(":
        # Not a title after the space: the destination itself holds a space (not a link in
        # CommonMark, so it would render as plain text); report all of it.
        end = line.find(")", index)
        return line[begin:end] if end >= 0 else line[begin:]
    return line[begin:index]


def extract_links(text: str) -> list[Link]:
    """Every link and image target in a Markdown document, with its line number."""
    links: list[Link] = []
    for number, line in _prose_lines(text):
        position = line.find("](")
        while position >= 0:
            target = _destination(line, position + 2)
            if target is not None:
                links.append(Link(number, target))
            position = line.find("](", position + 2)
        definition = _REFERENCE_DEF.match(line)
        if definition:
            links.append(Link(number, definition.group(2).strip("<>")))
        links.extend(Link(number, match.group(1)) for match in _AUTOLINK.finditer(line))
        links.extend(Link(number, match.group(1)) for match in _HTML_LINK.finditer(line))
    return links


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: plain text, lowercase, punctuation dropped."""
    text = _INLINE_LINK.sub(r"\1", heading)
    text = _HTML_TAG.sub("", text)
    text = text.replace("`", "").replace("*", "")
    text = _SLUG_DROP.sub("", text.strip().lower())
    return text.replace(" ", "-")


def heading_texts(text: str) -> list[str]:
    """The text of every ATX and setext heading, in document order."""
    headings: list[str] = []
    previous: str | None = None
    last_number = 0
    for number, line in _outside_fences(text):
        if number != last_number + 1:
            previous = None  # a code block came between
        last_number = number
        atx = _ATX_HEADING.match(line)
        if atx:
            headings.append(atx.group(2) or "")
            previous = None
            continue
        if previous and previous.strip() and _SETEXT_UNDERLINE.match(line):
            headings.append(previous.strip())
            previous = None
            continue
        previous = line
    return headings


@cache
def anchors_of(path: Path) -> frozenset[str]:
    """Every anchor a Markdown file defines: heading slugs (deduplicated) and HTML ids."""
    text = path.read_text(encoding="utf-8", errors="replace")
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for heading in heading_texts(text):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    anchors.update(match.group(1) for match in _HTML_ANCHOR.finditer(text))
    return frozenset(anchors)


def check_url(url: str) -> str | None:
    """Why an http(s) URL is malformed, or None when it is well-formed (it is not fetched)."""
    if _URL_FORBIDDEN.search(url):
        return f"malformed URL (space or forbidden character): {url}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return f"malformed URL (bad port): {url}"
    del port
    host = parts.hostname
    if not parts.netloc or not host:
        return f"malformed URL (no host): {url}"
    if ":" in host:  # an IPv6 literal, bracketed in the URL
        return None
    labels = host.rstrip(".").split(".")
    if not all(_HOST_LABEL.match(label) for label in labels):
        return f"malformed URL (bad host name): {url}"
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _check_scheme(target: str) -> str | None:
    """Why a link with a URL scheme is broken, or None (http(s) is checked, not fetched)."""
    name = target.split(":", 1)[0].lower()
    if name in {"http", "https"}:
        return check_url(target)
    if name in _ALLOWED_SCHEMES:
        return None
    return f"unsupported link scheme '{name}:': {target}"


def _check_anchor(document: Path, anchor: str, target: str) -> str | None:
    """Why ``#anchor`` does not exist in ``document`` (a file or folder), or None."""
    if document.is_dir():
        document = document / "README.md"
        if not document.is_file():
            return None
    if document.suffix.lower() not in MARKDOWN_SUFFIXES:
        return None  # e.g. #L10 line anchors into source files
    anchors = anchors_of(document)
    if anchor in anchors or anchor.lower() in anchors:
        return None
    return f"broken anchor: {target} (no heading '#{anchor}' in {document.name})"


def check_link(source: Path, link: Link, root: Path) -> str | None:
    """Why ``link`` (found in ``source``) is broken, or None when it is fine."""
    target = link.target.strip()
    if not target:
        return "empty link target"
    if _SCHEME.match(target):
        return _check_scheme(target)
    if target.startswith("//"):
        return f"protocol-relative URL (write https://): {target}"
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    resolved = source.resolve()
    if path_part:
        base = root if path_part.startswith("/") else source.parent
        resolved = (base / path_part.lstrip("/")).resolve()
        if not _inside(resolved, root.resolve()):
            return f"link leaves the repository: {target}"
        if not resolved.exists():
            return f"broken link: {target} (no such file)"
    return _check_anchor(resolved, unquote(anchor), target) if anchor else None


def check_file(path: Path, root: Path) -> tuple[int, list[Problem]]:
    """Check one Markdown file; returns how many links it holds and the broken ones."""
    text = path.read_text(encoding="utf-8", errors="replace")
    links = extract_links(text)
    problems = [
        Problem(path, link.line, message)
        for link in links
        if (message := check_link(path, link, root)) is not None
    ]
    return len(links), problems


def main(argv: list[str] | None = None) -> int:
    """Check every Markdown file under ROOT; exit status 1 when a link is broken."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in {"-h", "--help"}):
        sys.stderr.write("usage: check_links.py [ROOT]\n")
        return 2
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    root = root.resolve()
    if not root.is_dir():
        sys.stderr.write(f"check_links: {root} is not a directory\n")
        return 2
    anchors_of.cache_clear()
    files = markdown_files(root)
    total = 0
    problems: list[Problem] = []
    for path in files:
        count, found = check_file(path, root)
        total += count
        problems.extend(found)
    for problem in problems:
        sys.stdout.write(problem.render(root) + "\n")
    verdict = f"{len(problems)} broken" if problems else "all OK"
    sys.stdout.write(
        f"check_links: {len(files)} Markdown files, {total} links checked, {verdict}\n"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
