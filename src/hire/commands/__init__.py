"""`hire <verb>`: one module per verb. Each has ``add_arguments(parser)`` and ``run(args) -> int``:
it checks the flags, calls one library function and prints the result. ``VERBS`` is the order
``hire --help`` lists them in; ``hire.cli`` assembles the parser from it."""

from hire.commands import bench, calibrate, eval, generate, models, scaling, serve, sparsify_train, train, tune

VERBS = {
    "eval": eval,
    "bench": bench,
    "generate": generate,
    "serve": serve,
    "calibrate": calibrate,
    "train": train,
    "sparsify-train": sparsify_train,
    "tune": tune,
    "scaling": scaling,
    "models": models,
}

__all__ = ["VERBS"]
