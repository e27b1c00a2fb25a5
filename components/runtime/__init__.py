"""What ships and runs without torch: the ONNX graphs (``export``), the playable export the ``onnx_export`` stage
writes (``playable``: graphs, held-out contexts, manifest, parity report), its contract (``export_contract``: the
manifest, the graphs' inputs and outputs) and the decoder split for the pipelined player (``decoder_split``).
Docstring only: import the modules themselves."""
