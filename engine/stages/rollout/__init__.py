"""What every RL stage (PPO, GRPO, distillation) shares: the models, the loop state, the rollout
and the prompt stream. By step:

- building: build.py (`build_models`: the policy shared with the actor, reference, critic and
  scorer; `open_rewards`, `build_optimizers`, `trainables`), models.py (`PPOModels`),
  optimizers.py, state.py (`PPOState`, the loop state a checkpoint holds), phase_timer.py;
- the rollout: sampler.py (the run's one rollout interface, `build_sampler`); its rows,
  answer_rows.py (single-turn answers: a trajectory of one turn) or agent_rows.py (multi-turn
  trajectories with tools or an environment: engine/agents), each an `advance(rows, stop)` over
  the typed groups in flight (engine/inference/in_flight.py); its schedule, which chooses only the
  requests and the stop rules, whole_groups.py (every group to its end) or partial.py (groups
  carried across iterations), both with DAPO's dynamic sampling (dynamic_sampling.py);
  sampled_rows.py (the rows as `Generated`, and everything after sampling, for every mode),
  reward_scores.py, prompt_stream.py, packs.py, scored_rows.py (the scored rows: `Samples`),
  turn_credit.py (per-turn rewards and advantages), group_advantages.py, microbatches.py.
"""
