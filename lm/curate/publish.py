"""Replacing a curated output only by a complete new one, locally and on a bucket.

A run never writes into `<output>` while it works. Its workers write shards, rejects, report and
(last, only when the run reconciled) `manifest.json` into a staging directory beside the output,
`<parent>/.<name>.staging-<token>`; `publish` then swaps it in:

- Local: the previous output is renamed aside, the staging directory renamed to `<output>`
  (two renames on one file system: readers see the old complete output, briefly nothing, then
  the new complete output, never a mix), files the previous output held that a run does not
  write (`is_ours`) are moved over, and the old directory is deleted. An output that is a mount
  point cannot be renamed: its staging directory is `<output>/.staging-<token>` (the same disk)
  and it is published entry by entry, manifest last, as on a bucket.
- On a bucket there is no rename and no atomic swap of many objects, so the manifest is the
  commit point: readers read only through `manifest.json` (output.read_manifest) and only the
  shards it lists. `publish` deletes the old manifest first (from then on readers refuse the
  output instead of reading a mix), deletes the old run's files, copies the new ones, and
  writes the new manifest last (one object, visible only once complete). If publishing dies
  half way, `<output>` has no manifest, so nothing consumes it, and the complete new output is
  still in the staging directory, which the error names. A reader that read the old manifest
  before the swap began may see its shards vanish (an error), so a bucket output should not be
  re-curated while a job reads it.

A run that fails leaves `<output>` untouched: its staging directory is deleted, except that a
run which finished but did not reconcile keeps its report (data_report.md/.json, plots/) in
`<output>.failed/`, with no manifest, so it can be read and nothing consumes it. The next
successful run removes `<output>.failed/`. A staging directory left by a killed run holds no
manifest unless it finished; it is hidden and never read.
"""

from __future__ import annotations

import os
import shutil
import uuid

from lm import storage
from lm.curate.output import DOCS_PREFIX, MANIFEST, REJECTS_DIR
from lm.errors import ConfigError

REPORT_NAMES = ("data_report.md", "data_report.json", "plots")


def is_ours(name: str) -> bool:
    """True for a top-level entry a curation run writes (and a new run replaces)."""
    return name.startswith((DOCS_PREFIX + "-", "data_report.")) or name in (
        MANIFEST, "_stats.json", REJECTS_DIR, "plots",
    )  # fmt: skip


def resolve(output_dir: str) -> str:
    """The output directory a run replaces: a local path made absolute with symlinks resolved
    (a link to a big disk stays a link, and staging lands on the same disk), a bucket path
    without its trailing slash. ConfigError for an output with no parent to stage beside."""
    if storage.is_remote(output_dir):
        out = output_dir.rstrip("/")
        if "/" not in out.split("://", 1)[1]:
            raise ConfigError(f"--output={output_dir}: name a directory inside the bucket")
        return out
    out = os.path.realpath(output_dir)
    if os.path.dirname(out) == out:
        raise ConfigError(f"--output={output_dir}: name a directory, not the file system root")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--output={output_dir} exists and is not a directory")
    return out


def _sibling(output_dir: str, name: str) -> str:
    if storage.is_remote(output_dir):
        parent, base = output_dir.rsplit("/", 1)
        return f"{parent}/{name.format(base=base)}"
    parent, base = os.path.split(output_dir)
    return os.path.join(parent, name.format(base=base))


def _by_entries(output_dir: str) -> bool:
    """True where the output cannot be swapped by renaming it: a bucket, a mount point."""
    return storage.is_remote(output_dir) or os.path.ismount(output_dir)


def staging_dir(output_dir: str) -> str:
    """A new, empty staging directory beside `output_dir` (inside it for a mount point; created
    locally, ConfigError with the reason when that is not writable)."""
    token = uuid.uuid4().hex[:12]
    if not storage.is_remote(output_dir) and os.path.ismount(output_dir):
        path = os.path.join(output_dir, f".staging-{token}")
    else:
        path = _sibling(output_dir, ".{base}.staging-" + token)
    if not storage.is_remote(path):
        try:
            os.makedirs(path)
        except OSError as e:
            raise ConfigError(f"cannot create {path} beside --output: {e.strerror}") from None
    return path


def failed_dir(output_dir: str) -> str:
    """Where the report of a run that did not reconcile is kept."""
    return _sibling(output_dir, "{base}.failed")


def publish(staging: str, output_dir: str) -> None:
    """Replaces `output_dir` by the finished `staging` (see the module docstring); removes the
    report of an earlier failed run."""
    if _by_entries(output_dir):
        _publish_by_entries(staging, output_dir)
    else:
        _publish_local(staging, output_dir)
    storage.remove(failed_dir(output_dir))


def _publish_local(staging: str, output_dir: str) -> None:
    if not os.path.lexists(output_dir):
        os.rename(staging, output_dir)
        return
    old = _sibling(output_dir, ".{base}.replaced-" + uuid.uuid4().hex[:12])
    os.rename(output_dir, old)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    for name in os.listdir(old):  # a user's own files in the output directory stay there
        if not is_ours(name):
            os.rename(os.path.join(old, name), os.path.join(output_dir, name))
    shutil.rmtree(old, ignore_errors=True)


def _publish_by_entries(staging: str, output_dir: str) -> None:
    """The manifest is the commit point: removed first, written last (see the module docstring).
    Local entries are renamed (one disk), a bucket's objects copied server side."""
    storage.remove(f"{output_dir}/{MANIFEST}")  # first: from here on nothing consumes it
    for name in storage.listdir(output_dir):
        if is_ours(name):
            storage.remove(f"{output_dir}/{name}")
    if storage.is_remote(output_dir):
        files = storage.relative_files(staging)
        for rel in sorted(files, key=lambda r: r == MANIFEST):  # the manifest last
            _copy_object(f"{staging}/{rel}", f"{output_dir}/{rel}")
    else:
        for name in sorted(os.listdir(staging), key=lambda n: n == MANIFEST):
            os.rename(os.path.join(staging, name), os.path.join(output_dir, name))
    storage.remove(staging)


def _copy_object(src: str, dst: str) -> None:
    """One object copied inside the bucket (server side: nothing passes through this machine)."""
    storage.path(src).copy(storage.path(dst), overwrite=True)


def keep_failed_report(staging: str, output_dir: str) -> str:
    """Moves the report of a run that did not reconcile to `failed_dir` (replacing an earlier
    one), deletes the rest of `staging`, and returns the failed directory."""
    failed = failed_dir(output_dir)
    storage.remove(failed)
    remote = storage.is_remote(failed)
    if not remote:
        os.makedirs(failed)
    for name in REPORT_NAMES:
        src = storage.join(staging, name)
        if not storage.exists(src):
            continue
        if not remote:
            os.rename(src, os.path.join(failed, name))
        elif storage.isdir(src):
            storage.copy_tree(src, f"{failed}/{name}")
        else:
            _copy_object(src, f"{failed}/{name}")
    storage.remove(staging)
    return failed


def discard(staging: str) -> None:
    """Deletes the staging directory of a run that failed before it finished."""
    try:
        storage.remove(staging)
    except OSError:
        pass  # best effort: it is hidden and holds no manifest
