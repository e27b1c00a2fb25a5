"""The ONNX side: the graphs (``export``: export, check and compare with PyTorch), the playable export the
``onnx_export`` stage writes (``playable``: graphs, held-out contexts, manifest, parity report), its contract
(``export_contract``: the manifest, the graphs' inputs and outputs), and what the player runs without torch
(``sessions``, and ``decoder_split`` for the pipelined decoder). Docstring only: import the modules themselves."""
