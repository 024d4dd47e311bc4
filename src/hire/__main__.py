import sys

from hire.cli import main

sys.exit(main())
