"""`kdfast demo llm` at a tiny size: every run trains, the table, the plot and the numbers
are written, and the memory comparison runs the fused loss against materialised logits."""
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from kdfast import cli, demo_llm  # noqa: E402


def test_demo_llm_tiny_run(tmp_path, capsys):
    import torch
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        code = cli.main(["demo", "llm", "--steps", "4", "--teacher-steps", "6", "--seq", "16", "--bs", "4",
                         "--chars", "4000", "--teacher", "16,1,2", "--student", "8,1,2", "--memory-shape", "64,500,16",
                         "--out", str(out), "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    assert "valid perplexity" in printed and "KD overhead" in printed and "peak extra memory" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["teacher", "student alone", "forward KL", "reverse KL", "JSD (β=0.5)"]
    assert results["teacher_steps"] == 6 and results["steps"] == 4
    for name, run in results["runs"].items():
        assert len(run["step_s"]) == (6 if name == "teacher" else 4)
        assert run["curve"][-1][0] == len(run["step_s"]) and math.isfinite(run["valid_perplexity"])
        assert 1 < run["valid_perplexity"] < 10 * results["vocab"]
    assert [("kd_overhead" in r) for r in results["summary"]] == [False, False, True, True, True]
    # distillation starts from the same student as the run alone, so the runs differ only by the loss
    alone, fkl = results["runs"]["student alone"], results["runs"]["forward KL"]
    assert alone["valid_perplexity"] != fkl["valid_perplexity"]
    for m in results["memory"]:
        assert 0 < m["fused_bytes"] and 0 < m["materialised_bytes"]
    big = results["memory"][-1]
    assert (big["tokens"], big["vocab"]) == (64, 500)
    assert big["fused_bytes"] < big["materialised_bytes"]
    assert (out / "perplexity.png").stat().st_size > 1000


def test_demo_llm_messages(capsys):
    with pytest.raises(SystemExit):
        demo_llm.main(["--student", "10,1,4"])
    assert "multiple of the heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_llm.main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_char_tokenizer_round_trip():
    text = demo_llm.load_text()[:2000]
    tok = demo_llm.CharTokenizer(text)
    assert tok.decode(tok.encode(text)) == text
    assert len(tok) == len(set(text))
