"""``python -m lobass.report DIR [--out OUT] [--wandb-project NAME]``."""

from lobass.report import main

main()
