"""The supported Hugging Face architectures, and which one a config.json or a model is."""

from __future__ import annotations

from lm.convert.common import Family
from lm.convert.gpt2 import GPT2Family
from lm.convert.llama import LlamaFamily, MistralFamily, MixtralFamily, Qwen2Family
from lm.errors import ConfigError

FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (GPT2Family(), LlamaFamily(), MistralFamily(), MixtralFamily(), Qwen2Family())
}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def supported() -> str:
    return ", ".join(FAMILIES)


def family_for_config(hf: dict, where: str = "config.json") -> Family:
    """The family of an HF config: `architectures[0]`, else `model_type`; an unknown one is a
    ConfigError listing the supported architectures."""
    names = hf.get("architectures") or []
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    if not names and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    found = ", ".join(names) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"{where}: architecture {found} is not supported; supported: {supported()}")


def family_by_name(architecture: str) -> Family:
    if architecture not in FAMILIES:
        raise ConfigError(
            f"unknown Hugging Face architecture {architecture!r}; supported: {supported()}"
        )
    return FAMILIES[architecture]


def infer_family(mc) -> Family:
    """The HF architecture that can hold a model with these keys (a run trained in lm, with no
    import to say where it came from)."""
    gpt2 = (
        mc.position == "learned"
        and mc.norm == "layernorm"
        and mc.mlp == "gelu"
        and mc.use_bias
        and not mc.qkv_bias
        and mc.num_kv_heads == mc.num_heads
        and mc.num_experts == 0
        and "L" not in mc.attention_pattern
    )
    if gpt2:
        return FAMILIES["GPT2LMHeadModel"]
    llama_like = mc.position == "rope" and mc.norm == "rmsnorm" and mc.mlp == "swiglu"
    soft = mc.attn_logit_softcap == 0 and mc.final_logit_softcap == 0
    if llama_like and soft:
        local = "L" in mc.attention_pattern
        if mc.num_experts > 0:
            moe_ok = (
                not mc.use_bias
                and mc.router == "softmax"
                and mc.router_norm_topk
                and mc.num_shared_experts == 0
                and mc.moe_first_dense == 0
                and mc.moe_every == 1
                and set(mc.attention_pattern) in ({"G"}, {"L"})
            )
            if moe_ok:
                return FAMILIES["MixtralForCausalLM"]
        elif mc.qkv_bias and not mc.use_bias:
            return FAMILIES["Qwen2ForCausalLM"]
        elif local and set(mc.attention_pattern) == {"L"} and not mc.use_bias:
            return FAMILIES["MistralForCausalLM"]
        elif not local and not mc.qkv_bias:
            return FAMILIES["LlamaForCausalLM"]
    raise ConfigError(
        "this model's keys (position, norm, mlp, biases, experts, attention_pattern) match no "
        f"supported Hugging Face architecture ({supported()})"
    )
