"""The command-line programs: one wrapper, flags from the settings, one file per program."""
