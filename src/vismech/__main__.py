import sys

from vismech.cli import main

sys.exit(main())
