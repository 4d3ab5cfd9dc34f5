import sys

from vismech.app.cli import main

sys.exit(main())
