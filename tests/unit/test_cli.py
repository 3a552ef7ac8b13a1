"""The autopar command: plan (built-in and user factory), show, and clear errors."""

from __future__ import annotations

import json

import torch

from autopar import load_plan
from autopar.cli import main
from autopar.models import MLP


def factory(batch: int, seq: int):
    """A user's factory for ``autopar plan tests.unit.test_cli:factory``."""
    del seq
    return MLP(32, 64), {"x": torch.randn(batch, 32), "target": torch.randn(batch, 32)}


def test_plan_and_show(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "gpt2-tiny", "--mesh", "2x2", "--batch", "4", "--seq", "16", "-o", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mesh 2x2" in out and "blocks.0.attn" in out and "planned in" in out
    assert load_plan(path).mesh_shape == [2, 2]
    assert main(["show", str(path)]) == 0
    assert "blocks.1.fc" in capsys.readouterr().out


def test_plan_a_user_factory(capsys):
    assert main(["plan", "tests.unit.test_cli:factory", "--mesh", "4", "--gpu", "a100", "--batch", "8"]) == 0
    assert "fc1" in capsys.readouterr().out


def test_plan_a_zoo_model(capsys):
    assert main(["plan", "dlrm", "--size", "tiny", "--mesh", "2x2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "tables" in out and "fallback ops (replicated, no sharding rule): none" in out


def test_kernels_option_fuses_or_not(tmp_path, capsys):
    args = ["llama3-8b", "--size", "tiny", "--mesh", "2x2", "--batch", "2", "--seq", "8"]
    assert main(["plan", *args, "--kernels", "fused", "--gpu", "cpu"]) == 0
    assert "fused kernels: 5 chains" in capsys.readouterr().out
    assert main(["plan", *args, "--kernels", "eager"]) == 0
    assert "fused kernels: none" in capsys.readouterr().out
    step_s = {}
    for kernels in ("fused", "eager"):  # priced for H100s: the fused kernels are cheaper
        out = tmp_path / f"{kernels}.json"
        assert main(["bench", *args, "--strategies", "auto", "--kernels", kernels, "--json", str(out)]) == 0
        step_s[kernels] = json.loads(out.read_text())[0]["step_s"]
    assert step_s["fused"] < step_s["eager"]


def test_bad_input_is_one_clear_line(capsys):
    assert main(["plan", "gpt2-tiny", "--mesh", "2x2", "--gpu", "tpu"]) == 2
    assert "unknown GPU 'tpu'" in capsys.readouterr().err
    assert main(["plan", "nosuchmodel"]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err


def test_show_explain_lists_what_was_turned_down(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "gpt2-tiny", "--mesh", "2x2", "--batch", "4", "--seq", "32", "-o", str(out)]) == 0
    plan = load_plan(out)
    linear = next(n for n in plan.nodes if n.op == "aten.linear.default")
    capsys.readouterr()
    assert main(["show", str(out), "--explain", linear.name]) == 0
    text = capsys.readouterr().out
    assert f"set by decision {linear.decision}" in text and "turned down" in text
    # the plan is optimal: no single decision changed alone makes the step faster
    deltas = [a["delta_s"] for alts in plan.alternatives.values() for a in alts]
    assert deltas and min(deltas) >= -1e-4 * plan.estimated_step_s
    assert main(["show", str(out), "--explain", linear.name + "x"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_show_html_is_self_contained(tmp_path, capsys):
    out, page = tmp_path / "plan.json", tmp_path / "report.html"
    assert main(["plan", "gpt2-tiny", "--mesh", "2x2", "--batch", "4", "--seq", "32", "-o", str(out)]) == 0
    assert main(["show", str(out), "--html", str(page)]) == 0
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2  # memory bar and communication chart
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "<link" not in text and "@import" not in text  # no stylesheet or font from outside
    assert "blocks.0" in text and "peak memory at" in text


def test_progress_shows_phases_on_a_terminal_and_the_library_is_quiet(capsys):
    import io

    from autopar import make_plan
    from autopar.models import GPT, gpt_config
    from autopar.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    cfg = gpt_config("gpt2-tiny")
    ids = torch.randint(0, cfg.vocab, (4, 16))
    kwargs = {"input_ids": ids, "labels": ids.clone()}
    make_plan(GPT(cfg), (), (2,), example_kwargs=kwargs)
    assert capsys.readouterr().err == ""  # quiet as a library
    screen = Terminal()
    progress = Progress(3, stream=screen)
    make_plan(GPT(cfg), (), (2,), example_kwargs=kwargs, progress=progress)
    progress.done()
    shown = screen.getvalue()
    assert "[1/3] tracing" in shown and "[2/3] strategies and costs" in shown and "[3/3] solving" in shown
    assert shown.endswith("\r\033[K")  # the line is cleared at the end
    piped = io.StringIO()
    Progress(3, stream=piped)("tracing")
    assert piped.getvalue() == ""  # nothing on a pipe or a log file
