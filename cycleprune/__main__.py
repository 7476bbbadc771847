import sys

from cycleprune.cli import main

sys.exit(main())
