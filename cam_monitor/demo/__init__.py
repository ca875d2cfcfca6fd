"""The built-in demo: "Decoy Digits", a small CNN, and the run that shows the monitor at work."""
