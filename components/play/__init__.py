"""Playing the learned game: the keymap, the game state and the WebSocket player server (``server``), the static
in-browser bundle (``web_bundle``) and the pages both engines serve (``page/``). Docstring only: import the
modules themselves."""
