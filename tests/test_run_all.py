"""benchmarks/run_all.py: the report's arithmetic (MFU against the row's dtype peak, growth
ratios), the table written as rows arrive, and a run past its deadline that still writes."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in ("bench_clip", "bench_data", "bench_fid", "bench_gan", "bench_tokenizer",
                 "bench_unclip"):
        sys.modules.pop(name, None)


def test_report_mfu_and_scaling(run_all, tmp_path):
    out = tmp_path / "r.md"
    report = run_all.Report(["# head"], {"float32": 100.0, "bfloat16": 400.0}, str(out))
    report.add("m", "train", 8, "32px", "f32", 2.0, 4.0, 50.0, scale=("g", 8))
    assert out.read_text().count("| m |") == 1  # written after the first row already
    report.add("m", "train", 32, "32px", "bf16", 4.0, 8.0, 100.0, scale=("g", 32))
    report.add("n", "sample", 1, "-", "f32", 0.5, 2.0)
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| m |")]
    assert rows[0].endswith("| 50.0 | 50.0% |")
    assert rows[1].endswith("| 100.0 | 25.0% |")  # bf16 rows against the bf16 peak
    assert "| n | sample | 1 | - | f32 | 0.5 | 2 | - | - |" in text
    growth = [line for line in text.splitlines() if line.startswith("| g |")]
    # 2x the time for 4x the batch: half the time per image.
    assert growth == ["| g | 8 | 2 | 1.00 | 1.00 |", "| g | 32 | 4 | 2.00 | 0.50 |"]


def test_deadline_skips_and_still_writes(run_all, tmp_path):
    out = tmp_path / "speed.md"
    run_all.main(["--quick", "--deadline", "1e-9", "--peak-n", "256", "--cache", "",
                  "--out", str(out)])
    text = out.read_text()
    assert "jax " in text and "float32" in text
    for name in ("clip_train", "gan_train", "gan_sample", "unclip_all", "fid_features",
                 "data_all"):
        assert f"- {name}: skipped, past the 0 s deadline" in text


def test_out_in_missing_directory_is_one_line(run_all, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--out", str(tmp_path / "no" / "r.md")])
    assert "its directory does not exist" in capsys.readouterr().err
