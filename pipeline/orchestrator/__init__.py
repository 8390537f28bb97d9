"""The orchestrator: one job from a model to the Hub (run), many jobs (jobs)."""
