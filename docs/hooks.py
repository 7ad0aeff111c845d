"""MkDocs hook: the config reference page, generated from the schema on every build (never written to docs/)."""
from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from robustcl.docs_reference import REFERENCE_PAGE, render


def on_files(files: Files, config: Any) -> Files:
    """Add reference/config.md, rendered from robustcl.config's dataclasses and each method's config."""
    files.append(File.generated(config, REFERENCE_PAGE, content=render()))
    return files

