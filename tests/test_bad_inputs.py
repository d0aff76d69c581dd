"""The bad-input matrix (tests/bad_inputs.py): every cell raises its error, naming the
argument and the values seen; docs/errors.md is the matrix's table; what is accepted on
purpose works."""
import pytest
import torch

import kdfast
from bad_inputs import DOCS, cells, render, run
from kdfast import functional as KF

CELLS = cells()


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c.api}-{c.bad}-{i}" for i, c in enumerate(CELLS)])
def test_bad_input_raises_an_error_naming_the_argument_and_the_values(cell):
    error = run(cell)
    assert error is not None, f"{cell.api} accepted {cell.bad}"
    assert type(error) is cell.error or isinstance(error, cell.error), f"{type(error).__name__}: {error}"
    missing = [part for part in cell.seen if part not in str(error)]
    assert not missing, f"the message does not name {missing}: {error}"


def test_every_public_function_and_loss_is_in_the_matrix():
    covered = {c.api for c in CELLS}
    public = set(KF.__all__) | set(kdfast.losses.__all__) - {"DistillationLoss"} | {"topk_logits"}
    assert public <= covered, f"not in the matrix: {sorted(public - covered)}"


def test_docs_table_is_the_matrix():
    with open(DOCS) as f:
        assert f.read() == render(), "docs/errors.md is out of date: run python tests/bad_inputs.py"


def test_what_is_accepted_on_purpose():
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    loss = KF.soft_target_kl(s, t.half(), T=2)  # mixed dtypes, a teacher that requires grad
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and t.grad is None
    assert torch.isfinite(KF.pkt(torch.randn(4, 8), torch.randn(4, 3)))
    assert torch.isfinite(KF.attention_transfer(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8), pool=True))
