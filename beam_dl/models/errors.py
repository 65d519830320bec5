"""The error a model directory that cannot be served raises (its message names
the file and the field), shared by the format and the quantized variants."""


class CheckpointError(ValueError):
  """A model directory that cannot be loaded, with the reason."""
