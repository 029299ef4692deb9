"""The dashboard: a run's status, experiments, progress, diffs and logs as web pages."""
