"""The memory plan: per-GPU bytes of a training stage in each phase, before anything is launched.

`fusedrl plan STAGE ...` (cli) and every stage's start-up check (`check.refuse_unfit`) run the same
`phases.plan_stage`: the stage's models are built on the meta device with the engine's own classes
(model_bytes.py), and the bytes follow the engine's own allocation rules (phases.py: what FSDP2
shards, what is gathered whole, the optimizer's state, the KV pool; activations.py: activations
per token budget). This package's __init__ imports nothing, so `fusedrl --help` stays torch-free.
"""
