"""A user's reward functions: loaded from `module:function` specs or passed as callables, called as
TRL calls them (functions.py), each contained in a worker process or a thread (workers.py,
threads.py), several combined by weights (combined.py)."""
