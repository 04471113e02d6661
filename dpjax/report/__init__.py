"""The report: result files, figures and the summary."""
