"""The suites of `fusedrl bench`, one module each: `rows(ctx)` measures its cases on ctx's device
and returns rows of results.py's schema."""
