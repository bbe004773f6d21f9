"""Everything that is not the math: settings, logging, the job store, the watcher,
the engine worker loop and the command line."""
