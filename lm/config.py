"""Experiment configs: the default schema, loading `experiments/<name>.py`, command-line overrides.

Every experiment is a plain function `get_config()` that starts from `default_config()` and changes
what it needs. The schema is small and grouped: model, data, tokenizer, optim, train, mesh.
Overrides are `--config.a.b=value` strings; a key that does not exist, or a value of the wrong
type, raises `ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import pkgutil
from collections.abc import Sequence
from types import ModuleType

import ml_collections

import experiments
from lm.config_checks import check_values
from lm.data.sources import COMPONENT_KEYS, DOC_KEYS
from lm.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
    """The full schema with defaults; experiments override a few values."""
    c = ml_collections.ConfigDict()
    c.description = ""
    c.seed = 0

    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=0,  # 0: take it from the tokenizer.
            num_layers=2,
            d_model=128,
            num_heads=4,
            num_kv_heads=0,  # 0: same as num_heads (multi-head); fewer gives grouped-query attn.
            head_dim=0,  # 0: d_model // num_heads.
            d_ff=512,
            max_seq_len=256,
            position="learned",  # learned | rope
            rope_theta=10000.0,
            norm="layernorm",  # layernorm | rmsnorm
            norm_eps=1e-5,
            mlp="gelu",  # gelu | swiglu | geglu
            use_bias=True,
            tie_embeddings=True,
            dropout=0.0,
            init_std=0.02,
            dtype="auto",  # auto (bfloat16 off-CPU, float32 on CPU) | float32 | bfloat16
            param_dtype="float32",
            remat="none",  # none | full | dots (save matmul outputs, recompute the rest)
            scan_layers=False,
            # auto (einsum on CPU, cudnn on GPU, splash on TPU) | xla | cudnn | splash | einsum
            attention="auto",
            causal=True,  # False: bidirectional attention (BERT-style masked LM)
            loss_chunk=0,  # >0: cross-entropy over chunks of this many positions (no full logits)
            qkv_bias=False,  # bias on the q/k/v projections only (Qwen2), whatever use_bias says
            # Attention pattern, cycled over layers: G global, L local (sliding window).
            # "G": all global; "L": all local (Mistral); "LG": alternating (Gemma 2).
            attention_pattern="G",
            sliding_window=0,  # tokens a local layer sees, itself included; needs an L layer
            attn_logit_softcap=0.0,  # >0: cap * tanh(logits / cap) on attention logits (Gemma 2)
            final_logit_softcap=0.0,  # >0: the same on the output logits
            post_norms=False,  # also norm each sublayer's output before the residual (Gemma 2)
            embed_scale=False,  # token embeddings times sqrt(d_model) (Gemma)
            # Mixture of experts (lm/models/layers/moe.py); num_experts 0 is a dense model.
            num_experts=0,
            experts_per_token=2,
            num_shared_experts=0,  # always-on experts beside the routed ones (DeepSeekMoE)
            moe_d_ff=0,  # hidden size of one expert; 0: d_ff
            moe_every=1,  # every k-th layer is MoE (counting after moe_first_dense)
            moe_first_dense=0,  # the first n layers stay dense
            router="softmax",  # softmax (top-k of softmax) | sigmoid (scores + bias, DeepSeek-V3)
            router_norm_topk=True,  # renormalize the k chosen gates to sum to 1 (Mixtral)
            moe_dispatch="dropless",  # dropless (sorted + grouped matmul) | capacity (drops)
            capacity_factor=1.25,  # capacity mode: slots per expert = factor * tokens * k / E
            # Dropless kernel: auto (tokamax on GPU/TPU, ragged_dot on CPU) | ragged_dot
            # (jax.lax) | tokamax | tiled (tiles of one expert, per-tile weights: small CPU models)
            grouped_matmul="auto",
            load_balance_weight=0.01,  # Switch Transformer load-balancing loss weight
            router_z_weight=0.001,  # ST-MoE router z-loss weight
            router_bias_rate=0.001,  # sigmoid router: bias step toward balanced load (aux-free)
            # Weight-only quantization for inference, written by `lm quantize` (training needs 0):
            # 8 | 4 bits per Dense/Embed weight, weight_group_size weights per scale (0: per
            # output channel).
            weight_bits=0,
            weight_group_size=0,
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            source="stdlib",  # stdlib | text | dir | jsonl | tfds | curated | task | mixture
            path="",  # file or directory for text / dir / jsonl; `lm data run` output for curated
            include="*.py,*.txt,*.md,*.rst",  # globs for `dir` and `stdlib`
            exclude="",
            jsonl_field="text",
            tfds_name="",  # e.g. "tiny_shakespeare" (needs the data prepared locally)
            tfds_split="train",
            task="",  # a registered seqio Task or Mixture name (source=task)
            max_documents=0,  # 0: all
            max_file_bytes=1_000_000,
            validation_fraction=0.02,
            seq_len=128,
            batch_size=16,  # global batch, in rows of seq_len tokens
            shuffle_seed=0,
            cache_dir="",  # "": <workdir>/data_cache
            # grain: threads reading rows (-1: none on a host of <= 4 cores, where they slow
            # the step by 3-6%, else cores // 4 up to 8) and batches read ahead. grain's
            # defaults (16, 500) held ~2.5 bytes of RSS per byte of a 100 MB pack.
            read_threads=-1,
            prefetch_batches=16,
            objective="lm",  # lm | mlm (BERT; needs model.causal=False) | span_corruption (T5)
            # source=mixture: name -> dict(rate=, final_rate=, source=, ...); lm/data/mixture.py
            mixture=ml_collections.ConfigDict(),
            curriculum=ml_collections.ConfigDict(
                dict(
                    seq_len_warmup_steps=0,  # 0: off; else rows grow from seq_len_start to seq_len
                    seq_len_start=32,
                    difficulty="none",  # none | length | rarity: easiest documents first
                    competence_start=0.1,  # fraction of the easiest rows open at step 0
                    competence_steps=0,  # steps until all rows are open; 0: train.steps // 2
                    mixture_steps=0,  # steps over which mixture rates move to their final_rate
                )
            ),
        )
    )

    c.tokenizer = ml_collections.ConfigDict(
        dict(
            path="",  # an existing SentencePiece .model; "" trains one into <workdir>/tokenizer
            kind="bpe",  # bpe | unigram | char
            vocab_size=2048,
            byte_fallback=True,
            train_max_bytes=20_000_000,
            special_tokens="<|system|>,<|user|>,<|assistant|>,<|end|>",
            extra_ids=0,  # ids appended after the pieces: [MASK] / T5 sentinels (masked objectives)
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=3e-3,
            schedule="cosine",  # cosine | linear | constant
            warmup_steps=50,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
            grad_accum_steps=1,
            spike_factor=5.0,  # skip an update whose loss exceeds this x the running mean; 0: off
            max_consecutive_skips=20,  # stop with an error after this many skips in a row
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=200,
            log_every=10,
            eval_every=100,
            eval_batches=8,
            checkpoint_every=100,
            keep_checkpoints=3,
            async_checkpoints=True,
            sample_prompts="def |import |class ",  # '|'-separated prompts for report samples
            sample_tokens=64,
            # Steps run per jitted call (a lax.scan over the step): saves the per-call host
            # work that small models on CPU pay every step. Groups start at multiples of it;
            # steps near a log/eval/checkpoint step that falls inside a group run one by one.
            steps_per_call=1,
            profile_steps=0,  # > 0: a jax.profiler trace of this many steps, <workdir>/profile
        )
    )

    c.mesh = ml_collections.ConfigDict(
        dict(
            data=-1,  # -1: the devices the other axes leave
            fsdp=1,
            expert=1,  # expert parallelism: experts sharded, tokens moved by all-to-all
            tensor=1,
            # Logical axis -> mesh axes. A logical name not listed here is replicated.
            rules=(
                # The expert axis is data-parallel outside the MoE layers.
                ("batch", ("data", "fsdp", "expert")),
                ("experts", "expert"),
                ("vocab", "tensor"),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
                ("kv_heads", "tensor"),
                ("head_dim", None),
                ("seq", None),
                ("layers", None),
            ),
        )
    )

    c.quant = ml_collections.ConfigDict(
        dict(
            # Quantized training through qwix: none | int8 | fp8 (where the backend has it).
            training="none",
            # Module-path regexes quantized in training (qwix rules); others stay in full precision.
            module_paths=".*",
        )
    )
    c.finetune = finetune_defaults()
    return c


def finetune_defaults() -> ml_collections.ConfigDict:
    """`lm finetune`: what to start from, on which data, with which objective (lm/finetune)."""
    return ml_collections.ConfigDict(
        dict(
            # sft | lm (continued pretraining, domain adaptation) | rm | dpo | ppo | grpo
            method="sft",
            init="",  # the run to start from: a workdir, or hf:DIR (a Hugging Face checkpoint)
            # JSONL (local or gs://), or project-made data: stdlib:instructions |
            # stdlib:preferences | stdlib:verifiable (lm/finetune/make_data.py)
            data="",
            eval_data="",  # "": a held-out slice of `data` (eval_fraction)
            eval_fraction=0.1,
            eval_prompts=64,  # grpo / ppo: held-out prompts answered greedily at each validation
            max_examples=0,  # 0: all
            # lm-eval tasks run on the init model and on the result (before / after), e.g.
            # lm_py_perplexity: what was kept or forgotten, next to what was learned
            eval_tasks="",
            eval_limit=0,  # docs per eval task; 0: all
            domain="",  # method lm on a mixture: the component that is the new domain
            lora=ml_collections.ConfigDict(
                dict(
                    rank=0,  # 0: full fine-tuning
                    alpha=16.0,  # the update is scaled by alpha / rank
                    dropout=0.0,
                    # regex over module paths like blocks/0/attn/q, blocks/1/mlp/down
                    pattern=r".*(attn/(q|k|v|o)|mlp/(gate|up|down))$",
                )
            ),
            dpo=ml_collections.ConfigDict(
                # nll_weight > 0: RPO, DPO plus that times the chosen answers' NLL per token
                dict(beta=0.1, label_smoothing=0.0, reference_free=False, nll_weight=0.0)
            ),
            rl=ml_collections.ConfigDict(
                dict(
                    prompts_per_step=8,
                    group_size=4,  # GRPO: samples per prompt (G)
                    max_new_tokens=24,
                    temperature=1.0,
                    top_p=1.0,
                    clip_eps=0.2,
                    kl_beta=0.04,  # GRPO: KL to the reference (k3 estimator)
                    reward="signature",  # a name in lm/finetune/rewards.py, or module:function
                    reward_model="",  # PPO: the workdir of an `rm` run
                    kl_coef=0.05,  # PPO: initial KL penalty coefficient
                    kl_target=6.0,  # PPO: adaptive KL target (nats per sequence)
                    kl_horizon=10000,  # episodes (samples) over which the coefficient adapts
                    gamma=1.0,
                    lam=0.95,
                    value_clip=0.2,
                    value_coef=0.1,
                    resample_rounds=2,  # GRPO: rounds replacing all-equal-reward groups
                )
            ),
        )
    )


def mixture_component(
    data: ml_collections.ConfigDict, rate: float, final_rate: float = -1.0, **keys: object
) -> dict:
    """One `data.mixture` entry: the data group's document keys with `keys` changed, and rates.

    Every key is present, so each can be overridden (`--config.data.mixture.web.rate=0.5`).
    `final_rate` < 0 keeps `rate` for the whole run (see data.curriculum.mixture_steps).
    """
    unknown = sorted(set(keys) - set(COMPONENT_KEYS))
    if unknown:
        raise ConfigError(f"mixture component keys {unknown} are not document keys {DOC_KEYS}")
    return {
        "rate": float(rate),
        "final_rate": float(final_rate),
        "task": data.task,
        **{k: data[k] for k in DOC_KEYS},
        **keys,
    }


def list_configs(package: ModuleType) -> dict[str, str]:
    """Name -> one-line description of every module with `get_config()` in `package`."""
    out = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "get_config"):
            out[info.name] = ((module.__doc__ or "").strip().splitlines() or [""])[0]
    return out


def load_config(package: ModuleType, name: str, kind: str) -> ml_collections.ConfigDict:
    """`<package>/<name>.py`'s `get_config()`; an unknown name suggests close matches."""
    names = list_configs(package)
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(names)}.")
    return importlib.import_module(f"{package.__name__}.{name}").get_config()


def list_experiments() -> dict[str, str]:
    """Name -> one-line description of every module in `experiments/`."""
    return list_configs(experiments)


def load_experiment(name: str) -> ml_collections.ConfigDict:
    """Imports `experiments/<name>.py` and returns its `get_config()`. A path (it has a `/`
    or ends in .json) names a run instead: its workdir or its config.json, e.g. a workdir
    `lm convert --from_hf` wrote, so `lm train --experiment=W --workdir=W` fine-tunes it."""
    if "/" in name or name.endswith(".json"):
        return load_run_experiment(name)
    return load_config(experiments, name, "experiment")


def load_run_experiment(path: str) -> ml_collections.ConfigDict:
    """A saved run config (`<path>/config.json`, or `path` itself) laid over `default_config()`,
    so keys added since it was saved keep their defaults and every key is overridable."""
    from lm import jsonio, storage

    file = path if path.endswith(".json") else storage.join(path, "config.json")
    if not storage.exists(file):
        raise ConfigError(f"--experiment={path}: no run config at {file}")
    try:
        saved = jsonio.read_json(file)
    except jsonio.JSONError as e:
        raise ConfigError(f"--experiment={path}: {e}") from None
    cfg = default_config()
    _lay_over(cfg, saved)
    return cfg


def _lay_over(cfg: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        current = cfg.get(key) if key in cfg else None
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            _lay_over(current, value)
        elif key not in cfg:
            cfg[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
        elif isinstance(current, tuple) and isinstance(value, list):
            cfg[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(current, float) and isinstance(value, int):
            cfg[key] = float(value)
        else:
            cfg[key] = value


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _a_type(value: object) -> str:
    """ "an int", "a float", "a tuple": the type of `value` with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _parse_value(text: str, current: object, key: str) -> object:
    """Parses `text` into the type of `current`, or raises ConfigError naming `key`."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key} expects true or false, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key} expects {_a_type(current)}, got {text!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key} expects {_a_type(current)}, got {text!r}")
    return value


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies `a.b=value` (or `--config.a.b=value`) strings to `cfg` in place and returns it."""
    for raw in overrides:
        item = raw[2:] if raw.startswith("--") else raw
        item = item[len("config.") :] if item.startswith("config.") else item
        if "=" not in item:
            raise ConfigError(f"override {raw!r} needs the form --config.key=value")
        key, text = item.split("=", 1)
        parent, leaf = cfg, key
        if "." in key:
            path, leaf = key.rsplit(".", 1)
            for part in path.split("."):
                node = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
                if not isinstance(node, ml_collections.ConfigDict):
                    parent = None
                    break
                parent = node
        if parent is None or leaf not in parent:
            close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config.{key} is not a config key.{hint}")
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a group; set one of its keys instead")
        value = _parse_value(text, current, key)
        try:
            parent[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{key}: {e}") from None
    return cfg


def get_config(name: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of experiment `name` with `overrides` applied, its values checked."""
    cfg = apply_overrides(load_experiment(name), overrides)
    check_values(cfg)
    return cfg


def get_config_with(name: str, values: dict[str, object]) -> ml_collections.ConfigDict:
    """`get_config` with settings as Python values, `{"train.steps": 30, "optim.lr": 1e-3}`
    (notebooks, scripts): the same key and type checks as `--config.train.steps=30`."""
    texts = [f"{key}={v if isinstance(v, str) else repr(v)}" for key, v in values.items()]
    return get_config(name, texts)
