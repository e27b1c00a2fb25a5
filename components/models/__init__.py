"""The models: the frame autoencoder (``autoencoder``), the world model, a UNet conditioned on past latents and
actions (``world_model``, its action warp in ``motion_warp``, its training in ``world_model_training``), the
diffusion sampler (``sampler``), the 1-step student (``distillation``) and the decoder tuned to its rollouts
(``rollout_decoder``). Docstring only: import the modules themselves."""
