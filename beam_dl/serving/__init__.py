"""Serving Flax models in Beam's RunInference: `handler.JaxModelHandler`
(Beam's `ModelHandler` for beam_dl model directories), where the model lives
(`devices`), out-of-memory recovery (`oom`), model outputs -> records
(`postprocess`), and the jax2tf SavedModel path (`savedmodel_export`,
`savedmodel_handler`)."""
