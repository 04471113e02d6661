"""The study: its settings, the metrics, the pruning rankings and methods, the statistics, the typed results, and the run that ties them together."""
