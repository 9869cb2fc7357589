"""`lm convert`: a Hugging Face directory <-> an lm run workdir.

Import writes a workdir that the rest of lm uses unchanged: `config.json` (the run config:
`default_config()` with the model keys of the HF config, `tokenizer.path` and an `hf` group
recording the architecture, tensor format, dtypes and vocab size for the way back),
`tokenizer/` (tokenizer.json, tokenizer_config.json, the HF config.json, ...) and an orbax
checkpoint of the whole train state at step 0 (fresh optimizer state, the data iterator at
its start), so `lm sample`, `restore_params` and `lm train` (fine-tuning, resuming) read it
like any run. Export reads a checkpoint back with `restore_params` and writes model.safetensors
(sharded past 5 GiB) + config.json + the tokenizer files for `from_pretrained`.

Each phase (reading, converting the tensors, building the state, writing) is an `lm.stages`
stage: a live line on a terminal's stderr for a large model, its time recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lm import sharding, stages, storage
from lm.convert import hf as hf_io
from lm.convert.common import Link, check_tensors, stack_layers, unstack_layers
from lm.convert.families import family_by_name, family_for_config, infer_family
from lm.errors import CheckpointError, ConfigError
from lm.training.checkpoint import _key_name

TOKENIZER_DIR = "tokenizer"


def param_names(tree) -> tuple[list[str], list, object]:
    """(dotted names, leaves, treedef) of an nnx.State: `blocks.0.attn.q.kernel`, ..."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [".".join(_key_name(k) for k in path).removesuffix(".value") for path, _ in leaves]
    return names, [x for _, x in leaves], treedef


def _flat_params(params) -> dict[str, np.ndarray]:
    names, leaves, _ = param_names(params)
    return {n: np.asarray(jax.device_get(x)) for n, x in zip(names, leaves)}


def _pad_rows(x: np.ndarray, rows: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - x.shape[axis])
    return np.pad(x, pad)


def _check_empty_workdir(workdir: str) -> None:
    for name in ("config.json", "checkpoints"):
        if storage.exists(storage.join(workdir, name)):
            raise ConfigError(
                f"{workdir} already holds a run ({name}); import into a new --workdir"
            )


def import_hf(
    hf_dir: str,
    workdir: str,
    *,
    vocab_multiple: int = 0,
    scan_layers: bool = False,
    param_dtype: str = "float32",
) -> dict:
    """Converts the HF model in `hf_dir` into a new run workdir; returns a summary dict.

    `vocab_multiple` > 0 pads the embedding (and an untied head) with zero rows to a multiple
    of it (e.g. for tensor-parallel sharding of the vocab); export removes them again. The
    real ids' logits are unchanged; the padded ids get logit 0 and decode to nothing."""
    from lm.config import default_config
    from lm.models.transformer import ModelConfig
    from lm.tokenizer.hf_vocab import HFVocab
    from lm.training.setup import save_config

    hf_dir = os.path.abspath(hf_dir)
    with stages.stage(f"reading {hf_dir}"):
        hf_cfg = hf_io.read_config(hf_dir)
        family = family_for_config(hf_cfg, os.path.join(hf_dir, "config.json"))
        files = hf_io.TensorFiles(hf_dir)
        fmt = family.detect_format(set(files.shapes))
    cfg = default_config()
    cfg.model.update(family.model_keys(hf_cfg))
    cfg.model.update(scan_layers=scan_layers, param_dtype=param_dtype)
    hf_vocab = int(cfg.model.vocab_size)
    mc_hf = ModelConfig.from_config(cfg.model, hf_vocab)
    links = family.links(mc_hf, fmt)
    expected = {n: dims for link in links for n, dims in zip(link.hf, link.dims)}
    check_tensors(
        files.shapes,
        expected,
        lambda n: family.ignorable(mc_hf, n),
        hf_dir,
        family.architecture,
    )
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        raise FileNotFoundError(
            f"{hf_dir} has no tokenizer.json (the fast tokenizer): save it with "
            "AutoTokenizer.save_pretrained into the model directory"
        )
    _check_empty_workdir(workdir)

    flat: dict[str, np.ndarray] = {}
    with stages.stage("converting the tensors", total=len(links)) as progress:
        for done, link in enumerate(links, 1):
            flat.update(zip(link.ours, link.fwd(*[files.get(n) for n in link.hf])))
            progress.update(done)
    vocab_size = hf_vocab
    if vocab_multiple > 0:
        vocab_size = -(-hf_vocab // vocab_multiple) * vocab_multiple
        flat["embed.embedding"] = _pad_rows(flat["embed.embedding"], vocab_size, 0)
        if "head.kernel" in flat:
            flat["head.kernel"] = _pad_rows(flat["head.kernel"], vocab_size, 1)
    cfg.model.vocab_size = vocab_size
    mc = ModelConfig.from_config(cfg.model, vocab_size)
    if mc.scan_layers:
        flat = stack_layers(flat, mc.num_layers)

    with stages.stage("building the step-0 train state"):
        state, checkpointer_keep = _step0_state(cfg, mc, flat), cfg.train.keep_checkpoints

    # The tokenizer directory: HF's files plus its config.json (vocab rows, special ids).
    tok_dir = storage.join(workdir, TOKENIZER_DIR)
    storage.makedirs(tok_dir)
    hf_io.copy_files(hf_dir, tok_dir, hf_io.TOKENIZER_FILES)
    hf_io.write_json(storage.join(tok_dir, "config.json"), {**hf_cfg, "vocab_size": vocab_size})
    cfg.tokenizer.path = storage.absolute(storage.join(tok_dir, "tokenizer.json"))
    vocab = HFVocab(cfg.tokenizer.path)
    if vocab.base_vocab_size > hf_vocab:
        logging.warning(
            "the tokenizer has %d tokens but the embedding %d rows: ids past it are clipped",
            vocab.base_vocab_size,
            hf_vocab,
        )
    main = files.main_dtype()
    used = {n for link in links for n in link.hf}
    overrides = {n: d for n, d in files.dtypes.items() if n in used and d != main}
    cfg.hf = ml_collections.ConfigDict(
        dict(
            architecture=family.architecture,
            format=fmt,
            dtype=main,
            dtype_overrides=json.dumps(overrides, sort_keys=True),
            vocab_size=hf_vocab,
            source=hf_dir,
        )
    )
    with stages.stage(f"writing {workdir}"):
        _save(state, workdir, checkpointer_keep)
        save_config(cfg, workdir)
    return dict(
        workdir=workdir,
        architecture=family.architecture,
        params=int(sum(x.size for x in flat.values())),
        vocab_size=vocab_size,
        step=0,
    )


def _step0_state(cfg, mc, flat: dict[str, np.ndarray]):
    """The step-0 train state on an FSDP mesh over the local devices (each device holds only
    its shard of every parameter); CheckpointError if lm's model has other parameters."""
    from lm.training.train_step import Trainer, TrainState

    mesh_cfg = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
    mesh = sharding.make_mesh(mesh_cfg)
    trainer = Trainer(cfg, mc, mesh)
    abstract = trainer.abstract_state.params
    names, leaves, treedef = param_names(abstract)
    missing = [n for n in names if n not in flat]
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        what = (
            f"model parameter {missing[0]} has no Hugging Face tensor"
            if missing
            else f"converted tensor {extra[0]} has no parameter in lm's model"
        )
        raise CheckpointError(f"{what}: lm's model does not implement these model keys yet")
    arrays = []
    for name, leaf in zip(names, leaves):
        value = flat[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"converted {name} has shape {value.shape} but the model expects {leaf.shape}"
            )
        value = value.astype(leaf.dtype)
        arrays.append(
            jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda i, v=value: v[i])
        )
    params = jax.tree_util.tree_unflatten(treedef, arrays)
    shardings = trainer.state_shardings
    opt_state = jax.jit(trainer.tx.init, out_shardings=shardings.opt_state)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
        loss_ema=jax.device_put(jnp.zeros((), jnp.float32), replicated),
    )
    return state


def _save(state, workdir: str, keep: int) -> None:
    """Checkpoint 0 with the data iterator at its start (grain's state at index 0)."""
    from lm.training.checkpoint import Checkpointer

    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep=keep, async_save=False)
    try:
        ckpt.save(0, state, {"grain": {"next_index": 0}, "taken": []})
        ckpt.wait()
    finally:
        ckpt.close()


def export_hf(
    workdir: str, out_dir: str, step: int | None = None, *, max_shard_bytes: int = 5 * 2**30
) -> dict:
    """Writes a run's checkpoint as a Hugging Face directory; returns a summary dict.

    The architecture is the one recorded at import, else the one the model keys match
    (`infer_family`). Tensors are written in the imported dtypes (float32 for a run trained
    in lm), the vocab cut back to the HF size when the import padded it."""
    from lm.tokenizer.hf_vocab import HFVocab
    from lm.training.restore import restore_params
    from lm.training.setup import load_run_config

    cfg = load_run_config(workdir)
    with stages.stage(f"reading {workdir}"):
        _, params, mc, vocab, step = restore_params(workdir, step)
        flat = _flat_params(params)
    if mc.scan_layers:
        flat = unstack_layers(flat, mc.num_layers)
    info = cfg.get("hf") or ml_collections.ConfigDict()
    family = family_by_name(info.architecture) if info.get("architecture") else infer_family(mc)
    hf_vocab = int(info.get("vocab_size") or mc.vocab_size)
    if hf_vocab < mc.vocab_size:  # padding added at import (or by the run) comes off
        flat["embed.embedding"] = flat["embed.embedding"][:hf_vocab]
        if "head.kernel" in flat:
            flat["head.kernel"] = flat["head.kernel"][:, :hf_vocab]
    mc_out = dataclasses.replace(mc, vocab_size=hf_vocab)
    main = info.get("dtype") or np.dtype(mc.param_dtype).name
    overrides = json.loads(info.get("dtype_overrides") or "{}")
    with stages.stage("converting the tensors"):
        tensors = _to_hf_tensors(family.links(mc_out, info.get("format", "")), flat, family)
        tensors = {
            n: t.astype(hf_io.numpy_dtype(overrides.get(n, main)), copy=False)
            for n, t in tensors.items()
        }
    with stages.stage(f"writing {out_dir}"):
        files = hf_io.write_tensors(out_dir, tensors, max_shard_bytes)

    base = {}
    is_hf = isinstance(vocab, HFVocab)
    tok_dir = os.path.dirname(vocab.tokenizer_file) if is_hf else ""
    if is_hf and storage.exists(storage.join(tok_dir, "config.json")):
        base = json.loads(storage.read_text(storage.join(tok_dir, "config.json")))
        if base.get("model_type") != family.model_type:
            base = {}
    hf_cfg = family.hf_config(mc_out, base)
    hf_cfg["dtype"] = main
    if "torch_dtype" in base:
        hf_cfg["torch_dtype"] = main
    if not base:
        hf_cfg.update(bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id)
    hf_io.write_json(os.path.join(out_dir, "config.json"), hf_cfg)
    if is_hf:
        hf_io.copy_files(tok_dir, out_dir, hf_io.TOKENIZER_FILES)
    else:  # a SentencePiece run: the model file, under the name HF's slow tokenizers use
        storage.write_bytes(os.path.join(out_dir, "tokenizer.model"), vocab.sp_model)
    return dict(out_dir=out_dir, architecture=family.architecture, step=step, files=files)


def _to_hf_tensors(links: list[Link], flat: dict[str, np.ndarray], family) -> dict:
    out = {}
    for link in links:
        missing = [n for n in link.ours if n not in flat]
        if missing:
            raise CheckpointError(
                f"the checkpoint has no {missing[0]}, which {family.architecture} needs"
            )
        out.update(zip(link.hf, link.inv(*[flat[n] for n in link.ours])))
    used = {n for link in links for n in link.ours}
    extra = sorted(set(flat) - used)
    if extra:
        raise ConfigError(
            f"parameter {extra[0]} has no place in {family.architecture}; this model does not "
            "export to Hugging Face"
        )
    return out
