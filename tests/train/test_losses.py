"""Each loss against a hand computation on small tensors: values, gradients, clipping, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from nightlab.train import losses
from nightlab.train.errors import LossError


def run(name, logp, config=None, **inputs):
    """Loss value, elementwise loss and d(loss)/d(logp) for plain lists."""
    logp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()}
    losses.check_inputs(name, tuple(logp.shape), {k: tuple(v.shape) for k, v in tensors.items()})
    loss, elementwise = losses.compute(name, logp, tensors, losses.resolve_config(name, config))
    loss.backward()
    return loss.item(), elementwise.detach().tolist(), logp.grad.tolist()


def test_cross_entropy_with_negative_weights():
    loss, elem, grad = run("cross_entropy", [-1.0, -2.0, -0.5], weights=[1.0, -0.5, 0.0])
    assert elem == pytest.approx([1.0, -1.0, 0.0])
    assert loss == pytest.approx(0.0)
    assert grad == pytest.approx([-1.0, 0.5, 0.0])


def test_cross_entropy_without_weights_counts_every_target():
    loss, _, _ = run("cross_entropy", [-1.0, -2.0])
    assert loss == pytest.approx(3.0)


def test_cross_entropy_soft_targets():
    logp = [[-0.1, -2.0], [-1.0, -0.5]]
    loss, elem, grad = run("cross_entropy", logp, weights=[[0.75, 0.25], [0.5, 0.5]])
    assert elem == pytest.approx([0.75 * 0.1 + 0.25 * 2.0, 0.5 * 1.0 + 0.5 * 0.5])
    assert loss == pytest.approx(sum(elem))
    assert sum(grad, []) == pytest.approx([-0.75, -0.25, -0.5, -0.5])


def test_importance_sampling():
    logp, q, adv = [-1.0, -2.0], [-1.5, -1.0], [2.0, -1.0]
    loss, elem, grad = run("importance_sampling", logp, logprobs=q, advantages=adv)
    ratios = [math.exp(lp - lq) for lp, lq in zip(logp, q, strict=True)]
    assert elem == pytest.approx([-ratios[0] * 2.0, ratios[1]])
    assert grad == pytest.approx([-ratios[0] * 2.0, ratios[1]])  # d(-r*A)/dlogp = -r*A


def test_ppo_clips_only_where_the_ratio_leaves_the_band_in_the_advantage_direction():
    # token 0: r = e^0.5 > 1.2 with A > 0 -> clipped, no gradient
    # token 1: r = e^0.5 > 1.2 with A < 0 -> unclipped term is the min, gradient flows
    # token 2: r = e^-0.5 < 0.8 with A < 0 -> clipped, no gradient
    # token 3: r = 1 inside the band -> plain ratio
    logp = [0.0, 0.0, -1.0, -1.0]
    q = [-0.5, -0.5, -0.5, -1.0]
    adv = [1.0, -1.0, -1.0, 2.0]
    loss, elem, grad = run("ppo", logp, logprobs=q, advantages=adv)
    r = math.exp(0.5)
    assert elem == pytest.approx([-1.2, r, 0.8, -2.0])
    assert grad == pytest.approx([0.0, r, 0.0, -2.0])
    assert loss == pytest.approx(sum(elem))


def test_ppo_thresholds_from_config_and_per_token_inputs():
    logp, q, adv = [0.0, 0.0], [-0.5, -0.5], [1.0, 1.0]
    _, elem, _ = run(
        "ppo", logp, {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}, logprobs=q, advantages=adv
    )
    assert elem == pytest.approx([-1.5, -1.5])
    _, elem, _ = run("ppo", logp, logprobs=q, advantages=adv, clip_high_threshold=[1.1, 10.0])
    assert elem == pytest.approx([-1.1, -math.exp(0.5)])


def test_cispo_keeps_gradient_through_logp_with_a_clipped_weight():
    logp, q, adv = [0.0, -1.0], [-0.5, -1.0], [1.0, -2.0]
    loss, elem, grad = run("cispo", logp, logprobs=q, advantages=adv)
    assert elem == pytest.approx([-1.2 * 0.0 * 1.0, -1.0 * -1.0 * -2.0])
    assert grad == pytest.approx([-1.2, 2.0])  # -sg(clip(r)) * A


def test_dro():
    logp, q, adv = [-1.0, -2.0], [-1.5, -1.0], [1.0, -1.0]
    beta = 0.5
    loss, elem, grad = run("dro", logp, {"beta": beta}, logprobs=q, advantages=adv)
    expected = [-(lp * a - 0.5 * beta * (lp - lq) ** 2) for lp, lq, a in zip(logp, q, adv, strict=True)]
    assert elem == pytest.approx(expected)
    assert grad == pytest.approx([-(a - beta * (lp - lq)) for lp, lq, a in zip(logp, q, adv, strict=True)])


def test_gspo_uses_the_masked_sequence_ratio_for_every_token():
    logp = [-1.0, -1.0, -2.0]
    q = [-1.2, -1.4, 0.0]  # the last token (prompt-like) would dominate if it were in the mask
    adv = [1.0, 1.0, 0.0]
    loss, elem, grad = run("gspo", logp, logprobs=q, advantages=adv)
    s = math.exp((0.2 + 0.4) / 2)  # = e^0.3 > 1.2 -> clipped for A > 0
    assert s > 1.2
    assert elem == pytest.approx([-1.2, -1.2, 0.0])
    assert grad == pytest.approx([0.0, 0.0, 0.0])
    # an explicit mask over the first token only: s = e^0.2 = 1.2214 -> still clipped; widen the band instead
    _, elem, grad = run(
        "gspo",
        logp,
        {"clip_high_threshold": 2.0},
        logprobs=q,
        advantages=adv,
        sequence_ratio_mask=[1.0, 0.0, 0.0],
    )
    s = math.exp(0.2)
    assert elem == pytest.approx([-s, -s, 0.0])
    assert grad == pytest.approx([-s, -s, 0.0])  # each token: d(s * exp(logp - sg logp))/dlogp = s


def test_stable_reinforce_against_the_formula_in_docs_service_md():
    # token 0: drawn with mu = e^-1, pi = e^0 -> pi/mu = e > 2: weight truncated to 2; KL to q = e^-0.5
    # token 1: drawn with mu = e^-0.5, pi = e^-1 -> weight e^-0.5, untruncated; pi = q: no KL
    # token 2: a prompt token (mask 0): nothing, whatever its inputs
    logp, q, mu = [0.0, -1.0, -3.0], [-0.5, -1.0, 0.0], [-1.0, -0.5, 0.0]
    adv, mask, kl_coeff = [1.0, -2.0, 0.0], [1.0, 1.0, 0.0], 0.5
    loss, elem, grad = run(
        "stable_reinforce",
        logp,
        {"kl_coeff": kl_coeff},
        logprobs=q,
        advantages=adv,
        sampling_logprobs=mu,
        sampled_mask=mask,
    )
    w1 = math.exp(-0.5)
    k3 = math.exp(0.5) - 1 - 0.5  # r - 1 - log r with r = pi/q = e^0.5
    assert elem == pytest.approx([-2.0 * 1.0 * 0.0 + kl_coeff * k3, -w1 * -2.0 * -1.0, 0.0])
    assert loss == pytest.approx(sum(elem))
    # the weight is a constant (stop-gradient): d/dlogp = -w * A, plus kl_coeff * (r - 1) from k3
    assert grad == pytest.approx([-2.0 + kl_coeff * (math.exp(0.5) - 1), 2.0 * w1, 0.0])


def test_stable_reinforce_without_recorded_inputs_weighs_every_token_against_q():
    """Straight to the engine (no service to fill them): mu = q and every token counts."""
    logp, q, adv = [-1.0, -2.0], [-1.5, -1.0], [1.0, 1.0]
    _, elem, grad = run("stable_reinforce", logp, {"clip_high_threshold": 1.5}, logprobs=q, advantages=adv)
    w = [min(math.exp(0.5), 1.5), math.exp(-1.0)]
    assert elem == pytest.approx([-w[0] * -1.0, -w[1] * -2.0])
    assert grad == pytest.approx([-w[0], -w[1]])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: losses.resolve_config("nope", None), "unknown loss_fn 'nope'"),
        (lambda: losses.resolve_config("ppo", {"clip_ratio": 0.2}), "no config key 'clip_ratio'"),
        (lambda: losses.resolve_config("dro", {"beta": "big"}), "must be a number"),
        (lambda: losses.check_inputs("ppo", (3,), {"logprobs": (3,)}), "needs loss_fn_inputs['advantages']"),
        (lambda: losses.check_inputs("cross_entropy", (3,), {"weights": (4,)}), "has shape (4,)"),
        (
            lambda: losses.check_inputs("ppo", (3, 2), {"logprobs": (3, 2), "advantages": (3, 2)}),
            "shape (T,)",
        ),
    ],
)
def test_errors_name_what_is_wrong(call, message):
    with pytest.raises(LossError) as info:
        call()
    assert message in str(info.value)
