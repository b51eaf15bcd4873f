"""Tools a person runs beside the pipeline, not stages of it: the demo, benchmarks, the embedded broker,
the result consumer and the synthetic world the bundled model is trained and scored on."""
