"""English prose and Python code that ship with every Python: the demo model's text corpus.

- code: the standard library's top-level modules (`Lib/*.py`), read as text (never imported);
- prose: `pydoc_data.topics` (the language reference pages `help()` shows) and the docstrings of
  those modules (read with `ast`, so nothing is executed).

Documents are split into train and held-out by a hash of their name (a tenth held out), so the
split is the same on every machine with the same Python version. The corpus depends on that
version (3.11 for the committed model); the model card says which.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_EVERY = 10  # one document in ten (by name hash) is held out


@dataclass(frozen=True)
class Document:
    name: str
    domain: str   # "code" or "prose"
    text: str


def held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELD_OUT_EVERY == 0


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(tree: ast.Module) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 40:
                out.append(doc)
    return out


def documents(split: str = "train", max_file_bytes: int = 250_000) -> list[Document]:
    """Code and prose documents of `split` ("train" or "held_out"), in a fixed order."""
    from pydoc_data.topics import topics

    want_held = split == "held_out"
    docs = []
    for name in sorted(topics):
        if held_out("topic:" + name) == want_held:
            docs.append(Document("topic:" + name, "prose", topics[name].strip()))
    for path in sorted(stdlib_dir().glob("*.py")):
        if path.stat().st_size > max_file_bytes or held_out("module:" + path.stem) != want_held:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError):
            continue
        docs.append(Document("module:" + path.stem, "code", source))
        prose = "\n\n".join(_docstrings(tree))
        if prose:
            docs.append(Document("doc:" + path.stem, "prose", prose))
    return docs
