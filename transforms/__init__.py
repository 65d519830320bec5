"""beam_dl's public PTransforms."""
from transforms.images import DecodeImages, ReadImageExamples, ReadImageFiles
from transforms.inference import ClassifyImages, InferenceOutputs, RunInferenceWithDeadLetters
from transforms.io import WriteJsonLines

__all__ = [
    'ClassifyImages',
    'DecodeImages',
    'InferenceOutputs',
    'ReadImageExamples',
    'ReadImageFiles',
    'RunInferenceWithDeadLetters',
    'WriteJsonLines',
]
