"""The data the models learn from: the trajectory store, one format for frames and latents
(``trajectory_store``: shards, episodes, the train/held-out split), and the latent gate (``latent_validation``,
stage ``validated_latents``). Docstring only: import the modules themselves."""
