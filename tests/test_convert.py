"""`lm convert`: Hugging Face checkpoints <-> lm workdirs, with logit parity per family.

The transformers models are built offline from small configs with seeded random weights
(lm/convert/parity.py: 2 layers, hidden 64, 4 heads, vocab 300) and saved with their own tiny
BPE tokenizer. Parity: our float32 logits within 1e-4 of transformers' float32 ones; our
bfloat16 compute (float32 params) against transformers' float32 with mean KL <= 0.015.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from lm.convert import parity  # noqa: E402
from lm.convert.workdir import export_hf, import_hf, param_names  # noqa: E402
from lm.errors import ConfigError  # noqa: E402
from lm.training.setup import load_run_config  # noqa: E402

FAMILIES = list(parity.TINY)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (transformers model, hf_dir, workdir), converted once per module."""
    root = tmp_path_factory.mktemp("convert")
    cache = {}

    def get(family):
        if family not in cache:
            hf_dir, workdir = str(root / family), str(root / f"{family}-run")
            model = parity.tiny_model(family, hf_dir)
            import_hf(hf_dir, workdir)
            cache[family] = (model, hf_dir, workdir)
        return cache[family]

    return get


def _tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_in_fp32_and_bf16(family, imported):
    model, _, workdir = imported(family)
    ids = parity.token_ids()
    reference = parity.hf_logits(model, ids)
    fp32 = parity.compare(reference, parity.lm_logits(workdir, ids, "float32"))
    bf16 = parity.compare(reference, parity.lm_logits(workdir, ids, "bfloat16"))
    assert parity.FP32_MAX_ABS == 1e-4 and parity.BF16_MAX_KL == 0.015  # the bounds
    assert fp32["max_abs"] <= parity.FP32_MAX_ABS, fp32
    assert bf16["kl"] <= parity.BF16_MAX_KL, bf16


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact_and_loads_in_transformers(family, imported, tmp_path):
    import transformers

    model, hf_dir, workdir = imported(family)
    out = str(tmp_path / "export")
    export_hf(workdir, out)
    before, after = _tensors(hf_dir), _tensors(out)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert np.array_equal(after[name], tensor), name  # bitwise: permutations only
    # The same config.json back, and tied embeddings detected from it (no lm_head then).
    original = json.load(open(os.path.join(hf_dir, "config.json")))
    assert json.load(open(os.path.join(out, "config.json"))) == original
    tied = load_run_config(workdir).model.tie_embeddings
    assert tied == model.config.tie_word_embeddings == ("lm_head.weight" not in before)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    ids = parity.token_ids()
    np.testing.assert_array_equal(parity.hf_logits(reloaded, ids), parity.hf_logits(model, ids))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, name))


def test_mistral_window_cuts_the_test_sequence(imported):
    """The Mistral parity case tests the windowed mask only if the window changes the logits:
    the same weights with global attention agree before the window and differ past it."""
    import transformers

    model, _, _ = imported("mistral")
    window = parity.TINY["mistral"][1]["sliding_window"]
    assert window < parity.SEQ
    config = model.config.to_dict()
    config["sliding_window"] = None
    full = transformers.MistralForCausalLM(transformers.MistralConfig(**config)).eval()
    full.load_state_dict(model.state_dict())
    ids = parity.token_ids()
    windowed, unwindowed = parity.hf_logits(model, ids), parity.hf_logits(full, ids)
    np.testing.assert_allclose(windowed[:, :window], unwindowed[:, :window], atol=1e-5)
    assert np.abs(windowed[:, window:] - unwindowed[:, window:]).max() > 0.1


def test_mixtral_routing_is_varied(imported):
    """Random routers send tokens to every expert in many top-2 combinations, so the Mixtral
    parity compares the routing, the gates and each expert's weights (a misplaced expert or a
    wrong gate normalization moves the logits far past 1e-4)."""
    import torch

    model, _, _ = imported("mixtral")
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(
            torch.as_tensor(parity.token_ids(), dtype=torch.long), output_router_logits=True
        )
    for layer_logits in out.router_logits:
        chosen = torch.topk(layer_logits, k, dim=-1).indices.sort(-1).values.reshape(-1, k)
        assert len(set(chosen.flatten().tolist())) == model.config.num_local_experts
        assert len({tuple(row) for row in chosen.tolist()}) >= 3


def test_restore_into_an_fsdp_tensor_mesh_gives_the_rules_shardings(imported):
    from lm import sharding
    from lm.models.transformer import ModelConfig
    from lm.tokenizer.vocab import load_vocab
    from lm.training.checkpoint import Checkpointer
    from lm.training.restore import restore_params
    from lm.training.train_step import Trainer

    _, _, workdir = imported("llama")
    cfg = load_run_config(workdir)
    cfg.mesh.update(data=1, fsdp=4, expert=1, tensor=2)
    model_cfg = ModelConfig.from_config(cfg.model, load_vocab(cfg.tokenizer.path).vocab_size)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
    try:
        state, data_state, step = ckpt.restore_latest(trainer.abstract_state)
    finally:
        ckpt.close()
    assert step == 0 and data_state["grain"] == {"next_index": 0}
    names, leaves, _ = param_names(state.params)
    _, wanted, _ = param_names(trainer.state_shardings.params)
    ref_names, ref_leaves, _ = param_names(restore_params(workdir)[1])  # replicated copy
    ref = dict(zip(ref_names, ref_leaves))
    sharded = 0
    for name, leaf, want in zip(names, leaves, wanted):
        assert leaf.sharding == want, name
        split = want.shard_shape(leaf.shape) != leaf.shape
        sharded += split
        full = np.asarray(ref[name])
        assert len(leaf.addressable_shards) == 8, name
        for shard in leaf.addressable_shards:  # each device holds its piece, and only that
            assert shard.data.shape == want.shard_shape(leaf.shape), name
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    assert sharded >= 10  # embeddings, q/k/v/o, the MLP and the head are split
    q = state.params["blocks"][0]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec[:2] == ("fsdp", "tensor")


def test_sharded_checkpoints_are_read_and_written(imported, tmp_path):
    _, hf_dir, workdir = imported("llama")
    sharded_dir = str(tmp_path / "sharded")
    export_hf(workdir, sharded_dir, max_shard_bytes=100_000)
    index = json.load(open(os.path.join(sharded_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    again = str(tmp_path / "again")
    import_hf(sharded_dir, again)
    out = str(tmp_path / "out")
    export_hf(again, out)
    before, after = _tensors(hf_dir), _tensors(out)
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_vocab_padding_is_removed_on_export(imported, tmp_path):
    model, hf_dir, _ = imported("llama")
    workdir = str(tmp_path / "padded")
    from lm.cli import main

    # Through the CLI flag: the vocabulary padded to a multiple of 128.
    assert (
        main(["convert", f"--from_hf={hf_dir}", f"--workdir={workdir}", "--vocab_multiple=128"])
        == 0
    )
    assert load_run_config(workdir).model.vocab_size == 384
    ids = parity.token_ids()
    ours = parity.lm_logits(workdir, ids)
    assert ours.shape[-1] == 384
    np.testing.assert_allclose(ours[..., : parity.VOCAB], parity.hf_logits(model, ids), atol=1e-4)
    out = str(tmp_path / "out")
    export_hf(workdir, out)
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == parity.VOCAB
    before, after = _tensors(hf_dir), _tensors(out)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_bf16_checkpoints_round_trip_in_bf16(imported, tmp_path):
    import ml_dtypes

    _, hf_dir, _ = imported("llama_tied")
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    for name in os.listdir(hf_dir):
        if not name.endswith(".safetensors"):
            (bf16_dir / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors(hf_dir).items()}
    save_file(tensors, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    import_hf(str(bf16_dir), str(tmp_path / "w"))
    export_hf(str(tmp_path / "w"), str(tmp_path / "out"))
    after = _tensors(str(tmp_path / "out"))
    assert all(after[n].dtype == ml_dtypes.bfloat16 for n in after)
    assert all(np.array_equal(tensors[n], after[n]) for n in tensors)
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


def test_gpt2_without_the_transformer_prefix_keeps_its_names(imported, tmp_path):
    _, hf_dir, _ = imported("gpt2")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(hf_dir):
        if not name.endswith(".safetensors"):
            (bare / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    tensors = {k.removeprefix("transformer."): v for k, v in _tensors(hf_dir).items()}
    save_file(tensors, str(bare / "model.safetensors"), metadata={"format": "pt"})
    import_hf(str(bare), str(tmp_path / "w"))
    export_hf(str(tmp_path / "w"), str(tmp_path / "out"))
    after = _tensors(str(tmp_path / "out"))
    assert sorted(after) == sorted(tensors)
    assert all(np.array_equal(tensors[n], after[n]) for n in tensors)


# -- user errors ---------------------------------------------------------------------------------


def _copy_with(hf_dir, out, config_edit=None, drop=None):
    os.makedirs(out)
    for name in os.listdir(hf_dir):
        data = open(os.path.join(hf_dir, name), "rb").read()
        open(os.path.join(out, name), "wb").write(data)
    if config_edit:
        cfg = json.load(open(os.path.join(out, "config.json")))
        cfg.update(config_edit)
        json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    if drop:
        tensors = {k: v for k, v in _tensors(out).items() if k != drop}
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_unknown_architecture_lists_the_supported_ones(imported, tmp_path):
    _, hf_dir, _ = imported("llama")
    bad = _copy_with(hf_dir, tmp_path / "bad", {"architectures": ["FalconForCausalLM"]})
    with pytest.raises(ConfigError) as e:
        import_hf(bad, str(tmp_path / "w"))
    message = str(e.value)
    assert "FalconForCausalLM is not supported" in message and "\n" not in message
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM", "Qwen2"):
        assert name in message


def test_config_that_does_not_match_the_tensors_names_the_key(imported, tmp_path):
    _, hf_dir, _ = imported("llama")
    bad = _copy_with(hf_dir, tmp_path / "bad", {"hidden_size": 32, "head_dim": 16})
    with pytest.raises(ConfigError, match=r"hidden_size=32 does not match the weights") as e:
        import_hf(bad, str(tmp_path / "w"))
    assert "model.embed_tokens.weight" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "w")  # nothing written


def test_missing_tensor_is_named(imported, tmp_path):
    _, hf_dir, _ = imported("mixtral")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    bad = _copy_with(hf_dir, tmp_path / "bad", drop=name)
    with pytest.raises(ConfigError, match=f"tensor {name} is missing") as e:
        import_hf(bad, str(tmp_path / "w"))
    assert "\n" not in str(e.value)
    _, hf_dir, _ = imported("llama")  # untied: a checkpoint without its head
    bad = _copy_with(hf_dir, tmp_path / "headless", drop="lm_head.weight")
    with pytest.raises(ConfigError, match="lm_head.weight is missing.*tie_word_embeddings"):
        import_hf(bad, str(tmp_path / "w"))


def test_unreadable_safetensors_is_one_line(imported, tmp_path):
    _, hf_dir, _ = imported("gpt2")
    bad = _copy_with(hf_dir, tmp_path / "bad")
    open(os.path.join(bad, "model.safetensors"), "wb").write(b"not a safetensors file")
    with pytest.raises(ConfigError, match="is not a readable safetensors file") as e:
        import_hf(bad, str(tmp_path / "w"))
    assert "\n" not in str(e.value)


def test_cli_errors_are_one_line(imported, tmp_path, capsys):
    from lm.cli import main

    _, hf_dir, workdir = imported("gpt2")
    capsys.readouterr()  # drop what building the fixture printed (transformers' progress bars)
    assert main(["convert", f"--workdir={workdir}", f"--from_hf={hf_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already holds a run" in err and "\n" not in err
    assert main(["convert", f"--workdir={workdir}"]) == 2
    assert "exactly one of --from_hf" in capsys.readouterr().err
    out = tmp_path / "cli-export"
    assert main(["convert", f"--workdir={workdir}", f"--to_hf={out}"]) == 0
    assert "exported step 0 as GPT2LMHeadModel" in capsys.readouterr().out


# -- tokenizer, sampling and training with the imported tokenizer --------------------------------


def test_hf_vocab_reads_special_tokens_and_round_trips(imported):
    from lm.tokenizer.hf_vocab import HFVocab
    from lm.tokenizer.vocab import load_vocab

    _, hf_dir, workdir = imported("llama")
    vocab = load_vocab(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    assert isinstance(vocab, HFVocab) and isinstance(load_vocab(hf_dir), HFVocab)
    tok = vocab.tokenizer
    assert (vocab.bos_id, vocab.eos_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))
    assert vocab.vocab_size == parity.VOCAB
    assert vocab.base_vocab_size < vocab.vocab_size  # the embedding is padded past the tokens
    text = "def add(a, b):\n\treturn a != b  # ünïcode\n"
    ids = vocab.encode(text)
    assert 0 in ids  # "!" is id 0, as in GPT-2 and Qwen2
    assert vocab.bos_id not in ids and vocab.decode(ids) == text
    assert vocab.decode([*ids, vocab.eos_id, *ids]) == text
    assert vocab.decode([*ids, parity.VOCAB - 1]) == text  # a padding id decodes to nothing
    assert len(vocab.digest) == 64


def test_hf_vocab_without_bos(tmp_path):
    from lm.tokenizer.hf_vocab import HFVocab

    parity.tiny_tokenizer(str(tmp_path), bos=False)
    vocab = HFVocab(str(tmp_path))
    eos = vocab.tokenizer.token_to_id("</s>")
    assert vocab.bos_id is None and vocab.eos_id == eos and vocab.start_id == eos
    assert vocab.pad_id == eos and vocab.vocab_size == vocab.base_vocab_size


def test_convert_names_and_times_its_stages(imported, tmp_path, stage_updates):
    # Issue 20 item 4: a stage line (on a terminal) and a recorded time for each phase.
    from lm import stages

    updates = stage_updates
    _, hf_dir, _ = imported("gpt2")
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    seen = len(stages.timings())
    updates.clear()
    import_hf(hf_dir, workdir)
    export_hf(workdir, out)
    names = [name for name, _ in stages.timings()[seen:]]
    assert names == [
        f"reading {hf_dir}",
        "converting the tensors",
        "building the step-0 train state",
        f"writing {workdir}",
        f"reading {workdir}",
        "converting the tensors",
        f"writing {out}",
    ]
    counts = [(done, total) for name, done, total in updates if name == "converting the tensors"]
    assert counts[-1][0] == counts[-1][1] > 1 and [d for d, _ in counts] == list(
        range(1, counts[-1][1] + 1)
    )


# -- prompts follow the imported tokenizer's own BOS convention ----------------------------------


def _greedy_against_transformers(family, tokenizer, tmp_path, capsys, prompt="def add"):
    """(transformers' prompt ids, lm's prompt ids): a tiny `family` model with the `tokenizer`
    layout, converted with `lm convert`, then the same string generated greedily by
    transformers and by `lm sample` (tokens and printed text must agree)."""
    import torch
    import transformers

    from lm.cli import main
    from lm.evaluation.harness import LMEvalModel
    from lm.inference.engine import Engine, SamplingParams

    hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
    model = parity.tiny_model(family, hf_dir, tokenizer=tokenizer)
    assert main(["convert", f"--from_hf={hf_dir}", f"--workdir={workdir}"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([hf_ids]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
            eos_token_id=None,  # all 12 tokens, as lm sample keeps going past no EOS
        )
    expected = out[0, len(hf_ids) :].tolist()

    engine = Engine.from_workdir(workdir, slots=1)
    ours = engine.encode_prompt(prompt)
    assert LMEvalModel.from_engine(engine).tok_encode(prompt) == ours  # lm eval's contexts too
    (result,) = engine.generate([ours], [SamplingParams(max_tokens=12, temperature=0.0)])
    capsys.readouterr()
    args = ["sample", f"--workdir={workdir}", f"--prompt={prompt}", "--temperature=0"]
    assert main([*args, "--max_new_tokens=12"]) == 0
    printed = capsys.readouterr().out
    eos = tok.eos_token_id
    cut = expected[: expected.index(eos)] if eos in expected else expected
    assert result.token_ids[: len(cut)] == cut, (result.token_ids, expected)
    assert printed == prompt + tok.decode(cut) + "\n"
    return hf_ids, ours


def test_imported_gpt2_samples_what_transformers_generates(tmp_path, capsys):
    # GPT-2's tokenizer (ByteLevel post-processor) adds nothing before a text: neither may lm.
    hf_ids, ours = _greedy_against_transformers("gpt2", "gpt2", tmp_path, capsys)
    assert ours == hf_ids and len(hf_ids) == 4  # "def add" and no <|endoftext|>


def test_imported_llama3_prompts_start_with_its_bos(tmp_path, capsys):
    # Llama 3's tokenizer.json template puts <|begin_of_text|> first: so does lm.
    hf_ids, ours = _greedy_against_transformers("llama", "llama3", tmp_path, capsys)
    bos = json.load(open(tmp_path / "hf" / "tokenizer.json"))["added_tokens"][0]
    assert bos["content"] == "<|begin_of_text|>"
    assert ours == hf_ids and ours[0] == bos["id"] and ours.count(bos["id"]) == 1


def test_prompt_start_follows_the_tokenizer_files(tmp_path):
    from char_vocab import char_vocab

    from lm.tokenizer.hf_vocab import HFVocab
    from lm.tokenizer.vocab import SentencePieceVocab, prompt_start_id

    end = parity.gpt2_tokenizer(str(tmp_path / "gpt2"))
    gpt2 = HFVocab(str(tmp_path / "gpt2"))
    assert (gpt2.bos_id, gpt2.start_id, prompt_start_id(gpt2)) == (end, end, None)
    bos, _ = parity.llama3_tokenizer(str(tmp_path / "llama3"))
    assert prompt_start_id(HFVocab(str(tmp_path / "llama3"))) == bos
    # No post-processor: tokenizer_config.json's add_bos_token decides (transformers 4's
    # LlamaTokenizerFast built its template from it; absent, nothing is added).
    bos, _ = parity.tiny_tokenizer(str(tmp_path / "plain"))
    assert prompt_start_id(HFVocab(str(tmp_path / "plain"))) is None
    config_path = tmp_path / "plain" / "tokenizer_config.json"
    config = json.load(open(config_path))
    json.dump({**config, "add_bos_token": True}, open(config_path, "w"))
    assert prompt_start_id(HFVocab(str(tmp_path / "plain"))) == bos
    # lm's own SentencePiece runs keep BOS (id 3) before every prompt.
    sp = char_vocab(tmp_path, "sp", [], parity.TEXTS, spare=40)
    assert isinstance(sp, SentencePieceVocab) and prompt_start_id(sp) == 3


def _packed_train_rows(workdir):
    from array_record.python.array_record_module import ArrayRecordReader

    from lm.data.grain_pipeline import decode_row

    (plan,) = os.listdir(os.path.join(workdir, "data_cache"))
    reader = ArrayRecordReader(
        os.path.join(workdir, "data_cache", plan, "00-train", "rows.array_record")
    )
    features = ("inputs", "targets", "segment_ids", "positions", "weights")
    rows = [decode_row(r, features) for r in reader.read_all()]
    reader.close()
    meta = json.load(open(os.path.join(workdir, "data_cache", plan, "00-train", "meta.json")))
    return {k: np.stack([r[k] for r in rows]) for k in features}, meta


@pytest.mark.slow  # ~35 s: make test-slow; test_finetune inits from hf:DIR
def test_imported_model_samples_and_fine_tunes_on_the_stdlib(imported, tmp_path, capsys):
    import transformers

    from lm.cli import main
    from lm.config import load_experiment
    from lm.data.documents import iter_documents
    from lm.tokenizer.hf_vocab import HFVocab
    from lm.training.restore import restore_params

    _, _, workdir = imported("llama_tied")
    assert main(["sample", f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=8"]) == 0
    assert "def " in capsys.readouterr().out
    overrides = [
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=2",
        "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=2",
        "--config.train.sample_prompts=def ",
        "--config.train.sample_tokens=4",
        "--config.data.max_documents=12",
        "--config.data.curriculum.difficulty=rarity",  # scores id 0, ends documents at </s>
        "--config.data.validation_fraction=0.2",
        "--config.data.seq_len=32",
        "--config.data.batch_size=8",
        "--config.optim.warmup_steps=1",
    ]
    assert main(["train", f"--experiment={workdir}", f"--workdir={workdir}", *overrides]) == 0
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    # It fine-tuned the imported weights (not a fresh init): two small Adam steps away.
    names, start, _ = param_names(restore_params(workdir, 0)[1])
    _, end, _ = param_names(restore_params(workdir, 2)[1])
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(start, end)]
    assert 0 < max(moved) < 0.02, dict(zip(names, moved))

    # Packed with the imported tokenizer: id 0 ("!") kept and weighed, every document's EOS in.
    vocab = HFVocab(os.path.join(workdir, "tokenizer"))
    rows, meta = _packed_train_rows(workdir)
    real = rows["segment_ids"] > 0
    assert meta["tokens"] == int(real.sum())  # id 0 counts as a token (bits per byte)
    assert np.array_equal(rows["weights"] > 0, real)
    assert ((rows["targets"] == 0) & real).any()
    # Every segment (document piece) starts at position 0 with the tokenizer's BOS. Padding
    # (segment 0) has position 0 too, but is no document: input 0 (BOS at its first position,
    # where seqio's shift puts one) and weight 0.
    starts = real.copy()
    starts[:, 1:] &= rows["segment_ids"][:, 1:] != rows["segment_ids"][:, :-1]
    assert np.array_equal(starts, (rows["positions"] == 0) & real)
    assert (rows["inputs"][starts] == vocab.bos_id).all()
    cfg = load_experiment(workdir)
    assert int((rows["targets"] == vocab.eos_id).sum()) == sum(
        1 for _ in iter_documents(cfg.data, "train")
    )
    # The fine-tuned run still exports (the import record survives the saved run config).
    out = str(tmp_path / "tuned")
    assert main(["convert", f"--workdir={workdir}", f"--to_hf={out}"]) == 0
    transformers.AutoModelForCausalLM.from_pretrained(out)
