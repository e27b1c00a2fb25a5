"""Judging a model on held-out play: the metrics, baselines, rollouts and turn test (``scoring``), long play
(``long_play``), the view-motion measures (``view_motion``), the evaluation stage's report (``report``), the paper's
ablations (``ablations``), champion/challenger promotion (``promotion``) and the champion's GTO registration
(``registry``). Docstring only: import the modules themselves."""
