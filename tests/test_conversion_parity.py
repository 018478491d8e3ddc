"""Megatron at TP1/TP2/PP2/TP2×PP2 equals transformers; the classic conversion bugs are caught."""

import runpy

import pytest

from p2o_hpc.megatron.conversion_check import compare_with_hf
from p2o_hpc.paths import REPO_ROOT

pytestmark = pytest.mark.multiproc
TOLERANCE = 1e-4


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_megatron_matches_hf(tiny_model_dir, tmp_path, tp, pp):
    diffs = compare_with_hf(tiny_model_dir, tp, pp, workdir=tmp_path)
    assert diffs["max_abs_logit_diff"] <= TOLERANCE, diffs
    assert diffs["max_abs_logprob_diff"] <= TOLERANCE, diffs


def check_conversion(*argv: str) -> int:
    """tools/check_conversion.py's main() in this process (its ranks are spawned either way)."""
    return runpy.run_path(str(REPO_ROOT / "tools" / "check_conversion.py"))["main"](list(argv))


def test_check_conversion_cli_passes_at_tp1(tiny_model_dir, capsys):
    assert check_conversion("--tp", "1", "--model", str(tiny_model_dir)) == 0
    out = capsys.readouterr().out
    assert "max_abs_logit_diff=" in out and "max_abs_logprob_diff=" in out and "conversion_check=PASS" in out


def test_check_conversion_cli_fails_on_naive_qkv_concat(tiny_model_dir, capsys):
    assert check_conversion("--tp", "2", "--model", str(tiny_model_dir), "--negative-control", "naive_qkv") == 1
    logit_diff = float(capsys.readouterr().out.split("max_abs_logit_diff=")[1].split()[0])
    assert logit_diff > 0.1


def test_interleaved_rope_is_detected(tiny_model_dir, tmp_path):
    diffs = compare_with_hf(tiny_model_dir, 1, 1, negative_control="interleaved_rope", workdir=tmp_path)
    assert diffs["max_abs_logit_diff"] > 0.1
