"""``python -m lobass.report DIR [--out OUT] [--wandb-project NAME] [--equivalence-margin M]``."""

from lobass.report import main

main()
