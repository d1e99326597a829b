"""The `hierloc` command line: the typer app and its small commands (main.py), ``predict``
(predict.py), ``evaluate`` (evaluate.py), and what ``run`` needs around the flow: the config
(config.py) and a clean stop on SIGTERM (signals.py). ``python -m flows.cli`` runs it."""
