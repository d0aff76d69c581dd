"""Distillation on 2 CPU processes over gloo: torchrun, a real fastai fit, kdfast's distrib_ctx."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fastai")
pytest.importorskip("accelerate")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_fit.py")


def torchrun(out, loss: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("KDFAST_BACKEND", None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             WORKER, str(out), loss], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softtarget", "attention"])
def test_two_processes_train_the_same_student(tmp_path, loss):
    ranks = torchrun(tmp_path, loss)
    assert [r["world"] for r in ranks] == [2, 2]
    # each rank saw half of the 400 training images per epoch (2 epochs)
    assert [r["samples"] for r in ranks] == [400, 400]
    # the same KD weight schedule on both ranks, and the KD term applied on every batch
    assert ranks[0]["weights"] == ranks[1]["weights"] and len(set(ranks[0]["weights"])) > 1
    for r in ranks:
        assert len(r["kd_values"]) == len(r["weights"]) - r["weights"].count(0.0)
        assert all(v > 0 for v in r["kd_values"])
        blended = [b for b, w in zip(r["blended"], r["weights"]) if w > 0]
        assert blended and all(b > 0 for b in blended)  # the backpropagated loss is not the plain loss
        assert r["teacher_wrapped"] == "Sequential" and r["hooks_left"] == 0
    # DDP kept the students identical
    s0, s1 = (torch.load(tmp_path / f"student{r}.pt") for r in range(2))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
