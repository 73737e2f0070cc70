"""experiments/bench/gpu_check.py runs end to end in --dry-run mode (tiny shapes, interpret mode)."""
from experiments.bench import gpu_check


def test_dry_run(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kda             PASS" in out and "kda_safe        PASS" in out
    for impl in ("pallas", "chunk"):
        assert f"| 40 | kda_safe          | {impl}" in out
    assert "softmax attention" in out
    assert "correctness: PASS" in out
