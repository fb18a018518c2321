"""The claims of the cards of the long-unroll checkpoints (``ortho_long``, ``ortho_long_p32`` and
the default ``ortho_long_mixture``) against tuned Adam: in distribution on the MNIST-1D MLP
(fast, in CI) and on the 10,000-step autoencoder of ``real_models`` (slow), which the vectors'
AdamW rate of 1e-2 ran away on when meta-trained over short unrolls. All three come from the
``ortho_long`` recipe: population 8, population 32, and over a task mixture."""

from __future__ import annotations

import pytest
from _shipped_curves import autoencoder_ratios, shipped_curves

from l2o.eval.metrics import steps_to_reach

#: (checkpoint, its id, the step at which its card says it reaches tuned Adam's final loss)
SHIPPED = [
    ("ortho_long", "ortho_mlp-4584d02732b3", 130),
    ("ortho_long_p32", "ortho_mlp-e36010a19997", 129),
    ("ortho_long_mixture", "ortho_mlp-494685a8a383", 118),
]


@pytest.mark.parametrize(("checkpoint", "checkpoint_id", "card_step"), SHIPPED)
def test_in_distribution_it_reaches_tuned_adams_final_loss_in_75_percent_of_the_steps(
    tmp_path, checkpoint, checkpoint_id, card_step
):
    """Cards: 200 steps, 8 held-out seeds: Adam's final loss at step ``card_step`` (0.65 of 200;
    ``ortho_adamw_vectors``: 153); the test asks for at most 0.75 of the steps."""
    adam, learned = shipped_curves(checkpoint, checkpoint_id, "ortho_long", 200, 8, tmp_path)
    reached = steps_to_reach(learned, float(adam[-1]))
    assert reached is not None and reached <= 0.75 * 200, (reached, card_step)


@pytest.mark.slow
@pytest.mark.parametrize(("checkpoint", "checkpoint_id", "card_step"), SHIPPED)
def test_the_10000_step_autoencoder_does_not_run_away(checkpoint, checkpoint_id, card_step):
    """Cards: the real_models autoencoder, 10,000 steps, 2 held-out seeds, no guard: training and
    held-out loss at most 2x tuned Adam's (l2o-eval: `ortho_long` 1.30x and 1.40x,
    `ortho_long_p32` 0.99x and 1.05x, `ortho_long_mixture` 1.09x and 0.94x; with 20-step
    truncations the same vector rate ended at training loss 58)."""
    training, held_out = autoencoder_ratios(checkpoint, checkpoint_id)
    assert training <= 2 and held_out <= 2, (training, held_out)
