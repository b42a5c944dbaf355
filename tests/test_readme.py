"""The README's training-loop patterns run as written (one process, a plain model)."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _pattern_code() -> str:
    text = README.read_text()
    after = text[text.index("Training-loop patterns") :]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def _run(root: str, total_steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    warm = torch.optim.lr_scheduler.LinearLR(optim, start_factor=0.2, total_iters=4)
    sched = torch.optim.lr_scheduler.SequentialLR(optim, [warm, torch.optim.lr_scheduler.ConstantLR(optim, 0.5, 50)], milestones=[4])
    torch.manual_seed(123)  # the RNG state the checkpoint carries

    def next_batch(i: int) -> torch.Tensor:
        return torch.randn(2, 4) + i % 5  # uses the global RNG: a resume must restore it

    env = {"model": model, "optim": optim, "sched": sched, "ckpt_root": root, "total_steps": total_steps, "save_every": 3, "next_batch": next_batch}
    exec(compile(_pattern_code(), str(README), "exec"), env)
    return model


def test_readme_resume_or_start_pattern_resumes_exactly(tmp_path):
    straight = _run(str(tmp_path / "a"), 9)
    _run(str(tmp_path / "b"), 6)  # a fresh start, saved at steps 3 and 6
    resumed = _run(str(tmp_path / "b"), 9)  # resumes at 6, runs 3 more
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000003", "step-00000006", "step-00000009"]
