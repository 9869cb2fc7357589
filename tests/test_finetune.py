"""`lm finetune` end to end from a small trained run (`tiny_workdir`): SFT and its resume, LoRA
(what is saved, what trains, the restored merged model, serving it), DPO, the reward model,
GRPO and PPO, an init from a Hugging Face checkpoint, user errors, and every method going
through the one train loop.

Each run is a few steps (wiring, not learning: tests/test_finetune_quality.py shows what the
methods learn) and a module fixture shared by the tests that read it. References are computed
here, apart from the code under test: parameter counts from the model's dimensions, saved
shapes from orbax's own metadata, losses and greedy replies from plain forward passes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from types import SimpleNamespace

import httpx2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lm.cli import main
from tests.conftest import tiny_train_argv
from tests.train_run import records

# No sample replies in report.md (two engine compiles a run) but for the LoRA run, which checks
# them; tests/test_finetune_report.py checks what they are.
FAST = (
    "--config.train.steps_per_call=1",
    "--config.train.log_every=1",
    "--config.train.sample_tokens=0",
)
# Few examples, small batches; multiples of the batch so no odd-sized batch compiles again.
SFT = (
    "--config.finetune.max_examples=200",
    "--config.data.batch_size=8",
    "--config.train.eval_every=100",
    "--config.train.checkpoint_every=100",
)
PAIRS = (
    "--config.finetune.max_examples=80",  # 72 train / 8 held-out pairs: whole batches of 8
    "--config.data.batch_size=8",
    "--config.train.steps=4",
    "--config.train.eval_every=100",
)
ADAPTED = ("attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up")  # gelu: no mlp/gate


def finetune(experiment: str, init: str, workdir, *overrides: str) -> int:
    init_flag = [f"--init={init}"] if init else []
    return main(
        ["finetune", f"--experiment={experiment}", *init_flag, f"--workdir={workdir}", *FAST,
         *overrides]
    )  # fmt: skip


def finetune_json(workdir) -> dict:
    with open(os.path.join(workdir, "finetune.json")) as f:
        return json.load(f)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def flat(tree) -> dict[str, np.ndarray]:
    """keystr -> numpy array of every leaf (nnx State or plain dict)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p).replace(".value", ""): np.asarray(x) for p, x in leaves}


def saved_shapes(workdir, step: int) -> dict[str, tuple]:
    """name -> global shape of every array of a checkpoint, read from orbax's metadata."""
    meta = ocp.StandardCheckpointer().metadata(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in leaves}


def size(shapes: dict[str, tuple], prefix: str) -> tuple[int, int]:
    """(leaf count, scalar count) of the arrays under `prefix`."""
    picked = [s for name, s in shapes.items() if name.startswith(prefix)]
    return len(picked), sum(math.prod(s) for s in picked)


def model_dims(workdir) -> dict:
    """The model's dimensions from the run's config.json (defaults resolved by hand)."""
    with open(os.path.join(workdir, "config.json")) as f:
        m = json.load(f)["model"]
    heads = m["num_heads"]
    return dict(
        layers=m["num_layers"],
        d=m["d_model"],
        q=heads * (m["head_dim"] or m["d_model"] // heads),
        kv=(m["num_kv_heads"] or heads) * (m["head_dim"] or m["d_model"] // heads),
        ff=m["d_ff"],
        mlp=m["mlp"],
    )


def lora_count(dims: dict, rank: int) -> int:
    """rank * (n_in + n_out) over the adapted Dense modules of every layer."""
    d, q, kv, ff = dims["d"], dims["q"], dims["kv"], dims["ff"]
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + (d + ff) + (ff + d)
    assert dims["mlp"] == "gelu"  # a gated MLP would add mlp/gate: (d + ff)
    return rank * per_layer * dims["layers"]


_forward = jax.jit(
    lambda graphdef, params, tokens: nnx.merge(graphdef, params)(
        tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), jnp.ones_like(tokens)
    )[0],
    static_argnums=0,
)


def logits_of(graphdef, params, tokens) -> np.ndarray:
    return np.asarray(_forward(graphdef, params, jnp.asarray(tokens, jnp.int32)))


_rows_forward = jax.jit(
    lambda graphdef, params, rows: nnx.merge(graphdef, params)(
        rows["inputs"], rows["positions"], rows["segment_ids"]
    )[0],
    static_argnums=0,
)


def logits_of_rows(graphdef, params, rows: dict) -> np.ndarray:
    keys = ("inputs", "positions", "segment_ids")
    return np.asarray(_rows_forward(graphdef, params, {k: jnp.asarray(rows[k]) for k in keys}))


def greedy_by_hand(graphdef, params, prompt: list[int], max_tokens: int, stop: set[int]):
    """Greedy decoding with a full forward pass per token (no cache): causal, so the logits at
    the last real position ignore the right padding; one compile for the padded length."""
    ids = list(prompt)
    length = len(prompt) + max_tokens
    out = []
    for _ in range(max_tokens):
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(ids)] = ids
        token = int(np.argmax(logits_of(graphdef, params, tokens)[0, len(ids) - 1]))
        if token in stop:
            break
        ids.append(token)
        out.append(token)
    return out


# -- the runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def loop_calls():
    """Every entry into the one train loop (`lm.training.loop._loop`) during this module: the
    workdir, the step it starts from and the summary's `resumed_from`."""
    from lm.training import loop

    calls: list[dict] = []
    real = loop._loop

    def counted(*args, **kwargs):
        call = {"workdir": str(args[1]), "start": int(args[5])}
        calls.append(call)
        state, summary = real(*args, **kwargs)
        call["resumed_from"] = summary["resumed_from"]
        return state, summary

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "_loop", counted)
        yield calls


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def sft(tiny_workdir, root):
    """SFT for 4 steps, then the same command with 8 steps (a resume from checkpoint 4)."""
    workdir = str(root / "sft")
    assert finetune("sft_tiny", tiny_workdir, workdir, "--config.train.steps=4", *SFT) == 0
    first = sorted(records(workdir))
    assert finetune("sft_tiny", tiny_workdir, workdir, "--config.train.steps=8", *SFT) == 0
    return SimpleNamespace(workdir=workdir, first_steps=first)


@pytest.fixture(scope="module")
def lora(tiny_workdir, root):
    from lm.training.restore import restore_run

    base_ckpts = sorted(os.listdir(os.path.join(tiny_workdir, "checkpoints")))
    base_before = flat(restore_run(tiny_workdir).params)
    workdir = str(root / "lora")
    steps, samples = "--config.train.steps=4", "--config.train.sample_tokens=8"
    assert finetune("lora_tiny", tiny_workdir, workdir, steps, samples, *SFT) == 0
    return SimpleNamespace(
        workdir=workdir, base=tiny_workdir, base_before=base_before, base_ckpts=base_ckpts
    )


@pytest.fixture(scope="module")
def dpo(sft, root):
    workdir = str(root / "dpo")
    assert finetune("dpo_tiny", sft.workdir, workdir, *PAIRS) == 0
    return workdir


@pytest.fixture(scope="module")
def rm(sft, root):
    workdir = str(root / "rm")
    assert finetune("rm_tiny", sft.workdir, workdir, *PAIRS) == 0
    return workdir


@pytest.fixture(scope="module")
def prompts(root):
    """RL prompts short enough for the tiny run's 128-token context under its 320-piece
    tokenizer (the stdlib prompts' fixed preamble alone is ~60 of its tokens)."""
    from lm.finetune.make_data import PROMPT_PREFIX, verifiable

    path = root / "prompts.jsonl"
    with open(path, "w") as f:
        for item in verifiable(40, 0):
            text = item.prompt[0]["content"].removeprefix(PROMPT_PREFIX)[:40]
            f.write(json.dumps({"prompt": text, "answer": item.answer}) + "\n")
    return str(path)


RL = (
    "--config.train.steps=2",
    "--config.train.eval_every=100",
    "--config.data.batch_size=8",
    "--config.finetune.rl.max_new_tokens=8",
)
GROUPS = ("--config.finetune.rl.prompts_per_step=2", "--config.finetune.rl.group_size=4")


def length_reward(prompt_text: str, completion: str, answer: str | None) -> float:
    """A reward by `module:function` that varies inside a group (the 8-step SFT model writes no
    signature yet, so `signature` would score every sample 0 and no group would teach)."""
    return float(len(completion))


@pytest.fixture(scope="module")
def grpo(sft, prompts, root):
    workdir = str(root / "grpo")
    reward = "--config.finetune.rl.reward=tests.test_finetune:length_reward"
    assert finetune(
        "grpo_tiny", sft.workdir, workdir, f"--config.finetune.data={prompts}", reward, *RL,
        *GROUPS,
    ) == 0  # fmt: skip
    return workdir


@pytest.fixture(scope="module")
def ppo(sft, rm, prompts, root):
    workdir = str(root / "ppo")
    assert finetune(
        "ppo_tiny", sft.workdir, workdir, f"--config.finetune.data={prompts}", *RL,
        "--config.finetune.rl.prompts_per_step=8", f"--config.finetune.rl.reward_model={rm}",
    ) == 0  # fmt: skip
    return workdir


# -- SFT ---------------------------------------------------------------------------------------


def test_sft_lowers_the_held_out_loss(sft):
    record = finetune_json(sft.workdir)
    before, after = record["validation_before"], record["validation"]
    assert record["method"] == "sft" and record["steps"] == 8
    assert before["weight"] == after["weight"] > 0  # the same held-out tokens
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    data = record["data"]
    assert data["train_examples"] + data["held_out_examples"] == 200


def test_sft_checkpoint_restores_and_samples(sft, capsys):
    """The restored params are the final ones: a hand-written weighted cross-entropy over the
    held-out rows reproduces finetune.json's validation loss; `lm sample` reads the workdir."""
    from lm.finetune.run import offline_data
    from lm.training.restore import restore_run

    run = restore_run(sft.workdir)
    assert run.step == 8
    _, held, _ = offline_data(run.cfg, run.vocab)
    logits = logits_of_rows(run.trainer.graphdef, run.params, held)
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), held["targets"][..., None], axis=-1)[..., 0]
    loss = float(np.sum(nll * held["weights"]) / np.sum(held["weights"]))
    assert loss == pytest.approx(finetune_json(sft.workdir)["validation"]["loss"], abs=1e-3)

    capsys.readouterr()
    argv = ["sample", f"--workdir={sft.workdir}", "--prompt=the model", "--max_new_tokens=5"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "(checkpoint 8)" in out.err
    assert out.out.startswith("the model") and len(out.out.strip()) > len("the model")


def test_sft_resume_continues_from_the_checkpoint(sft, loop_calls):
    runs = [c for c in loop_calls if c["workdir"] == sft.workdir]
    assert [c["start"] for c in runs] == [0, 4]
    assert [c["resumed_from"] for c in runs] == [0, 4]
    assert sft.first_steps == [1, 2, 3, 4]
    assert sorted(records(sft.workdir)) == list(range(1, 9))  # each step logged once
    assert sorted(records(sft.workdir, "validation")) == [4, 8]
    assert sorted(os.listdir(os.path.join(sft.workdir, "checkpoints"))) == ["4", "8", "data"]


# -- LoRA --------------------------------------------------------------------------------------


def test_lora_checkpoint_holds_only_the_adapters(lora):
    dims = model_dims(lora.base)
    with open(os.path.join(lora.workdir, "adapter.json")) as f:
        adapter = json.load(f)
    expected = [f"blocks/{i}/{m}" for i in range(dims["layers"]) for m in ADAPTED]
    assert adapter["paths"] == expected
    assert adapter["rank"] == 8 and adapter["alpha"] == 16.0

    saved = saved_shapes(lora.workdir, 4)
    base = saved_shapes(lora.base, max(int(s) for s in lora.base_ckpts if s.isdigit()))
    params = [n[2:-2].split("']['") for n in saved if n.startswith("['params']")]
    # Exactly an A [n_in, rank] and a B [rank, n_out] per adapted module, nothing else.
    assert sorted(("/".join(p[1:-2]), p[-2], p[-1]) for p in params) == [
        (path, ab, "value") for path in expected for ab in ("lora_a", "lora_b")
    ]
    count = lora_count(dims, rank=8)
    assert size(saved, "['params']") == (2 * len(expected), count)
    base_leaves, base_size = size(base, "['params']")
    assert base_leaves > 2 * len(expected) and base_size > 5 * count
    # Adam's two moments are adapter-sized as well.
    for moment in ("mu", "nu"):
        shapes = {n: s for n, s in saved.items() if n.startswith("['opt_state']")}
        shapes = {n: s for n, s in shapes.items() if f"['{moment}']" in n}
        assert size(shapes, "") == (2 * len(expected), count), moment


def test_lora_trains_the_adapters_with_adapter_sized_optimizer_state(lora):
    """The trainable count is rank * (n_in + n_out) summed over the adapted modules; the
    optimizer state is Adam's two moments of the adapters, not of the model."""
    from lm import sharding
    from lm.finetune.objectives import make_objective
    from lm.models.transformer import ModelConfig
    from lm.tokenizer.vocab import load_vocab
    from lm.training.setup import load_run_config
    from lm.training.train_step import Trainer

    count = lora_count(model_dims(lora.base), rank=8)
    record = finetune_json(lora.workdir)
    assert record["trainable_params"] == count
    assert (
        record["adapter"]["paths"]
        == json.load(open(os.path.join(lora.workdir, "adapter.json")))["paths"]
    )

    cfg = load_run_config(lora.workdir)
    vocab = load_vocab(cfg.tokenizer.path, cfg.tokenizer.get("extra_ids", 0))
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    full_cfg = cfg.copy_and_resolve_references()
    full_cfg.finetune.lora.rank = 0

    def state_bytes(c) -> tuple[int, int]:
        state = Trainer(c, model_cfg, mesh, make_objective(c)).abstract_state
        nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
        return nbytes(state.params), nbytes(state.opt_state)

    lora_params, lora_opt = state_bytes(cfg)
    full_params, full_opt = state_bytes(full_cfg)
    assert lora_params == 4 * count
    assert abs(lora_opt - 2 * lora_params) <= 64  # mu and nu (+ a few scalar counters)
    assert abs(full_opt - 2 * full_params) <= 64
    assert full_params > 5 * lora_params


def test_lora_leaves_the_base_unchanged(lora):
    from lm.finetune.restore import restore_finetuned
    from lm.training.restore import restore_run

    assert sorted(os.listdir(os.path.join(lora.base, "checkpoints"))) == lora.base_ckpts
    after = flat(restore_run(lora.base).params)
    assert after.keys() == lora.base_before.keys()
    for name, value in lora.base_before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # The run's frozen weights are the base's, bit for bit.
    run = restore_finetuned(lora.workdir, restore_base=restore_run, as_language_model=False)
    frozen = flat(run.trainer.frozen)
    assert frozen.keys() == lora.base_before.keys()
    for name, value in lora.base_before.items():
        np.testing.assert_array_equal(frozen[name], value, err_msg=name)


def _hand_lora_model(lora):
    """The base model with adapters added by hand and set to the checkpoint's A and B, read
    with orbax directly (no lm restore code): the unmerged base + adapters model."""
    from lm.finetune.lora import add_lora, has_lora
    from lm.training.restore import restore_run

    base = restore_run(lora.base)
    model = nnx.merge(base.trainer.graphdef, base.params)
    with open(os.path.join(lora.workdir, "adapter.json")) as f:
        meta = json.load(f)
    paths = add_lora(model, ml_collections.ConfigDict(meta), nnx.Rngs(123))
    assert paths == meta["paths"]
    saved = ocp.StandardCheckpointer().restore(
        os.path.join(lora.workdir, "checkpoints", "4", "state")
    )["params"]
    for path, module in nnx.iter_modules(model):
        if has_lora(module):
            node = saved
            for key in path:
                node = node[str(key)]
            module.lora_a.set_value(jnp.asarray(np.asarray(node["lora_a"]["value"])))
            module.lora_b.set_value(jnp.asarray(np.asarray(node["lora_b"]["value"])))
            assert np.abs(np.asarray(node["lora_b"]["value"])).max() > 0  # B has trained
    return base, model


@pytest.fixture(scope="module")
def merged(lora):
    """`restore_run` of the LoRA workdir: the base with the adapters merged in."""
    from lm.training.restore import restore_run

    return restore_run(lora.workdir)


def test_lora_restores_as_base_plus_adapters_merged(lora, merged):
    from lm.finetune.lora import has_lora

    plain = nnx.merge(merged.trainer.graphdef, merged.params)
    assert not any(has_lora(m) for _, m in nnx.iter_modules(plain))
    base, by_hand = _hand_lora_model(lora)
    tokens = np.random.default_rng(0).integers(0, merged.vocab.vocab_size, (2, 48))
    want = logits_of(*nnx.split(by_hand, nnx.Param), tokens)
    got = logits_of(merged.trainer.graphdef, merged.params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    base_logits = logits_of(base.trainer.graphdef, base.params, tokens)
    assert np.abs(got - base_logits).max() > 1e-3  # the adapters change the model


def test_lora_workdir_serves_the_merged_model(lora, merged):
    from lm.inference.engine import Engine
    from lm.serve.app import create_app
    from lm.serve.runner import ServerThread
    from lm.tokenizer.chat import apply_chat_template, chat_stop_token_ids

    messages = [{"role": "user", "content": "Write the signature of a function that adds."}]
    engine = Engine.from_workdir(lora.workdir, slots=8)
    try:
        with ServerThread(create_app(engine, model_name="lora", owns_engine=False)) as url:
            reply = httpx2.post(
                url + "/v1/chat/completions",
                json={"model": "lora", "messages": messages, "max_tokens": 8, "temperature": 0},
                timeout=120,
            )
    finally:
        engine.shutdown()
    assert reply.status_code == 200, reply.text
    served = reply.json()["choices"][0]["message"]["content"]

    prompt = apply_chat_template(merged.vocab, messages, add_generation_prompt=True)
    stop = set(chat_stop_token_ids(merged.vocab))
    ids = greedy_by_hand(merged.trainer.graphdef, merged.params, prompt, 8, stop)
    assert ids and served == merged.vocab.decode(ids)


# -- DPO and the reward model ------------------------------------------------------------------


def test_dpo_logs_its_metrics_and_its_reference_is_the_init_policy(dpo):
    rows = records(dpo)
    assert sorted(rows) == [1, 2, 3, 4]
    for row in rows.values():
        for key in ("rewards/margin", "rewards/accuracy", "preference_accuracy", "loss"):
            assert math.isfinite(row[key]), (key, row)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy == reference
    record = finetune_json(dpo)
    before = record["validation_before"]
    # The reference log-probs were computed once from the init params, the same way the
    # policy's are: before any update every implicit reward is 0 and the loss is log 2.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(before[key]) < 1e-4, (key, before)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert record["validation"]["rewards/margin"] > before["rewards/margin"]
    assert record["data"]["held_out_examples"] == 8


def test_reward_model_logs_accuracy(rm):
    rows = records(rm)
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows.values())
    record = finetune_json(rm)
    assert {"accuracy", "rewards/margin"} <= set(record["validation"])
    assert record["validation"]["loss"] < record["validation_before"]["loss"]


# -- GRPO and PPO ------------------------------------------------------------------------------


def test_grpo_logs_rollout_metrics(grpo):
    rows = records(grpo)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert row["rollout/reward_mean"] >= 0.0
        assert 0.0 <= row["rollout/zero_std_groups"] <= 1.0
        assert math.isfinite(row["rollout/kl"]) and math.isfinite(row["loss"])
    # Step 1 samples from the initial policy, which is the reference.
    assert abs(rows[1]["rollout/kl"]) < 1e-3, rows[1]
    # The rewards vary inside the groups, so the step has a policy gradient.
    assert rows[1]["rollout/zero_std_groups"] < 1.0 and rows[1]["grad_norm"] > 0, rows[1]
    record = finetune_json(grpo)
    assert "reward" in record["validation_before"] and "reward" in record["validation"]


def test_ppo_with_a_reward_model_logs_value_loss_and_kl_coef(ppo):
    rows = records(ppo)
    assert sorted(rows) == [1, 2]
    from lm.config import get_config

    initial = get_config("ppo_tiny").finetune.rl.kl_coef
    assert rows[1]["rollout/kl_coef"] == pytest.approx(initial)  # before any update
    for row in rows.values():
        assert math.isfinite(row["value_loss"]) and row["value_loss"] >= 0
        assert math.isfinite(row["rollout/reward_mean"])
    assert abs(rows[1]["rollout/kl"]) < 1e-3, rows[1]


def test_rl_config_errors_are_one_line(sft, prompts, root, capsys):
    capsys.readouterr()
    data = f"--config.finetune.data={prompts}"
    assert finetune("ppo_tiny", sft.workdir, root / "ppo-no-rm", data, *RL) == 2
    assert "reward_model" in one_error_line(capsys)
    bad = "--config.finetune.rl.reward=no_such_reward"
    assert finetune("grpo_tiny", sft.workdir, root / "grpo-bad", data, bad, *RL, *GROUPS) == 2
    assert "unknown finetune.rl.reward 'no_such_reward'" in one_error_line(capsys)


# -- init from Hugging Face --------------------------------------------------------------------


def test_init_from_a_hugging_face_checkpoint(root, caplog):
    """An hf: init is converted into <workdir>/base and trained with the fine-tuning recipe for
    imported checkpoints (the experiment sets no optim for it): peak lr 2e-5 * sqrt(4096 /
    hidden_size) clipped to [1e-5, 1e-4], warmup 3% of the steps (at least 1), no decay."""
    pytest.importorskip("transformers")
    from lm.convert import parity
    from lm.training.restore import restore_run

    hf_dir = str(root / "hf-llama")
    parity.tiny_model("llama", hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        width = json.load(f)["hidden_size"]
    peak = min(1e-4, max(1e-5, 2e-5 * math.sqrt(4096 / width)))
    workdir = str(root / "from-hf")
    overrides = ("--config.train.steps=4", "--config.finetune.max_examples=40",
                 "--config.data.batch_size=8", "--config.train.eval_every=100")  # fmt: skip
    with caplog.at_level("INFO"):
        assert finetune("sft_tiny", f"hf:{hf_dir}", workdir, *overrides) == 0
    base = os.path.join(workdir, "base")
    assert os.path.exists(os.path.join(base, "config.json"))
    rows = records(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    # Step n logs the rate of its update n - 1: 0 in the one warmup step, then the peak.
    assert rows[1]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(peak, rel=1e-6)
    assert max(r["lr"] for r in rows.values()) == pytest.approx(peak, rel=1e-6)
    with open(os.path.join(workdir, "config.json")) as f:
        optim = json.load(f)["optim"]
    assert optim["warmup_steps"] == 1 and optim["weight_decay"] == 0.0
    assert "fine-tuning recipe" in caplog.text and "pretraining learning rate" not in caplog.text
    tuned, converted = flat(restore_run(workdir).params), flat(restore_run(base).params)
    assert tuned.keys() == converted.keys()
    assert all(tuned[k].shape == converted[k].shape for k in tuned)
    assert any(not np.array_equal(tuned[k], converted[k]) for k in tuned)  # it trained
    record = finetune_json(workdir)
    assert record["init"] == f"hf:{hf_dir}" and record["recipe"] is True


# -- reports ---------------------------------------------------------------------------------


def test_every_method_writes_a_report_of_its_run(sft, lora, dpo, rm, grpo, ppo):
    """report.md, loss_curve.png and the validation table of every method; sample replies
    for the LoRA run (its adapters merged for the engine), none for the reward model."""
    runs = [(sft.workdir, "sft"), (lora.workdir, "sft"), (dpo, "dpo"), (rm, "rm"),
            (grpo, "grpo"), (ppo, "ppo")]  # fmt: skip
    for workdir, method in runs:
        with open(os.path.join(workdir, "report.md")) as f:
            report = f.read()
        assert f"| method | {method} |" in report, workdir
        assert os.path.getsize(os.path.join(workdir, "loss_curve.png")) > 0
        record = finetune_json(workdir)
        before, after = record["validation_before"], record["validation"]
        for key in set(after) - {"weight"}:
            assert f"| {key} | {before[key]:.4f} | {after[key]:.4f} |" in report, (workdir, key)
    with open(os.path.join(lora.workdir, "report.md")) as f:
        assert "| LoRA | rank 8, alpha 16.0 |" in f.read()
    samples = finetune_json(lora.workdir)["samples"]
    assert len(samples) == 3 and all(isinstance(s["after"], str) for s in samples)
    assert finetune_json(rm)["samples"] == []


# -- user errors -------------------------------------------------------------------------------


def test_user_errors_are_one_line(tiny_workdir, root, capsys):
    capsys.readouterr()
    assert finetune("sft_tiny", "", root / "e1") == 2
    assert "set --init=" in one_error_line(capsys)

    empty = root / "empty"
    empty.mkdir()
    assert finetune("sft_tiny", str(empty), root / "e2") == 2
    assert f"--init={empty}: no run there" in one_error_line(capsys)

    missing = root / "missing.jsonl"
    assert finetune("sft_tiny", tiny_workdir, root / "e3", f"--config.finetune.data={missing}") == 2
    assert f"data file '{missing}' does not exist" in one_error_line(capsys)

    bad = root / "bad.jsonl"
    bad.write_text('{"messages": "no"}\nnot json\n{"prompt": "only a prompt"}\n')
    assert finetune("sft_tiny", tiny_workdir, root / "e4", f"--config.finetune.data={bad}") == 2
    line = one_error_line(capsys)
    assert "all 3 records rejected" in line and "bad_json=1" in line, line


# -- the one train loop ------------------------------------------------------------------------


def test_train_and_every_finetune_method_run_in_the_one_loop(
    tiny_workdir, sft, dpo, grpo, root, loop_calls
):
    """`lm train` (one more step of a copy of the tiny run: its tokenizer and data caches come
    along) and the SFT, DPO and GRPO fine-tunes all entered `_loop`."""
    workdir = str(root / "train")
    shutil.copytree(tiny_workdir, workdir)
    corpus = os.path.join(os.path.dirname(tiny_workdir), "corpus.txt")
    assert main(tiny_train_argv(workdir, corpus, "--config.train.steps=31")) == 0
    assert {"workdir": workdir, "start": 30, "resumed_from": 30} in loop_calls
    entered = {c["workdir"] for c in loop_calls}
    for run in (sft.workdir, dpo, grpo):
        assert str(run) in entered, run
