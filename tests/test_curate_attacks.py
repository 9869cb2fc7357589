"""Attacks on `lm data run` (issue 20): inputs that block or never end, crafted ids, a run that
fails or crashes over a good output, a bucket swap cut short, byte order marks, deep nesting.

Every expectation is what this file wrote (file names, ids, outcomes), never a count taken from
the code under test. Run with `-s` to see how many hostile inputs each test accounted for.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys

import ml_collections
import pytest

from lm import storage
from lm.curate import output, pipeline, sources
from lm.curate.cli import main, run_curation
from lm.curate.config import default_config
from lm.curate.output import read_documents, read_manifest
from lm.curate.synthetic import prose
from lm.errors import DataError
from tests.test_curate_hostile import _outcomes

ARGS = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]


def _prose(seed: int) -> str:
    return prose(random.Random(seed), 300)


def _config(kind: str, path: str, include: str = ""):
    c = default_config()
    c.source.update(type=kind, path=path, kind="prose")
    if include:
        c.source.include = include
    c.output.num_shards = 2
    c.decontam.enabled = False
    return c


def _accounted(name: str, expected: dict, got: dict) -> None:
    """Asserts every written case went where expected, then prints the tally."""
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for doc_id, outcome in expected.items():
        assert got[doc_id][0] == outcome, (doc_id, got[doc_id])
    print(f"\nhostile inputs accounted ({name}): {len(expected)}/{len(expected)}")


class _Alarm:
    """Fails the test (instead of hanging it) if the block takes longer than `seconds`."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def _ring(self, *_):
        raise TimeoutError(f"blocked for more than {self.seconds}s")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._ring)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


# --- 1. FIFOs, sockets and devices are never opened -------------------------------------------


def _special_files(root, device: bool = True) -> dict[str, str]:
    """A FIFO, a symlink to /dev/zero (a read never ends) and, where the path is short enough,
    a Unix socket, under `root`; returns name -> expected reject reason."""
    made = {"pipe": "not_regular_file:fifo"}
    os.mkfifo(os.path.join(root, "pipe"))
    if device and os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", os.path.join(root, "zero"))
        made["zero"] = "not_regular_file:char_device"
    path = os.path.join(root, "sock")
    if len(path) < 100:  # AF_UNIX paths are limited to 108 bytes
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        made["sock"] = "not_regular_file:socket"
    return made


def _cap() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def test_fifo_socket_and_device_inputs_are_counted_rejects_not_a_hang(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "good.txt").write_text(_prose(1))
    specials = _special_files(str(corpus))
    for name in list(specials):  # the same files under the names the include glob wants
        os.rename(corpus / name, corpus / f"{name}.txt")
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "lm.curate.cli", "run", "--pipeline=stdlib", f"--output={out}",
        "--config.source.type=dir", f"--config.source.path={corpus}",
        "--config.decontam.enabled=False", "--runner=DirectRunner",
    ]  # fmt: skip
    try:  # capped at 6 GiB of address space: a reader of /dev/zero fails instead of the machine
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, preexec_fn=_cap)
    except subprocess.TimeoutExpired:
        pytest.fail("lm data run hung on a FIFO / device input")
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = {"dir/good.txt": "kept"}
    expected |= {f"dir/{name}.txt": f"decode/{why}" for name, why in specials.items()}
    _accounted("fifo, socket, device", expected, _outcomes(str(out)))


def test_readers_refuse_a_fifo_without_opening_it(tmp_path):
    """Each container reader, and the open itself (a file swapped for a FIFO after the type
    check), refuses a FIFO at once. (No /dev/zero here: a reader that opened it would fill this
    process's memory; the test above has it, in a capped child process.)"""
    specials = _special_files(str(tmp_path), device=False)
    src = default_config().source.to_dict()
    with _Alarm(20):
        for kind in ("jsonl", "parquet", "warc", "dir"):
            for name, why in specials.items():
                docs = list(sources.read_input((str(tmp_path / name), name), dict(src, type=kind)))
                assert [d["reject"] for d in docs] == [("decode", why)], (kind, name, docs)
        with pytest.raises(Exception, match="not_regular_file:fifo"):
            sources._open(str(tmp_path / "pipe"))


def test_config_files_that_are_fifos_are_one_line_errors(tmp_path, capsys):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "good.txt").write_text(_prose(2))
    os.mkfifo(tmp_path / "words")
    for flag in ("--config.blocklist.file", "--config.decontam.eval_sets"):
        with _Alarm(60):
            rc = main(["run", "--pipeline=stdlib", f"--output={tmp_path / 'out'}",
                       "--config.source.type=dir", f"--config.source.path={corpus}",
                       f"{flag}={tmp_path / 'words'}", "--runner=DirectRunner"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and "not a regular file" in err and "Traceback" not in err, err


# --- 3, 5, 6. Crafted ids and file names, byte order marks, deep nesting ----------------------


def test_crafted_ids_boms_and_deep_nesting(tmp_path):
    """A record whose id imitates another input's record (`b.jsonl:1` inside `a.jsonl`, next to
    a file named `a.jsonl:b.jsonl`), ids that differ only in an escape, a file name that spells
    another's escaped bytes, lines starting with a BOM, and a line of 100,000 `[`."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    expected: dict[str, str] = {}

    def jsonl(name: str | bytes, lines: list[bytes], outcomes: dict[str, str]) -> None:
        path = os.path.join(os.fsencode(corpus), os.fsencode(name))
        with open(path, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        expected.update(outcomes)

    def rec(doc_id, seed: int) -> bytes:
        obj = {"text": _prose(seed)} | ({"id": doc_id} if doc_id is not None else {})
        return json.dumps(obj).encode()

    bom = b"\xef\xbb\xbf"
    jsonl("a.jsonl", [rec("b.jsonl:1", 1), rec("b.jsonl%3A1", 2), rec(None, 3)], {
        "jsonl/a.jsonl:b.jsonl%3A1": "kept",
        "jsonl/a.jsonl:b.jsonl%253A1": "kept",
        "jsonl/a.jsonl:000000002": "kept",
    })  # fmt: skip
    jsonl("a.jsonl:b.jsonl", [rec("1", 4)], {"jsonl/a.jsonl:b.jsonl:1": "kept"})
    jsonl("b.jsonl", [bom + rec("first", 5), rec(None, 6), bom + rec(None, 7)], {
        "jsonl/b.jsonl:first": "kept",
        "jsonl/b.jsonl:000000001": "kept",
        "jsonl/b.jsonl:000000002": "kept",
    })  # fmt: skip
    deep = b"[" * 100_000
    jsonl("deep.jsonl", [deep, rec("ok", 8)], {
        "jsonl/deep.jsonl:000000000": "decode/invalid_record",
        "jsonl/deep.jsonl:ok": "kept",
    })  # fmt: skip
    # A name that is not UTF-8 (written as `\xff` in ids) and one literally spelled `\xff`.
    jsonl(b"n\xff.jsonl", [rec("1", 9)], {"jsonl/n\\xff.jsonl:1": "kept"})
    jsonl("n\\xff.jsonl", [rec("1", 10)], {"jsonl/n\\\\xff.jsonl:1": "kept"})

    out = str(tmp_path / "out")
    report = run_curation(_config("jsonl", str(corpus)), out, ARGS, name="crafted")
    assert report["reconciled"]
    got = _outcomes(out)
    _accounted("crafted ids, BOMs, deep nesting", expected, got)
    assert got["jsonl/deep.jsonl:000000000"][1]["detail"] == "JSON nested deeper than 64 levels"
    for doc_id in ("jsonl/b.jsonl:first", "jsonl/b.jsonl:000000002"):
        assert not got[doc_id][1]["text"].startswith("\ufeff")


# --- 2, 4. A failed or crashed run leaves the previous output as it was -----------------------


def _corpus(root, seeds) -> set[str]:
    os.makedirs(root)
    for s in seeds:
        with open(os.path.join(root, f"doc_{s}.txt"), "w") as f:
            f.write(_prose(s))
    return {f"dir/doc_{s}.txt" for s in seeds}


def _snapshot(root) -> dict[str, bytes]:
    """Every file under `root` (local or gs://) with its bytes."""
    files = storage.relative_files(root)
    return {rel: storage.read_bytes(storage.join(root, rel)) for rel in files}


def test_a_failed_or_crashed_run_leaves_the_previous_output(tmp_path, monkeypatch):
    first = _corpus(tmp_path / "first", range(3))
    second = _corpus(tmp_path / "second", range(10, 14))
    out = tmp_path / "out"
    run_curation(_config("dir", str(tmp_path / "first")), str(out), ARGS, name="first")
    (out / "notes.md").write_text("the user's own file")
    before = _snapshot(out)
    assert set(_outcomes(str(out))) == first

    # A run that does not reconcile (a document lost after the read).
    chain = pipeline.ChainFn.process
    monkeypatch.setattr(
        pipeline.ChainFn,
        "process",
        lambda self, d: [] if d["id"] == "dir/doc_11.txt" else chain(self, d),
    )
    with pytest.raises(DataError) as err:
        run_curation(_config("dir", str(tmp_path / "second")), str(out), ARGS, name="bad")
    monkeypatch.undo()
    assert _snapshot(out) == before
    failed = tmp_path / "out.failed"
    assert f"{failed}/data_report.md" in str(err.value) and "\n" not in str(err.value)
    assert not json.loads((failed / "data_report.json").read_text())["reconciled"]
    assert sorted(os.listdir(failed)) == ["data_report.json", "data_report.md", "plots"]
    with pytest.raises(DataError, match="has no manifest.json"):
        read_manifest(str(failed))

    # A run that dies half way, after its workers wrote some shards.
    def crash(cfg, inputs, output_dir, args):
        storage.write_text(output.shard_path(output_dir, "rejects", 0, 2), "{}\n")
        raise RuntimeError("worker lost")

    monkeypatch.setattr(pipeline, "run", crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_curation(_config("dir", str(tmp_path / "second")), str(out), ARGS, name="crash")
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["first", "out", "out.failed", "second"]

    # A good run replaces it whole; the user's file stays, the failed report goes.
    run_curation(_config("dir", str(tmp_path / "second")), str(out), ARGS, name="second")
    assert set(_outcomes(str(out))) == second
    assert (out / "notes.md").read_text() == "the user's own file"
    assert sorted(os.listdir(tmp_path)) == ["first", "out", "second"]


def _fake_output(root: str, ids: list[str], reconciled=True) -> None:
    """A minimal output written by hand: one documents shard and its manifest."""
    shard = output.shard_path(root, "documents", 0, 1)
    output.write_documents(shard, [{"id": i, "text": f"the text of {i}"} for i in ids])
    shards = {"documents": [shard[len(root) + 1 :]], "rejects": []}
    storage.write_text(f"{root}/manifest.json",
                       json.dumps({"reconciled": reconciled, "shards": shards}))  # fmt: skip


def test_readers_refuse_an_unreconciled_or_crafted_manifest(tmp_path):
    from lm.data.sources import split_refs

    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    _fake_output(good, ["a", "b"])
    _fake_output(bad, ["a", "b"], reconciled=False)
    assert [d["id"] for d in read_documents(good)] == ["a", "b"]
    with pytest.raises(DataError, match="did not reconcile") as err:
        list(read_documents(bad))
    assert "\n" not in str(err.value)
    data = ml_collections.ConfigDict(
        dict(source="curated", path=bad, max_documents=0, validation_fraction=0.0)
    )
    with pytest.raises(DataError, match="did not reconcile"):  # what `lm data pack` reads
        split_refs(data, "train")
    manifest = json.loads(storage.read_text(f"{good}/manifest.json"))
    manifest["shards"]["documents"] = ["../bad/" + manifest["shards"]["documents"][0]]
    storage.write_text(f"{good}/manifest.json", json.dumps(manifest))
    with pytest.raises(DataError, match="bad or missing shard list"):
        read_manifest(good)


# --- 4 on a bucket: the manifest is the commit point -----------------------------------------


def _bucket_run(src: str, out: str) -> int:
    return main(["run", "--pipeline=web", f"--output={out}", "--config.source.type=jsonl",
                 f"--config.source.path={src}", "--config.output.num_shards=2",
                 "--config.decontam.enabled=False", "--runner=DirectRunner"])  # fmt: skip


def test_a_failed_run_leaves_the_bucket_output(gcs, monkeypatch, capsys):
    src, out = gcs.fresh("attack-in"), gcs.fresh("attack-out")
    lines = [json.dumps({"id": f"r{i}", "text": _prose(30 + i)}) for i in range(3)]
    storage.write_text(f"{src}/part.jsonl", "\n".join(lines) + "\n")
    assert _bucket_run(src, out) == 0, capsys.readouterr().err[-2000:]
    before = _snapshot(out)
    assert {d["id"] for d in read_documents(out)} == {f"jsonl/part.jsonl:r{i}" for i in range(3)}

    storage.write_text(f"{src}/more.jsonl", json.dumps({"id": "m", "text": _prose(40)}) + "\n")
    chain = pipeline.ChainFn.process
    monkeypatch.setattr(
        pipeline.ChainFn,
        "process",
        lambda self, d: [] if d["id"].endswith(":m") else chain(self, d),
    )
    assert _bucket_run(src, out) == 2
    err = capsys.readouterr().err
    assert f"{out}.failed/data_report.md" in err and "Traceback" not in err, err[-2000:]
    assert _snapshot(out) == before
    bucket = out.removeprefix("gs://").split("/")[0]
    left = [f for f in gcs.fs().find(bucket) if ".staging-" in f]
    assert not left, left
    assert storage.exists(f"{out}.failed/data_report.md")
    assert not storage.exists(f"{out}.failed/manifest.json")


def test_an_interrupted_bucket_swap_is_never_read_as_a_mix(gcs, monkeypatch):
    from lm.curate import publish

    out = gcs.fresh("swap")
    _fake_output(out, ["old0", "old1"])
    staging = publish.staging_dir(out)
    _fake_output(staging, ["new0", "new1", "new2"])
    copied: list[str] = []
    real_copy = publish._copy_object

    def fail_after_first(src, dst):
        if copied:
            raise OSError("connection reset")
        copied.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(publish, "_copy_object", fail_after_first)
    with pytest.raises(OSError):
        publish.publish(staging, out)
    with pytest.raises(DataError, match="has no manifest.json"):
        read_manifest(out)  # neither the old output nor a mix of old and new
    assert [d["id"] for d in read_documents(staging)] == ["new0", "new1", "new2"]

    monkeypatch.setattr(publish, "_copy_object", lambda s, d: (copied.append(d), real_copy(s, d)))
    copied.clear()
    publish.publish(staging, out)
    assert copied[-1] == f"{out}/manifest.json"  # the commit point, written last
    assert [d["id"] for d in read_documents(out)] == ["new0", "new1", "new2"]
    assert not storage.exists(staging)


def test_an_output_that_is_a_mount_point_is_published_entry_by_entry(tmp_path, monkeypatch):
    """A mount point cannot be renamed: the run stages inside it and swaps entries, manifest
    last (simulated: os.path.ismount says yes for the output)."""
    from lm.curate import publish

    out = str(tmp_path / "out")
    _fake_output(out, ["old0"])
    (tmp_path / "out" / "notes.md").write_text("mine")
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == out)
    staging = publish.staging_dir(out)
    assert os.path.dirname(staging) == out
    _fake_output(staging, ["new0", "new1"])
    assert [d["id"] for d in read_documents(out)] == ["old0"]  # untouched until published
    publish.publish(staging, out)
    assert [d["id"] for d in read_documents(out)] == ["new0", "new1"]
    assert sorted(os.listdir(out)) == [
        "documents-00000-of-00001.array_record", "manifest.json", "notes.md",
    ]  # fmt: skip
