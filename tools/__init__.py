"""tfmp's command-line tools (`python -m tools.<name>`)."""

from tools import startup

startup.quiet_tensorflow_startup()  # before Keras loads TensorFlow: its native lines hidden
