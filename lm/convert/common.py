"""Shared pieces of the Hugging Face mappings: labelled shapes, layout changes, the checks.

Why labelled shapes: a config.json that disagrees with its tensors (hidden_size 64, weights 32
wide) must fail with one line naming the config key, so every expected HF tensor shape is a
tuple of `Dim(size, key)` and the first dimension that differs names its key.

Layouts: a torch `nn.Linear` weight is `[out, in]`; our `Dense` kernel is
`in_shape + out_shape` (e.g. q: `[d_model, heads, head_dim]`), so `from_linear` transposes and
reshapes and `to_linear` undoes it. Both are pure permutations of the same numbers, which is why
from_hf -> to_hf gives back bitwise the same tensors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from lm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dimension of an expected HF tensor: its size and the config.json key(s) setting it."""

    size: int
    key: str


Shapes = dict[str, tuple[Dim, ...]]  # HF tensor name -> expected shape, in checking order
Getter = Callable[[str], np.ndarray]


def from_linear(w: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """torch Linear weight [out, in] -> our kernel [*in_shape, *out_shape]."""
    return np.ascontiguousarray(w.T).reshape(*in_shape, *out_shape)


def to_linear(kernel: np.ndarray, n_in_axes: int) -> np.ndarray:
    """Our kernel [*in_shape, *out_shape] (first `n_in_axes` axes are inputs) -> [out, in]."""
    n_in = math.prod(kernel.shape[:n_in_axes])
    return np.ascontiguousarray(kernel.reshape(n_in, -1).T)


def contiguous(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def check_tensors(
    shapes: dict[str, tuple[int, ...]],
    expected: Shapes,
    ignorable: Callable[[str], bool],
    where: str,
    architecture: str,
) -> None:
    """Raises a one-line ConfigError for the first missing tensor, the first dimension that
    differs from what config.json says (naming the key), or a tensor with no place in the model.

    `shapes`: the checkpoint's tensor name -> shape; `ignorable(name)`: tensors the model does
    not need (buffers such as GPT-2's attn.bias, a tied lm_head)."""
    for name, dims in expected.items():
        if name not in shapes:
            hint = "; is tie_word_embeddings wrong?" if name.endswith("lm_head.weight") else ""
            raise ConfigError(
                f"tensor {name} is missing from {where} ({architecture} with this config.json "
                f"needs it{hint})"
            )
        have = tuple(shapes[name])
        want = tuple(d.size for d in dims)
        if len(have) != len(want):
            raise ConfigError(
                f"tensor {name} in {where} has shape {list(have)} but {architecture} expects "
                f"{list(want)}"
            )
        for i, (size, dim) in enumerate(zip(have, dims)):
            if size != dim.size:
                raise ConfigError(
                    f"config.json {dim.key}={dim.size} does not match the weights: {name} has "
                    f"shape {list(have)} (dim {i} is {size}); fix {dim.key} in config.json"
                )
    extra = sorted(n for n in shapes if n not in expected and not ignorable(n))
    if extra:
        raise ConfigError(
            f"tensor {extra[0]} in {where} has no place in {architecture} with this config.json "
            f"({len(extra)} such tensors; is a bias or tie_word_embeddings setting wrong?)"
        )


def stack_layers(flat: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Per-layer names `blocks.<i>.x` -> scanned `blocks.x` stacked [layers, ...]."""
    out = {k: v for k, v in flat.items() if not k.startswith("blocks.")}
    names = {k.split(".", 2)[2] for k in flat if k.startswith("blocks.")}
    for name in sorted(names):
        out[f"blocks.{name}"] = np.stack([flat[f"blocks.{i}.{name}"] for i in range(num_layers)])
    return out


def unstack_layers(flat: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Scanned `blocks.x` [layers, ...] -> per-layer `blocks.<i>.x` (inverse of stack_layers)."""
    out = {k: v for k, v in flat.items() if not k.startswith("blocks.")}
    for k, v in flat.items():
        if k.startswith("blocks."):
            name = k.split(".", 1)[1]
            for i in range(num_layers):
                out[f"blocks.{i}.{name}"] = v[i]
    return out


def get_key(cfg: dict, *names: str, default=None):
    """The first of `names` present (and not None) in an HF config dict, else `default`."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def require_int(cfg: dict, name: str, architecture: str) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(
            f"config.json of a {architecture} needs a positive integer {name}, got {value!r}"
        )
    return value


def rope_theta(cfg: dict, architecture: str, default: float = 10000.0) -> float:
    """Rotary base from `rope_parameters` (transformers 5) or `rope_theta` (4.x); any rope
    scaling other than the default one is refused, since our rotary has none."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(
            f"config.json rope type {kind!r} of this {architecture} is not supported (lm's "
            "rotary has no scaling); only rope_type 'default' converts"
        )
    if cfg.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConfigError("config.json partial_rotary_factor != 1 is not supported")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or default)


@dataclasses.dataclass(frozen=True)
class Link:
    """HF tensors `hf` (expected shapes `dims`) <-> our flat params `ours`.

    `fwd(*hf_arrays) -> our arrays` and `inv(*our_arrays) -> hf arrays` are exact inverses
    (transposes, reshapes, splits and stacks only)."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    dims: tuple[tuple[Dim, ...], ...]
    fwd: Callable[..., tuple]
    inv: Callable[..., tuple]


def product(dims: Sequence[Dim]) -> Dim:
    """The flattened dimension of `dims` (e.g. heads * head_dim), labelled by all their keys."""
    if len(dims) == 1:
        return dims[0]
    return Dim(math.prod(d.size for d in dims), "*".join(d.key for d in dims))


def same(ours: str, hf: str, dims: Sequence[Dim]) -> Link:
    """A tensor kept as it is (embedding tables, norm scales, Conv1D kernels [in, out])."""
    return Link((ours,), (hf,), (tuple(dims),), lambda w: (w,), lambda w: (w,))


def linear(ours: str, hf: str, in_dims: Sequence[Dim], out_dims: Sequence[Dim]) -> Link:
    """torch Linear weight [out, in] <-> our kernel [*in_dims, *out_dims]."""
    in_shape = tuple(d.size for d in in_dims)
    out_shape = tuple(d.size for d in out_dims)
    return Link(
        (ours,),
        (hf,),
        ((product(out_dims), product(in_dims)),),
        lambda w: (from_linear(w, in_shape, out_shape),),
        lambda k: (to_linear(k, len(in_shape)),),
    )


def vector(ours: str, hf: str, out_dims: Sequence[Dim]) -> Link:
    """A bias [prod(out)] <-> ours [*out_dims] (e.g. q bias [heads, head_dim])."""
    shape = tuple(d.size for d in out_dims)
    return Link(
        (ours,),
        (hf,),
        ((product(out_dims),),),
        lambda b: (b.reshape(shape),),
        lambda b: (contiguous(b.reshape(-1)),),
    )


class Family:
    """One Hugging Face architecture: its config mapping and its tensor links.

    Subclasses set `architecture` (the `architectures[0]` of config.json), `model_type`, and
    implement `model_keys`, `hf_config` and `links`."""

    architecture = ""
    model_type = ""

    def model_keys(self, hf: dict) -> dict:
        """config.json -> our `model` config keys (ModelConfig fields)."""
        raise NotImplementedError

    def hf_config(self, mc, base: dict) -> dict:
        """Our resolved ModelConfig -> config.json (on top of `base`, the imported one or {})."""
        raise NotImplementedError

    def detect_format(self, names: set[str]) -> str:
        """A variant of the tensor naming found in a checkpoint ("" for the standard one)."""
        del names
        return ""

    def links(self, mc, fmt: str = "") -> list[Link]:
        raise NotImplementedError

    def ignorable(self, mc, name: str) -> bool:
        """Checkpoint tensors the model does not use: rotary caches, a tied lm_head."""
        return name.endswith("rotary_emb.inv_freq") or (
            mc.tie_embeddings and name == "lm_head.weight"
        )
