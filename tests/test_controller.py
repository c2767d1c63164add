"""The controller on synthetic logit sequences: known surprisal/entropy, windows, events."""

import math

import torch

from clada_compile import CladaConfig
from clada_compile.controller import Controller, token_signals


def test_signals_on_known_distributions():
    V = 16
    uniform = torch.zeros(1, V)
    s, e, bad = token_signals(uniform, torch.tensor([3]))
    assert math.isclose(float(s), 1.0, rel_tol=1e-6) and math.isclose(float(e), 1.0, rel_tol=1e-6)
    # two equally likely tokens: entropy 1 bit, surprisal 1 bit, normalized by log2(16) = 4
    two = torch.full((1, V), -1e4)
    two[0, :2] = 0.0
    s, e, _ = token_signals(two, torch.tensor([0]))
    assert math.isclose(float(s), 0.25, rel_tol=1e-5) and math.isclose(float(e), 0.25, rel_tol=1e-5)
    assert not bad.any()


def test_nonfinite_logits_are_max_load_not_nan():
    logits = torch.tensor([[float("nan")] * 8, [0.0] * 7 + [float("inf")]])
    s, e, bad = token_signals(logits, torch.tensor([0, 7]))
    assert bad.tolist() == [True, True]
    assert torch.isfinite(s).all() and torch.isfinite(e).all()
    ctl = Controller(CladaConfig(update_window=2, schedule="clada"), torch.full((3,), 0.1))
    for _ in range(4):
        d = ctl.observe(float(s[0]), float(e[0]))
        assert torch.isfinite(d.taus).all()


def test_windows_thresholds_and_events():
    cfg = CladaConfig(update_window=4, surprisal_threshold=0.5, entropy_threshold=0.5, schedule="clada",
                      high_load_scale=0.5, low_load_scale=2.0, reselect=True)
    base = torch.tensor([0.2, 0.4])
    ctl = Controller(cfg, base)
    window = [(0.4, 0.4), (0.3, 0.3), (0.2, 0.2), (0.1, 0.1)]
    decisions = [ctl.observe(s, e) for s, e in window]
    assert [d.load for d in decisions] == ["warmup"] * 3 + ["low"]
    # the first window closes at token 4: thresholds = median of the window = 0.25
    assert math.isclose(ctl.s_threshold, 0.25) and math.isclose(ctl.e_threshold, 0.25)
    high = ctl.observe(0.9, 0.9)
    assert high.load == "high" and high.reselect and torch.allclose(high.taus, base * 0.5)
    mid = ctl.observe(0.9, 0.1)
    assert mid.load == "mid" and torch.allclose(mid.taus, base)
    low = ctl.observe(0.1, 0.1)
    assert low.load == "low" and torch.allclose(low.taus, base * 2.0)
    again = ctl.observe(0.95, 0.95)  # high again, but within the same window: no second re-selection
    assert again.load in ("high", "mid") and not again.reselect
    assert ctl.events == 1


def test_static_schedule_keeps_base():
    ctl = Controller(CladaConfig(update_window=2, schedule="static"), torch.tensor([0.3]))
    for s in (0.1, 0.9, 0.2, 0.95, 0.99):
        assert torch.equal(ctl.observe(s, s).taus, torch.tensor([0.3]))
