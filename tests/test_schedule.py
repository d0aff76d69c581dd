"""kdfast.schedule: fasterai's schedules, value for value."""
import math

import numpy as np
import pytest

from kdfast import schedule as S

fs = pytest.importorskip("fasterai.core.schedule")

PCTS = [0.0, 1e-9, 0.05, 0.1, 0.19999, 0.2, 0.25, 1 / 3, 0.4999, 0.5, 0.5001, 0.6, 2 / 3, 0.75, 0.9, 0.999, 1.0, 1.2,
        -0.1] + list(np.linspace(0, 1, 101))


@pytest.mark.parametrize("name", S.schedules)
def test_predefined_schedules_match_fasterai(name):
    ours, theirs = getattr(S, name), getattr(fs, name)
    assert (ours.start_pct, ours.end_pct, ours.start_val, ours.end_val) == \
        (theirs.start_pct, theirs.end_pct, theirs.start_val, theirs.end_val)
    for p in PCTS:
        assert ours.progress(p) == theirs.progress(p), (name, p)
    ours.reset()
    theirs.reset()


@pytest.mark.parametrize("name", ["sched_oneshot", "sched_iterative", "sched_agp", "sched_onecycle", "sched_dsd"])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.9), (1.0, 0.0), (5.0, 50.0)])
def test_schedule_functions_match_fasterai(name, start, end):
    for pos in np.linspace(0, 1, 37):
        assert getattr(S, name)(start, end, float(pos)) == getattr(fs, name)(start, end, float(pos))


def test_cos_and_lin_are_fastais():
    from fastai.callback.schedule import sched_cos, sched_lin
    for pos in np.linspace(0, 1, 37):
        assert S.sched_cos(0.1, 0.7, pos) == sched_cos(0.1, 0.7, pos)
        assert S.sched_lin(0.1, 0.7, pos) == sched_lin(0.1, 0.7, pos)


@pytest.mark.parametrize("kwargs", [dict(start_pct=0.3), dict(end_pct=0.6), dict(start_pct=0.2, end_pct=0.8,
                                                                                   start_val=0.1, end_val=0.5),
                                    dict(start_pct=0.5, end_pct=0.5)])
def test_custom_schedule_matches_fasterai(kwargs):
    ours, theirs = S.Schedule(S.sched_cos, **kwargs), fs.Schedule(fs.sched_cos, **kwargs)
    for p in PCTS:
        assert ours.progress(p) == theirs.progress(p)


def test_changed_after_step_reset_as_fasterai():
    for sched in (S.Schedule(S.sched_iterative, start_pct=0.2), fs.Schedule(fs.sched_iterative, start_pct=0.2)):
        trace = []
        for p in (0.0, 0.1, 0.3, 0.35, 0.7, 1.0):
            sched.progress(p)
            trace.append(sched.changed)
            sched.after_step()
        sched.reset()
        trace.append(sched.changed)
        if isinstance(sched, S.Schedule):
            ours = trace
    assert ours == trace == [False, False, True, False, True, True, False]


def test_available_schedules_and_errors():
    assert S.available_schedules() == fs.available_schedules()
    assert S.cos(0.5) == pytest.approx(0.5)  # a schedule is also a function of pct_train
    with pytest.raises(ValueError, match="start_pct=0.8 is after end_pct=0.2"):
        S.Schedule(S.sched_lin, start_pct=0.8, end_pct=0.2)
    with pytest.raises(TypeError, match="sched_func must be a function"):
        S.Schedule(0.5)


def test_values_for_plotting_leave_the_state_alone():
    S.cos.progress(0.3)
    pcts, vals = S.cos.values(11, target=100)
    assert vals[0] == 0 and vals[-1] == 100 and vals[5] == pytest.approx(50)
    assert S.cos._current_progress == S.cos.progress(0.3)
    assert math.isclose(S.cos.progress(0.3), (1 - math.cos(math.pi * 0.3)) / 2)
    S.cos.reset()
