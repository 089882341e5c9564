import sys

from fleetcli.fleetd import main

sys.exit(main())
