"""The PPO and GRPO stage over the shared rollout (engine/stages/rollout). trainer.py is the recipe
(`train_ppo`: the models, then one iteration after another: sample, build the experience, update);
the pieces below it, by step:

- the experience: experience.py (scored rows -> batch.py's `PPOBatch`: reference and old
  log-probs, values, rewards, advantages), forwards.py, advantages.py;
- the update: update.py (the minibatch updates), ptx.py (PPO-ptx);
- controllers.py (the KL controller and the reward moments, restored from the loop state).
"""
