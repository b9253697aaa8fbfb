"""Copy a run of scripts/make_mini_world_models.sh into adapters/mini-world/ with its manifest.

    python scripts/ship_mini_world.py RUN_DIR [DEST]
"""

import sys

from genret.world.shipped import MINI_WORLD, ship

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(ship(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else MINI_WORLD))
