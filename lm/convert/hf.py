"""Reading and writing a Hugging Face model directory: config.json and safetensors files.

Why numpy: `safetensors`' numpy backend (bfloat16 through ml_dtypes) needs no torch, so
`lm convert` runs wherever lm does. Sharded checkpoints (`model.safetensors.index.json` with a
`weight_map`) are read tensor by tensor, and large exports are split the same way.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from lm import storage
from lm.errors import ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Everything of a Hugging Face directory that is not weights: the tokenizer, the generation
# defaults and the model config (HFVocab reads its special ids and vocab_size).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {hf_dir} a Hugging Face model directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


class TensorFiles:
    """The tensors of a directory's `model.safetensors`, or of the shards its index names.

    `shapes` and `dtypes` come from the file headers; `get(name)` reads one tensor."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f).get("weight_map") or {}
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{index_path} is not a safetensors index") from None
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            files = [SINGLE]
        else:
            found = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not found:
                raise FileNotFoundError(
                    f"no {SINGLE} or {INDEX} in {hf_dir} (only safetensors checkpoints convert)"
                )
            files = found
        self._handles, self._where = {}, {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} (named by {INDEX}) not found")
            try:
                handle = safe_open(path, framework="np")
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"{path} is not a readable safetensors file: {first}") from None
            self._handles[name] = handle
            for key in handle.keys():
                piece = handle.get_slice(key)
                self._where[key] = name
                self.shapes[key] = tuple(piece.get_shape())
                self.dtypes[key] = _numpy_dtype_name(piece.get_dtype())

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConfigError(f"tensor {name} is missing from {self.hf_dir}")
        return self._handles[self._where[name]].get_tensor(name)

    def main_dtype(self) -> str:
        """The most common floating dtype of the tensors (the checkpoint's dtype)."""
        counts = Counter(d for d in self.dtypes.values() if d.startswith(("float", "bfloat")))
        return counts.most_common(1)[0][0] if counts else "float32"


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _numpy_dtype_name(code: str) -> str:
    return _SAFETENSORS_DTYPES.get(code, code.lower())


def numpy_dtype(name: str) -> np.dtype:
    """A dtype name (bfloat16 included, through ml_dtypes) as a numpy dtype."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def write_tensors(
    out_dir: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Writes `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors shards of
    at most `max_shard_bytes` plus the index, as transformers' save_pretrained does."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(tensors[name])
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors without a known format
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE), metadata=metadata)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, file_name), metadata=metadata)
        weight_map.update({k: file_name for k in shard})
    index = {
        "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return names


def copy_files(src_dir: str, dst_dir: str, names: tuple[str, ...]) -> list[str]:
    """Copies those of `names` that exist in `src_dir` (local or gs://) to `dst_dir`."""
    copied = []
    for name in names:
        src = storage.join(src_dir, name)
        if storage.exists(src):
            storage.write_bytes(storage.join(dst_dir, name), storage.read_bytes(src))
            copied.append(name)
    return copied


def write_json(path: str, data: dict) -> None:
    storage.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
