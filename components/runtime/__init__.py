"""What ships and runs without torch: the ONNX export and its contract (``export``, ``export_contract``: the
manifest, the graphs' inputs and outputs, the parity check) and the decoder split for the pipelined player
(``decoder_split``). Docstring only: import the modules themselves."""
