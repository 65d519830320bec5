"""The element types of beam_dl's PCollections, as Beam type hints.

Public PTransforms declare them (`with_input_types` / `with_output_types`),
so Beam checks at pipeline construction that a transform is applied to the
elements it reads (`pipeline_type_check`, on by default) and picks coders
from them. One name per element shape; the record classes themselves live
with their codecs (`Event`, `SequenceRecord`, `PaddedBatch`).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import numpy as np
from apache_beam.io.fileio import ReadableFile

# A dead letter {"key", "stage", "reason", ...} (beam_dl.core.deadletter).
DeadLetter = Dict[str, Any]
# A JSON-able output record: features, predictions, drift reports, late events.
Record = Dict[str, Any]
# (key, encoded image), optionally followed by metadata (path, label). The
# image is its bytes, or the file to read them from (ReadImageFiles with
# defer_read=True: DecodeImages reads it on its decode thread).
EncodedImage = Union[Tuple[str, bytes], Tuple[str, bytes, Any], Tuple[str, ReadableFile], Tuple[str, ReadableFile, Any]]
# (key, image array [H, W, C]), optionally followed by metadata.
DecodedImage = Union[Tuple[str, np.ndarray], Tuple[str, np.ndarray, Any]]
# (key, model input array): what RunInference's keyed handler reads.
KeyedArray = Tuple[str, np.ndarray]
# (file name, serialized record) from a TFRecord file; (key, raw example bytes).
KeyedBytes = Tuple[str, bytes]
# (key, {feature name: array}) from a saved tf.Transform graph.
KeyedFeatures = Tuple[str, Dict[str, Any]]
# A feature dict {name: number or list of numbers} (drift profiles).
FeatureDict = Dict[str, Any]
# A text line as read from a file (ReadFromText with BytesCoder gives bytes).
TextLine = Union[str, bytes]
