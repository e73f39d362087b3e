"""bench/profile_steps.py (the GPU visit's profile of decode steps and a training micro-batch)
runs to the end on the tiny shape here and writes the three summaries with their head and tables."""
from fusedrl.bench import profile_steps


def test_quick_profiles_write_the_three_summaries(tmp_path):
    profile_steps.main(["--out", str(tmp_path), "--quick"])
    decode = (tmp_path / "profile_decode.txt").read_text()
    train = (tmp_path / "profile_train.txt").read_text()
    wide = (tmp_path / "profile_decode_b4.txt").read_text()
    assert "decode batch 1, 8 new tokens" in decode and "steps profiled: 8" in decode
    assert "training micro-batch of 64 tokens; packed attention padded SDPA" in train
    assert "steps profiled: 3" in train
    assert "decode batch 4, 8 new tokens" in wide and "steps profiled: 8" in wide
    for text in (decode, train, wide):
        assert text.startswith("commit ") and "ms per step" in text
        assert "By host time:" in text and "aten::mm" in text  # the table lists the GEMMs
