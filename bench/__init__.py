"""fusedrl.bench: the benchmark a user runs, `fusedrl bench kernels | generate | train | rl | all |
compare` (command.py parses, runner.py runs the suites of suites/, results.py writes one schema).
The bench_*.py modules are the measuring code of each kernel family or engine path, each also a
script (`python -m fusedrl.bench.bench_generate`). This package's __init__ imports nothing, so the
`fusedrl` command's parsing stays torch-free."""
