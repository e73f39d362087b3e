"""verl's seams in every verl process: importing this module runs verl.register() (our head,
policy loss and advantage estimators) in the process that imports it. verl looks its policy loss
up inside its Ray workers, and Megatron's forward binds the head when its module is imported, so
a register() in the driver does not reach them: name this module in one of verl's own hooks,
which import a module in each process that runs verl code (docs/integrations.md):

    VERL_USE_EXTERNAL_MODULES=fusedrl.kernels.integrations.verl_worker   (environment: read by
        `import verl` in every process, before verl's models are imported; the workers get it
        from the driver's environment on a local Ray cluster, or from ray_init's runtime_env)
    actor_rollout_ref.model.external_lib=fusedrl.kernels.integrations.verl_worker   (config:
        imported by each worker's init_model, before it builds the model)
"""
from .verl import register

register()
