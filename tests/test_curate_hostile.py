"""Hostile inputs end to end: every one is kept or a counted reject with its reason, never a crash
or a silent loss. One corpus (built in tmp_path) holds every case; each source type in it is
curated by `run_curation`, and every id written is checked against the ids this file wrote.

Run with `-s` to see the table `input -> where it went`.
"""

import json
import os
import random
import zlib

import pytest

from lm.curate.cli import main, run_curation
from lm.curate.config import default_config
from lm.curate.output import read_documents, read_rejects
from lm.curate.synthetic import prose
from lm.errors import DataError


def _chmod_000_is_readable() -> bool:
    """True where this process reads files whatever their mode (root with CAP_DAC_OVERRIDE)."""
    import tempfile

    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.chmod(path, 0)
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False
    finally:
        os.remove(path)


IS_ROOT = _chmod_000_is_readable()
ROOT_REASON = (
    "running as root: chmod 000 does not stop this process from reading (to include these "
    "cases as root: setpriv --bounding-set=-dac_override,-dac_read_search python -m pytest ...)"
)


def _prose(seed: int) -> str:
    return prose(random.Random(seed), 300)


def _flat(seed: int, n: int) -> bytes:
    """n bytes of prose on one line (safe inside a JSON string)."""
    return _prose(seed).replace("\n", " ").encode()[:n]


def _warc_record(kind: str, rid: str, block: bytes, url: str = "", declared: int = 0) -> bytes:
    head = f"WARC/1.0\r\nWARC-Type: {kind}\r\nWARC-Record-ID: <urn:uuid:{rid}>\r\n"
    if url:
        head += f"WARC-Target-URI: {url}\r\n"
    head += "WARC-Date: 2024-01-01T00:00:00Z\r\n"
    if kind == "response":
        head += "Content-Type: application/http; msgtype=response\r\n"
    head += f"Content-Length: {declared or len(block)}\r\n\r\n"
    return head.encode() + block + (b"" if declared else b"\r\n\r\n")


def _http(content_type: str, body: bytes) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n\r\n".encode() + body


def _page(seed: int) -> bytes:
    body = "".join(f"<p>{p}</p>" for p in _prose(seed).split("\n\n"))
    return f"<html><body><article>{body}</article></body></html>".encode()


def build_corpus(root: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Writes the corpus; returns source type -> id -> (what the input is, expected outcome),
    the outcome `kept` or `step/reason`."""
    expected: dict[str, dict[str, tuple[str, str]]] = {}

    # --- JSONL: one line per case, plus a truncated .gz --------------------------------------
    jdir = os.path.join(root, "jsonl")
    os.makedirs(jdir)
    lines: list[tuple[bytes, str, str, str]] = []  # (line, id, what, outcome)

    def line(obj, doc_id: str, what: str, outcome: str, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        lines.append((data, doc_id, what, outcome))

    n = len
    line({"id": "good1", "text": _prose(1)}, "good1", "valid record", "kept")
    line(
        None,
        f"{1:09d}",
        "invalid UTF-8 bytes in a JSON string",
        "decode/invalid_utf8",
        raw=b'{"id": "u8", "text": "caf\xe9 ' + _flat(2, 200) + b'"}',
    )
    line(
        None,
        "surr",
        'lone surrogate escape "\\ud800" in text',
        "decode/lone_surrogate",
        raw=b'{"id": "surr", "text": "abc \\ud800 def"}',
    )
    line(
        {"id": "nul", "text": "abc \u0000 def " + _prose(3)},
        "nul",
        'NUL escape "\\u0000" in text',
        "decode/binary",
    )
    line(
        None,
        f"{4:09d}",
        "raw control byte 0x01 inside a JSON string",
        "decode/invalid_record",
        raw=b'{"id": "ctl", "text": "abc \x01 def"}',
    )
    ctl = _prose(5).replace(". ", ".\u001b[31m \u0007", 3)
    line({"id": "ansi", "text": ctl}, "ansi", "ANSI escape and BEL in text (escaped)", "kept")
    line(
        {"id": "num", "text": 12345},
        "num",
        "text field is a number",
        "decode/invalid_field_type:text",
    )
    line(
        {"id": ["a"], "text": _prose(6)},
        f"{n(lines):09d}",
        "id field is a list",
        "decode/invalid_field_type:id",
    )
    line(
        {"id": "good1", "text": _prose(7)},
        f"good1#dup{n(lines)}",
        'repeated id "good1" (made unique)',
        "kept",
    )
    line(None, f"{n(lines) + 1:09d}", "not JSON", "decode/invalid_record", raw=b"{not json")
    line([1, 2], f"{n(lines) + 1:09d}", "a JSON array, not an object", "decode/invalid_record")
    line({"body": _prose(8)}, f"{n(lines) + 1:09d}", "no text field", "decode/invalid_record")
    line(
        None,
        f"{n(lines) + 1:09d}",
        "JSON nested 100000 deep",
        "decode/invalid_record",
        raw=b"[" * 100_000 + b"]" * 100_000,
    )
    line(
        None,
        f"{n(lines) + 1:09d}",
        "lone surrogate in the id",
        "decode/lone_surrogate",
        raw=b'{"id": "\\udc80", "text": "' + _flat(9, 300) + b'"}',
    )
    with open(os.path.join(jdir, "a.jsonl"), "wb") as f:
        for i, (data, *_) in enumerate(lines):
            f.write(data + b"\n")
            if i == 8:
                f.write(b"   \n")  # a blank line: counted by the reader, not a document
    exp = expected.setdefault("jsonl", {})
    for _, doc_id, what, outcome in lines:
        exp[f"jsonl/a.jsonl:{doc_id}"] = (f"a.jsonl: {what}", outcome)
    # A gzip file cut short: the records before the cut are kept, the cut is one reject.
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container
    blob = b""
    for i in range(3):
        blob += comp.compress(json.dumps({"id": f"b{i}", "text": _prose(20 + i)}).encode() + b"\n")
        blob += comp.flush(zlib.Z_SYNC_FLUSH)
        if i == 1:
            cut = len(blob) + 40
    blob += comp.flush()
    with open(os.path.join(jdir, "b.jsonl.gz"), "wb") as f:
        f.write(blob[:cut])
    exp["jsonl/b.jsonl.gz:b0"] = ("b.jsonl.gz: record before the cut", "kept")
    exp["jsonl/b.jsonl.gz:b1"] = ("b.jsonl.gz: record before the cut", "kept")
    exp["jsonl/b.jsonl.gz:unreadable"] = (
        "b.jsonl.gz: gzip truncated in record b2",
        "decode/truncated",
    )
    with open(os.path.join(jdir, "c.jsonl.gz"), "wb") as f:
        f.write(b"not gzip at all\n")
    exp["jsonl/c.jsonl.gz:unreadable"] = ("c.jsonl.gz: not gzip data", "decode/corrupt_gzip")
    if not IS_ROOT:
        locked = os.path.join(jdir, "locked.jsonl")
        with open(locked, "w") as f:
            f.write(json.dumps({"text": _prose(30)}) + "\n")
        os.chmod(locked, 0)
        exp["jsonl/locked.jsonl:unreadable"] = (
            "locked.jsonl: chmod 000",
            "decode/read_error:EACCES",
        )

    # --- Parquet: nulls, a wrong column type, a corrupt file ---------------------------------
    import pyarrow as pa
    import pyarrow.parquet as pq

    pdir = os.path.join(root, "parquet")
    os.makedirs(pdir)
    texts = [_prose(40), None, _prose(41), "abc\x00def " + _prose(42)]
    pq.write_table(
        pa.table({"text": texts, "id": ["p0", "p1", None, "p3"]}), os.path.join(pdir, "p.parquet")
    )
    pq.write_table(pa.table({"text": [1, 2]}), os.path.join(pdir, "ints.parquet"))
    with open(os.path.join(pdir, "bad.parquet"), "wb") as f:
        f.write(b"PAR1 this is not a parquet file")
    exp = expected.setdefault("parquet", {})
    exp["parquet/p.parquet:p0"] = ("p.parquet row 0: valid", "kept")
    exp["parquet/p.parquet:p1"] = ("p.parquet row 1: text null", "decode/null_text")
    exp[f"parquet/p.parquet:{2:09d}"] = ("p.parquet row 2: id null", "kept")
    exp["parquet/p.parquet:p3"] = ("p.parquet row 3: NUL in text", "decode/binary")
    for i in range(2):
        exp[f"parquet/ints.parquet:{i:09d}"] = (
            f"ints.parquet row {i}: int64 text column",
            "decode/invalid_field_type:text",
        )
    exp["parquet/bad.parquet:unreadable"] = (
        "bad.parquet: not Parquet",
        "decode/unreadable_container:ArrowInvalid",
    )

    # --- WARC: HTML, not HTML, a non-document record, a record cut short ---------------------
    wdir = os.path.join(root, "warc")
    os.makedirs(wdir)
    with open(os.path.join(wdir, "c.warc"), "wb") as f:
        f.write(_warc_record("warcinfo", "0000", b"software: test\r\n"))
        f.write(
            _warc_record("response", "0001", _http("text/html", _page(50)), "https://a.example/")
        )
        f.write(
            _warc_record(
                "response",
                "0002",
                _http("image/png", b"\x89PNG\r\n\x1a\n...."),
                "https://a.example/i.png",
            )
        )
        f.write(_warc_record("request", "0003", b"GET / HTTP/1.1\r\n\r\n", "https://a.example/"))
        block = _http("text/html", _page(51))
        f.write(
            _warc_record(
                "response", "0004", block[:300], "https://a.example/t", declared=len(block)
            )
        )
    exp = expected.setdefault("warc", {})
    exp["warc/c.warc:0001"] = ("c.warc: text/html response", "kept")
    exp["warc/c.warc:0002"] = ("c.warc: image/png response", "decode/not_html")
    exp["warc/c.warc:0004"] = (
        "c.warc: response cut short (truncated file)",
        "decode/truncated_record",
    )

    # --- Plain files: encodings, bytes, links, permissions -----------------------------------
    fdir = os.path.join(root, "files")
    os.makedirs(os.path.join(fdir, "sub"))
    exp = expected.setdefault("dir", {})

    def put(name: str, data: bytes, what: str, outcome: str, doc_name: str = "") -> None:
        with open(os.path.join(fdir, name), "wb") as f:
            f.write(data)
        exp[f"dir/{doc_name or name}"] = (f"{doc_name or name}: {what}", outcome)

    put("good.txt", _prose(60).encode(), "UTF-8 prose", "kept")
    words = _prose(61).split(" ")
    for i, w in ((5, "café"), (40, "résumé"), (90, "“quoted”"), (140, "naïve"), (200, "café")):
        words[i] = w
    put(
        "legacy_cp1252.txt",
        " ".join(words).encode("cp1252"),
        "English in cp1252 (no UTF-8 anywhere)",
        "kept",
    )
    japanese = "日本語のテキストです。これは長い文章で、文字コードの検出を試すためのものです。"
    put(
        "legacy_sjis.txt",
        (japanese * 8).encode("shift_jis"),
        "Japanese in Shift-JIS",
        "langid/language:ja",
    )
    put(
        "corrupt_utf8.txt",
        _prose(62).encode()[:600] + b"\xff\xfe\xc3\x28 broken",
        "UTF-8 with a few corrupt bytes",
        "decode/invalid_utf8",
    )
    put(
        "nul.txt",
        _prose(63).encode()[:500] + b"\x00\x00" + _prose(64).encode(),
        "NUL bytes",
        "decode/binary",
    )
    ctl = _prose(65).replace(". ", ".\x1b[1m\x07 ", 4).replace("\n\n", "\n\x0c\n", 1)
    put("control.txt", ctl.encode(), "ESC, BEL, form feed bytes", "kept")
    put(
        os.fsdecode(b"bad\xffname.txt"),
        _prose(66).encode(),
        "file name not valid UTF-8",
        "kept",
        doc_name="bad\\xffname.txt",
    )
    os.symlink("loop.txt", os.path.join(fdir, "loop.txt"))
    exp["dir/loop.txt"] = ("loop.txt: symlink to itself", "decode/read_error:ELOOP")
    os.symlink("..", os.path.join(fdir, "sub", "back"))
    exp["dir/sub/back"] = ("sub/back: directory symlink to its parent", "decode/symlink_loop")
    put("sub/inner.txt", _prose(67).encode(), "UTF-8 prose in a subdirectory", "kept")
    if not IS_ROOT:
        put("locked.txt", _prose(68).encode(), "chmod 000", "decode/read_error:EACCES")
        os.chmod(os.path.join(fdir, "locked.txt"), 0)
        os.makedirs(os.path.join(fdir, "lockeddir"))
        with open(os.path.join(fdir, "lockeddir", "x.txt"), "w") as f:
            f.write(_prose(69))
        os.chmod(os.path.join(fdir, "lockeddir"), 0)
        exp["dir/lockeddir"] = ("lockeddir/: chmod 000 directory", "decode/unreadable_dir:EACCES")
    return expected


def _config(kind: str, path: str):
    c = default_config()
    c.source.update(type=kind, path=path, kind="prose" if kind != "dir" else "auto")
    c.output.num_shards = 2
    c.decontam.enabled = False
    return c


def _outcomes(out: str) -> dict[str, tuple[str, dict]]:
    """id -> (outcome, stored record) of everything the run wrote."""
    got: dict[str, tuple[str, dict]] = {}
    for d in read_documents(out):
        assert d["id"] not in got, f"id written twice: {d['id']}"
        got[d["id"]] = ("kept", d)
    for r in read_rejects(out):
        assert r["id"] not in got, f"id written twice: {r['id']}"
        got[r["id"]] = (f"{r['step']}/{r['reason']}", r)
    return got


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    corpus = os.path.join(root, "corpus")
    expected = build_corpus(corpus)
    runs = {}
    folders = {"jsonl": "jsonl", "parquet": "parquet", "warc": "warc", "dir": "files"}
    for kind, folder in folders.items():
        out = os.path.join(root, f"out_{kind}")
        args = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
        report = run_curation(_config(kind, os.path.join(corpus, folder)), out, args, name=kind)
        runs[kind] = (out, report, _outcomes(out))
    for d, dirs, files in os.walk(corpus):  # undo chmod 000, so tmp_path can be removed
        for name in dirs + files:  # (top-down: a directory is opened before it is walked)
            if not os.path.islink(os.path.join(d, name)):
                os.chmod(os.path.join(d, name), 0o700)
    return expected, runs


def test_every_hostile_input_is_kept_or_a_counted_reject(curated):
    expected, runs = curated
    rows = []
    for kind, cases in expected.items():
        out, report, got = runs[kind]
        assert report["reconciled"], report["reconciliation"]
        assert set(got) == set(cases), (kind, sorted(set(got) ^ set(cases)))
        for doc_id, (what, outcome) in cases.items():
            assert got[doc_id][0] == outcome, (doc_id, what, got[doc_id])
            rows.append((what, doc_id, got[doc_id][0]))
        # The readers' own counts, not the chain's: every read record was written once.
        ids = report["reconciliation"]["ids"]
        assert ids["kept"] + ids["rejected"] == len(cases)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'input':{width}}  ->  where it went (id)")
    for what, doc_id, outcome in rows:
        print(f"{what:{width}}  ->  {outcome}  ({doc_id})")
    # Counted from what build_corpus wrote, each matched against what the run wrote.
    total = sum(len(cases) for cases in expected.values())
    print(f"hostile inputs accounted (hostile corpus): {len(rows)}/{total}")
    if IS_ROOT:
        print(f"(chmod 000 file and directory cases not built: {ROOT_REASON})")


def test_kept_hostile_documents_are_clean(curated):
    _, runs = curated
    got = runs["dir"][2]
    legacy = got["dir/legacy_cp1252.txt"][1]
    assert "café" in legacy["text"] and "résumé" in legacy["text"], legacy["text"][:200]
    assert legacy["encoding"] not in ("", "utf-8")
    for doc_id in ("dir/control.txt",):
        text = got[doc_id][1]["text"]
        assert not any(c in text for c in "\x1b\x07\x0c"), doc_id
    ansi = runs["jsonl"][2]["jsonl/a.jsonl:ansi"][1]["text"]
    assert "\x1b" not in ansi and "\x07" not in ansi
    # The repeated id was made unique and counted by the reader.
    assert runs["jsonl"][1]["reconciliation"]["read"]["duplicate_ids"] == 1
    assert runs["jsonl"][1]["reconciliation"]["read"]["blank_lines"] == 1
    assert runs["warc"][1]["reconciliation"]["read"]["skipped_records"] == 2  # warcinfo, request


@pytest.mark.skipif(IS_ROOT, reason=ROOT_REASON)
def test_unreadable_file_and_directory_are_counted(curated):
    expected, runs = curated
    got = runs["dir"][2]
    assert got["dir/locked.txt"][0] == "decode/read_error:EACCES"
    assert got["dir/lockeddir"][0] == "decode/unreadable_dir:EACCES"
    assert runs["jsonl"][2]["jsonl/locked.jsonl:unreadable"][0] == "decode/read_error:EACCES"


def _mixed(tmp_path) -> str:
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc_{i}.txt").write_text(_prose(100 + i))
    return str(corpus)


@pytest.mark.parametrize("fault", ["drop", "duplicate"])
def test_a_lost_or_doubled_document_fails_the_run_loudly(fault, tmp_path, monkeypatch, capsys):
    """A bug that loses (or doubles) a document after the read is caught by the id join, even
    though the chain's own summaries of what it saw still add up."""
    from lm.curate import pipeline

    lost = "dir/doc_2.txt"
    if fault == "drop":  # lost between the chain and the writers
        chain = pipeline.ChainFn.process

        def drop(self, doc):
            yield from ([] if doc["id"] == lost else chain(self, doc))

        monkeypatch.setattr(pipeline.ChainFn, "process", drop)
    else:  # a writer that writes one document twice
        write = pipeline.WriteShardFn.process

        def twice(self, kv):
            docs = [d for x in kv[1] for d in ([x, x] if x["id"] == lost else [x])]
            return write(self, (kv[0], docs))

        monkeypatch.setattr(pipeline.WriteShardFn, "process", twice)
    out = str(tmp_path / "out")
    args = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
    with pytest.raises(DataError) as err:
        run_curation(_config("dir", _mixed(tmp_path)), out, args, name="faulty")
    problem = "missing: 1" if fault == "drop" else "written twice: 1"
    message = str(err.value)
    assert problem in message and lost in message and "\n" not in message
    # The failed run's report is kept beside the output, named in the message; no manifest is
    # written anywhere, and the output itself was never created.
    failed = f"{out}.failed"
    assert f"{failed}/data_report.md" in message
    with open(os.path.join(failed, "data_report.json")) as f:
        rec = json.load(f)["reconciliation"]
    assert not rec["ok"]
    name = "missing" if fault == "drop" else "written_twice"
    assert rec["ids"]["problems"][name] == [1, [lost]]
    assert not os.path.exists(out) and not os.path.exists(os.path.join(failed, "manifest.json"))
    assert sorted(os.listdir(tmp_path)) == ["c", "out.failed"]  # no staging directory left
    # Through the command line: one line on stderr, exit status 2, no traceback.
    rc = main(
        [
            "run",
            "--pipeline=stdlib",
            f"--output={out}",
            "--config.source.type=dir",
            f"--config.source.path={tmp_path / 'c'}",
            "--config.decontam.enabled=False",
            "--runner=DirectRunner",
        ]
    )
    err_text = capsys.readouterr().err
    assert rc == 2 and problem in err_text and "Traceback" not in err_text
