"""Optional inference backends: our components converted to other runtimes.

Each backend lives in its own module and imports its runtime lazily, so `sd` never needs it installed:

    from sd.backends.openvino import compile_models
    pipe = sd.Pipeline(compile_models(sd.load_models(path)))
"""
