"""Each loss against values computed by hand (plain Python math), plus its gradient and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from twinkle.loss import get_loss, list_losses
from twinkle.types import InvalidInputError, UnsupportedError

LP = [-0.5, -1.0, -2.0]
Q = [-0.7, -0.9, -2.5]
A = [1.0, -2.0, 0.5]


def _run(name, lps, inputs, config=None):
    spec = get_loss(name)
    lp_t = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in lps]
    inp_t = [{k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()} for d in inputs]
    out = spec.fn(lp_t, inp_t, spec.resolve_config(config))
    out.loss.backward()
    return out, [t.grad.tolist() for t in lp_t]


def test_cross_entropy_weighted_sum():
    w = [1.0, 0.0, 2.0]
    out, g = _run("cross_entropy", [LP, [-3.0]], [{"weights": w}, {}])
    expected = -(-0.5 * 1 + -1.0 * 0 + -2.0 * 2) - (-3.0)  # weights default to 1
    assert out.loss.item() == pytest.approx(expected)
    assert out.metrics["loss:sum"] == pytest.approx(expected)
    assert g[0] == pytest.approx([-1.0, 0.0, -2.0]) and g[1] == pytest.approx([-1.0])
    assert out.outputs[0]["logprobs"].tolist() == pytest.approx(LP)


def test_cross_entropy_2d_targets():
    lp = [[-0.1, -0.2], [-0.3, -0.4]]
    w = [[1.0, 0.5], [0.0, 2.0]]
    out, _ = _run("cross_entropy", [lp], [{"weights": w}])
    assert out.loss.item() == pytest.approx(-(-0.1 - 0.1 + 0 - 0.8))


def test_importance_sampling():
    out, g = _run("importance_sampling", [LP], [{"logprobs": Q, "advantages": A}])
    r = [math.exp(a - b) for a, b in zip(LP, Q, strict=True)]
    assert out.loss.item() == pytest.approx(-sum(ri * ai for ri, ai in zip(r, A, strict=True)))
    assert g[0] == pytest.approx([-ri * ai for ri, ai in zip(r, A, strict=True)])  # d(-r A)/dlp = -r A


def test_ppo_clips_with_default_and_custom_bounds():
    def expected(lo, hi):
        tot = 0.0
        for lp, q, a in zip(LP, Q, A, strict=True):
            r = math.exp(lp - q)
            tot += -min(r * a, min(max(r, lo), hi) * a)
        return tot

    out, g = _run("ppo", [LP], [{"logprobs": Q, "advantages": A}])
    assert out.loss.item() == pytest.approx(expected(0.8, 1.2))
    # token 0: r=e^0.2=1.22>1.2 with A>0 -> clipped, zero gradient; token 2: r=e^0.5=1.65, A>0 -> clipped
    assert g[0][0] == 0.0 and g[0][2] == 0.0
    assert g[0][1] == pytest.approx(-math.exp(-0.1) * -2.0)
    out2, _ = _run("ppo", [LP], [{"logprobs": Q, "advantages": A}], {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    assert out2.loss.item() == pytest.approx(expected(0.5, 2.0))
    assert out.metrics["clip_fraction:mean"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("config,lo,hi", [(None, 0.0, 4.0), ({"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, 0.8, 1.2)])
def test_cispo_stop_gradient_on_ratio(config, lo, hi):
    """Tinker's documented cispo default is the one-sided clip 0.0 / 4.0 (not ppo's 0.8 / 1.2)."""
    lps = [-0.5, -3.0, -2.0]  # r = exp(lp − q) is 1.22, 0.007 and 1.65: the 0.8/1.2 clip would bind twice
    out, g = _run("cispo", [lps], [{"logprobs": Q, "advantages": A}], config)
    c = [min(max(math.exp(lp - q), lo), hi) for lp, q in zip(lps, Q, strict=True)]
    assert out.loss.item() == pytest.approx(-sum(ci * lp * a for ci, lp, a in zip(c, lps, A, strict=True)))
    assert g[0] == pytest.approx([-ci * a for ci, a in zip(c, A, strict=True)])


def test_dro():
    beta = 0.3
    out, g = _run("dro", [LP], [{"logprobs": Q, "advantages": A}], {"beta": beta})
    exp = -sum(lp * a - 0.5 * beta * (lp - q) ** 2 for lp, q, a in zip(LP, Q, A, strict=True))
    assert out.loss.item() == pytest.approx(exp)
    assert g[0] == pytest.approx([-(a - beta * (lp - q)) for lp, q, a in zip(LP, Q, A, strict=True)])


def test_dpo_pairs():
    chosen, rejected = [-1.0, -0.5, -0.2], [-0.3, -2.0, -1.5]
    ref_c, ref_r = [-1.0, -0.8, -0.4], [-0.3, -1.5, -1.0]
    w = [0.0, 1.0, 1.0]  # first token is the prompt
    out, g = _run("dpo", [chosen, rejected],
                  [{"weights": w, "ref_logprobs": ref_c}, {"weights": w, "ref_logprobs": ref_r}], {"beta": 0.5})
    rc = 0.5 * ((-0.5 + 0.8) + (-0.2 + 0.4))
    rr = 0.5 * ((-2.0 + 1.5) + (-1.5 + 1.0))
    margin = rc - rr
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-margin)))
    assert out.metrics["dpo_margin:mean"] == pytest.approx(margin)
    assert out.metrics["dpo_accuracy:mean"] == 1.0
    assert out.metrics["chosen_reward:mean"] == pytest.approx(rc)
    sig = 1 / (1 + math.exp(margin))  # d loss / d margin = -sigmoid(-margin)
    assert g[0] == pytest.approx([0.0, -sig * 0.5, -sig * 0.5])
    assert g[1] == pytest.approx([0.0, sig * 0.5, sig * 0.5])
    assert get_loss("dpo").config_defaults["beta"] == 0.1


def test_registry_and_config_errors():
    assert set(list_losses()) >= {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "dpo"}
    with pytest.raises(UnsupportedError) as e:
        get_loss("nope")
    assert e.value.field == "loss_fn"
    with pytest.raises(InvalidInputError) as e:
        get_loss("ppo").resolve_config({"clip_low_threshold": "abc"})
    assert e.value.field == "loss_fn_config.clip_low_threshold"
    with pytest.raises(InvalidInputError):
        get_loss("ppo").resolve_config({"clip_low_threshold": 2.0, "clip_high_threshold": 1.0})
    assert get_loss("ppo").resolve_config({"clip_high_threshold": "1.5"})["clip_high_threshold"] == 1.5


def test_documented_defaults():
    """Audited against Tinker's loss documentation (docs/models.md, "Loss defaults")."""
    assert get_loss("ppo").config_defaults == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert get_loss("cispo").config_defaults == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert get_loss("dro").config_defaults == {"beta": 0.05}
    assert get_loss("cross_entropy").config_defaults == {}
    assert get_loss("importance_sampling").config_defaults == {}


@pytest.mark.parametrize("value", ["nan", "NaN", "Infinity", "-inf", float("nan"), float("inf"), 1e309, "1e400"])
def test_dro_beta_non_finite_refused(value):
    with pytest.raises(InvalidInputError) as e:
        get_loss("dro").resolve_config({"beta": value})
    assert e.value.field == "loss_fn_config.beta" and e.value.status == 400


@pytest.mark.parametrize("name,config,field", [
    ("ppo", {"clip_low_threshold": -0.1}, "clip_low_threshold"),
    ("ppo", {"clip_high_threshold": 0}, "clip_high_threshold"),
    ("ppo", {"clip_high_threshold": True}, "clip_high_threshold"),
    ("ppo", {"clip_high_threshold": [1]}, "clip_high_threshold"),
    ("cispo", {"clip_high_threshold": 1e30}, "clip_high_threshold"),
    ("dro", {"beta": -1}, "beta"),
    ("dpo", {"beta": 0}, "beta"),
    ("dro", {"bta": 0.1}, "bta"),  # an unknown key is named, not ignored
    ("cross_entropy", {"beta": 0.1}, "beta"),
])
def test_config_ranges(name, config, field):
    with pytest.raises(InvalidInputError) as e:
        get_loss(name).resolve_config(config)
    assert e.value.field == f"loss_fn_config.{field}"


def test_registry_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; import twinkle.loss as L; L.get_loss('dro').resolve_config({'beta': 1});"
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(L.list_losses()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
