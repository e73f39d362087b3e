"""`fusedrl demo`: the whole recipe on tasks a program checks, built from nothing (no downloads).
sorting.py runs SFT -> reward model -> PPO (or GRPO) on sorting digits (sorting_task.py: the task,
data and tiny model); tool.py runs SFT -> GRPO with a calculator tool on adding numbers
(tool_task.py). Both train through the stages (engine/stages/) as any run does."""
