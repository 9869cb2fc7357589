"""Document sources, the seqio task + packing (`lm data pack`), the packed batch iterator, and
the module import graph."""

import ast
import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import seqio  # noqa: E402

from lm import storage  # noqa: E402
from lm.config import default_config  # noqa: E402
from lm.data import packed, sources  # noqa: E402
from lm.data.documents import iter_documents  # noqa: E402
from lm.data.grain_pipeline import FEATURES, batch_features  # noqa: E402
from lm.data.pack import pack as pack_here  # noqa: E402
from lm.data.sources import SPLITS, chunk_text  # noqa: E402
from lm.errors import DataError  # noqa: E402
from lm.tokenizer.sentencepiece_tokenizer import (  # noqa: E402
    BOS_ID,
    load_vocabulary,
    train_tokenizer,
)

SEQ, BATCH = 32, 4
REPO = pathlib.Path(__file__).resolve().parents[1]


def make_docs(n: int = 30) -> list[str]:
    """Distinct documents of varied length, most longer than one SEQ-token row."""
    docs = []
    for i in range(n):
        body = "".join(f"    value_{i}_{j} = compute({j}, {i})\n" for j in range(1 + i % 7))
        docs.append(f"def function_{i}(x):\n{body}    return x  # doc {i}\n")
    return docs


def dir_cfg(root: str, tokenizer: str = "", **data):
    cfg = default_config()
    cfg.data.update(source="dir", path=root, seq_len=SEQ, batch_size=BATCH)
    cfg.data.update(**{"validation_fraction": 0.2, **data})
    cfg.tokenizer.update(vocab_size=100, byte_fallback=False, path=tokenizer)
    return cfg


def pack(cfg, workdir: str) -> None:
    """`lm data pack` in this process (packed.ensure_packed runs the same code in a child)."""
    if not packed.is_packed(cfg, workdir):
        pack_here(cfg, workdir)


def split_dir(cfg, workdir: str, split: str, component: int = 0) -> str:
    plan = packed.read_plan(cfg, workdir)
    return storage.join(packed.plan_dir(cfg, workdir), plan["components"][component]["dirs"][split])


def split_rows(cfg, workdir: str, split: str) -> tuple[dict, dict]:
    """({feature: [rows, seq_len]}, meta) of the packed split of a one-component config."""
    pack(cfg, workdir)
    s = packed.PackedSplit(split_dir(cfg, workdir, split), batch_features(cfg.data.objective))
    rows = [s.row(i) for i in range(len(s))]
    return {k: np.stack([r[k] for r in rows]) for k in s.features}, s.meta


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(cfg, vocab, workdir) over 30 small .py files with a 100-piece BPE tokenizer, packed."""
    root = tmp_path_factory.mktemp("docs")
    for i, doc in enumerate(make_docs()):
        (root / f"doc_{i:02d}.py").write_text(doc)
    cfg = dir_cfg(str(root))
    vocab_path = train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path_factory.mktemp("tok")))
    cfg.tokenizer.path = vocab_path
    workdir = str(tmp_path_factory.mktemp("work"))
    pack(cfg, workdir)
    return cfg, load_vocabulary(vocab_path), workdir


# ---------------------------------------------------------------- sources


def test_text_source_chunks_a_big_file_without_losing_text(tmp_path):
    paras = [f"Paragraph {i}.\n" + "words and more words\n" * (5 + i % 40) for i in range(120)]
    text = "\n".join(paras)
    path = tmp_path / "input.txt"
    path.write_text(text)
    assert "".join(chunk_text(text)) == text
    cfg = default_config()
    cfg.data.update(source="text", path=str(path))
    train = list(iter_documents(cfg.data, "train"))
    val = list(iter_documents(cfg.data, "validation"))
    assert len(train) > 10 and val  # a validation split exists even for one file
    assert max(len(d) for d in train) < 3 * sources.TEXT_CHUNK_BYTES
    assert sorted(train + val) == sorted(chunk_text(text))


def test_dir_source_include_exclude(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("a")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("b")
    (tmp_path / "pkg" / "sub" / "skip_me.py").write_text("skip")
    (tmp_path / "pkg" / "c.md").write_text("c")
    (tmp_path / "pkg" / "d.bin").write_bytes(b"\xff\xfe\x00")
    cfg = default_config()
    cfg.data.update(source="dir", path=str(tmp_path), include="*.py,*.md", exclude="skip_*")
    cfg.data.validation_fraction = 0.0
    assert sorted(iter_documents(cfg.data, "train")) == ["a", "b", "c"]
    cfg.data.include = "*"  # the binary file is skipped and counted, never a crash
    assert sorted(iter_documents(cfg.data, "train")) == ["a", "b", "c"]
    assert sources.last_skip_stats.not_utf8 == 1


def test_jsonl_source_and_malformed_line(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [json.dumps({"content": f"doc {i}"}) for i in range(5)]
    path.write_text("\n".join(rows) + "\n\n")
    cfg = default_config()
    cfg.data.update(source="jsonl", path=str(path), jsonl_field="content")
    cfg.data.validation_fraction = 0.0
    assert list(iter_documents(cfg.data, "train")) == [f"doc {i}" for i in range(5)]
    path.write_text(rows[0] + "\n" + rows[1] + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl:3: malformed JSON"):
        list(iter_documents(cfg.data, "train"))
    cfg.data.jsonl_field = "text"
    path.write_text(rows[0] + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: no string field 'text'"):
        list(iter_documents(cfg.data, "train"))


def test_stdlib_source_with_max_documents():
    cfg = default_config()
    cfg.data.update(source="stdlib", max_documents=40, validation_fraction=0.1)
    train = list(iter_documents(cfg.data, "train"))
    val = list(iter_documents(cfg.data, "validation"))
    assert 30 <= len(train) + len(val) <= 40 and val
    assert all(isinstance(d, str) and d for d in train)
    assert train == list(iter_documents(cfg.data, "train"))  # deterministic


@pytest.mark.parametrize("source", ["text", "dir", "jsonl"])
def test_missing_path_names_path_and_key(source, tmp_path):
    cfg = default_config()
    cfg.data.update(source=source, path=str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"missing.*--config\.data\.path"):
        list(iter_documents(cfg.data, "train"))
    cfg.data.path = ""
    with pytest.raises(DataError, match=r"--config\.data\.path"):
        list(iter_documents(cfg.data, "train"))


def test_splits_disjoint_and_shards_partition(corpus):
    cfg = corpus[0]
    train = list(iter_documents(cfg.data, "train"))
    val = list(iter_documents(cfg.data, "validation"))
    assert val and not set(train) & set(val)
    assert sorted(train + val) == sorted(make_docs())
    shards = [list(iter_documents(cfg.data, "train", i, 3)) for i in range(3)]
    assert all(shards)
    assert sorted(sum(shards, [])) == sorted(train)
    assert sum(len(s) for s in shards) == len(set(sum(shards, [])))


# ---------------------------------------------------------------- packing


def test_packed_rows_are_consistent_and_lose_no_token(corpus):
    cfg, vocab, workdir = corpus
    rows, meta = split_rows(cfg, workdir, "train")
    inputs, targets = np.asarray(rows["inputs"]), np.asarray(rows["targets"])
    seg, pos, w = np.asarray(rows["segment_ids"]), np.asarray(rows["positions"]), rows["weights"]
    assert targets.shape[1] == SEQ and targets.dtype == np.int32 and w.dtype == np.float32
    expected = sum(len(vocab.encode(d)) + 1 for d in iter_documents(cfg.data, "train"))
    assert int((seg > 0).sum()) == int(w.sum()) == meta["tokens"] == expected
    assert ((targets == vocab.eos_id) & (seg > 0)).sum() == len(
        list(iter_documents(cfg.data, "train"))
    )
    assert np.all((seg == 0) == (w == 0)) and np.all(targets[seg == 0] == 0)
    for r in range(len(seg)):
        starts = np.flatnonzero(np.diff(seg[r], prepend=-1) != 0)
        for s, e in zip(starts, [*starts[1:], SEQ]):
            if seg[r, s] == 0:
                continue
            assert list(pos[r, s:e]) == list(range(e - s))  # positions restart per segment
            assert inputs[r, s] == BOS_ID
            assert list(inputs[r, s + 1 : e]) == list(targets[r, s : e - 1])  # shifted by one
    # Reused: packing again does not rewrite the split.
    written = os.stat(os.path.join(split_dir(cfg, workdir, "train"), "rows.array_record"))
    pack_here(cfg, workdir)
    again, meta2 = split_rows(cfg, workdir, "train")
    assert meta2 == meta and np.array_equal(again["targets"], targets)
    path = os.path.join(split_dir(cfg, workdir, "train"), "rows.array_record")
    assert os.stat(path).st_mtime_ns == written.st_mtime_ns


def test_documents_are_cut_into_pieces_not_truncated(corpus):
    """Each segment is one consecutive <= SEQ-token piece of (document tokens + EOS)."""
    cfg, vocab, workdir = corpus
    rows, _ = split_rows(cfg, workdir, "validation")
    targets, seg = np.asarray(rows["targets"]), np.asarray(rows["segment_ids"])
    got = [
        tuple(int(t) for t in targets[r][seg[r] == s])
        for r in range(len(seg))
        for s in np.unique(seg[r][seg[r] > 0])
    ]
    expected, longest = [], 0
    for doc in iter_documents(cfg.data, "validation"):
        ids = [*vocab.encode(doc), vocab.eos_id]
        longest = max(longest, len(ids))
        expected += [tuple(ids[i : i + SEQ]) for i in range(0, len(ids), SEQ)]
    assert longest > 2 * SEQ  # the corpus really has documents longer than a row
    assert sorted(got) == sorted(expected)


# ---------------------------------------------------------------- batches


def test_iterator_is_deterministic_and_resumes_exactly(corpus):
    cfg, vocab, workdir = corpus
    it = packed.make_train_iterator(cfg, vocab, workdir)
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(3)]
    for a, b in zip(first, [next(packed.make_train_iterator(cfg, vocab, workdir)) for _ in [0]]):
        assert all(np.array_equal(a[k], b[k]) for k in FEATURES)
    resumed = packed.make_train_iterator(cfg, vocab, workdir)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(3)]):
        for k in FEATURES:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
    assert not all(np.array_equal(a["targets"], b["targets"]) for a, b in zip(first, rest))
    batch = first[0]
    assert set(batch) == set(FEATURES)
    assert all(v.shape == (BATCH, SEQ) for v in batch.values())
    assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32


def test_iterator_is_infinite_and_reshuffles_epochs(corpus):
    cfg, vocab, workdir = corpus
    it = packed.make_train_iterator(cfg, vocab, workdir)
    n = it.get_state()["rows"][0]
    seen = np.concatenate([next(it)["targets"] for _ in range(2 * n // BATCH + 1)])
    epoch0 = seen[:n]
    assert len({r.tobytes() for r in epoch0}) == len({r.tobytes() for r in seen})  # all rows
    assert not np.array_equal(epoch0, seen[n : 2 * n])  # a new order each epoch


def test_per_host_batches(corpus):
    cfg, vocab, workdir = corpus
    a = next(packed.make_train_iterator(cfg, vocab, workdir, 0, 2))
    b = next(packed.make_train_iterator(cfg, vocab, workdir, 1, 2))
    assert a["targets"].shape == b["targets"].shape == (BATCH // 2, SEQ)
    assert not {r.tobytes() for r in a["targets"]} & {r.tobytes() for r in b["targets"]}
    with pytest.raises(DataError, match="not divisible"):
        packed.make_train_iterator(cfg, vocab, workdir, 0, 3)


def test_eval_batches_and_bytes_per_token(corpus):
    cfg, vocab, workdir = corpus
    one = packed.make_eval_batches(cfg, vocab, workdir, 3)
    two = packed.make_eval_batches(cfg, vocab, workdir, 3)
    assert len(one) == 3 and all(b["targets"].shape == (BATCH, SEQ) for b in one)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(one, two) for k in x)
    val = list(iter_documents(cfg.data, "validation"))
    tokens = sum(len(vocab.encode(d)) + 1 for d in val)
    bpt = packed.validation_bytes_per_token(cfg, vocab, workdir)
    assert bpt == pytest.approx(sum(len(d.encode()) for d in val) / tokens)


def test_zero_rows_is_a_data_error(corpus, tmp_path):
    cfg, vocab, _ = corpus
    cfg = dir_cfg(cfg.data.path, vocab.sentencepiece_model_file, validation_fraction=0.0)
    with pytest.raises(DataError, match="zero validation rows"):
        pack(cfg, str(tmp_path))


@pytest.mark.slow  # ~50 s: make test-slow
def test_packs_are_built_in_a_subprocess_and_its_errors_come_back(corpus, tmp_path):
    cfg, vocab, _ = corpus
    cfg = dir_cfg(cfg.data.path, vocab.sentencepiece_model_file)
    workdir = str(tmp_path / "work")
    packed.ensure_packed(cfg, workdir)  # `lm data pack` in a child process
    plan = packed.read_plan(cfg, workdir)
    assert [c["name"] for c in plan["components"]] == ["main"]
    rows, meta = split_rows(cfg, str(tmp_path / "direct"), "validation")  # in this process
    split = packed.PackedSplit(split_dir(cfg, workdir, "validation"), FEATURES)
    assert len(split) == meta["rows"] and split.meta["tokens"] == meta["tokens"]
    for i in (0, len(split) - 1):
        for k in FEATURES:
            np.testing.assert_array_equal(split.row(i)[k], rows[k][i])
    empty = dir_cfg(cfg.data.path, vocab.sentencepiece_model_file, validation_fraction=0.0)
    with pytest.raises(DataError, match="zero validation rows"):
        packed.ensure_packed(empty, str(tmp_path / "empty"))


def test_registered_task_source(corpus):
    from data_mixtures import register_text_task

    cfg, vocab, workdir = corpus
    name = register_text_task(cfg.data, vocab.sentencepiece_model_file)
    assert register_text_task(cfg.data, vocab.sentencepiece_model_file) == name
    assert name in seqio.TaskRegistry.names()
    task_cfg = dir_cfg("", vocab.sentencepiece_model_file, source="task", task=name)
    direct, _ = split_rows(cfg, workdir, "train")
    via_task, _ = split_rows(task_cfg, workdir, "train")  # packed in this process: registered
    assert packed.plan_dir(task_cfg, workdir) != packed.plan_dir(cfg, workdir)
    assert np.array_equal(direct["targets"], via_task["targets"])
    # A task has no raw text: its bytes are those of its decoded pieces.
    assert packed.validation_bytes_per_token(task_cfg, vocab, workdir) == pytest.approx(
        packed.validation_bytes_per_token(cfg, vocab, workdir), rel=0.05
    )


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = default_config()
    cfg.data.update(source="tfds", tfds_name="tiny_shakespeare", validation_fraction=0.3)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        train = list(iter_documents(cfg.data, "train"))
        val = list(iter_documents(cfg.data, "validation"))
        shards = [list(iter_documents(cfg.data, "train", i, 2)) for i in range(2)]
    assert len(train) + len(val) == 12 and all(isinstance(d, str) for d in train)
    assert sorted(shards[0] + shards[1]) == sorted(train)


def test_cache_is_rebuilt_when_the_data_changes(corpus, tmp_path):
    _, vocab, workdir = corpus
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):  # three files: one of them is the validation split
        (docs / f"{i}.py").write_text(make_docs()[3 + i] * 2)
    cfg = dir_cfg(str(docs), vocab.sentencepiece_model_file)

    def tokens() -> int:
        return sum(int((split_rows(cfg, workdir, s)[0]["weights"] > 0).sum()) for s in SPLITS)

    before, old = tokens(), packed.plan_dir(cfg, workdir)
    (docs / "0.py").write_text(make_docs()[3])
    assert packed.plan_dir(cfg, workdir) != old
    assert tokens() < before


# ---------------------------------------------------------------- imports


def _import_graph(packages=("lm", "data_mixtures")) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports (every import statement, those inside
    functions included, resolved to the deepest module that exists)."""
    files = {}
    for pkg in packages:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                deps |= {resolve(f"{base}.{a.name}") or resolve(base) for a in node.names}
        graph[module] = {d for d in deps if d and d != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    graph = _import_graph()
    assert {"lm.data.sources", "lm.data.documents", "data_mixtures.text"} <= set(graph)
    assert "lm.data.sources" in graph["data_mixtures.text"]  # statements are really read
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not any(
        d == "lm.cli" for m, deps in graph.items() if m.startswith("lm.data") for d in deps
    )


def _jsonl_cfg(path):
    cfg = default_config()
    cfg.data.update(source="jsonl", path=str(path), validation_fraction=0.0)
    return cfg


def test_a_bad_jsonl_line_names_file_line_and_the_whole_reason(tmp_path):
    """Malformed JSON, invalid UTF-8 and hostile nesting each stop the read with one line that
    names the file and line (and the column or byte); a leading BOM is not content."""
    path = tmp_path / "bad.jsonl"
    good = b'\xef\xbb\xbf{"text": "with a BOM"}\n'
    path.write_bytes(good + b'{"text": "tab\there"}\n')  # a raw tab at column 14
    with pytest.raises(DataError) as e:
        list(iter_documents(_jsonl_cfg(path).data, "train"))
    assert str(e.value) == (
        f"{path}:2: malformed JSON: Invalid control character at line 1 column 14"
    )
    path.write_bytes(good + b'{"text": "caf\xe9"}\n')  # the 14th byte, offset 13
    with pytest.raises(DataError) as e:
        list(iter_documents(_jsonl_cfg(path).data, "train"))
    assert str(e.value) == f"{path}:2: invalid UTF-8 at byte 13"
    path.write_bytes(good + b"[" * 100_000 + b"\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: JSON nested deeper than 64 levels"):
        list(iter_documents(_jsonl_cfg(path).data, "train"))
    path.write_bytes(good)
    assert list(iter_documents(_jsonl_cfg(path).data, "train")) == ["with a BOM"]


def test_text_that_is_not_utf8_is_rejected_never_guessed(tmp_path, caplog):
    """The only input file: a one-line error with the byte offset. One of several: skipped with
    a warning naming it and counted; the others train. Never decoded as another encoding."""
    bad = tmp_path / "latin.txt"
    bad.write_bytes("ok text\ncafé au lait\n".encode("cp1252"))  # é is byte 11
    cfg = default_config()
    cfg.data.update(source="text", path=str(bad), validation_fraction=0.0)
    with pytest.raises(DataError) as e:
        list(iter_documents(cfg.data, "train"))
    assert str(e.value).startswith(f"{bad}: not valid UTF-8 at byte 11 (0xe9)")
    good = tmp_path / "good.txt"
    good.write_text("plain UTF-8 text, café\n")
    cfg.data.path = f"{good},{bad}"
    with caplog.at_level("WARNING"):
        assert list(iter_documents(cfg.data, "train")) == ["plain UTF-8 text, café\n"]
    assert sources.last_skip_stats.not_utf8 == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"data: skipped {bad}: not valid UTF-8 at byte 11 (0xe9)"
    ]


def test_dir_source_warns_of_skipped_files_and_never_blocks_on_a_fifo(tmp_path, caplog):
    import threading

    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_bytes(b"beta \xff")
    os.mkfifo(tmp_path / "c.txt")  # open().read() on it would wait for a writer forever
    cfg = default_config()
    cfg.data.update(source="dir", path=str(tmp_path), include="*.txt", validation_fraction=0.0)
    found = []
    with caplog.at_level("WARNING"):
        reader = threading.Thread(
            target=lambda: found.extend(iter_documents(cfg.data, "train")), daemon=True
        )
        reader.start()
        reader.join(timeout=30)
    assert not reader.is_alive(), "the reader blocked on the FIFO"
    assert found == ["alpha"]
    assert sources.last_skip_stats.not_utf8 == 1 and sources.last_skip_stats.unreadable == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"data: skipped {tmp_path / 'b.txt'}: not valid UTF-8 at byte 5 (0xff)"]


def test_the_packing_process_reports_a_wrapped_data_error_as_one_line(
    corpus, tmp_path, capsys, monkeypatch
):
    """A bad JSONL line first read inside the tf.data pipeline (the tokenizer exists, so no
    tokenizer training reads it first) comes out of `lm data pack` as one line, exit 2, with
    the phases announced for the parent."""
    from lm.data.pack import main as pack_main

    _, vocab, _ = corpus
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(8)) + "{oops\n")
    groups = {"data": default_config().data.to_dict(), "tokenizer": {}}
    groups["data"].update(source="jsonl", path=str(path), seq_len=SEQ, validation_fraction=0.0)
    groups["tokenizer"] = {**default_config().tokenizer.to_dict(), "vocab_size": 100}
    groups["tokenizer"]["path"] = vocab.sentencepiece_model_file
    monkeypatch.setenv("LM_PACK_PHASES", "1")  # as ensure_packed sets it (packed.PHASES_ENV)
    code = pack_main([f"--workdir={tmp_path / 'w'}", f"--config-json={json.dumps(groups)}"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[-1] == f"lm data error: {path}:9: malformed JSON: Expecting property name " + (
        "enclosed in double quotes at line 1 column 2"
    )
    assert "lm-phase: begin packing the train split" in err
    assert not any("Traceback" in line for line in err)


def test_the_packing_process_phases_become_stages_and_its_logs_are_relayed(capsys):
    import sys

    from lm import stages

    child = (
        "import sys, time\n"
        "print('lm-phase: begin training the tokenizer', file=sys.stderr, flush=True)\n"
        "time.sleep(0.3)\n"
        "print('12:00:00 WARNING data: skipped x.txt', file=sys.stderr, flush=True)\n"
        "print('lm-phase: end training the tokenizer', file=sys.stderr, flush=True)\n"
        "print('I0000 noise from a C++ library', file=sys.stderr, flush=True)\n"
    )
    first = len(stages.timings())
    code, output = packed._run_packer([sys.executable, "-c", child], dict(os.environ))
    names = [name for name, _ in stages.timings()[first:]]
    assert code == 0
    assert names == [
        "starting the data process",
        "training the tokenizer",
        "closing the data process",
    ]
    assert stages.timings()[first + 1][1] >= 0.3
    assert capsys.readouterr().err == "12:00:00 WARNING data: skipped x.txt\n"
    assert output == ["12:00:00 WARNING data: skipped x.txt", "I0000 noise from a C++ library"]
