"""Ray job entrypoints: `python -m jobs.<name> --config jobs/configs/<x>.yaml key=value ...`."""
