"""A griffe extension that lets mkdocstrings render bayesdl's docstrings as they are written.

The docstrings are numpy-style and use a few reStructuredText habits that Markdown does not know.
This extension rewrites the docstring text after griffe has loaded the package (the source files
are not touched):

* Sphinx roles (``:class:`~bayesdl.decisions.Referral```, ``:func:`picp```, ``:meth:`decide```)
  become cross-references, resolved from the object the docstring belongs to. They are *optional*
  references: a link where the target is in the API reference, plain code where it is not (an
  internal module), never a broken link.
* Doctest lines (``>>> ...``) outside an ``Examples`` section become fenced ``pycon`` blocks
  (Markdown would read ``>>>`` as nested quotes), without their ``# doctest:`` flags.
* ``#:`` comments above an assignment (Sphinx's attribute docstrings) become the attribute's
  docstring, where it has none.
* A paragraph of prose after the items of a ``Parameters`` (or ``Attributes``, ...) section is
  given a ``Notes`` header, so that griffe does not read its words as parameter names.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|exc|obj):`([^`]+)`")
_DOCTEST_FLAG = re.compile(r"\s*# doctest:.*$")
_ITEM_SECTIONS = {"Parameters", "Other Parameters", "Attributes", "Returns", "Yields", "Raises"}
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
_ITEM_HEADER = re.compile(r"^\*{0,2}[A-Za-z_][\w.]*(\s*,\s*\*{0,2}[A-Za-z_]\w*)*\s*(:.*)?$")


def _target(obj: griffe.Object, name: str) -> str:
    """The full path of a role's target, resolved from ``obj``'s scope where it can be."""
    name = name.lstrip(".")
    if name.startswith("bayesdl."):
        return name
    first, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(first)
    except (griffe.NameResolutionError, KeyError):  # stays as written (an optional ref)
        return name
    return f"{resolved}.{rest}" if rest else resolved


def _roles(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match) -> str:
        kind, content = match.groups()
        explicit = re.fullmatch(r"(.*?)\s*<(.+)>", content)  # :func:`title <target>`
        if explicit:
            title, name = explicit.groups()
        else:
            name = content
            title = name.lstrip("~.").rsplit(".", 1)[-1] if name.startswith("~") else name
        name = name.lstrip("~")
        if kind in ("func", "meth") and not title.endswith(")"):
            title += "()"
        return (
            f'<autoref identifier="{_target(obj, name)}" optional>'
            f"<code>{title.replace('<', '&lt;')}</code></autoref>"
        )

    return _ROLE.sub(replace, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) and line.strip():
            section = line.strip()
        if line.lstrip().startswith(">>>") and section != "Examples":
            pad = " " * _indent(line)
            out.append(f"{pad}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(_DOCTEST_FLAG.sub("", lines[i]))
                i += 1
            out.append(f"{pad}```")
            continue
        out.append(line)
        i += 1
    return out


def _prose_notes(lines: list[str]) -> list[str]:
    """Give a prose paragraph that follows a numpy item section a ``Notes`` header."""
    out: list[str] = []
    section = ""
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and _UNDERLINE.match(following):
            section = line.strip()
        elif (
            section in _ITEM_SECTIONS
            and line.strip()
            and i > 0
            and not lines[i - 1].strip()
            and not _UNDERLINE.match(line)
            and (
                not _ITEM_HEADER.match(line.strip())
                or (following.strip() and _indent(following) <= _indent(line))
            )
        ):
            pad = " " * _indent(line)
            out += [f"{pad}Notes", f"{pad}-----"]
            section = "Notes"
        out.append(line)
    return out


class SphinxToMarkdown(griffe.Extension):
    """Rewrite reStructuredText habits in docstrings into what mkdocstrings renders."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs) -> None:
        if attr.docstring is not None or not attr.lineno or attr.filepath is None:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except KeyError:
            return
        comment: list[str] = []
        i = attr.lineno - 2  # the line above the assignment, 0-based
        while i >= 0 and lines[i].lstrip().startswith("#:"):
            comment.insert(0, lines[i].lstrip()[2:].strip())
            i -= 1
        if comment:
            attr.docstring = griffe.Docstring(
                "\n".join(comment), lineno=i + 2, endlineno=attr.lineno - 1, parent=attr
            )

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                lines = obj.docstring.value.split("\n")
                text = "\n".join(_prose_notes(_doctests(lines)))
                obj.docstring.value = _roles(obj, text)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
