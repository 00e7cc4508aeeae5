import sys

from megatier.cli import main

sys.exit(main())
