import sys

from fleetd.cli import main

sys.exit(main())
