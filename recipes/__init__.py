"""tfmp's training recipes (`python -m recipes.<name>`)."""

from tools import startup

startup.quiet_tensorflow_startup()  # before Keras loads TensorFlow: its native lines hidden
