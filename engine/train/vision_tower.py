"""A vision-language model's vision tower in training: frozen unless train.train_vision asks for
it. Frozen, its parameters take no gradient and no optimizer state, and the tower's forward runs
without building a graph (the features are context for the decoder, as the prompt's tokens are)."""
from __future__ import annotations


def set_vision_trainable(model, trainable: bool) -> None:
    """The tower (`model.visual`, absent in a text model: nothing to do) trainable or frozen."""
    visual = getattr(model, "visual", None)
    if visual is not None:
        visual.requires_grad_(trainable)
