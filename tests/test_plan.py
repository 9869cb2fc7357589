"""`lm plan` against published figures: GPT-3 FLOPs (Brown et al. 2020) and energy (Patterson
et al. 2021), Chinchilla tokens, chip-spec errors, and the CLI."""

import pytest

from lm.cli import main
from lm.errors import ConfigError
from lm.plan import chinchilla_tokens, energy_mwh, parse_chips, plan, train_time_s
from lm.training.peaks import CHIPS


def test_gpt3_flops_match_paper():
    # Brown et al. 2020, Table D.1: 3.14e23 training FLOPs for 175B on 300B tokens (6ND, no
    # attention term; the PaLM attention term adds ~2.8% on top).
    _, r = plan("gpt3_175b", "v5p-256", 300e9, compile=False)
    assert r["six_nd"] == pytest.approx(3.14e23, rel=0.01)
    assert r["flops"] == pytest.approx(3.14e23, rel=0.04)
    assert r["params"] == pytest.approx(175e9, rel=0.01)


def test_gpt3_energy_matches_patterson():
    # Patterson et al. 2021, Table 4 (GPT-3), all inputs from the paper: 3.14e23 FLOPs, 10,000
    # V100s at a measured 24.6 TFLOP/s each (-> 14.8 days), 330 W average system power per chip
    # (V100 TDP 300 W plus server overheads), PUE 1.10; they report 1,287 MWh.
    mfu = 24.6e12 / CHIPS["v100"][0]
    secs = train_time_s(3.14e23, 10_000, CHIPS["v100"][0], mfu)
    assert secs / 86400 == pytest.approx(14.8, rel=0.01)
    assert energy_mwh(10_000, 330.0, secs, 1.1) == pytest.approx(1287, rel=0.01)
    # Through `plan`, with our FLOP count (which includes attention): within 10%.
    _, r = plan("gpt3_175b", "v100-10000", 300e9, mfu=mfu, watts=330.0, pue=1.1, compile=False)
    assert r["mwh"] == pytest.approx(1287, rel=0.1)


def test_chinchilla_1b():
    assert chinchilla_tokens(1_000_000_000) == pytest.approx(20e9)


def test_chip_names():
    assert parse_chips("v5p-256").count == 128  # TensorCores in the name, 2 per chip
    assert parse_chips("v5e-16").count == 16


@pytest.mark.parametrize("spec", ["v9-8", "v5p", "v5p-3", "h100-0"])
def test_bad_chips_one_line(spec):
    with pytest.raises(ConfigError) as e:
        parse_chips(spec)
    assert "\n" not in str(e.value)


def test_cli_gpt2(capsys):
    assert (
        main(["plan", "--experiment=gpt2_124m", "--chips=v5p-8", "--tokens=1e9", "--no_compile"])
        == 0
    )
    out = capsys.readouterr().out
    v, d, layers, ff, t = 50304, 768, 12, 3072, 1024
    per_layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 2 * 2 * d
    n = v * d + t * d + layers * per_layer + 2 * d
    assert f"{n:,}" in out


def test_cli_bad_chips(capsys):
    assert main(["plan", "--experiment=gpt2_124m", "--chips=v9-8", "--tokens=1e9"]) == 2
    assert "unknown chip" in capsys.readouterr().err


def test_compile_small():
    cfg = ["--config.data.batch_size=8", "--config.data.seq_len=128"]
    lines, r = plan("gpt2_124m", "v5e-8", 1e9, cfg, compile=True, timeout=300)
    assert r.get("compiled_bytes", 0) > 0, lines


def test_plan_says_whether_the_run_fits_in_hbm(capsys):
    small = ["plan", "--experiment=llama_1b", "--chips=v5p-256", "--tokens=1e9", "--no_compile"]
    assert main(small) == 0
    assert "fits in HBM        yes" in capsys.readouterr().out
    # 175B parameters with Adam on 4 chips: ~2.8 TB of state alone, far over 4 x 95 GiB.
    big = ["plan", "--experiment=gpt3_175b", "--chips=v5p-8", "--tokens=1e9", "--no_compile"]
    assert main(big) == 0
    assert "fits in HBM        NO" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name", ["moe_tiny", "mixtral_8x7b", "deepseek_moe_16b", "mistral_7b", "gemma2_2b"]
)
def test_plan_works_for_the_issue_10_experiments(name, capsys):
    args = ["plan", f"--experiment={name}", "--chips=v5p-256", "--tokens=1e12", "--no_compile"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fits in HBM        yes" in out, out


def test_plan_without_tokens_uses_the_chinchilla_count_and_says_so(capsys):
    # Issue 20 item 6: --tokens was required although plan computes the Chinchilla count.
    assert main(["plan", "--experiment=llama_1b", "--chips=v4-8", "--no_compile"]) == 0
    out = capsys.readouterr().out
    tokens = 20 * 1_235_814_400  # ~20 per parameter, Llama-3.2-1B's 1.24B parameters
    assert f"training tokens    {tokens:.4g} (Chinchilla-optimal" in out
    assert f"steps              {round(tokens / (256 * 2048)):,} at 524,288 tokens/step" in out


def test_plan_prints_the_batch_and_mesh_its_memory_assumes(capsys):
    # llama_1b: 256 sequences of 2048 tokens a step, no accumulation, fsdp filling the mesh;
    # v4-8 names 8 TensorCores = 4 chips, so 64 sequences a device.
    argv = ["plan", "--experiment=llama_1b", "--chips=v4-8", "--tokens=1e9", "--no_compile"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "global batch       256 x 2048 tokens = 524,288 tokens/step" in out
    assert "grad accumulation  1 (--config.optim.grad_accum_steps): 64 sequences per device" in out
    assert "mesh               data 1 x fsdp 4 x expert 1 x tensor 1" in out
    lines = out.splitlines()
    memory = next(i for i, line in enumerate(lines) if line.startswith("memory/device"))
    assert lines[memory - 1].startswith("mesh")  # next to the memory figures they explain
    # It does not fit; the suggested accumulation does, with the same global batch.
    fits = next(line for line in lines if line.startswith("fits in HBM"))
    assert fits.startswith("fits in HBM        NO") and "grad_accum_steps=8" in fits
    assert main([*argv, "--config.optim.grad_accum_steps=8", "--config.mesh.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "grad accumulation  8 (--config.optim.grad_accum_steps): 16 sequences per device" in out
    assert "mesh               data 1 x fsdp 2 x expert 1 x tensor 2" in out
    assert "fits in HBM        yes" in out
