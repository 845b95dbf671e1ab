"""The runs, one module each, and the only code that drives a whole one (the CLI calls them): ``distill``,
``score``, ``tune``, ``evaluate``, ``demo``. Each reads top to bottom as its run happens."""
