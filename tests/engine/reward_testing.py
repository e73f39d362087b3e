"""Reward functions for the tests, in a module of their own that imports nothing: a run's worker
process imports it in a fraction of a second (a test module would bring torch)."""


def vowel_fraction(prompts, responses):
    """Toy reward function on texts (what reward_fn receives): the fraction of vowels. As
    `reward_fn="reward_testing:vowel_fraction"`, importable by torchrun ranks and reward workers
    (tests/engine is on their path)."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]
