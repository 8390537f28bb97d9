"""The command line: `python -m pipeline COMMAND`, flags generated from the stage configs."""
