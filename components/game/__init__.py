"""The real game and who plays it: ViZDoom (``environment``), the paper's reward (``reward``), the PPO agent
(``agent``, stage ``rl_agent``) and the recording of play from random to skilled (``collection``, stage
``raw_trajectories``). Docstring only: import the modules themselves."""
