"""Model compression for beam_dl model directories: int8 quantization
(`quantize`, with qwix), magnitude pruning during training (`pruning`) and
teacher-student distillation (`distill`). Every result is a normal model
directory that `JaxModelHandler` and the pipelines serve unchanged.
See docs/compression.md.
"""
