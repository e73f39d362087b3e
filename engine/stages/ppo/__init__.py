"""The PPO and GRPO stage. trainer.py is the recipe (`train_ppo`: the models, then one iteration
after another: sample, build the experience, update); the pieces below it, by step:

- the rollout: sampler.py (the run's one rollout interface, `build_sampler`); its rows,
  answer_rows.py (single-turn answers: a trajectory of one turn) or agent_rows.py (multi-turn
  trajectories with tools or an environment: engine/agents); its schedule, which chooses only the
  requests and the stop rules, whole_groups.py (with DAPO's dynamic sampling) or partial.py
  (answers and trajectories carried across iterations); sampled_rows.py (everything after sampling,
  for every mode: the sampling parameters, the context group's rows, the pack with routing
  records, the scores), reward_scores.py (reward model or functions), prompt_stream.py, packs.py,
  scored_rows.py (the scored rows: `Samples`);
- the experience: experience.py (scored rows -> batch.py's `PPOBatch`: reference and old
  log-probs, values, rewards, advantages), forwards.py, microbatches.py, advantages.py,
  turn_credit.py (per-turn rewards and advantages);
- the update: update.py (the minibatch updates), ptx.py (PPO-ptx);
- the run's state: models.py (`PPOModels`), state.py (the loop state), phase_timer.py.
"""
