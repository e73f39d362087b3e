"""What a run leaves on disk and how it is written: durable.py (written under a temp name and
renamed, fsynced, a manifest to verify it by, no leftovers), run_dir.py (the directories commands
write: the marker, one run's lock, what may be replaced), run_paths.py (a run's input paths pinned
when it starts) and path_checks.py (the paths a command is given, checked before anything loads)."""
