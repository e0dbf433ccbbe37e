"""Never delete what zppo_fast did not create: a marker file in every folder it makes.

Every folder zppo_fast creates to write into -- a run folder (`run.out_dir`), each checkpoint
(RUN_DIR/checkpoints/step_N), an exported model (`zppo_fast.export ... OUT`), each warm-up in the
SFT cache, each evaluation output folder -- holds a file named `.zppo_fast` that says which kind
of folder it is. zppo_fast replaces or deletes a folder only when that file is there; a folder
without it is the user's (or another program's), and is refused with an error that names it and
shows what it holds. An empty folder holds nothing to lose, so it may be used (and is marked).

    claim(path, "run")          # a fresh folder to write into: absent, empty or marked; refuses anything else
    remove(path)                # delete a marked folder (absent: nothing to do); refuses anything else
    replace(tmp, final)         # move a finished, marked folder into place over a marked one
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from zppo_fast.config import ConfigError

MARKER = ".zppo_fast"
KINDS = ("run", "checkpoint", "export", "sft_cache", "eval", "study")


class NotOursError(ConfigError):
    """A folder zppo_fast was asked to replace or delete but did not create; the message names it.
    A ConfigError: it is the chosen path (`run.out_dir`, OUT, `--out`) that cannot be used."""


def mark(folder: str | Path, kind: str) -> Path:
    """Create `folder` (and parents) if needed and write its marker; returns the folder."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; one of {', '.join(KINDS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"created_by": "zppo_fast", "kind": kind}) + "\n"
                                 "# zppo_fast may replace or delete the folder holding this file.\n")
    return folder


def kind_of(folder: str | Path) -> str | None:
    """The kind the marker of `folder` names, or None when it has no (readable) marker."""
    try:
        first = (Path(folder) / MARKER).read_text().splitlines()[0]
        kind = json.loads(first).get("kind")
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and next(folder.iterdir(), None) is None


def contents(folder: Path, shown: int = 5) -> str:
    """'a.txt, notes/, ... (12 entries)': what the user would lose, for error messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError as e:
        return f"unreadable: {e.strerror}"
    more = f", ... ({len(names)} entries)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def refusal(folder: Path, why: str) -> NotOursError:
    what = ("a link" if folder.is_symlink() else f"a folder holding {contents(folder)}" if folder.is_dir()
            else "a file")
    return NotOursError(f"{folder} {why}: it is {what}, and has no {MARKER} marker, so zppo_fast did not create it "
                        "and will not replace or delete it; choose another path, or empty or remove it yourself")


def check_claim(path: str | Path, kind: str, overwrite: bool = False) -> None:
    """Raise unless `claim(path, kind, overwrite)` may go ahead; changes nothing."""
    path = Path(path)
    if not os.path.lexists(path) or is_empty_dir(path):
        return
    found = None if path.is_symlink() or not path.is_dir() else kind_of(path)
    if found is None:
        raise refusal(path, "already exists")
    if found != kind and not overwrite:
        raise NotOursError(f"{path} is a zppo_fast {found} folder ({contents(path)}), not {kind} output; "
                           "it is replaced only when asked to (overwrite)")


def claim(path: str | Path, kind: str, overwrite: bool = False) -> Path:
    """A fresh folder at `path` to write into, marked: made when absent; an empty folder or a
    marked one of the same `kind` (of any kind with `overwrite`) is emptied first; any other path
    is refused, untouched."""
    path = Path(path)
    check_claim(path, kind, overwrite)
    if not is_empty_dir(path):
        remove(path)
    return mark(path, kind)


def remove(path: str | Path) -> None:
    """Delete the marked folder `path` with everything in it; nothing when it does not exist."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir() or kind_of(path) is None:
        raise refusal(path, "was to be deleted")
    shutil.rmtree(path)


def replace(tmp: str | Path, final: str | Path) -> Path:
    """Move the finished, marked folder `tmp` to `final` (same file system): a marked folder or an
    empty one at `final` is replaced, anything else refused. The old folder is first renamed aside,
    so `final` is at every moment either the old folder or the new one."""
    tmp, final = Path(tmp), Path(final)
    if kind_of(tmp) is None:
        raise ValueError(f"{tmp} has no {MARKER} marker: only finished zppo_fast folders are moved into place")
    if not os.path.lexists(final):
        tmp.rename(final)
        return final
    if is_empty_dir(final):
        final.rmdir()
        tmp.rename(final)
        return final
    if final.is_symlink() or not final.is_dir() or kind_of(final) is None:
        raise refusal(final, "was to be replaced")
    aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    final.rename(aside)
    tmp.rename(final)
    remove(aside)
    return final
