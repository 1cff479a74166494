"""A run's settings as data: the config dataclasses (each setting defined once) and the command-line
options derived from them."""
