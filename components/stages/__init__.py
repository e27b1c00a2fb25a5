"""One module per DVC stage, each with ``add_arguments(parser)`` and ``main(args)``; see ``components.cli``.

Keep module-level imports light (argparse, params): ``gamengen --help`` imports every stage module,
so torch, vizdoom and friends are imported inside ``main``.
"""
